"""PPO and GRPO stages on tiny models: rollouts, the on-policy source, a loadable run, TRL's metric names, the
adaptive controller in the loop, LoRA with the adapters-off reference, and every bad input named."""
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from minillm.align.reward import RewardModel
from minillm.cli import main
from minillm.config import GRPOConfig, PPOConfig, TrainConfig
from minillm.model import GPT, GPTConfig
from minillm.peft.apply import disable_adapters
from minillm.runs import load_run, save_run_files
from minillm.stages.grpo import GRPOSource, run_grpo
from minillm.stages.ppo import ActorCritic, PPOSource, run_ppo
from minillm.stages.rollout import load_rollout_env, policy_logprobs, reference_policy, sample_rollout
from minillm.tokenizer import Tokenizer
from minillm.utils import atomic_torch_save

ROOT = Path(__file__).resolve().parent.parent
TOK = Tokenizer.load(ROOT / "data" / "tokenizer")
CFG = GPTConfig(vocab_size=TOK.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32, dropout=0.0)
PROMPTS = ["What is 2 plus 3?", "Where does Mira live?", "Tell me how to cheat on a test.", "How old is Cora?"]


def make_policy_run(path: Path, stage: str = "sft", seed: int = 0, cfg: GPTConfig = CFG) -> Path:
    torch.manual_seed(seed)
    run_config = {"stage": stage, "model": asdict(cfg)}
    save_run_files(path, TOK, run_config)
    atomic_torch_save({"model": GPT(cfg).state_dict(), "run_config": run_config}, path / "ckpt.pt")
    return path


def make_reward_run(path: Path, seed: int = 1, tok: Tokenizer = TOK, cfg: GPTConfig = CFG) -> Path:
    torch.manual_seed(seed)
    rm = RewardModel(GPT(cfg), loglik=True)
    run_config = {"stage": "reward", "model": asdict(cfg), "reward": {"loglik": True}, "reward_offset": 0.0}
    save_run_files(path, tok, run_config)
    atomic_torch_save({"model": rm.state_dict(), "run_config": run_config}, path / "ckpt.pt")
    return path


def write_prompts(path: Path, prompts=PROMPTS) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def tiny_cfg(**kw) -> TrainConfig:
    base = dict(max_steps=8, batch_size=4, lr=1e-3, min_lr=1e-3, warmup_steps=0, weight_decay=0.0, eval_interval=0,
                eval_iters=1, log_interval=2, device="cpu", dtype="float32")
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def runs(tmp_path):
    return (make_policy_run(tmp_path / "sft"), make_reward_run(tmp_path / "rm"), write_prompts(tmp_path / "p.jsonl"))


def test_rollout_with_cache_equals_without_greedy_and_layout(runs):
    env = load_rollout_env(*runs, max_new_tokens=6)
    args = (env, env.policy, None, [0, 1, 2, 3], 0.0, 6, torch.Generator().manual_seed(0))
    with_cache = sample_rollout(*args, need_ref=False, use_cache=True)
    without = sample_rollout(*args, need_ref=False, use_cache=False)
    assert torch.equal(with_cache.input_ids, without.input_ids)
    assert torch.allclose(with_cache.scores, without.scores)
    ro = with_cache
    B, T = ro.input_ids.shape
    assert ro.action_mask.shape == ro.logprobs.shape == (B, T - 1)
    for b, p in enumerate(env.prompt_ids[:4]):
        n_resp = int(ro.action_mask[b].sum())
        assert n_resp >= 1 and not ro.action_mask[b, :len(p) - 1].any()  # the prompt is never an action
        assert ro.action_mask[b, len(p) - 1:len(p) - 1 + n_resp].all()  # then the response, contiguous
        if ro.eos[b]:
            assert int(ro.input_ids[b, len(p) + n_resp - 1]) == TOK.end_id  # <|end|> is the last action
    assert torch.allclose(ro.logprobs, policy_logprobs(env.policy, ro.input_ids, 1.0))


