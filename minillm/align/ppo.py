"""PPO for RLHF (Schulman et al., 2017; Ziegler et al., 2019; Ouyang et al., 2022): the math, no model.

A rollout samples a response y to a prompt x from the policy pi_theta, the reward model scores the whole
sequence with one number s, and a frozen reference pi_ref (the SFT model) keeps the policy close:

    KL_t      = log pi_theta(y_t) - log pi_ref(y_t)                        k1; k2, k3 in `kl_per_token`
    r_t       = -kl_coef * KL_t  (+ s at the last response token)           per-token reward
    delta_t   = r_t + gamma V_{t+1} - V_t          (V after the last response token = 0)
    A_t       = delta_t + gamma lam A_{t+1}                                GAE (Schulman et al., 2016)
    R_t       = A_t + V_t                                                  value target ("returns")

Then a few epochs of minibatch updates on the clipped surrogate and the clipped value loss,
with rho_t = pi_theta(y_t) / pi_old(y_t) = exp(log pi_theta - log pi_old):

    L_pg  = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))
    L_vf  = 1/2 mean_t max((V_t - R_t)^2, (clip(V_t, V_old_t - c, V_old_t + c) - R_t)^2)
    loss  = L_pg + vf_coef * L_vf                                          (no entropy bonus, as TRL)

Every mean is over response tokens only: `mask` (B, T) is 1 on response tokens and 0 on the prompt and
padding. The advantages are whitened (masked mean 0, variance 1) before the update, as TRL does.

Defaults are TRL's (`PPOConfig`: cliprange 0.2, cliprange_value 0.2, gamma 1.0, lam 0.95, vf_coef 0.1,
kl_estimator "k1", fixed kl_coef 0.05). The adaptive KL controller is Ziegler et al.'s, kept by TRL's
classic PPOTrainer (v0.11: init_kl_coef 0.2, target 6.0, horizon 10000).

Two places where TRL 0.19's trainer differs and this module follows the contract instead:
- TRL adds the score at index (last response token + 1) when that index is still inside the generated
  window, giving the value head one extra position; here it goes on the last response token (the classic
  PPOTrainer's choice), so an episode is exactly the response.
- TRL's logged approx_kl averages over every position of the window (padding contributes 0); here it is a
  mean over response tokens.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "KL_ESTIMATORS", "REDUCTIONS", "AdaptiveKLController", "FixedKLController", "gae", "kl_per_token",
    "masked_mean", "masked_normalize", "masked_sum", "masked_whiten", "per_token_rewards", "ppo_policy_loss",
    "ppo_value_loss", "token_entropy",
]

KL_ESTIMATORS = ("k1", "k2", "k3")
REDUCTIONS = ("mean", "none")


# ----------------------------------------------------------------------------- masked reductions
def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Sum of x over the positions where mask is 1.

        masked_sum(x, m) = sum_i x_i [m_i = 1]

    Masked-out entries are selected away, not multiplied by 0, so padding that holds inf or nan cannot
    leak in (inf * 0 = nan). dim=None sums everything to a 0-dim tensor.
    """
    m = _as_bool_mask(mask, x, "mask")
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Mean of x over the positions where mask is 1.

        masked_mean(x, m) = sum_i x_i [m_i = 1] / sum_i [m_i = 1]

    A slice with no mask-1 entry gives 0/0 = nan, as in TRL's `masked_mean`; the losses below check for
    an empty mask before they get there.
    """
    m = _as_bool_mask(mask, x, "mask")
    return masked_sum(x, m, dim) / m.sum(dim=dim).to(x.dtype)


def masked_normalize(
    x: torch.Tensor, mask: torch.Tensor, normalize_constant: float, dim: int | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Masked sum divided by a fixed constant instead of the token count.

        masked_normalize(x, m, C) = sum_i x_i [m_i = 1] / C

    Dividing by a constant (e.g. B * max_completion_length in Dr. GRPO) weights every token the same,
    whatever the length of the sequence it sits in.
    """
    if not _is_number(normalize_constant) or not normalize_constant > 0:
        raise ValueError(f"normalize_constant must be a finite number > 0, got {normalize_constant!r}")
    return masked_sum(x, mask, dim) / normalize_constant


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Whiten x with statistics taken over the mask-1 entries only (the whole tensor at once).

        mu    = masked_mean(x, m)
        var   = sum_i (x_i - mu)^2 [m_i = 1] / (n - 1)        n = number of mask-1 entries (Bessel)
        out   = (x - mu) / sqrt(var + eps)      [+ mu if not shift_mean]

    As TRL's `masked_whiten` on the mask-1 entries. Unlike TRL's, the masked-out entries of the result
    are 0 (TRL returns (x - mu) / sqrt(var + eps) there too, then its trainer zeroes them with
    masked_fill), so padding values never change anything. Needs n >= 2 for the Bessel correction.
    """
    m = _as_bool_mask(mask, x, "mask")
    n = int(m.sum())
    if n < 2:
        raise ValueError(f"mask must select at least 2 entries to whiten (Bessel's n - 1), got {n}")
    if not _is_number(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    mu = masked_mean(x, m)
    var = masked_sum((x - mu) ** 2, m) / (n - 1)
    out = (x - mu) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mu  # rewards keep their sign: only the scale is normalised
    return torch.where(m, out, torch.zeros((), dtype=out.dtype, device=out.device))


# ----------------------------------------------------------------------------- entropy and KL
def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution at every position: logits (B, T, V) -> (B, T).

        H_t = -sum_v p_v log p_v,   log p = log_softmax(logits)

    Computed from log_softmax, so huge logits do not overflow; a -inf logit (a banned token) has p = 0
    and contributes 0 rather than 0 * -inf = nan.
    """
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point or logits.dim() < 1:
        raise TypeError("logits must be a floating-point tensor with the vocabulary on the last dimension")
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(dim=-1)


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """One-sample estimates of KL(pi_theta || pi_ref) at each sampled token (Schulman, "Approximating KL").

    With tokens sampled from pi_theta and log r = log pi_ref(y_t) - log pi_theta(y_t):

        k1 = -log r                   unbiased, high variance, can be negative
        k2 = 1/2 (log r)^2            biased, low variance (TRL logs it only)
        k3 = (r - 1) - log r          unbiased, low variance, >= 0 (since e^u >= 1 + u)

    Shapes: logprobs, ref_logprobs (B, T) -> (B, T).
    """
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r ** 2
    if estimator == "k3":
        return torch.expm1(log_r) - log_r  # expm1: accurate when the two policies are close
    raise ValueError(f"unknown estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")


