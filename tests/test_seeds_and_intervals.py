"""Is an effect beyond noise? Mean ± std over seeds, bootstrap intervals, the wrong-character detector, and
the pipeline's per-seed determinism."""
import json
import math

import pytest
import torch

from minillm.eval import task
from minillm.eval.stats import bootstrap_ci, mean_std
from minillm.eval.task import named_characters, wrong_character
from minillm.pipeline import aggregate_card, fmt_mean_std, run_pipeline, write_seeds_report
from minillm.world import make_world

NAMES = [c.name for c in make_world(0).characters]


# ----------------------------------------------------------------------------- mean ± std
def test_mean_std_by_hand():
    assert mean_std([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]) == pytest.approx((5.0, math.sqrt(32 / 7)))
    assert mean_std([0.586, 0.586]) == (0.586, 0.0)
    assert mean_std([3]) == (3.0, 0.0)  # one seed: no spread to estimate
    with pytest.raises(ValueError):
        mean_std([])


# ----------------------------------------------------------------------------- bootstrap
def test_bootstrap_of_a_constant_is_that_constant():
    assert bootstrap_ci([0.7] * 50) == pytest.approx((0.7, 0.7))


def test_bootstrap_of_two_values_covers_every_resample_mean():
    # resample means of {0, 1} (n = 2) are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the 95% interval is [0, 1]
    assert bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    low, high = bootstrap_ci([0.0, 1.0], confidence=0.4)  # the middle 40% of the resample means is 0.5
    assert low == high == 0.5


def test_bootstrap_matches_the_normal_approximation_on_a_large_sample():
    x = [1.0] * 300 + [0.0] * 300  # mean 0.5, standard error sqrt(0.25 / 600) = 0.0204
    low, high = bootstrap_ci(x, n_resamples=4000)
    se = math.sqrt(0.25 / 600)
    assert low == pytest.approx(0.5 - 1.96 * se, abs=0.006) and high == pytest.approx(0.5 + 1.96 * se, abs=0.006)
    assert bootstrap_ci(x, seed=1) == bootstrap_ci(x, seed=1) != bootstrap_ci(x, seed=2)


def test_bootstrap_bad_input():
    for kwargs in ({"confidence": 1.0}, {"confidence": 0.0}, {"n_resamples": 0}):
        with pytest.raises(ValueError):
            bootstrap_ci([1.0, 2.0], **kwargs)
    with pytest.raises(ValueError):
        bootstrap_ci([])


# ----------------------------------------------------------------------------- wrong character
@pytest.mark.parametrize("answer, asked, wrong", [
    ("Sive's favourite colour is grey.", "Corin", True),     # the failure the issue reports
    ("Corin's favourite colour is grey.", "Corin", False),
    ("corin likes grey best.", "Corin", False),              # case does not matter
    ("Corin and Sive both like grey.", "Corin", True),        # naming anyone else counts
    ("Grey.", "Corin", False),                               # no name: wrong or right, not the wrong person
    ("Corinna likes grey.", "Corin", False),                 # whole words only (Corinna is no world name)
])
def test_wrong_character_by_hand(answer, asked, wrong):
    assert wrong_character(answer, asked, NAMES) is wrong


def test_named_characters_whole_words():
    assert named_characters("Mira met Sive's cat", ["Mira", "Sive", "Corin"]) == ["Mira", "Sive"]
    assert named_characters("Miramar", ["Mira"]) == []


def test_evaluate_instructions_counts_wrong_character_answers(monkeypatch):
    rows = [json.loads(line) for line in open("data/world/sft_test.jsonl")]
    facts = [r for r in rows if r["kind"] == "fact"][:3]
    other = next(n for n in NAMES if n != facts[0]["character"])
    answers = {task._user(facts[0]): task._assistant(facts[0]).replace(facts[0]["character"], other),
               task._user(facts[1]): task._assistant(facts[1]),
               task._user(facts[2]): "I do not know."}
    monkeypatch.setattr(task, "answer_questions", lambda model, tok, qs, **kw: [answers[q] for q in qs])
    res = task.evaluate_instructions(None, None, facts)
    assert res["wrong_character"] == pytest.approx(1 / 3)
    assert [r["wrong_character"] for r in res["rows"]] == [True, False, False]


