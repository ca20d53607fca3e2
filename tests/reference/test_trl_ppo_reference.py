"""Our PPO / GRPO math (minillm.align.ppo, minillm.align.grpo) against TRL 0.19's own code.

Where TRL 0.19 has a function we call it: `trl.core.masked_mean` / `masked_whiten`, the GRPO loss
`GRPOTrainer._compute_loss` (called unbound with a SimpleNamespace as `self`, so no model is needed) and
TRL's Bessel std `nanstd`. The PPO rollout targets, the PPO losses and the GRPO advantages are inline in
TRL's `train` / `_generate_and_score_completions`; for those the test first checks that the TRL source still
holds the formula and then compares with a line-by-line transcription of it. Skipped when TRL or its
trainers cannot be imported:

    pip install --no-deps trl==0.19.0   # plus transformers<5, accelerate, datasets, pandas if not present
"""
import inspect
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from minillm.align.grpo import group_advantages, grpo_loss
from minillm.align.ppo import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    masked_mean,
    masked_whiten,
    per_token_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    token_entropy,
)

trl = pytest.importorskip("trl")
try:
    import trl.core as trl_core
    from trl.trainer.grpo_trainer import GRPOTrainer, nanstd
    from trl.trainer.ppo_trainer import INVALID_LOGPROB, PPOTrainer
except Exception as e:  # noqa: BLE001 (a transformers/datasets mismatch can raise more than ImportError)
    pytest.skip(f"trl {trl.__version__} is installed but its trainers cannot be imported: {e}",
                allow_module_level=True)
if not trl.__version__.startswith("0.19."):
    pytest.skip(f"these tests call TRL 0.19's internal API; found trl {trl.__version__}", allow_module_level=True)

F64 = torch.float64
PPO_TRAIN_SRC = inspect.getsource(PPOTrainer.train)


def randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def ragged_mask(lengths: list[int], width: int) -> torch.Tensor:
    """(B, width) bool mask: row b is True on its first lengths[b] positions."""
    return torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def assert_in_trl_source(source: str, *snippets: str) -> None:
    for s in snippets:
        assert s in source, f"TRL's source no longer contains {s!r}: re-read it before trusting this comparison"


# ----------------------------------------------------------------------------- trl.core
@pytest.mark.parametrize("dim", [None, 1, 0])
def test_masked_mean_matches_trl(dim):
    x, mask = randn(0, 4, 6), ragged_mask([6, 3, 1, 5], 6)
    torch.testing.assert_close(masked_mean(x, mask, dim), trl_core.masked_mean(x, mask, axis=dim))


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_trl(shift_mean):
    x, mask = 5 + 3 * randn(1, 4, 6), ragged_mask([6, 3, 1, 5], 6)
    ours = masked_whiten(x, mask, shift_mean=shift_mean)
    theirs = trl_core.masked_whiten(x, mask, shift_mean=shift_mean)
    torch.testing.assert_close(ours[mask], theirs[mask])
    # TRL leaves whitened padding in place and its trainer masks it out afterwards; ours is 0 there already
    torch.testing.assert_close(ours, torch.masked_fill(theirs, ~mask, 0))
    assert_in_trl_source(PPO_TRAIN_SRC, "advantages = masked_whiten(advantages, ~padding_mask)",
                         "advantages = torch.masked_fill(advantages, padding_mask, 0)")


def test_trl_masked_var_is_bessel_corrected():
    x, mask = randn(2, 3, 5), ragged_mask([5, 2, 4], 5)
    torch.testing.assert_close(trl_core.masked_var(x, mask), x[mask].var(unbiased=True))


# ----------------------------------------------------------------------------- KL controllers
def find_trl_symbol(name: str):
    for module in ("trl.core", "trl.trainer.utils", "trl.trainer.ppo_trainer", "trl.trainer.ppo_config", "trl"):
        obj = getattr(__import__(module, fromlist=[name]), name, None)
        if obj is not None:
            return obj
    pytest.skip(f"trl {trl.__version__} has no {name}: the KL controllers lived in trl/trainer/utils.py for the "
                "classic PPOTrainer (v0.11); 0.19's PPOTrainer uses a fixed kl_coef and no controller class")


