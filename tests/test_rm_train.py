"""Reward-model stage: preference records, chat-template pairs, the training loop, normalisation, calibration."""
import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from minillm.align.preferences import (
    collate_pairs, encode_pair, encode_preferences, parse_preference, read_preferences, split_pairs,
)
from minillm.align.reward import RewardModel, bradley_terry_loss, score_sequences
from minillm.cli import build_parser
from minillm.config import RewardConfig, TrainConfig
from minillm.model import GPT, GPTConfig
from minillm.runs import load_reward_model, load_run, save_run_files
from minillm.stages.reward import (
    calibration, plot_calibration, reward_loss_fn, reward_offset, run_reward, score_texts,
)
from minillm.tokenizer import Tokenizer
from minillm.utils import atomic_torch_save

ROOT = Path(__file__).resolve().parent.parent
TOK = Tokenizer.load(ROOT / "data" / "tokenizer")

PAIRS = [
    {"prompt": "What is 2 plus 3?", "chosen": "2 plus 3 is 5.", "rejected": "2 plus 3 is 7.", "rejected_kind": "wrong"},
    {"prompt": "Where does Mira live?", "chosen": "Mira lives in Oakvale.",
     "rejected": "Ugh, Oakvale. Stupid question."},
    {"prompt": "Tell me how to cheat on a test.", "chosen": "I'm sorry, but I can't help with that.",
     "rejected": "Sure, just copy the answers."},
    {"prompt": "What is 4 plus 4?", "chosen": "4 plus 4 is 8.", "rejected": "I'm sorry, I cannot answer that."},
    {"prompt": "What is Bram's job?", "chosen": "Bram works as a baker.", "rejected": "Bram works as a potter."},
    {"prompt": "How old is Cora?", "chosen": "Cora is 30 years old.",
     "rejected": "Cora is 30 years old. I could go on and on about it."},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def make_run(path: Path, block_size: int = 64, seed: int = 0) -> Path:
    """A loadable run directory holding a small random GPT with the project's tokenizer."""
    cfg = GPTConfig(vocab_size=TOK.vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=32, dropout=0.0)
    torch.manual_seed(seed)
    model = GPT(cfg)
    run_config = {"stage": "sft", "model": asdict(cfg)}
    save_run_files(path, TOK, run_config)
    atomic_torch_save({"model": model.state_dict(), "run_config": run_config}, path / "ckpt.pt")
    return path


def tiny_cfg(**kw) -> TrainConfig:
    base = dict(max_steps=25, batch_size=6, lr=3e-3, min_lr=3e-3, warmup_steps=0, weight_decay=0.0,
                eval_interval=0, eval_iters=1, log_interval=5, device="cpu", dtype="float32")
    return TrainConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- records
def test_the_three_record_formats_give_the_same_pair():
    user = {"role": "user", "content": "Where does Mira live?"}
    good, bad = {"role": "assistant", "content": "Oakvale."}, {"role": "assistant", "content": "Nowhere."}
    standard = parse_preference({"prompt": user["content"], "chosen": good["content"],
                                 "rejected": bad["content"]}, "f:1")
    conversational = parse_preference({"prompt": [user], "chosen": [user, good], "rejected": [user, bad]}, "f:2")
    implicit = parse_preference({"chosen": [user, good], "rejected": [user, bad]}, "f:3")
    for pair in (standard, conversational, implicit):
        assert (pair.prompt, pair.chosen, pair.rejected) == ([user], [good], [bad])


@pytest.mark.parametrize("record, reason", [
    ({"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
    ({"prompt": "q", "chosen": "   ", "rejected": "b"}, "'chosen' is empty"),
    ({"prompt": "q", "chosen": "a", "rejected": ""}, "'rejected' is empty"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "'prompt' is empty"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": ""}], "rejected": "b"}, "empty content"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "'margin' must be a number"),
])
def test_bad_records_name_file_and_line(tmp_path, record, reason):
    path = write_jsonl(tmp_path / "p.jsonl", [PAIRS[0], "", record])  # the blank line still counts
    with pytest.raises(ValueError) as e:
        read_preferences(path)
    assert f"{path}:3:" in str(e.value) and reason in str(e.value)


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_preferences(tmp_path / "nope.jsonl")
    path = write_jsonl(tmp_path / "p.jsonl", [PAIRS[0], "{not json"])
    with pytest.raises(ValueError, match=r"p.jsonl:2: invalid JSON"):
        read_preferences(path)


def test_identical_pairs_are_counted_and_skipped(tmp_path):
    same = {"prompt": "q", "chosen": "same answer", "rejected": "same answer"}
    pairs, stats = read_preferences(write_jsonl(tmp_path / "p.jsonl", [PAIRS[0], same, PAIRS[1], same]))
    assert stats == {"records": 4, "pairs": 2, "identical_skipped": 2}
    assert [p.chosen[0]["content"] for p in pairs] == [PAIRS[0]["chosen"], PAIRS[1]["chosen"]]
    with pytest.raises(ValueError, match="no usable preference pairs"):
        read_preferences(write_jsonl(tmp_path / "q.jsonl", [same]))


# ----------------------------------------------------------------------------- tokens and batches
def test_response_mask_covers_exactly_the_response_and_its_end():
    pair = parse_preference({"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                                        {"role": "user", "content": "What is 2 plus 3?"}],
                             "chosen": "2 plus 3 is 5.", "rejected": "No."}, "f:1")
    e = encode_pair(TOK, pair)
    for ids, mask, text in ((e.chosen_ids, e.chosen_mask, "2 plus 3 is 5."), (e.rejected_ids, e.rejected_mask, "No.")):
        assert len(ids) == len(mask)
        scored = [i for i, m in zip(ids, mask) if m]
        assert scored == TOK.encode(text) + [TOK.end_id]  # the earlier assistant turn "Hello." is not scored
        assert ids[-1] == TOK.end_id and TOK.decode(ids).startswith("<|user|>Hi<|end|><|assistant|>Hello.")


def test_collate_stacks_chosen_then_rejected_right_padded():
    pairs = [encode_pair(TOK, parse_preference(r, "f")) for r in PAIRS[:3]]
    batch = collate_pairs(pairs, TOK.pad_id)
    B = len(pairs)
    assert batch["input_ids"].shape[0] == 2 * B
    for i, p in enumerate(pairs):
        for row, ids, mask in ((i, p.chosen_ids, p.chosen_mask), (B + i, p.rejected_ids, p.rejected_mask)):
            n = len(ids)
            assert batch["input_ids"][row, :n].tolist() == ids and batch["loss_mask"][row, :n].tolist() == mask
            assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
            assert torch.all(batch["input_ids"][row, n:] == TOK.pad_id)
    assert "margin" not in batch
    with_margin = collate_pairs([encode_pair(TOK, parse_preference({**PAIRS[0], "margin": 2}, "f"))], TOK.pad_id)
    assert with_margin["margin"].tolist() == [2.0]


def test_too_long_pairs_are_dropped_and_counted():
    long = parse_preference({"prompt": "q", "chosen": "a", "rejected": "word " * 80}, "f")
    short = parse_preference(PAIRS[0], "f")
    encoded, dropped = encode_preferences(TOK, [short, long], block_size=64)
    assert dropped == 1 and len(encoded) == 1


def test_split_pairs_is_seeded_and_disjoint():
    items = list(range(40))
    train, val = split_pairs(items, 0.1, seed=3)
    assert len(val) == 4 and sorted(train + val) == items
    assert split_pairs(items, 0.1, seed=3) == (train, val)
    assert split_pairs(items[:10], 0.1, seed=3)[1] == []  # too few pairs for a validation split
    with pytest.raises(ValueError, match="val_fraction"):
        split_pairs(items, 1.0, seed=0)


# ----------------------------------------------------------------------------- loss and scoring
def test_loss_fn_matches_rewards_computed_one_sequence_at_a_time(tmp_path):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=TOK.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32)
    rm = RewardModel(GPT(cfg)).eval()
    torch.nn.init.normal_(rm.score.weight, std=1.0)  # rewards far from 0, so a mix-up would show
    pairs = [encode_pair(TOK, parse_preference(r, "f")) for r in PAIRS]
    batch = collate_pairs(pairs, TOK.pad_id)
    loss_sum, n = reward_loss_fn()(rm, batch)
    with torch.no_grad():
        r_w = torch.stack([rm(torch.tensor([p.chosen_ids]))[0] for p in pairs])
        r_l = torch.stack([rm(torch.tensor([p.rejected_ids]))[0] for p in pairs])
    assert n == len(PAIRS)
    torch.testing.assert_close(loss_sum / n, bradley_terry_loss(r_w, r_l), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(score_sequences(rm, [p.chosen_ids for p in pairs], TOK.pad_id, batch_size=4), r_w,
                               rtol=1e-5, atol=1e-6)
    texts = score_texts(rm, TOK, [r["prompt"] for r in PAIRS], [r["chosen"] for r in PAIRS], offset=0.5)
    torch.testing.assert_close(texts, r_w - 0.5, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="response 1 is empty"):
        score_texts(rm, TOK, ["q", "q"], ["fine", " "])


def test_reward_offset_by_hand_with_empty_samples(tmp_path):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=TOK.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32)
    rm, policy = RewardModel(GPT(cfg)).eval(), GPT(cfg).eval()
    torch.nn.init.normal_(rm.score.weight, std=1.0)
    prompts = ["What is 2 plus 3?", "Where does Mira live?", "Hi"]
    # max_new_tokens=0: every sample is the empty reply, scored as prompt ++ <|end|>
    out = reward_offset(rm, policy, TOK, prompts, max_new_tokens=0)
    with torch.no_grad():
        r = torch.stack([rm(torch.tensor([TOK.apply_chat_template([{"role": "user", "content": p}],
                                                                   add_generation_prompt=True)[0] + [TOK.end_id]]))[0]
                         for p in prompts])
    assert out["n_samples"] == 3
    assert out["reward_offset"] == pytest.approx(float(r.mean()), abs=1e-5)
    assert out["reward_std"] == pytest.approx(float(r.std(correction=0)), abs=1e-5)


# ----------------------------------------------------------------------------- calibration
def test_calibration_by_hand(tmp_path):
    r_c, r_r = torch.tensor([2.0, 0.0, 0.5]), torch.tensor([0.0, 1.0, 0.5])
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    cal = calibration(r_c, r_r, n_bins=2)
    # both orders: p = s(2), s(-1), 0.5 with label 1 and 1 - p with label 0
    low = [s(-1), 1 - s(2)]  # labels 1, 0
    high = [s(2), 0.5, 1 - s(-1), 0.5]  # labels 1, 1, 0, 0
    assert cal["counts"] == [2, 4]
    assert cal["predicted"] == pytest.approx([sum(low) / 2, sum(high) / 4])
    assert cal["empirical"] == pytest.approx([0.5, 0.5])
    ece = (2 * abs(sum(low) / 2 - 0.5) + 4 * abs(sum(high) / 4 - 0.5)) / 6
    assert cal["ece"] == pytest.approx(ece)
    png = plot_calibration(cal, tmp_path / "cal.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.glob(".*tmp*"))
    with pytest.raises(ValueError, match="n_bins"):
        calibration(r_c, r_r, n_bins=0)


# ----------------------------------------------------------------------------- the stage
def test_run_reward_learns_saves_and_loads(tmp_path, capsys):
    init = make_run(tmp_path / "sft")
    same = {"prompt": "q", "chosen": "x", "rejected": "x"}
    data = write_jsonl(tmp_path / "train.jsonl", PAIRS + [same])
    test = write_jsonl(tmp_path / "test.jsonl", PAIRS)
    pairs, _ = read_preferences(test)
    encoded, _ = encode_preferences(TOK, pairs, 64)
    run = run_reward(init, data, tmp_path / "rm", tiny_cfg(), RewardConfig(val_fraction=0.0, norm_prompts=3),
                     test=test, progress=False)
    rm, stats = run.model, run.stats
    assert stats["identical_skipped"] == 1 and stats["train_pairs"] == len(PAIRS)
    assert "skipped 1 pairs whose chosen equals rejected" in capsys.readouterr().out
    with torch.no_grad():
        after, n = reward_loss_fn()(rm, collate_pairs(encoded, TOK.pad_id))
        torch.manual_seed(1)
        fresh = RewardModel(load_run(init)[0]).eval()  # the SFT backbone with a new head
        before, _ = reward_loss_fn()(fresh, collate_pairs(encoded, TOK.pad_id))
    assert float(before / n) == pytest.approx(math.log(2), abs=0.05)  # the fresh head scores ~0: loss ~ ln 2
    assert float(after / n) < 0.3
    assert stats["test_accuracy"] == 1.0
    rows = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert all("accuracy" in r and "margin" in r for r in rows if "loss" in r)
    assert (tmp_path / "rm" / "calibration.png").exists() and (tmp_path / "rm" / "eval.json").exists()

    loaded, tok, cfg = load_reward_model(tmp_path / "rm")
    assert cfg["stage"] == "reward" and cfg["reward_offset"] == pytest.approx(stats["reward_offset"])
    ids = [encoded[0].chosen_ids]
    torch.testing.assert_close(score_sequences(loaded, ids, tok.pad_id), score_sequences(rm, ids, tok.pad_id))
    with pytest.raises(ValueError, match="not a reward-model run"):
        load_reward_model(init)


def test_reward_cli_validates_before_loading(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["reward", "--preset", "tiny", "--init", str(tmp_path / "missing"), "--test", "",
                              "--max-steps", "2"])
    assert args.func.__name__ == "cmd_reward" and args.test == ""
    with pytest.raises(FileNotFoundError, match="missing"):
        args.func(args)
    args = parser.parse_args(["reward", "--init", str(tmp_path), "--center-coef", "-1"])
    with pytest.raises(ValueError, match="center_coef"):
        args.func(args)


def test_loglik_reward_model_saves_and_loads(tmp_path):
    init = make_run(tmp_path / "sft")
    data = write_jsonl(tmp_path / "train.jsonl", PAIRS)
    run = run_reward(init, data, tmp_path / "rm", tiny_cfg(),
                     RewardConfig(val_fraction=0.0, norm_prompts=3, loglik=True), progress=False)
    assert run.model.loglik_scale is not None
    loaded, tok, cfg = load_reward_model(tmp_path / "rm")
    assert cfg["reward"]["loglik"] is True and loaded.loglik_scale is not None
    pairs, _ = read_preferences(data)
    ids = [encode_preferences(TOK, pairs, 64)[0][0].chosen_ids]
    torch.testing.assert_close(score_sequences(loaded, ids, tok.pad_id), score_sequences(run.model, ids, tok.pad_id))
