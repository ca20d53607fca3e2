"""Direct Preference Optimization (Rafailov et al., 2023) and its close relatives.

Given a prompt x with a preferred response y_w and a dispreferred y_l, DPO trains the policy pi_theta
directly on the preference, against a frozen reference pi_ref (the SFT model):

    h      = [log pi_theta(y_w|x) - log pi_ref(y_w|x)] - [log pi_theta(y_l|x) - log pi_ref(y_l|x)]
    L_DPO  = -log sigma(beta * h)                                                    (paper Eq. 7)
    r_w    = beta * (log pi_theta(y_w|x) - log pi_ref(y_w|x)),  r_l likewise          (implicit rewards)

beta (default 0.1, TRL's `DPOConfig.beta`) sets how far the policy may move from the reference.
Variants of the per-pair loss on the same h (TRL v0.x `DPOTrainer.dpo_loss`, eps = label_smoothing):

    sigmoid (cDPO)  -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)   (Mitchell, 2023; eps = 0 is DPO)
    robust          [-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps)   (Chowdhury et al., 2024)
    hinge           max(0, 1 - beta h)                                      (SLiC, Zhao et al., 2023)
    ipo             (h - 1 / (2 beta))^2                                    (Azar et al., 2023; beta plays tau)

Reference-free DPO sets the reference log-ratio log pi_ref(y_w) - log pi_ref(y_l) to 0. Two
reference-free relatives on length-averaged log-probs are at the end: SimPO (Meng et al., 2024) and
ORPO (Hong et al., 2024).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["DPO_LOSS_TYPES", "dpo_loss", "dpo_metrics", "simpo_loss", "orpo_loss"]

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the (detached) implicit rewards; every argument tensor is (B,).

        h = (log pi(y_w) - log pi(y_l)) - (log pi_ref(y_w) - log pi_ref(y_l))   [ref term := 0 if reference_free]
        losses = see the module docstring for each loss_type (sigmoid, ipo, hinge, robust)
        chosen_rewards = beta * (log pi(y_w) - log pi_ref(y_w)).detach(),  rejected_rewards likewise

    Log-prob convention: sigmoid, hinge and robust take *summed* response log-probs
    (`sequence_logprobs(..., average=False)`), as the paper and TRL do. For `ipo`, TRL averages the
    log-probs per response token (length-normalised), so pass `average=True` log-probs to match TRL
    (the DPO reference repository uses summed log-probs for IPO too; the formula here is the same).

    label_smoothing eps in [0, 0.5) is the assumed probability that a label is flipped; it applies to
    `sigmoid` (conservative DPO) and `robust` only. The rewards always use the reference log-probs as
    given (as TRL does); with reference_free=True they may be None and are then taken as 0.
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)); the training loss is losses.mean().
    """
    check_dpo_hyperparameters(beta, loss_type, label_smoothing)
    if ref_chosen_logps is None or ref_rejected_logps is None:
        if not reference_free:
            raise ValueError(
                "dpo_loss: ref_chosen_logps and ref_rejected_logps are required unless reference_free=True"
            )
        ref_chosen_logps = torch.zeros_like(policy_chosen_logps)
        ref_rejected_logps = torch.zeros_like(policy_rejected_logps)
    _check_logps(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                 ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)

    pi_logratios = policy_chosen_logps - policy_rejected_logps  # (B,)
    ref_logratios = 0.0 if reference_free else ref_chosen_logps - ref_rejected_logps
    h = pi_logratios - ref_logratios  # (B,)
    losses = _pair_loss(h, beta, loss_type, label_smoothing)

    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def _pair_loss(h: torch.Tensor, beta: float, loss_type: str, eps: float) -> torch.Tensor:
    """The per-pair loss of `loss_type` on the log-ratio difference h (B,)."""
    # BEGIN ASSIGNMENT dpo-loss
    if loss_type == "sigmoid":
        return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    # ipo: regress h onto 1 / (2 tau), with tau = beta
    return (h - 1 / (2 * beta)) ** 2
    # END ASSIGNMENT