def test_adaptive_kl_controller_matches_trl():
    TrlAdaptive = find_trl_symbol("AdaptiveKLController")
    ours, theirs = AdaptiveKLController(0.2, 6.0, 10_000), TrlAdaptive(0.2, 6.0, 10_000)
    for kl, n in [(6.6, 128), (60.0, 128), (0.0, 256), (5.0, 64)]:
        ours.update(kl, n)
        theirs.update(kl, n)
        assert ours.value == pytest.approx(theirs.value, rel=1e-12)


def test_fixed_kl_controller_matches_trl():
    TrlFixed = find_trl_symbol("FixedKLController")
    ours, theirs = FixedKLController(0.05), TrlFixed(0.05)
    ours.update(3.0, 128)
    theirs.update(3.0, 128)
    assert ours.value == theirs.value


# ----------------------------------------------------------------------------- PPO rollout targets
def trl_rollout_targets(scores, logprobs, ref_logprobs, values, sequence_lengths, kl_coef, estimator, gamma, lam):
    """Steps 4 to 6 of TRL 0.19's PPOTrainer.train, transcribed: KL rewards, score placement, GAE, whitening.

    sequence_lengths[b] is the index of row b's last response token. TRL fills logprobs past it with
    INVALID_LOGPROB (so their KL is 0), keeps values up to one position past it, and adds the score there
    (seq_len + 1) when that index is inside the window, else at seq_len.
    """
    idx = torch.arange(logprobs.shape[1]).repeat(logprobs.shape[0], 1)
    padding_mask = idx > sequence_lengths.unsqueeze(1)
    logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
    padding_mask_p1 = idx > (sequence_lengths + 1).unsqueeze(1)
    values = torch.masked_fill(values, padding_mask_p1, 0)
    logr = ref_logprobs - logprobs
    kl = -logr if estimator == "k1" else (logr.exp() - 1) - logr
    rewards = -kl_coef * kl
    end = torch.where(sequence_lengths + 1 < rewards.shape[1], sequence_lengths + 1, sequence_lengths)
    rewards[torch.arange(rewards.shape[0]), end] += scores
    last, reversed_adv = 0, []
    for t in reversed(range(rewards.shape[1])):
        next_values = values[:, t + 1] if t < rewards.shape[1] - 1 else 0.0
        last = rewards[:, t] + gamma * next_values - values[:, t] + gamma * lam * last
        reversed_adv.append(last)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    returns = advantages + values
    whitened = torch.masked_fill(trl_core.masked_whiten(advantages, ~padding_mask), padding_mask, 0)
    return SimpleNamespace(logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, rewards=rewards,
                           advantages=advantages, returns=returns, whitened=whitened,
                           padding_mask=padding_mask, padding_mask_p1=padding_mask_p1)


def test_trl_rollout_source_still_holds_the_transcribed_formulas():
    assert_in_trl_source(
        PPO_TRAIN_SRC,
        "kl = -logr if args.kl_estimator == \"k1\" else (logr.exp() - 1) - logr",
        "non_score_reward = -args.kl_coef * kl",
        "actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)",
        "delta = rewards[:, t] + args.gamma * nextvalues - values[:, t]",
        "lastgaelam = delta + args.gamma * args.lam * lastgaelam",
        "returns = advantages + values",
    )


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5)])
def test_rollout_targets_match_trl(estimator, gamma, lam):
    """TRL's episode runs one token past the response (score and a value at seq_len + 1, its
    `padding_mask_p1`). Handing our functions that mask and TRL's INVALID_LOGPROB-filled log-probs
    reproduces TRL's rewards, advantages and returns exactly; whitening then uses the response mask."""
    B, T = 4, 7
    seq_len = torch.tensor([6, 2, 0, 4])  # last response index; row 0 fills the window
    logprobs, ref, values = -randn(3, B, T).abs(), -randn(4, B, T).abs(), randn(5, B, T)
    scores = randn(6, B)
    trl_out = trl_rollout_targets(scores, logprobs, ref, values, seq_len, 0.05, estimator, gamma, lam)
    episode = ~trl_out.padding_mask_p1

    rewards, _ = per_token_rewards(scores, trl_out.logprobs, trl_out.ref_logprobs, episode, 0.05, estimator)
    torch.testing.assert_close(rewards, torch.where(episode, trl_out.rewards, 0.0))
    torch.testing.assert_close(rewards, trl_out.rewards)  # TRL's rewards are 0 past the episode too
    adv, ret = gae(rewards, trl_out.values, episode, gamma=gamma, lam=lam)
    torch.testing.assert_close(adv, trl_out.advantages)
    torch.testing.assert_close(ret, trl_out.returns)
    torch.testing.assert_close(masked_whiten(adv, ~trl_out.padding_mask), trl_out.whitened)


