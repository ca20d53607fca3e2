"""The alignment tax (lesson 12): pretraining perplexity and fact completion after each stage, by hand, from the
same evaluation functions as the report card, and as columns of the PEFT comparison."""
import shutil
from pathlib import Path

import pytest

from minillm.config import TrainConfig
from minillm.datasets import read_jsonl
from minillm.eval.task import fact_completion_accuracy
from minillm.model import GPTConfig
from minillm.runs import load_run
from minillm.stages.compare import compare_methods
from minillm.stages.evaluate import (
    alignment_tax,
    evaluate_run,
    render_alignment_tax,
    report_rows,
    retained_knowledge,
    run_alignment_tax,
)
from minillm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
WORLD = ROOT / "data" / "world"


def test_alignment_tax_by_hand():
    rows = alignment_tax({"base": {"perplexity": 3.0, "fact_completion": 0.75},
                          "sft": {"perplexity": 9.0, "fact_completion": 0.5},
                          "lora": {"perplexity": 3.3, "fact_completion": 0.8}})
    by = {r["model"]: r for r in rows}
    assert by["base"]["perplexity_ratio"] == 1.0 and by["base"]["facts_lost"] == 0.0
    assert by["sft"]["perplexity_ratio"] == pytest.approx(3.0) and by["sft"]["facts_lost"] == pytest.approx(0.25)
    assert by["lora"]["perplexity_ratio"] == pytest.approx(1.1) and by["lora"]["facts_lost"] == pytest.approx(-0.05)
    table = render_alignment_tax(rows)
    assert "| sft | 9.000 | 3.00 | 0.500 | +0.250 |" in table


def test_alignment_tax_needs_the_base_row():
    with pytest.raises(ValueError, match="no row for the base model 'base'"):
        alignment_tax({"sft": {"perplexity": 9.0, "fact_completion": 0.5}})


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    """A world folder with a slice of the validation text, 12 fact probes and 40 SFT chats."""
    d = tmp_path_factory.mktemp("world")
    (d / "corpus_val.txt").write_text((WORLD / "corpus_val.txt").read_text()[:3000])
    (d / "probes.jsonl").write_text("\n".join((WORLD / "probes.jsonl").read_text().splitlines()[:12]) + "\n")
    (d / "sft_train.jsonl").write_text("\n".join((WORLD / "sft_train.jsonl").read_text().splitlines()[:40]) + "\n")
    (d / "sft_test.jsonl").write_text("\n".join((WORLD / "sft_test.jsonl").read_text().splitlines()[:4]) + "\n")
    shutil.copy(WORLD / "corpus_train.txt", d / "corpus_train.txt")
    return d


@pytest.fixture(scope="module")
def base_run(small_world, tmp_path_factory):
    from minillm.stages.pretrain import pretrain

    d = tmp_path_factory.mktemp("base")
    (d / "train.txt").write_text((WORLD / "corpus_train.txt").read_text()[:20_000])
    tok = Tokenizer.load(ROOT / "data" / "tokenizer")
    cfg = TrainConfig(max_steps=3, batch_size=4, warmup_steps=0, eval_interval=0, eval_iters=1, device="cpu")
    model_cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    pretrain(tok, d / "train.txt", d / "train.txt", model_cfg, cfg, d / "run", progress=False)
    return d / "run"


def test_retained_knowledge_is_the_report_cards_perplexity_and_fact_completion(base_run, small_world):
    model, tok, _ = load_run(base_run)
    k = retained_knowledge(model, tok, small_world)
    rows = report_rows(evaluate_run(base_run, ppl=small_world / "corpus_val.txt", mcq=None))
    sliding = next(v for m, v in rows.items() if m.startswith("perplexity (sliding window"))
    assert k["perplexity"] == pytest.approx(sliding, rel=1e-9)
    probes = [r for _, r in read_jsonl(small_world / "probes.jsonl")]
    assert k["fact_completion"] == fact_completion_accuracy(model, tok, probes)["accuracy"]
    assert k["n_probes"] == 12
    tax = run_alignment_tax({"base": base_run, "again": base_run}, small_world)
    assert [r["perplexity_ratio"] for r in tax] == [1.0, 1.0] and tax[1]["facts_lost"] == 0.0


def test_retained_knowledge_names_a_missing_file(base_run, tmp_path):
    model, tok, _ = load_run(base_run)
    with pytest.raises(FileNotFoundError, match="corpus_val.txt: file not found"):
        retained_knowledge(model, tok, tmp_path)


def test_peft_compare_reports_what_each_method_forgot(base_run, small_world, tmp_path):
    cfg = TrainConfig(max_steps=3, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=0, eval_interval=0,
                      eval_iters=1, log_interval=1, device="cpu")
    summary = compare_methods(base_run, small_world / "sft_train.jsonl", small_world / "sft_test.jsonl",
                              tmp_path / "cmp", cfg, methods=["full", "lora"], analytic_preset=None,
                              timing_repeats=1, timing_seconds=0.02, progress=False)
    model, tok, _ = load_run(base_run)
    base = retained_knowledge(model, tok, small_world)
    for r in summary["rows"]:
        assert r["perplexity_ratio"] == pytest.approx(r["perplexity"] / base["perplexity"])
        assert r["facts_lost"] == pytest.approx(base["fact_completion"] - r["fact_completion"])
    full = summary["rows"][0]
    assert full["perplexity_ratio"] != 1.0  # three steps at lr 1e-2 moved the weights
    assert "pretraining ppl x base | facts lost |" in (tmp_path / "cmp" / "table.md").read_text()
