"""GRPO (Shao et al., 2024, DeepSeekMath) and plain REINFORCE: policy gradients without a value function.

GRPO samples a group of G completions per prompt, scores each with one reward r_i, and uses the
group as its own baseline instead of a learned critic:

    A_i   = (r_i - mean_group(r)) / (std_group(r) + eps)                       one advantage per completion
    rho_t = exp(log pi_theta(y_t) - log pi_old(y_t))
    l_t   = -min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i) + beta KL_t
    KL_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1                         k3, >= 0 (only if beta > 0)

The std is Bessel-corrected (n - 1), as TRL's `rewards.view(-1, G).std(dim=1)`, and eps = 1e-4.
The per-token losses l are then aggregated over the response tokens (mask 1) in one of four ways:

    grpo     mean_b [ sum_t l_bt m_bt / sum_t m_bt ]       per-sequence token mean, then batch mean (paper)
    bnpo     sum_bt l m / sum_bt m                         token mean over the batch
    dr_grpo  sum_bt l m / (B * max_completion_length)      Dr. GRPO (Liu et al., 2025): no length bias
    dapo     sum_bt l m / (response tokens in the global batch)   DAPO (Yu et al., 2025)

On one process "dapo" equals "bnpo": they differ only when the batch is split over several processes
(dapo divides by the token count of all of them). Defaults are TRL's: epsilon 0.2, epsilon_high = epsilon
(DAPO recommends 0.28), beta 0.0 (DeepSeekMath used 0.04). With one policy update per rollout
(TRL's num_iterations = 1) pi_old = pi_theta, so rho = 1 and the clip never binds.
"""
from __future__ import annotations

import torch

from minillm.align.ppo import (
    _as_bool_mask,
    _check_clip,
    _check_kl_coef,
    _check_reduction,
    _check_same_shape,
    _is_number,
    _per_token,
    _reduce,
    masked_mean,
    masked_normalize,
    masked_sum,
)

__all__ = ["ADVANTAGE_SCALES", "GRPO_LOSS_TYPES", "PG_KINDS", "group_advantages", "grpo_loss", "policy_gradient_loss"]

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
ADVANTAGE_SCALES = ("group", "batch", "none")
PG_KINDS = ("reinforce",)