def test_full_rows_need_no_translation():
    """With no padding, TRL's seq_len + 1 falls outside the window: the score lands on the last token, as ours."""
    B, T = 3, 5
    logprobs, ref, values, scores = -randn(7, B, T).abs(), -randn(8, B, T).abs(), randn(9, B, T), randn(10, B)
    trl_out = trl_rollout_targets(scores, logprobs, ref, values, torch.full((B,), T - 1), 0.1, "k1", 1.0, 0.95)
    mask = torch.ones(B, T, dtype=torch.bool)
    rewards, _ = per_token_rewards(scores, logprobs, ref, mask, 0.1)
    torch.testing.assert_close(rewards, trl_out.rewards)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, trl_out.advantages)
    torch.testing.assert_close(ret, trl_out.returns)


# ----------------------------------------------------------------------------- PPO losses
def test_ppo_losses_match_trl():
    assert_in_trl_source(
        PPO_TRAIN_SRC,
        "pg_losses = -mb_advantage * ratio",
        "pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - args.cliprange, 1.0 + args.cliprange)",
        "pg_loss = masked_mean(pg_loss_max, ~padding_mask[micro_batch_inds])",
        "vf_loss = 0.5 * masked_mean(vf_loss_max, ~padding_mask_p1[micro_batch_inds])",
        "(pg_losses2 > pg_losses).float()",
        "(vf_losses2 > vf_losses1).float()",
    )
    B, T, eps, c = 4, 6, 0.2, 0.2
    mask = ragged_mask([6, 3, 1, 5], T)
    old, adv, vpred, old_values, returns = (randn(s, B, T) for s in range(11, 16))
    new = old + 0.4 * randn(16, B, T)  # some ratios beyond 1 +- 0.2
    ratio = torch.exp(new - old)
    pg1, pg2 = -adv * ratio, -adv * torch.clamp(ratio, 1.0 - eps, 1.0 + eps)
    loss, stats = ppo_policy_loss(new, old, adv, mask, cliprange=eps)
    torch.testing.assert_close(loss, trl_core.masked_mean(torch.max(pg1, pg2), mask))
    torch.testing.assert_close(stats["clipfrac"], trl_core.masked_mean((pg2 > pg1).float(), mask).to(F64))
    assert 0 < stats["clipfrac"] < 1

    v_clip = torch.clamp(vpred, old_values - c, old_values + c)
    vf1, vf2 = torch.square(vpred - returns), torch.square(v_clip - returns)
    vf_loss, vf_stats = ppo_value_loss(vpred, old_values, returns, mask, cliprange_value=c)
    torch.testing.assert_close(vf_loss, 0.5 * trl_core.masked_mean(torch.max(vf1, vf2), mask))
    torch.testing.assert_close(vf_stats["vf_clipfrac"], trl_core.masked_mean((vf2 > vf1).float(), mask).to(F64))


def test_entropy_matches_trl_formula():
    assert_in_trl_source(PPO_TRAIN_SRC,
                         "entropy = torch.logsumexp(logits, dim=-1) - torch.sum(prob_dist * logits, dim=-1)")
    logits = 4 * randn(17, 2, 3, 11)
    trl_entropy = torch.logsumexp(logits, dim=-1) - torch.sum(torch.softmax(logits, dim=-1) * logits, dim=-1)
    torch.testing.assert_close(token_entropy(logits), trl_entropy)