# ----------------------------------------------------------------------------- rewards and GAE
@torch.no_grad()
def per_token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The KL-shaped per-token rewards of one rollout batch.

        KL_t = kl_per_token(logprobs, ref_logprobs, estimator) on response tokens, 0 elsewhere
        r_t  = -kl_coef * KL_t  +  [t = last response token of the row] * scores[b]

    scores (B,) is the reward model's score of each whole sequence; logprobs, ref_logprobs, mask (B, T).
    Rows may have different lengths and end in padding; each score lands on that row's last mask-1
    position. Rewards are rollout targets, so no gradient flows through them.
    Returns (rewards (B, T), kl (B, T)), both 0 on mask-0 positions.
    """
    _check_kl_coef(kl_coef, "kl_coef")
    kl = kl_per_token(logprobs, ref_logprobs, estimator)
    m = _as_bool_mask(mask, logprobs, "mask")
    if not isinstance(scores, torch.Tensor) or scores.shape != logprobs.shape[:1]:
        raise ValueError(f"scores must be a (B,) = {tuple(logprobs.shape[:1])} tensor, got "
                         f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    kl = torch.where(m, kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    rewards = -kl_coef * kl
    last = _last_response_index(m)  # (B,)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards, kl


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al., 2016) over each row's response tokens.

        delta_t = r_t + gamma V_{t+1} - V_t         V_{t+1}: value at the NEXT response position, 0 after the last
        A_t     = delta_t + gamma lam A_{t+1}        (A after the last response token = 0)
        R_t     = A_t + V_t                          (returns: the value-function targets)

    rewards, values, mask (B, T). Mask-0 positions (prompt, padding, anything between) are outside the
    episode: the recursion steps over them, and A, R are 0 there. lam = 0 gives the one-step TD error,
    lam = 1 the Monte-Carlo return minus V. These are targets, so no gradient flows through them.
    Returns (advantages (B, T), returns (B, T)).
    """
    _check_same_shape(rewards=rewards, values=values)
    if rewards.dim() != 2:
        raise ValueError(f"rewards and values must be (B, T), got shape {tuple(rewards.shape)}")
    m = _as_bool_mask(mask, rewards, "mask")
    for name, v in (("gamma", gamma), ("lam", lam)):
        if not _is_number(v) or not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v!r}")
    # BEGIN ASSIGNMENT ppo-gae
    zero = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    next_value, next_adv = zero, zero  # the episode ends after the last response token
    advantages = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        # a mask-0 position neither gets an advantage nor becomes the "next" step of the one before it
        advantages.append(torch.where(m[:, t], adv_t, zero))
        next_value = torch.where(m[:, t], values[:, t], next_value)
        next_adv = torch.where(m[:, t], adv_t, next_adv)
    advantages = torch.stack(advantages[::-1], dim=1)
    returns = torch.where(m, advantages + values, torch.zeros((), dtype=values.dtype, device=values.device))
    return advantages, returns
    # END ASSIGNMENT