def dpo_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
) -> dict[str, float]:
    """Batch means with TRL's metric names.

        rewards/chosen = mean r_w      rewards/rejected = mean r_l     rewards/margins = mean (r_w - r_l)
        rewards/accuracies = mean [r_w > r_l]  (strict: a tie counts as wrong)
        logps/chosen = mean log pi(y_w)        logps/rejected = mean log pi(y_l)
    """
    _check_logps(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
                 policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    r_w, r_l = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "rewards/chosen": r_w.mean().item(),
        "rewards/rejected": r_l.mean().item(),
        "rewards/accuracies": (r_w > r_l).float().mean().item(),
        "rewards/margins": (r_w - r_l).mean().item(),
        "logps/chosen": policy_chosen_logps.detach().float().mean().item(),
        "logps/rejected": policy_rejected_logps.detach().float().mean().item(),
    }


def simpo_loss(
    avg_chosen_logps: torch.Tensor,
    avg_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al., 2024): reference-free, length-normalised, with a target margin gamma.

        losses = -(1 - eps) log sigma(beta (l_w - l_l) - gamma) - eps log sigma(-(beta (l_w - l_l) - gamma))
        rewards = beta * l (detached)

    l_w, l_l (B,) are *per-token average* log-probs (`sequence_logprobs(..., average=True)`).
    Defaults are TRL's (`CPOConfig(loss_type="simpo")`: beta 0.1, simpo_gamma 0.5); the SimPO paper
    itself uses a larger beta (about 2 to 10) [unverified exact values].
    """
    check_dpo_hyperparameters(beta, "sigmoid", label_smoothing)
    _check_logps(avg_chosen_logps=avg_chosen_logps, avg_rejected_logps=avg_rejected_logps)
    z = beta * (avg_chosen_logps - avg_rejected_logps) - gamma  # (B,)
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, beta * avg_chosen_logps.detach(), beta * avg_rejected_logps.detach()


def orpo_loss(
    avg_chosen_logps: torch.Tensor,
    avg_rejected_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO (Hong et al., 2024): SFT loss plus an odds-ratio preference term, no reference model.

        odds(y) = p / (1 - p) with log p = l (per-token average log-prob, `average=True`)
        log OR  = (l_w - l_l) - (log(1 - e^{l_w}) - log(1 - e^{l_l}))
        losses  = chosen_nll - beta * log sigma(log OR)          rewards = beta * l (detached)

    chosen_nll: the SFT negative log-likelihood of the chosen responses, (B,) or a scalar (TRL uses the
    token-mean NLL over the batch's chosen responses, a scalar). beta is lambda in the paper (TRL 0.1).
    """
    check_dpo_hyperparameters(beta, "sigmoid", 0.0)
    _check_logps(avg_chosen_logps=avg_chosen_logps, avg_rejected_logps=avg_rejected_logps)
    if not isinstance(chosen_nll, torch.Tensor) or chosen_nll.shape not in ((), avg_chosen_logps.shape):
        raise ValueError(f"orpo_loss: chosen_nll must be a scalar tensor or (B,) = {tuple(avg_chosen_logps.shape)}")
    if bool((avg_chosen_logps >= 0).any() or (avg_rejected_logps >= 0).any()):
        raise ValueError("orpo_loss: average log-probs must be < 0 (a probability of 1 has infinite odds)")
    # log(1 - e^l) written as log(-expm1(l)): accurate when l is close to 0
    log_odds = (avg_chosen_logps - avg_rejected_logps) - (
        torch.log(-torch.expm1(avg_chosen_logps)) - torch.log(-torch.expm1(avg_rejected_logps))
    )  # (B,)
    losses = chosen_nll - beta * F.logsigmoid(log_odds)
    return losses, beta * avg_chosen_logps.detach(), beta * avg_rejected_logps.detach()


def check_dpo_hyperparameters(beta: float, loss_type: str, label_smoothing: float) -> None:
    """beta > 0 and finite, a known loss_type, 0 <= label_smoothing < 0.5 (and only where the loss uses it)."""
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if label_smoothing > 0 and loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"label_smoothing applies to loss_type 'sigmoid' or 'robust' only, not {loss_type!r}")


def _check_logps(**tensors: torch.Tensor) -> None:
    """Every log-prob argument is a floating (B,) tensor of the same B."""
    shapes = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got {type(t).__name__}"
                            + (f" of {t.dtype}" if isinstance(t, torch.Tensor) else ""))
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D (B,), got shape {tuple(t.shape)}")
        shapes[name] = tuple(t.shape)
    if len(set(shapes.values())) > 1:
        raise ValueError(f"log-prob tensors must all have the same shape (B,), got {shapes}")