# ----------------------------------------------------------------------------- GRPO
def trl_grpo_loss(logp, old, ref, adv, mask, *, beta, eps_low, eps_high, loss_type, max_completion_length):
    """TRL 0.19's GRPOTrainer._compute_loss with `self` faked and the policy forward replaced by `logp`."""
    metrics = defaultdict(lambda: defaultdict(list))
    me = SimpleNamespace(
        _get_per_token_logps=lambda *args, **kwargs: logp,
        beta=beta, epsilon_low=eps_low, epsilon_high=eps_high, args=SimpleNamespace(delta=None),
        loss_type=loss_type, max_completion_length=max_completion_length, model=SimpleNamespace(training=True),
        _metrics=metrics, accelerator=SimpleNamespace(gather=lambda x: x),
    )
    B, T = logp.shape
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
        "ref_per_token_logps": ref, "old_per_token_logps": old, "advantages": adv,
    }
    return GRPOTrainer._compute_loss(me, None, inputs), metrics["train"]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("epsilon_high", [None, 0.28])
def test_grpo_loss_matches_trl(loss_type, beta, epsilon_high):
    B, T, eps = 6, 5, 0.2
    mask = ragged_mask([5, 2, 4, 1, 3, 5], T)
    old, ref = -randn(20, B, T).abs(), -randn(21, B, T).abs()
    logp = (old + 0.3 * randn(22, B, T)).requires_grad_(True)
    adv = randn(23, B)
    ours, stats = grpo_loss(logp, old, ref if beta > 0 else None, adv, mask, epsilon=eps, epsilon_high=epsilon_high,
                            beta=beta, loss_type=loss_type, max_completion_length=8)
    (our_grad,) = torch.autograd.grad(ours, logp)
    theirs, metrics = trl_grpo_loss(logp, old, ref, adv, mask, beta=beta, eps_low=eps,
                                    eps_high=eps if epsilon_high is None else epsilon_high,
                                    loss_type=loss_type, max_completion_length=8)
    (their_grad,) = torch.autograd.grad(theirs, logp)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(our_grad, their_grad)
    assert stats["clip_ratio"].item() == pytest.approx(metrics["clip_ratio/region_mean"][0])
    assert stats["clip_ratio_low"].item() == pytest.approx(metrics["clip_ratio/low_mean"][0])
    assert stats["clip_ratio_high"].item() == pytest.approx(metrics["clip_ratio/high_mean"][0])
    assert 0 < stats["clip_ratio"] < 1
    if beta > 0:
        assert stats["kl"].item() == pytest.approx(metrics["kl"][0])


def test_dapo_is_trls_bnpo_on_one_process():
    """TRL 0.19 predates loss_type="dapo"; on one process it divides by the same token count as bnpo."""
    B, T = 4, 5
    mask = ragged_mask([5, 2, 4, 1], T)
    old = -randn(24, B, T).abs()
    logp, adv = old + 0.3 * randn(25, B, T), randn(26, B)
    ours, _ = grpo_loss(logp, old, None, adv, mask, loss_type="dapo")
    theirs, _ = trl_grpo_loss(logp, old, None, adv, mask, beta=0.0, eps_low=0.2, eps_high=0.2, loss_type="bnpo",
                              max_completion_length=T)
    torch.testing.assert_close(ours, theirs)


def test_group_advantages_match_trl():
    src = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    assert_in_trl_source(src, "rewards.view(-1, self.num_generations).mean(dim=1)",
                         "rewards.view(-1, self.num_generations).std(dim=1)",
                         "advantages = advantages / (std_grouped_rewards + 1e-4)")
    G = 4
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 0.9, 0.1, 0.2, 2.0, 2.0, 2.0, 2.0], dtype=F64)
    groups = rewards.view(-1, G)
    centered = rewards - groups.mean(dim=1).repeat_interleave(G)
    std = groups.std(dim=1).repeat_interleave(G)
    torch.testing.assert_close(group_advantages(rewards, G, scale="group"), centered / (std + 1e-4))
    torch.testing.assert_close(group_advantages(rewards, G, scale="none"), centered)  # scale_rewards=False
    # scale="batch" is newer than 0.19 (one std over the batch); TRL's own Bessel std gives the same number
    torch.testing.assert_close(group_advantages(rewards, G, scale="batch"), centered / (nanstd(rewards) + 1e-4))