@torch.no_grad()
def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantages: rewards (B,) -> advantages (B,).

        A_i = (r_i - mean_g) / (s + eps)
        s   = std_g (scale="group"),  std over the whole batch (scale="batch"),  no division (scale="none")

    rewards holds consecutive groups of `group_size` samples of the same prompt:
    [p0 s0, p0 s1, ..., p0 s(G-1), p1 s0, ...]. Both stds are Bessel-corrected (torch.std, as TRL).
    A group whose rewards are all equal gets A = 0 (0 / eps): no signal, no update.
    """
    if not isinstance(rewards, torch.Tensor) or not rewards.dtype.is_floating_point:
        raise TypeError("rewards must be a floating-point tensor")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B,), got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2 (a std needs two samples), got {group_size!r}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"group_size {group_size} does not divide the batch size {rewards.shape[0]}")
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid: {', '.join(ADVANTAGE_SCALES)}")
    if not _is_number(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    # BEGIN ASSIGNMENT grpo-advantages
    groups = rewards.view(-1, group_size)  # (num_prompts, G)
    centered = (groups - groups.mean(dim=1, keepdim=True)).flatten()  # (B,)
    if scale == "none":
        return centered
    if scale == "group":
        std = groups.std(dim=1).repeat_interleave(group_size)  # (B,)
    else:
        std = rewards.std()
    return centered / (std + eps)
    # END ASSIGNMENT


def policy_gradient_loss(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "reinforce",
    reduction: str = "mean",
) -> torch.Tensor:
    """The REINFORCE loss (Williams, 1992) with a baseline folded into the advantage.

        l_t  = -A * log pi_theta(y_t)             grad l_t = -A grad log pi_theta(y_t)
        loss = masked_mean(l, mask)                (reduction="none": l itself, (B, T), unmasked)

    logprobs (B, T); advantages (B,) (one per sequence, broadcast over its tokens) or (B, T), treated as
    constants. Returns the loss tensor: a 0-dim tensor for "mean", (B, T) for "none".
    Its gradient equals the PPO/GRPO surrogate's at rho = 1 (the first update on fresh samples).
    """
    if kind not in PG_KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid: {', '.join(PG_KINDS)}")
    _check_same_shape(logprobs=logprobs)
    m = _as_bool_mask(mask, logprobs, "mask")
    _check_reduction(reduction)
    adv = _per_token(advantages, logprobs, "advantages")
    return _reduce(-adv * logprobs, m, reduction)


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss; see the module docstring for the aggregations.

        rho_t = exp(logp_t - old_t)
        l_t   = -min(rho_t A, clip(rho_t, 1 - epsilon, 1 + epsilon_high) A) + beta KL_t
        KL_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1                     (k3)
        loss  = aggregate_{loss_type}(l, mask)          (reduction="none": l itself, (B, T), unmasked)

    logprobs, old_logprobs, mask (B, T); advantages (B,) from `group_advantages` (or (B, T)); ref_logprobs
    (B, T), or None when beta == 0. epsilon_high=None means epsilon (symmetric clip).
    max_completion_length is dr_grpo's constant (default T, the padded completion width).
    "grpo" counts a row with no response token as 1 token (it contributes 0), as TRL does.
    stats (detached 0-dim tensors, means over response tokens):
        clip_ratio       = mean [A > 0 and rho > 1 + eps_high  or  A < 0 and rho < 1 - eps_low]
        clip_ratio_low, clip_ratio_high    the two halves of that
        ratio_mean       = mean rho
        kl               = mean k3 KL_t (present whenever ref_logprobs is given, even with beta == 0)
    """
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs)
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be (B, T), got shape {tuple(logprobs.shape)}")
    m = _as_bool_mask(mask, logprobs, "mask")
    eps_low, eps_high = _check_grpo_hyperparameters(epsilon, epsilon_high, beta, loss_type, reduction)
    if ref_logprobs is None:
        if beta > 0:
            raise ValueError("ref_logprobs is required when beta > 0 (the KL term needs the reference)")
    else:
        _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    if max_completion_length is None:
        max_completion_length = logprobs.shape[1]
    elif not isinstance(max_completion_length, int) or isinstance(max_completion_length, bool) \
            or max_completion_length < 1:
        raise ValueError(f"max_completion_length must be an int >= 1, got {max_completion_length!r}")
    adv = _per_token(advantages, logprobs, "advantages")

    ratio = torch.exp(logprobs - old_logprobs.detach())
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv)
    per_token = -surrogate
    kl = None if ref_logprobs is None else _k3(logprobs, ref_logprobs.detach())
    if beta > 0:
        per_token = per_token + beta * kl

    with torch.no_grad():
        low = (ratio < 1.0 - eps_low) & (adv < 0)
        high = (ratio > 1.0 + eps_high) & (adv > 0)
        stats = {
            "clip_ratio": masked_mean((low | high).to(logprobs.dtype), m),
            "clip_ratio_low": masked_mean(low.to(logprobs.dtype), m),
            "clip_ratio_high": masked_mean(high.to(logprobs.dtype), m),
            "ratio_mean": masked_mean(ratio, m),
        }
        if kl is not None:
            stats["kl"] = masked_mean(kl, m)
    if reduction == "none":
        return per_token, stats
    return _aggregate(per_token, m, loss_type, max_completion_length), stats


def _k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 KL_t = exp(d) - d - 1 with d = ref - logp: unbiased for KL(pi_theta || pi_ref) and >= 0."""
    d = ref_logprobs - logprobs
    return torch.expm1(d) - d


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int) -> torch.Tensor:
    """Reduce the (B, T) per-token loss to a scalar the `loss_type` way (module docstring)."""
    if loss_type == "grpo":
        # a row without response tokens divides by 1 (contributes 0) rather than producing 0/0
        lengths = mask.sum(dim=1).clamp(min=1).to(per_token.dtype)  # (B,)
        return (masked_sum(per_token, mask, dim=1) / lengths).mean()
    if loss_type == "dr_grpo":
        return masked_normalize(per_token, mask, per_token.shape[0] * max_completion_length)
    # bnpo and dapo: one process, so the global token count is the local one
    return _reduce(per_token, mask, "mean")


def _check_grpo_hyperparameters(
    epsilon: float, epsilon_high: float | None, beta: float, loss_type: str, reduction: str
) -> tuple[float, float]:
    """Validate and return (eps_low, eps_high)."""
    _check_clip(epsilon, "epsilon")
    if epsilon_high is None:
        epsilon_high = epsilon
    elif not _is_number(epsilon_high) or not epsilon_high > 0:
        raise ValueError(f"epsilon_high must be a finite number > 0, got {epsilon_high!r}")
    _check_kl_coef(beta, "beta")
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(GRPO_LOSS_TYPES)}")
    _check_reduction(reduction)
    return float(epsilon), float(epsilon_high)
