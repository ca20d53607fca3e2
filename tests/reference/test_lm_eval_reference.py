"""lm-evaluation-harness runs our model (minillm/stages/harness.py): on a local YAML task over the world's MCQ file
lm-eval's acc and acc_norm equal `evaluate_mcq`'s, on a rolling task its word perplexity equals
`document_perplexity`'s, and generate_until is our greedy decode cut at the stop string. Offline: local JSON files."""
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from minillm.eval.mcq import evaluate_mcq, load_mcq  # noqa: E402
from minillm.eval.perplexity import document_perplexity  # noqa: E402
from minillm.model import GPT, GPTConfig  # noqa: E402
from minillm.runs import load_run, save_run_files  # noqa: E402
from minillm.sampling import generate_completions  # noqa: E402
from minillm.stages.harness import register  # noqa: E402
from minillm.tokenizer import Tokenizer  # noqa: E402
from minillm.utils import atomic_torch_save  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WORLD = ROOT / "data" / "world"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval")
    tok = Tokenizer.load(ROOT / "data" / "tokenizer")
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    run = d / "run"
    save_run_files(run, tok, {"stage": "pretrain", "model": asdict(cfg)})
    atomic_torch_save({"model": GPT(cfg).state_dict(), "run_config": {"stage": "pretrain", "model": asdict(cfg)}},
                      run / "ckpt.pt")
    (d / "mcq.jsonl").write_text("\n".join((WORLD / "mcq_test.jsonl").read_text().splitlines()[:30]) + "\n")
    docs = [x.strip() for x in (WORLD / "corpus_val.txt").read_text().split("\n\n")[:12] if x.strip()]
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": x}) + "\n" for x in docs))
    (d / "world_mcq.yaml").write_text(f"""task: world_mcq
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'mcq.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (d / "world_ppl.yaml").write_text(f"""task: world_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'docs.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
""")
    register()
    return d, run, docs


def test_lm_eval_acc_and_word_perplexity_equal_ours(setup, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    d, run, docs = setup
    r = lm_eval.simple_evaluate(model="minillm", model_args=f"run={run}", tasks=["world_mcq", "world_ppl"],
                                task_manager=TaskManager(include_path=str(d)))["results"]
    model, tok, _ = load_run(run)
    ours = evaluate_mcq(model, tok, load_mcq(d / "mcq.jsonl"), fmt="hellaswag")
    assert r["world_mcq"]["acc,none"] == pytest.approx(ours["acc"], abs=1e-12)
    assert r["world_mcq"]["acc_norm,none"] == pytest.approx(ours["acc_norm"], abs=1e-12)
    ppl = document_perplexity(model, tok, docs)
    assert r["world_ppl"]["word_perplexity,none"] == pytest.approx(ppl["word_perplexity"], rel=1e-9)


def test_generate_until_is_our_greedy_decode_cut_at_the_stop_string(setup):
    from lm_eval.api.instance import Instance

    _, run, _ = setup
    lm = lm_eval.api.registry.get_model("minillm").create_from_arg_string(f"run={run}")
    model, tok, _ = load_run(run)
    contexts = ["Mira lives in", "The pet of Tobin is"]
    reqs = [Instance(request_type="generate_until", doc={}, arguments=(c, {"until": ["\n", "."], "max_gen_toks": 12}),
                     idx=0) for c in contexts]
    got = lm.generate_until(reqs)
    for c, g in zip(contexts, got):
        full = tok.decode(generate_completions(model, [tok.encode(c)], 12, eos_id=tok.eot_id, temperature=0.0)[0])
        cut = min([full.index(s) for s in ("\n", ".") if s in full], default=len(full))
        assert g == full[:cut]


def test_command_line_runs_lm_evals_own_cli(setup, capsys, monkeypatch):
    from minillm.cli import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    d, run, _ = setup
    assert main(["lm-eval", "--model_args", f"run={run}", "--tasks", "world_mcq", "--include_path", str(d),
                 "--limit", "5"]) == 0
    out = capsys.readouterr().out
    assert "world_mcq" in out and "acc_norm" in out