# ----------------------------------------------------------------------------- losses
def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, as a loss to minimise.

        rho_t  = exp(log pi_theta(y_t) - log pi_old(y_t))
        l_t    = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))         eps = cliprange
        loss   = masked_mean(l, mask)                  (reduction="none": l itself, (B, T), unmasked)

    logprobs (B, T) carries the gradient; old_logprobs (B, T) are the rollout's and advantages (B, T),
    or (B,) for one per sequence, are constants (both detached here). Where the clip binds (A > 0 and
    rho > 1 + eps, or A < 0 and rho < 1 - eps) the loss is flat in theta: those tokens have moved far enough.
    stats (detached 0-dim tensors, means over response tokens):
        clipfrac   = mean [-A clip(rho) > -A rho]    the fraction of tokens where the clip binds
        approx_kl  = 1/2 mean (log pi_theta - log pi_old)^2
        ratio_mean = mean rho
    """
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs)
    m = _as_bool_mask(mask, logprobs, "mask")
    _check_clip(cliprange, "cliprange")
    _check_reduction(reduction)
    # BEGIN ASSIGNMENT ppo-clipped-loss
    adv = _per_token(advantages, logprobs, "advantages")
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    per_token = torch.maximum(unclipped, clipped)  # the pessimistic (larger-loss) of the two
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(logprobs.dtype), m),
            "approx_kl": 0.5 * masked_mean(log_ratio ** 2, m),
            "ratio_mean": masked_mean(ratio, m),
        }
    return _reduce(per_token, m, reduction), stats
    # END ASSIGNMENT


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float = 0.2,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped value loss.

        V_clip = clip(V, V_old - c, V_old + c)                                  c = cliprange_value
        l_t    = 1/2 max((V_t - R_t)^2, (V_clip_t - R_t)^2)
        loss   = masked_mean(l, mask)                  (reduction="none": l itself, (B, T), unmasked)

    values (B, T) carries the gradient; old_values (rollout) and returns (from `gae`) are targets.
    Taking the max means a value that has already moved more than c from V_old gets no further push
    in the direction that made the unclipped error the smaller one. c is in reward units, so any c > 0.
    stats: vf_clipfrac = mean [(V_clip - R)^2 > (V - R)^2] over response tokens (detached 0-dim tensor).
    """
    _check_same_shape(values=values, old_values=old_values, returns=returns)
    m = _as_bool_mask(mask, values, "mask")
    if not _is_number(cliprange_value) or not cliprange_value > 0:
        raise ValueError(f"cliprange_value must be a finite number > 0, got {cliprange_value!r}")
    _check_reduction(reduction)
    old_values, returns = old_values.detach(), returns.detach()
    v_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    err_unclipped = (values - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    per_token = 0.5 * torch.maximum(err_unclipped, err_clipped)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((err_clipped > err_unclipped).to(values.dtype), m)}
    return _reduce(per_token, m, reduction), stats


