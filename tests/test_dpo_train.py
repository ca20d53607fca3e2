"""DPO stage: concatenated log-probs, a reference that never moves, the trainer on a tiny model, the CLI's checks."""
import copy
import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from minillm.align.logprobs import sequence_logprobs
from minillm.align.preferences import collate_pairs, encode_pair, parse_preference, read_preferences
from minillm.cli import main
from minillm.config import DPOConfig, TrainConfig
from minillm.model import GPT, GPTConfig
from minillm.peft.apply import apply_peft, disable_adapters
from minillm.runs import load_run, save_run_files
from minillm.stages.dpo import (
    concatenated_logps, dpo_loss_fn, evaluate_dpo, precompute_reference_logps, reference_logps, reward_and_kl,
    run_dpo,
)
from minillm.tokenizer import Tokenizer
from minillm.utils import atomic_torch_save
from minillm.world import gold_reward

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
CFG = GPTConfig(vocab_size=TOK.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32, dropout=0.0)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def make_run(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = GPT(CFG)
    run_config = {"stage": "sft", "model": asdict(CFG)}
    save_run_files(path, TOK, run_config)
    atomic_torch_save({"model": model.state_dict(), "run_config": run_config}, path / "ckpt.pt")
    return path


def tiny_cfg(**kw) -> TrainConfig:
    base = dict(max_steps=20, batch_size=6, lr=3e-3, min_lr=3e-3, warmup_steps=0, weight_decay=0.0,
                eval_interval=0, eval_iters=1, log_interval=5, device="cpu", dtype="float32")
    return TrainConfig(**{**base, **kw})


def batch_of(rows=PAIRS):
    return collate_pairs([encode_pair(TOK, parse_preference(r, "f")) for r in rows], TOK.pad_id)


def mean_loss(model, reference, rows=PAIRS, **kw) -> float:
    with torch.no_grad():
        s, n = dpo_loss_fn(reference, **kw)(model.eval(), batch_of(rows))
    return float(s / n)


# ----------------------------------------------------------------------------- log-probs
def test_concatenated_logps_equal_each_sequence_alone():
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    batch = batch_of()
    with torch.no_grad():
        pi_w, pi_l = concatenated_logps(model, batch)
        for i, r in enumerate(PAIRS):
            e = encode_pair(TOK, parse_preference(r, "f"))
            for ids, mask, got in ((e.chosen_ids, e.chosen_mask, pi_w[i]), (e.rejected_ids, e.rejected_mask, pi_l[i])):
                alone = sequence_logprobs(model, torch.tensor([ids]), torch.tensor([mask]))[0]
                torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)
        avg_w, _ = concatenated_logps(model, batch, average=True)
        n_w = batch["loss_mask"][: len(PAIRS), 1:].sum(-1)
        torch.testing.assert_close(avg_w, pi_w / n_w, rtol=1e-5, atol=1e-6)


