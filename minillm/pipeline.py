"""The main job, `python -m minillm pipeline`: every stage in order, then a report card.

    world data -> tokenizer -> pretraining -> samples -> validation perplexity -> fact completion

Each stage writes into its own directory under --out (default runs/pipeline) and adds rows to
runs/pipeline/report.md, so an instructor can run one command and show the class what each stage did.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from minillm.utils import atomic_write_text, write_json

SAMPLE_PROMPTS = ["Mira", "The town of Oakvale", "3 plus 4 is", "Everyone knows"]


def ensure_world(data_dir: Path, seed: int) -> None:
    """Use the bundled world data; generate it only when it is missing."""
    if (data_dir / "corpus_train.txt").exists():
        return
    from minillm.world import write_world

    print(f"[world] {data_dir} has no world data: generating it with seed {seed}")
    write_world(seed, data_dir)


def ensure_tokenizer(tok_path: Path, corpus: Path, vocab_size: int):
    """Load the bundled tokenizer, or train one (and save it) when it is missing."""
    from minillm.tokenizer import Tokenizer

    if (tok_path / "tokenizer.json").exists() or tok_path.is_file():
        return Tokenizer.load(tok_path), 0.0
    t0 = time.perf_counter()
    tok = Tokenizer.train(corpus, vocab_size)
    seconds = time.perf_counter() - t0
    tok_path.mkdir(parents=True, exist_ok=True)
    tok.save(tok_path)
    print(f"[tokenizer] trained {tok.vocab_size} tokens in {seconds:.1f}s -> {tok_path}")
    return tok, seconds


def run_samples(model, tok, n_new: int = 30) -> list[dict[str, str]]:
    """Greedy and sampled (T=0.8, top-k 50) continuations of a few prompts."""
    from minillm.sampling import generate_completions

    prompts = [tok.encode(p) for p in SAMPLE_PROMPTS]
    greedy = generate_completions(model, prompts, n_new, eos_id=tok.eot_id, temperature=0)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    sampled = generate_completions(model, prompts, n_new, eos_id=tok.eot_id, temperature=0.8, top_k=50,
                                   generator=gen)
    return [{"prompt": p, "greedy": tok.decode(g), "sampled": tok.decode(s)}
            for p, g, s in zip(SAMPLE_PROMPTS, greedy, sampled)]


def validation_perplexity(model, tok, val_path: Path) -> dict[str, Any]:
    """Sliding-window perplexity (stride = half the context) over the whole validation corpus."""
    from minillm.datasets import tokenize_corpus
    from minillm.eval.perplexity import perplexity

    ids = tokenize_corpus(val_path, tok)
    return perplexity(model, ids, max_length=model.config.block_size, stride=model.config.block_size // 2,
                      batch_size=32)


def run_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    from minillm.cli import resolve_configs
    from minillm.eval.task import fact_completion_accuracy
    from minillm.pretrain import pretrain
    from minillm.utils import pick_device

    t_total = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    ensure_world(data, args.seed_world)
    timings["world"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    from minillm.config import get_preset

    tok, _ = ensure_tokenizer(Path(args.tokenizer), data / "corpus_train.txt", get_preset(args.preset).vocab_size)
    timings["tokenizer"] = time.perf_counter() - t0

    model_cfg, train_cfg = resolve_configs(args, tok.vocab_size)
    print(f"[pretrain] preset {args.preset}: {model_cfg}")
    model, result = pretrain(tok, data / "corpus_train.txt", data / "corpus_val.txt", model_cfg, train_cfg,
                             out / "base")
    timings["pretrain"] = result.seconds

    t0 = time.perf_counter()
    model.eval()
    samples = run_samples(model, tok)
    timings["samples"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ppl = validation_perplexity(model, tok, data / "corpus_val.txt")
    timings["perplexity"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    probes = [json.loads(line) for line in (data / "probes.jsonl").read_text().splitlines() if line.strip()]
    facts = fact_completion_accuracy(model, tok, probes)
    timings["fact_completion"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_total

    summary = {
        "preset": args.preset,
        "device": str(pick_device(train_cfg.device)),
        "model": asdict(model_cfg),
        "parameters": model.num_parameters(),
        "pretrain": {"steps": result.step, "train_loss": result.train_loss, "val_loss": result.val_loss,
                     "seconds": result.seconds, "tokens_per_s": result.tokens_per_s},
        "val_perplexity": ppl,
        "fact_completion": {k: v for k, v in facts.items() if k != "rows"},
        "timings_s": timings,
    }
    write_json(out / "summary.json", summary)
    write_json(out / "fact_completion.json", facts["rows"])
    atomic_write_text(out / "report.md", render_report(summary, samples, facts))
    print(f"[pipeline] done in {timings['total']:.0f}s: report at {out / 'report.md'}")
    return summary


def render_report(summary: dict[str, Any], samples: list[dict[str, str]], facts: dict[str, Any]) -> str:
    p, ppl, fc, t = summary["pretrain"], summary["val_perplexity"], summary["fact_completion"], summary["timings_s"]
    m = summary["model"]
    lines = [
        "# minillm pipeline report",
        "",
        f"Preset `{summary['preset']}` on `{summary['device']}`: {m['n_layer']} layers, {m['n_head']} heads, "
        f"{m['n_embd']} wide, context {m['block_size']}, vocabulary {m['vocab_size']} "
        f"({summary['parameters']:,} parameters).",
        "",
        "## Report card",
        "",
        "| stage | metric | value |",
        "| --- | --- | --- |",
        f"| pretrain | steps | {p['steps']} |",
        f"| pretrain | final train loss | {p['train_loss']:.4f} |",
        f"| pretrain | final validation loss | {p['val_loss']:.4f} |",
        f"| pretrain | tokens/s | {p['tokens_per_s']:,.0f} |",
        f"| base model | validation perplexity (sliding window) | {ppl['ppl']:.3f} over {ppl['n_tokens']:,} tokens |",
        f"| base model | fact completion, held-out phrasing (greedy) | {fc['accuracy']:.3f} of {fc['n']} probes |",
        "",
        "Fact completion by attribute: "
        + ", ".join(f"{k} {v:.2f}" for k, v in fc["per_attribute"].items()),
        "",
        "![pretraining loss](base/loss_curve.png)",
        "",
        "## Samples from the base model",
        "",
        "| prompt | greedy | sampled (T=0.8, top-k 50) |",
        "| --- | --- | --- |",
    ]
    for s in samples:
        cell = [s["prompt"], s["greedy"], s["sampled"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cell) + " |")
    wrong = [r for r in facts["rows"] if not r["correct"]][:8]
    if wrong:
        lines += ["", "## Some fact completions it got wrong", "", "| prompt | answer | completion |",
                  "| --- | --- | --- |"]
        lines += [f"| {r['prompt']} | {r['answer']} | {r['completion'].strip()} |" for r in wrong]
    lines += ["", "## Time per stage (seconds)", "", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {k} | {v:.1f} |" for k, v in t.items()]
    return "\n".join(lines) + "\n"