# ----------------------------------------------------------------------------- KL controllers
class AdaptiveKLController:
    """The adaptive KL coefficient of Ziegler et al. (2019), as in TRL's classic PPOTrainer.

        e     = clip(KL_current / target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n_steps / horizon)

    KL above target raises beta (pull harder towards pi_ref), below lowers it; the clip bounds the step.
    TRL passes KL_current = batch mean of the per-sequence summed KL and n_steps = the batch size.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        _check_kl_coef(init_kl_coef, "init_kl_coef")
        for name, v in (("target", target), ("horizon", horizon)):
            if not _is_number(v) or not v > 0:
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """beta <- beta * (1 + clip(current_kl / target - 1, -0.2, 0.2) * n_steps / horizon)."""
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            raise ValueError(f"current_kl must be finite, got {current_kl!r}")
        if not _is_number(n_steps) or n_steps < 0:
            raise ValueError(f"n_steps must be a number >= 0, got {n_steps!r}")
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


class FixedKLController:
    """A constant KL coefficient (TRL's current PPOTrainer: kl_coef = 0.05); `update` changes nothing."""

    def __init__(self, kl_coef: float) -> None:
        _check_kl_coef(kl_coef, "kl_coef")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """beta stays the same (the same interface as AdaptiveKLController)."""


# ----------------------------------------------------------------------------- helpers
def _reduce(per_token: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """reduction="none": the (B, T) per-token loss as is; "mean": its mean over response tokens."""
    if reduction == "none":
        return per_token
    if not bool(mask.any()):
        raise ValueError("mask has no response token (all 0): the mean over response tokens is undefined")
    return masked_mean(per_token, mask)


def _per_token(advantages: torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    """advantages of shape (B, T), or (B,) broadcast to every token of the sequence."""
    if not isinstance(advantages, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(advantages).__name__}")
    if advantages.shape == like.shape:
        return advantages.detach()
    if like.dim() == 2 and advantages.shape == like.shape[:1]:
        return advantages.detach().unsqueeze(1)
    raise ValueError(f"{name} must have shape {tuple(like.shape)} or {tuple(like.shape[:1])}, "
                     f"got {tuple(advantages.shape)}")


def _last_response_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True position of each row of a (B, T) bool mask; ValueError for an empty row."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    last = torch.where(mask, positions, -1).amax(dim=-1)
    if bool((last < 0).any()):
        empty = torch.nonzero(last < 0).flatten().tolist()
        raise ValueError(f"mask rows {empty} have no response token; every row needs at least one")
    return last


def _as_bool_mask(mask: torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    """mask as bool, after checking it is a 0/1 tensor of exactly like's shape."""
    if not isinstance(mask, torch.Tensor) or not isinstance(like, torch.Tensor):
        raise TypeError(f"{name} and the values it masks must be tensors")
    if mask.shape != like.shape:
        raise ValueError(f"{name} must have the shape of the values {tuple(like.shape)}, got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must hold only 0 and 1")
    return mask != 0


def _check_same_shape(**tensors: torch.Tensor) -> None:
    """Every argument is a floating-point tensor, all of one shape."""
    shapes = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {type(t).__name__}"
                             + (f" of {t.dtype}" if isinstance(t, torch.Tensor) else ""))
        shapes[name] = tuple(t.shape)
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}")


def _check_clip(eps: float, name: str) -> None:
    """A ratio clip range must lie in (0, 1): 1 - eps has to stay a positive ratio."""
    if not _is_number(eps) or not 0.0 < eps < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {eps!r}")


def _check_kl_coef(value: float, name: str) -> None:
    if not _is_number(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")


def _is_number(v: object) -> bool:
    """A finite real number (bool excluded: True is not a coefficient)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