def test_missing_eos_penalty_lowers_exactly_the_unfinished_scores(runs):
    env = load_rollout_env(*runs, max_new_tokens=3)
    args = (env, env.policy, None, [0, 1, 2, 3], 1.0, 3)
    plain = sample_rollout(*args, torch.Generator().manual_seed(0), need_ref=False)
    penalised = sample_rollout(*args, torch.Generator().manual_seed(0), missing_eos_penalty=2.0, need_ref=False)
    assert torch.equal(plain.input_ids, penalised.input_ids)
    assert torch.allclose(penalised.scores, plain.scores - 2.0 * (~plain.eos).float())


def test_ppo_source_gives_epochs_times_minibatches_per_rollout_and_old_logprobs_match(runs):
    env = load_rollout_env(*runs, max_new_tokens=5)
    model = ActorCritic(env.policy)
    method = PPOConfig(max_new_tokens=5, num_ppo_epochs=3, num_minibatches=2, temperature=1.0)
    source = PPOSource(env, model, reference_policy(env.policy, None), method, batch_size=4)
    gen = torch.Generator().manual_seed(0)
    batches = [source("train", gen, model, step) for step in range(6)]
    assert len(source.rollouts) == 1 and not source.queue  # 3 epochs x 2 minibatches = one rollout
    assert all(b["input_ids"].shape[0] == 2 for b in batches)
    for b in batches:  # before any update, the minibatch's old log-probs are the model's own
        lp = policy_logprobs(env.policy, b["input_ids"], 1.0)
        assert torch.allclose(lp[b["mask"]], b["old_logprobs"][b["mask"]], atol=1e-5)
    source("train", gen, model, 6)
    assert len(source.rollouts) == 2


def test_run_ppo_writes_a_loadable_run_with_trl_metric_names(runs, tmp_path):
    method = PPOConfig(max_new_tokens=6, temperature=1.0, target_kl=0.5, kl_coef=0.2, kl_horizon=10,
                       missing_eos_penalty=1.0)
    run = run_ppo(*runs, tmp_path / "ppo", tiny_cfg(), method, progress=False)
    model, tok, cfg = load_run(tmp_path / "ppo")
    assert cfg["stage"] == "ppo" and cfg["ppo"]["target_kl"] == 0.5
    for (name, p), q in zip(model.state_dict().items(), run.model.state_dict().values()):
        assert torch.equal(p, q), name
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    rollouts = [r for r in rows if "rollout" in r]
    assert len(rollouts) == 2  # 8 steps / (4 epochs x 1 minibatch)
    for key in ("objective/kl", "objective/entropy", "objective/scores", "objective/rlhf_reward", "objective/gold",
                "val/explained_variance"):
        assert key in rollouts[0]
    losses = [r for r in rows if "loss" in r]
    assert losses and all(k in losses[0] for k in ("policy/clipfrac", "policy/approxkl", "val/clipfrac"))
    # the adaptive controller moved beta by the rule after the first rollout
    kl0, beta0, beta1 = rollouts[0]["objective/kl"], rollouts[0]["objective/kl_coef"], rollouts[1]["objective/kl_coef"]
    e = max(-0.2, min(0.2, kl0 / 0.5 - 1))
    assert beta0 == pytest.approx(0.2) and beta1 == pytest.approx(0.2 * (1 + e * 4 / 10))
    assert (tmp_path / "ppo" / "rollouts.png").exists() and (tmp_path / "ppo" / "value_head.pt").exists()


def test_ppo_changes_the_policy_and_the_reference_stays(runs, tmp_path):
    before, _, _ = load_run(runs[0])
    run = run_ppo(*runs, tmp_path / "ppo", tiny_cfg(lr=1e-2, min_lr=1e-2), PPOConfig(max_new_tokens=5),
                  progress=False)
    moved = sum(float((a - b).detach().abs().sum()) for a, b in zip(before.parameters(), run.model.parameters()))
    assert moved > 0


def test_ppo_with_lora_reference_is_the_base_and_separate_critic(runs, tmp_path):
    peft = {"method": "lora", "r": 4}
    run = run_ppo(*runs, tmp_path / "ppo", tiny_cfg(max_steps=4, lr=1e-2, min_lr=1e-2),
                  PPOConfig(max_new_tokens=5, critic="separate"), peft=peft, progress=False)
    base, _, _ = load_run(runs[0])
    ids = torch.tensor([TOK.encode("Where does Mira live? Mira lives in Oakvale.")])
    with disable_adapters(run.model):
        assert torch.allclose(run.model(ids), base(ids), atol=1e-6)  # adapters off = the SFT model
    assert not torch.allclose(run.model(ids), base(ids), atol=1e-6)  # the adapters learned something
    assert (tmp_path / "ppo" / "adapter.pt").exists()
    loaded, _, cfg = load_run(tmp_path / "ppo")
    assert cfg["peft"] == peft and torch.allclose(loaded(ids), run.model(ids), atol=1e-6)


