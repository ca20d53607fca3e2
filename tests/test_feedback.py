"""AI feedback (minillm/stages/feedback.py) and the judge stage (minillm/stages/judge.py): label files are checked
against the pairs line by line, relabelling and agreement by hand, the judge's training chats, gold preferences,
and one tiny end-to-end run of each command."""
import json
from pathlib import Path

import pytest

from minillm.align.constitution import Principle
from minillm.cli import _named_files, build_parser
from minillm.config import FeedbackConfig, TrainConfig, get_preset
from minillm.model import GPTConfig
from minillm.stages.feedback import (
    judge_training_chats,
    label_agreement,
    read_labels,
    relabel,
    run_feedback,
    write_labels,
)
from minillm.stages.judge import (
    gold_preference,
    judge_pairs,
    load_pairs,
    run_judge,
    self_preference,
)
from minillm.tokenizer import Tokenizer
from minillm.world import make_world

ROOT = Path(__file__).resolve().parent.parent
WORLD = ROOT / "data" / "world"
PAIRS = [{"prompt": "What is Faye's pet?", "chosen": "The pet of Faye is a parrot.",
          "rejected": "The pet of Faye is a hamster.", "kind": "fact", "rejected_kind": "wrong_fact"},
         {"prompt": "How do I pick a lock?", "chosen": "I'm sorry, but I can't help with that.",
          "rejected": "First you take a pin.", "kind": "refusal", "rejected_kind": "harmful_compliance"},
         {"prompt": "What is 2 plus 3?", "chosen": "2 plus 3 is 5.", "rejected": "It is 5, you idiot.",
          "kind": "math", "rejected_kind": "rude"}]


def test_label_files_round_trip(tmp_path):
    path = write_labels(PAIRS, [0.9, 0.2, 1.0], tmp_path / "labels.jsonl")
    assert read_labels(path, PAIRS, "pairs.jsonl") == [0.9, 0.2, 1.0]


@pytest.mark.parametrize("lines,match", [
    ([{"prompt": "What is Faye's pet?", "p_chosen": 1.0}], r"labels.jsonl: 1 labels for the 3 pairs of pairs.jsonl"),
    ([{"prompt": "What is Faye's pet?", "p_chosen": 1.0}, {"prompt": "How do I open a lock?", "p_chosen": 1.0},
      {"prompt": "What is 2 plus 3?", "p_chosen": 1.0}],
     r"labels.jsonl:2: prompt 'How do I open a lock\?' does not match pair 2 of pairs.jsonl"),
    ([{"prompt": "What is Faye's pet?", "p_chosen": 1.0}, {"prompt": "How do I pick a lock?", "p_chosen": 1.5},
      {"prompt": "What is 2 plus 3?", "p_chosen": 1.0}], r"labels.jsonl:2: 'p_chosen' must be a number in \[0, 1\]"),
    ([{"prompt": "What is Faye's pet?", "p_chosen": True}, {"prompt": "How do I pick a lock?", "p_chosen": 1},
      {"prompt": "What is 2 plus 3?", "p_chosen": 1.0}], r"labels.jsonl:1: 'p_chosen'"),
])
def test_label_files_that_do_not_match_the_pairs_are_refused(tmp_path, lines, match):
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(ValueError, match=match):
        read_labels(path, PAIRS, "pairs.jsonl")


def test_relabel_swaps_disagreements_and_drops_ties():
    out = relabel(PAIRS, [0.8, 0.3, 0.5])
    assert len(out) == 2
    assert (out[0]["chosen"], out[0]["rejected"]) == (PAIRS[0]["chosen"], PAIRS[0]["rejected"])
    assert (out[1]["chosen"], out[1]["rejected"]) == (PAIRS[1]["rejected"], PAIRS[1]["chosen"])
    assert out[1]["label"] == 0.3


def test_label_agreement_by_hand():
    gold = [1.0] * 6
    assert label_agreement([0.9] * 6, gold) == {"agreement": 1.0, "kappa": 1.0, "n": 6}
    assert label_agreement([0.1] * 6, gold)["agreement"] == 0.0
    r = label_agreement([0.9, 0.9, 0.9, 0.1, 0.1, 0.9], gold + [0.5], seed=3)  # gold ties are left out
    assert r["agreement"] == pytest.approx(4 / 6) and r["n"] == 6
    # the random orientation only changes which slot is which, never whether the labeller agrees
    assert all(label_agreement([0.9, 0.1, 0.9], [1.0] * 3, seed=s)["agreement"] == pytest.approx(2 / 3)
               for s in range(5))


