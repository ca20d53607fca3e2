"""On-policy pairs: best/worst selection by hand, ties and empty samples, the JSONL round trip, the command."""
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from minillm.align.preferences import read_preferences
from minillm.cli import build_parser
from minillm.config import PairsConfig
from minillm.model import GPT, GPTConfig
from minillm.runs import save_run_files
from minillm.stages.pairs import best_worst_pairs, gold_scorer, read_prompts, run_pairs, sample_responses, write_pairs
from minillm.tokenizer import Tokenizer
from minillm.utils import atomic_torch_save
from minillm.world import gold_reward

ROOT = Path(__file__).resolve().parent.parent
TOK = Tokenizer.load(ROOT / "data" / "tokenizer")
CFG = GPTConfig(vocab_size=TOK.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32, dropout=0.0)
USER = lambda text: [{"role": "user", "content": text}]  # noqa: E731


def make_run(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    run_config = {"stage": "sft", "model": asdict(CFG)}
    save_run_files(path, TOK, run_config)
    atomic_torch_save({"model": GPT(CFG).state_dict(), "run_config": run_config}, path / "ckpt.pt")
    return path


def test_best_and_worst_by_hand_ties_and_empty_responses_skipped():
    prompts = [USER("a?"), USER("b?"), USER("c?"), USER("x") + [{"role": "assistant", "content": "y"}] + USER("d?")]
    responses = [["good", "bad", "meh"], ["same", "same too"], ["", "only one"], ["p", "q", "r"]]
    scores = [[1.0, -1.0, 0.0], [0.5, 0.5], [2.0, 1.0], [0.1, float("nan"), -0.3]]
    rows, stats = best_worst_pairs(prompts, responses, scores, extras=[{"kind": "k"}] * 4)
    assert stats == {"prompts": 4, "pairs": 2, "ties": 1, "too_few": 1, "empty_responses": 1}
    assert rows[0] == {"prompt": "a?", "chosen": "good", "rejected": "bad", "chosen_score": 1.0,
                       "rejected_score": -1.0, "kind": "k"}
    assert rows[1]["prompt"] == prompts[3] and (rows[1]["chosen"], rows[1]["rejected"]) == ("p", "r")  # NaN ignored


def test_written_pairs_read_back_as_preferences(tmp_path):
    rows, _ = best_worst_pairs([USER("What is 2 plus 3?"), USER("x") + [{"role": "assistant", "content": "y"}]
                                + USER("z?")], [["2 plus 3 is 5.", "No."], ["A.", "B."]], [[1.5, -1.0], [0.0, 1.0]])
    path = write_pairs(rows, tmp_path / "pairs.jsonl")
    assert not list(tmp_path.glob(".*tmp"))
    pairs, stats = read_preferences(path)
    assert stats["pairs"] == 2
    assert pairs[0].prompt == USER("What is 2 plus 3?") and pairs[0].chosen[0]["content"] == "2 plus 3 is 5."
    assert pairs[1].prompt[-1]["content"] == "z?" and pairs[1].chosen[0]["content"] == "B."


def test_read_prompts_from_chats_and_preference_files(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}], "kind": "fact"},
        {"prompt": "Q2", "chosen": "a", "rejected": "b"},
        {"instruction": "Q3", "input": "", "output": "A3"},
    ]) + "\n")
    got = read_prompts(path)
    assert [p for p, _ in got] == [USER("Q1"), USER("Q2"), USER("Q3")]
    assert got[0][1] == {"kind": "fact"} and got[1][1] == {}
    path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:2:"):
        read_prompts(path)
    path.write_text(json.dumps({"prompt": "  "}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:1: 'prompt' is empty"):
        read_prompts(path)


def test_sample_responses_shape_and_seed():
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    prompts = [USER("What is 2 plus 3?"), USER("Hi")]
    a = sample_responses(model, TOK, prompts, n=3, max_new_tokens=6, seed=1)
    assert len(a) == 2 and all(len(ys) == 3 for ys in a) and all(isinstance(y, str) for ys in a for y in ys)
    assert a == sample_responses(model, TOK, prompts, n=3, max_new_tokens=6, seed=1)
    with pytest.raises(ValueError, match="n must be"):
        sample_responses(model, TOK, prompts, n=0)


def test_run_pairs_with_the_gold_scorer(tmp_path):
    policy = make_run(tmp_path / "sft")
    stats = run_pairs(policy, ROOT / "data" / "world" / "sft_train.jsonl", tmp_path / "pairs.jsonl",
                      PairsConfig(n=3, limit=6, max_new_tokens=10), device="cpu")
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert stats["pairs"] == len(rows) == 6 - stats["ties"] - stats["too_few"] and rows
    for r in rows:
        assert r["chosen_score"] == gold_reward(r["prompt"], r["chosen"]) > r["rejected_score"]
        assert r["rejected_score"] == gold_reward(r["prompt"], r["rejected"]) and r["scorer"] == "gold"
    assert read_preferences(tmp_path / "pairs.jsonl")[1]["pairs"] == len(rows)
    assert gold_scorer()([USER("What is 2 plus 3?")], ["2 plus 3 is 5."]) == [1.5]


def test_pairs_command_checks_its_arguments(tmp_path):
    p = build_parser()
    args = p.parse_args(["pairs", "--policy", str(tmp_path), "--n", "1"])
    with pytest.raises(ValueError, match="n must be an int >= 2"):
        args.func(args)
    args = p.parse_args(["pairs", "--policy", str(tmp_path), "--scorer", str(tmp_path / "no_rm"),
                         "--prompts", str(ROOT / "data" / "world" / "sft_test.jsonl")])
    with pytest.raises(ValueError, match="scorer must be 'gold' or a reward-model run directory"):
        args.func(args)