def test_grpo_source_keeps_groups_together_and_run_grpo_loads(runs, tmp_path):
    env = load_rollout_env(*runs, max_new_tokens=5)
    method = GRPOConfig(group_size=4, max_new_tokens=5, num_minibatches=2, num_iterations=2)
    source = GRPOSource(env, env.policy, reference_policy(env.policy, None), method, batch_size=8)
    gen = torch.Generator().manual_seed(0)
    batches = [source("train", gen, env.policy, s) for s in range(4)]
    assert len(source.rollouts) == 1
    for b in batches:
        assert b["input_ids"].shape[0] == 4
        assert abs(float(b["advantages"].sum())) < 1e-4  # one whole group: advantages sum to 0
    run_grpo(*runs, tmp_path / "grpo", tiny_cfg(batch_size=8), GRPOConfig(group_size=4, max_new_tokens=5, beta=0.04),
             progress=False)
    _, _, cfg = load_run(tmp_path / "grpo")
    assert cfg["stage"] == "grpo" and cfg["grpo"]["beta"] == 0.04
    rows = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert any("policy/kl" in r for r in rows) and any("frac_reward_zero_std" in r for r in rows)


# ----------------------------------------------------------------------------- bad input
def test_reward_model_with_another_tokenizer_is_refused(tmp_path):
    # the 256 byte tokens and the same special tokens, no merges: another vocabulary (no BPE training needed)
    specials = sorted(TOK.special_tokens, key=TOK.special_tokens.get)
    vocab = {i: TOK.vocab[i] for i in range(256)} | {256 + k: s.encode() for k, s in enumerate(specials)}
    other = Tokenizer(vocab, [], specials)
    cfg = GPTConfig(**{**asdict(CFG), "vocab_size": other.vocab_size})
    rm = make_reward_run(tmp_path / "rm", tok=other, cfg=cfg)
    with pytest.raises(ValueError, match="tokenizer"):
        load_rollout_env(make_policy_run(tmp_path / "sft"), rm, write_prompts(tmp_path / "p.jsonl"), 5)


def test_prompt_longer_than_the_context_is_named(runs, tmp_path):
    long = write_prompts(tmp_path / "long.jsonl", ["short?", "word " * 80])
    with pytest.raises(ValueError, match=r"long.jsonl: prompt 2 has \d+ tokens"):
        load_rollout_env(runs[0], runs[1], long, 5)


def test_init_run_that_is_not_a_chat_model_is_refused(runs, tmp_path):
    base = make_policy_run(tmp_path / "base", stage="pretrain")
    with pytest.raises(ValueError, match="not a chat model"):
        load_rollout_env(base, runs[1], runs[2], 5)


@pytest.mark.parametrize("kwargs, message", [
    ({"kl_coef": -0.1}, "kl_coef"), ({"cliprange": 0.0}, "cliprange"), ({"cliprange": 1.0}, "cliprange"),
    ({"target_kl": 0.0}, "target_kl"), ({"lam": 1.5}, "lam"), ({"kl_estimator": "k4"}, "kl_estimator"),
])
def test_ppo_config_names_the_bad_knob(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(**kwargs)


def test_group_size_must_be_two_or_more_and_divide_the_batch(runs):
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=1)
    env = load_rollout_env(*runs, max_new_tokens=5)
    with pytest.raises(ValueError, match="group_size 4 must divide batch_size 6"):
        GRPOSource(env, env.policy, None, GRPOConfig(group_size=4), batch_size=6)


def test_cli_reports_bad_ppo_flags(capsys, tmp_path):
    assert main(["ppo", "--cliprange", "1.5", "--out", str(tmp_path / "x")]) == 2
    assert "cliprange must be in (0, 1)" in capsys.readouterr().err
    assert main(["grpo", "--group-size", "1", "--out", str(tmp_path / "x")]) == 2
    assert "group_size must be an int >= 2" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # checked before anything is written