def test_loss_is_ln2_at_the_start_and_precomputed_reference_agrees():
    torch.manual_seed(0)
    model = GPT(CFG)
    reference = copy.deepcopy(model).eval()
    assert mean_loss(model, reference) == pytest.approx(math.log(2), abs=1e-6)
    pairs = [encode_pair(TOK, parse_preference(r, "f")) for r in PAIRS]
    table = precompute_reference_logps(model, reference, pairs, TOK.pad_id, batch_size=4)  # (N, 2)
    batch = batch_of()
    batch["ref_logps"] = torch.cat([table[:, 0], table[:, 1]])
    with torch.no_grad():
        s, n = dpo_loss_fn(None)(model.eval(), batch)  # reference=None would need adapters: the table is used
    assert float(s / n) == pytest.approx(math.log(2), abs=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(torch.stack(concatenated_logps(reference, batch), dim=1), table)


def test_rpo_term_adds_the_chosen_per_token_nll():
    torch.manual_seed(0)
    model = GPT(CFG)
    reference = copy.deepcopy(model).eval()
    batch = batch_of()
    with torch.no_grad():
        pi_w, _ = concatenated_logps(model.eval(), batch)
    n_w = torch.tensor([len(TOK.encode(r["chosen"])) + 1 for r in PAIRS], dtype=pi_w.dtype)  # answer + <|end|>
    expected = math.log(2) + 0.5 * float((-pi_w / n_w).mean())
    assert mean_loss(model, reference, rpo_alpha=0.5) == pytest.approx(expected, rel=1e-5)
    assert mean_loss(model, reference, rpo_alpha=0.5, average=True) == pytest.approx(expected, rel=1e-5)


def _one_dpo_step(model, reference, lr=0.05):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    loss_sum, n = dpo_loss_fn(reference)(model, batch_of())
    (loss_sum / n).backward()
    opt.step()
    opt.zero_grad()


def test_reference_logps_unchanged_by_a_dpo_step_frozen_copy():
    torch.manual_seed(0)
    model = GPT(CFG)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    batch = batch_of()
    before_ref = reference_logps(model, reference, batch)
    before_pi = concatenated_logps(model.eval(), batch)
    _one_dpo_step(model, reference)
    after_ref = reference_logps(model, reference, batch)
    with torch.no_grad():
        after_pi = concatenated_logps(model.eval(), batch)
    for b, a in zip(before_ref, after_ref):
        assert torch.equal(b, a)
    assert not torch.allclose(before_pi[0], after_pi[0])  # the policy itself did move


def test_reference_logps_unchanged_by_a_dpo_step_adapters_disabled():
    torch.manual_seed(0)
    base = GPT(CFG)
    sft = copy.deepcopy(base).eval()
    model = apply_peft(base, "lora", r=4, lora_alpha=8)
    batch = batch_of()
    with torch.no_grad():
        sft_logps = concatenated_logps(sft, batch)
    for _ in range(2):  # after the first step B != 0, so the second changes the adapted model's output
        _one_dpo_step(model, None)
    ref = reference_logps(model, None, batch)
    for s, r in zip(sft_logps, ref):
        torch.testing.assert_close(s, r, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        adapted = concatenated_logps(model.eval(), batch)
        assert not torch.allclose(adapted[0], sft_logps[0])


# ----------------------------------------------------------------------------- the stage
def test_run_dpo_reduces_the_loss_and_saves_a_loadable_run(tmp_path, capsys):
    init = make_run(tmp_path / "sft")
    same = {"prompt": "q", "chosen": "x", "rejected": "x"}
    data = write_jsonl(tmp_path / "train.jsonl", PAIRS + [same, same])
    test = write_jsonl(tmp_path / "test.jsonl", PAIRS)
    sft, _, _ = load_run(init)
    run = run_dpo(init, data, tmp_path / "dpo", tiny_cfg(), DPOConfig(val_fraction=0.0), test=test, progress=False)
    policy, stats = run.model, run.stats
    assert stats["identical_skipped"] == 2 and stats["train_pairs"] == len(PAIRS)
    assert "skipped 2 pairs whose chosen equals rejected" in capsys.readouterr().out
    assert mean_loss(sft, sft) == pytest.approx(math.log(2), abs=1e-6)
    assert mean_loss(policy, sft) < 0.35
    assert stats["test_accuracy"] == 1.0
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert all("rewards/accuracies" in r and "logps/rejected" in r for r in rows if "loss" in r)
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]
    loaded, _, cfg = load_run(tmp_path / "dpo")
    assert cfg["stage"] == "dpo" and cfg["dpo"]["average_logps"] is False
    batch = batch_of()
    with torch.no_grad():
        torch.testing.assert_close(concatenated_logps(loaded, batch)[0], concatenated_logps(policy, batch)[0])


def test_run_dpo_with_lora_uses_the_disabled_adapters_as_reference(tmp_path):
    init = make_run(tmp_path / "sft")
    data = write_jsonl(tmp_path / "train.jsonl", PAIRS)
    sft, _, _ = load_run(init)
    run_dpo(init, data, tmp_path / "dpo", tiny_cfg(lr=2e-2, min_lr=2e-2), DPOConfig(loss_type="ipo", val_fraction=0.0),
            peft={"method": "lora", "r": 4, "lora_alpha": 8}, progress=False)
    loaded, _, cfg = load_run(tmp_path / "dpo")
    assert cfg["peft"]["method"] == "lora" and cfg["dpo"]["average_logps"] is True  # IPO averages, as TRL
    assert (tmp_path / "dpo" / "adapter.pt").exists()
    batch = batch_of()
    with torch.no_grad():
        with disable_adapters(loaded):
            ref = concatenated_logps(loaded, batch)
        torch.testing.assert_close(ref[0], concatenated_logps(sft, batch)[0], rtol=1e-5, atol=1e-5)
    ipo = dict(loss_type="ipo", beta=0.1, average=True)
    assert mean_loss(loaded, None, **ipo) < mean_loss(sft, sft, **ipo)
    ev = evaluate_dpo(loaded, None, TOK, [parse_preference(r, "f") for r in PAIRS], beta=0.1, average=True)
    assert ev["n"] == len(PAIRS) and set(ev["per_kind_accuracy"]) == {"wrong", "all"}


def test_evaluate_dpo_accuracy_by_hand():
    torch.manual_seed(0)
    policy, reference = GPT(CFG).eval(), GPT(CFG).eval()
    pairs = [parse_preference(r, "f") for r in PAIRS]
    ev = evaluate_dpo(policy, reference, TOK, pairs, beta=0.5)
    batch = batch_of()
    with torch.no_grad():
        pw, pl = concatenated_logps(policy, batch)
        rw, rl = concatenated_logps(reference, batch)
    expected = ((0.5 * (pw - rw)) > (0.5 * (pl - rl))).float().mean().item()
    assert ev["rewards/accuracies"] == pytest.approx(expected)
    assert ev["rewards/margins"] == pytest.approx((0.5 * ((pw - rw) - (pl - rl))).mean().item(), abs=1e-5)


def test_reward_and_kl_of_the_reference_itself():
    torch.manual_seed(0)
    policy = GPT(CFG).eval()
    prompts = ["What is 2 plus 3?", "Where does Mira live?"]
    out = reward_and_kl(policy, copy.deepcopy(policy), TOK, prompts, n_samples=2, max_new_tokens=8,
                        reward_fn=lambda x, y: float(len(x)))
    assert out["n"] == 4 and out["kl"] == pytest.approx(0.0, abs=1e-5)
    assert out["reward"] == pytest.approx(sum(len(p) for p in prompts) / 2)
    other = GPT(CFG).eval()  # a different network: KL(pi || ref) > 0 in expectation
    out2 = reward_and_kl(policy, other, TOK, prompts, n_samples=4, max_new_tokens=8)
    assert out2["kl"] > 0
    explicit = reward_and_kl(policy, other, TOK, prompts, n_samples=4, max_new_tokens=8, reward_fn=gold_reward)
    assert out2 == explicit  # the default reward is the world's gold reward


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("flag, value, message", [
    ("--beta", "0", "beta must be a finite number > 0"),
    ("--beta", "-0.1", "beta must be a finite number > 0"),
    ("--beta", "nan", "beta must be a finite number > 0"),
    ("--label-smoothing", "0.5", "label_smoothing must be in [0, 0.5)"),
    ("--label-smoothing", "-0.1", "label_smoothing must be in [0, 0.5)"),
])
def test_cli_rejects_bad_beta_and_label_smoothing(flag, value, message, capsys, tmp_path):
    assert main(["dpo", "--init", str(tmp_path / "missing"), flag, value]) == 2
    assert message in capsys.readouterr().err


def test_cli_checks_hyperparameters_before_loading_anything(tmp_path, capsys):
    missing = str(tmp_path / "missing")
    assert main(["dpo", "--init", missing, "--loss-type", "hinge", "--label-smoothing", "0.1"]) == 2
    assert "label_smoothing applies to loss_type 'sigmoid' or 'robust'" in capsys.readouterr().err
    assert main(["dpo", "--init", missing, "--test", ""]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["dpo", "--init", missing, "--rpo-alpha", "-1"]) == 2
    assert "rpo_alpha" in capsys.readouterr().err
    with pytest.raises(ValueError, match="beta"):
        run_dpo(tmp_path / "missing", tmp_path / "none.jsonl", tmp_path / "out", tiny_cfg(), DPOConfig(beta=0.0))
    assert not (tmp_path / "out").exists()


def test_bad_preference_file_reaches_the_stage(tmp_path):
    init = make_run(tmp_path / "sft")
    data = write_jsonl(tmp_path / "train.jsonl", [PAIRS[0], {"prompt": "q", "chosen": "a", "rejected": " "}])
    with pytest.raises(ValueError, match=r"train.jsonl:2: 'rejected' is empty"):
        run_dpo(init, data, tmp_path / "dpo", tiny_cfg(), progress=False)
    assert read_preferences(write_jsonl(tmp_path / "ok.jsonl", PAIRS))[1]["pairs"] == len(PAIRS)