# ----------------------------------------------------------------------------- the report over seeds
CARDS = {
    0: [["sft", "exact match: base -> SFT", (0.0, 0.5), None], ["sft", "steps", 10, None],
        ["dpo", "settings", "beta 0.1", None], ["rm", "accuracy", 0.8, (0.7, 0.9)]],
    1: [["sft", "exact match: base -> SFT", (0.0, 0.7), None], ["sft", "steps", 10, None],
        ["dpo", "settings", "beta 0.1", None], ["rm", "accuracy", 0.9, (0.8, 1.0)]],
    2: [["sft", "exact match: base -> SFT", (0.0, 0.6), None], ["sft", "steps", 10, None],
        ["dpo", "settings", "beta 0.1", None], ["rm", "accuracy", 1.0, (0.9, 1.0)]],
}


def test_report_card_renders_mean_and_std_from_per_seed_values(tmp_path):
    rows = aggregate_card(list(CARDS.values()))
    assert [r["metric"] for r in rows] == ["exact match: base -> SFT", "steps", "settings", "accuracy"]
    assert fmt_mean_std(rows[0]) == "0.000 ± 0.000 -> 0.600 ± 0.100"
    assert fmt_mean_std(rows[1]) == "10.0 ± 0.0"
    assert fmt_mean_std(rows[2]) == "beta 0.1"  # text that agrees across seeds is shown once
    assert fmt_mean_std(rows[3]) == "0.900 ± 0.100" and rows[3]["values"] == [0.8, 0.9, 1.0]
    summary = write_seeds_report(tmp_path, "tiny", {s: {"card": c} for s, c in CARDS.items()}, 1.0)
    report = (tmp_path / "report.md").read_text()
    assert "| rm | accuracy | 0.900 ± 0.100 | 0.800 | 0.900 | 1.000 |" in report
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["seeds"] == [0, 1, 2] and saved["per_seed"]["1"]["card"][3][2] == 0.9
    assert summary["card"][0]["mean"] == pytest.approx([0.0, 0.6])


# ----------------------------------------------------------------------------- determinism per seed
FAST = {"max_steps": 3, "eval_interval": 0, "eval_iters": 1, "batch_size": 4, "device": "cpu"}
VARYING = ("wall time", "tokens/s", "seconds")  # clock readings, not results


def _figures(card):
    return [(stage, metric, value) for stage, metric, value, _ in card if not any(v in metric for v in VARYING)]


def test_same_seed_same_figures_other_seed_other_figures(tmp_path):
    # Pretraining alone: its figures depend on the seed, and no graded assignment sits on its path (the later
    # stages use the sampling, loss and evaluation functions students implement).
    skip = ["base_eval", "sft", "sft_experiments", "reward", "dpo", "ppo", "grpo", "frontier", "eval"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic order in both runs
    try:
        a = run_pipeline(tmp_path / "a", preset="tiny", train_overrides=FAST, skip=skip, seeds=[5])
        b = run_pipeline(tmp_path / "b", preset="tiny", train_overrides=FAST, skip=skip, seeds=[5, 6])
    finally:
        torch.set_num_threads(threads)
    fig_a, fig_b5, fig_b6 = (_figures(x["card"]) for x in (a["per_seed"]["5"], b["per_seed"]["5"],
                                                            b["per_seed"]["6"]))
    assert fig_a == fig_b5
    assert fig_a != fig_b6
    assert (tmp_path / "b" / "seed_6" / "report.md").exists() and "seed 6" in (tmp_path / "b" / "report.md").read_text()
