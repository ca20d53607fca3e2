"""Lesson 9 ex 3: leak half the test items into the pretraining corpus in the MMLU letter layout (150 copies each,
as the notebook's experiment), pretrain the notebook's small model (tiny preset, 128 wide, 300 steps) on the clean
and the leaked corpus, and evaluate both in the mmlu, hellaswag and cloze formats, with the contamination check."""
import json, random, sys
from dataclasses import replace
from pathlib import Path
import torch
torch.set_num_threads(1)
from minillm.config import get_preset, EvalConfig
from minillm.datasets import read_text, split_documents
from minillm.eval.contamination import contamination_report
from minillm.eval.mcq import load_mcq, mmlu_text, LETTERS
from minillm.stages.evaluate import evaluate_run
from minillm.stages.pretrain import pretrain
from minillm.tokenizer import Tokenizer

out = Path("/tmp/ans2/l9")
tok = Tokenizer.load("data/tokenizer")
test_items = load_mcq("data/world/mcq_test.jsonl")
leaked_idx = sorted(random.Random(0).sample(range(len(test_items)), len(test_items) // 2))  # the notebook's half
train_docs = split_documents(read_text("data/world/corpus_train.txt"))
leak = [mmlu_text(test_items[i]) + " " + LETTERS[test_items[i]["answer"]] for i in leaked_idx]
print("a leaked document:", repr(leak[0]))
docs = train_docs + leak * 150
random.Random(0).shuffle(docs)
corpus = out / "corpus_mmlu_leak.txt"
corpus.write_text("\n\n".join(docs) + "\n")
for n, thr in ((4, 0.7), (8, 0.5)):
    for name, c in (("clean", train_docs), ("leaked", docs)):
        rep = contamination_report(test_items, c, n=n, threshold=thr)
        flagged = {i for i, r in enumerate(rep["per_item"]) if r["contaminated"]}
        print(f"check n={n} thr={thr} on the {name} corpus: {len(flagged)} flagged, "
              f"{len(flagged & set(leaked_idx))} of 24 leaked, {len(flagged - set(leaked_idx))} others")
preset = get_preset("tiny")
cfg = replace(preset.model, vocab_size=tok.vocab_size, n_embd=128, n_head=4)
tcfg = replace(preset.pretrain, max_steps=300, eval_interval=300, device="cpu")
for name, path in (("clean", "data/world/corpus_train.txt"), ("leak_mmlu", str(corpus))):
    if not (out / name / "ckpt.pt").exists():
        _, res = pretrain(tok, path, "data/world/corpus_val.txt", cfg, tcfg, str(out / name), progress=False)
        print(f"{name}: val loss {res.val_loss:.3f}, {res.seconds:.0f}s")
rows = {}
for name in ("clean", "leak_mmlu"):
    for fmt in ("mmlu", "hellaswag", "cloze"):
        rep = evaluate_run(out / name, ppl=None, contamination=str(corpus), method=EvalConfig(format=fmt))
        ok = [r["pred"] == r["answer"] for r in rep["mcq"]["per_item"]]
        lk = sum(ok[i] for i in leaked_idx) / 24
        cl = sum(ok[i] for i in range(48) if i not in leaked_idx) / 24
        preds = [r["pred"] for r in rep["mcq"]["per_item"]]
        c = rep["contamination"]
        print(f"{name:9s} {fmt:9s}: all {sum(ok)/48:.3f} leaked half {lk:.3f} clean half {cl:.3f} | "
              f"check (leaked corpus) flags {c['n_contaminated']}, acc clean {c['acc_clean']:.3f} "
              f"contaminated {c['acc_contaminated']:.3f} | most common pred share {max(preds.count(k) for k in set(preds))/48:.2f}")