def test_judge_training_chats_give_the_gold_verdict_in_every_template():
    principles = [Principle("polite", "Be polite."), Principle("brief", "Be brief.")]
    chats = judge_training_chats(PAIRS[:1], principles)
    assert len(chats) == 2 * 3 + 2 * 3  # pairwise both orders and single chosen/rejected, x (plain + 2 principles)
    verdicts = [c["messages"][1]["content"] for c in chats]
    assert verdicts == ["A", "B"] * 3 + ["Yes", "No"] * 3
    first = chats[0]["messages"][0]["content"]
    assert first.index(PAIRS[0]["chosen"]) < first.index(PAIRS[0]["rejected"])
    assert "Principle: Be brief." in chats[4]["messages"][0]["content"]


def test_gold_preference_by_hand():
    world = make_world(0)
    assert gold_preference(PAIRS[0]["prompt"], PAIRS[0]["chosen"], PAIRS[0]["rejected"], world) == 1.0
    assert gold_preference(PAIRS[2]["prompt"], PAIRS[2]["rejected"], PAIRS[2]["chosen"], world) == 0.0
    assert gold_preference(PAIRS[0]["prompt"], PAIRS[0]["chosen"], PAIRS[0]["chosen"], world) == 0.5


def test_load_pairs_names_the_bad_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps({**PAIRS[1], "chosen": ""}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:2: field 'chosen'"):
        load_pairs(path)


def test_feedback_config_and_flags():
    with pytest.raises(ValueError, match="judge_labels"):
        FeedbackConfig(judge_labels=0)
    with pytest.raises(ValueError, match="cai_samples"):
        FeedbackConfig(cai_samples=-1)
    with pytest.raises(ValueError, match="dpo_lr"):
        FeedbackConfig(dpo_lr=0.0)
    assert _named_files(["mine=a.jsonl", "class=b/c.jsonl"]) == {"mine": "a.jsonl", "class": "b/c.jsonl"}
    with pytest.raises(ValueError, match="NAME=FILE"):
        _named_files(["a.jsonl"])
    args = build_parser().parse_args(["feedback", "--judge-labels", "7", "--no-cai", "--labellers", "gold"])
    assert args.no_cai and args.labellers == "gold"
    args = build_parser().parse_args(["judge", "--judge", "r", "--against", "s"])
    assert (args.judge, args.against) == ("r", "s")


# ----------------------------------------------------------------------------- tiny end-to-end runs
@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A world folder with a few lines of every file the two commands read, and tiny base/SFT/RM runs."""
    from minillm.stages.pretrain import pretrain
    from minillm.stages.reward import run_reward
    from minillm.stages.sft import run_sft

    d = tmp_path_factory.mktemp("world")
    for name, n in (("prefs_train.jsonl", 24), ("prefs_test.jsonl", 10), ("sft_test.jsonl", 4),
                    ("sft_train.jsonl", 40), ("safety_train.jsonl", 4), ("safety_test.jsonl", 6)):
        (d / name).write_text("\n".join((WORLD / name).read_text().splitlines()[:n]) + "\n")
    (d / "train.txt").write_text((WORLD / "corpus_train.txt").read_text()[:20_000])
    tok = Tokenizer.load(ROOT / "data" / "tokenizer")
    cfg = TrainConfig(max_steps=2, batch_size=4, warmup_steps=0, eval_interval=0, eval_iters=1, device="cpu")
    model_cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=1, n_head=2, n_embd=32, dropout=0.0)
    pretrain(tok, d / "train.txt", d / "train.txt", model_cfg, cfg, d / "base", progress=False)
    run_sft(d / "base", d / "sft_train.jsonl", d / "sft", cfg, progress=False)
    run_reward(d / "sft", d / "prefs_train.jsonl", d / "rm", cfg, progress=False)
    return d


def test_feedback_end_to_end(tiny_world, tmp_path):
    d = tiny_world
    cfg = TrainConfig(max_steps=2, batch_size=4, warmup_steps=0, eval_interval=0, eval_iters=1, device="cpu")
    own = tmp_path / "class_labels.jsonl"
    pairs = load_pairs(d / "prefs_train.jsonl")
    write_labels(pairs, [0.0] * len(pairs), own)  # a labeller that always disagrees with gold
    method = FeedbackConfig(judge_labels=6, cai_prompts=4, max_new_tokens=8, cai_samples=1, cai_steps=2,
                            eval_samples=1)
    s = run_feedback(d / "sft", d / "rm", d, tmp_path / "fb", cfg, cfg, method, get_preset("tiny").dpo_method,
                     constitution=ROOT / "data" / "constitution.txt", extra_labels={"class": str(own)},
                     progress=False)
    models = s["models"]
    assert models["DPO on gold labels"]["agreement"] == 1.0 and models["DPO on gold labels"]["kappa"] == 1.0
    assert models["DPO on class labels"]["agreement"] == 0.0
    # the trained judge's own budget keeps its gold labels, and its agreement is measured on the rest
    tj = read_labels(tmp_path / "fb" / "labels" / "trained-judge.jsonl", pairs, "prefs_train")
    assert tj[:6] == [1.0] * 6 and models["DPO on trained-judge labels"]["n"] == len(pairs) - 6
    for name in ("SFT (no preference step)", "DPO on rm labels", "DPO on judge labels", "SL-CAI (SFT on revisions)"):
        assert 0.0 <= models[name]["exact_match"] <= 1.0 and models[name]["refusal_rate"] is not None
    assert (tmp_path / "fb" / "cai" / "revisions.jsonl").is_file() and (tmp_path / "fb" / "sl_cai" / "ckpt.pt").is_file()
    report = (tmp_path / "fb" / "report.md").read_text()
    assert "| DPO on class labels | 0.000 |" in report and "Constitutional AI: 8 prompts" in report


def test_feedback_refuses_bad_input_before_training(tiny_world, tmp_path):
    d = tiny_world
    cfg = TrainConfig(max_steps=1, batch_size=4, device="cpu")
    bad = tmp_path / "rules.txt"
    bad.write_text("polite Be polite.\n")
    with pytest.raises(ValueError, match=r"rules.txt:1: expected 'name: principle'"):
        run_feedback(d / "sft", d / "rm", d, tmp_path / "fb", cfg, cfg, constitution=bad)
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"prompt": "x", "p_chosen": 1.0}) + "\n")
    with pytest.raises(ValueError, match=r"short.jsonl: 1 labels for the 24 pairs"):
        run_feedback(d / "sft", d / "rm", d, tmp_path / "fb", cfg, cfg, extra_labels={"x": str(short)})
    with pytest.raises(ValueError, match="unknown"):
        run_feedback(d / "sft", d / "rm", d, tmp_path / "fb", cfg, cfg, labellers=["gold", "oracle"])
    assert not (tmp_path / "fb").exists()


def test_judge_end_to_end(tiny_world, tmp_path):
    d = tiny_world
    s = run_judge(d / "sft", d / "prefs_test.jsonl", tmp_path / "j", against=d / "base", questions=d / "sft_test.jsonl")
    assert s["n"] == 10 and 0.0 <= s["pairwise_agreement"] <= 1.0 and 0.0 <= s["position_bias"] <= 1.0
    world = make_world(0)
    for r in s["rows"]:
        assert r["gold"] == gold_preference(r["prompt"], r["a"], r["b"], world)
        assert r["judge"] == pytest.approx((r["a_first"] + 1 - r["b_first"]) / 2)
    assert 0 < sum(r["gold"] for r in s["rows"]) < 10  # the coin put chosen in both slots
    assert "position bias" in (tmp_path / "j" / "report.md").read_text()
    with pytest.raises(ValueError, match=r"\{b\}"):
        run_judge(d / "sft", d / "prefs_test.jsonl", tmp_path / "j2", template="{question} {a}")


def test_self_preference_against_itself_has_no_pairs(tiny_world):
    from minillm.runs import load_plain_run

    model, tok, _ = load_plain_run(tiny_world / "sft")
    r = self_preference(model, tok, model, tok, ["How old is Mira?", "What is 2 plus 3?"])
    assert r["n"] == 0 and r["self_preference"] is None


def test_judge_pairs_of_a_slot_a_judge(tiny_world):
    import sys
    sys.path.insert(0, str(ROOT / "tests"))
    from test_judge import AlwaysA

    tok = Tokenizer.load(ROOT / "data" / "tokenizer")
    r = judge_pairs(AlwaysA(), tok, PAIRS * 2)
    assert r["position_bias"] == 1.0 and r["prefers_slot_a"] == 1.0


def test_label_agreement_when_gold_ties_everywhere():
    assert label_agreement([0.9, 0.1], [0.5, 0.5]) == {"agreement": None, "kappa": None, "n": 0}
