"""Knowledge distillation: a small student learns from a big teacher's whole next-token distribution.

Hinton et al. (2015, "Distilling the Knowledge in a Neural Network") soften both distributions with a
temperature T and train the student on the teacher's *soft targets*:

    p_T = softmax(z_teacher / T)        q_T = softmax(z_student / T)        (over the vocabulary V)

    KL(p || q) = sum_v p_v (log p_v - log q_v)              forward KL: mode covering (Hinton 2015)
    KL(q || p) = sum_v q_v (log q_v - log p_v)              reverse KL: mode seeking (MiniLLM, Gu et al. 2023)
    JSD_b(p, q) = b KL(p || m) + (1 - b) KL(q || m),   m = b p + (1 - b) q     (GKD, Agarwal et al. 2024)

    kd = T^2 * mean over response positions of D(p_T, q_T)

The T^2 factor: the gradient of D(p_T, q_T) with respect to the student's logits is (q_T - p_T) / T for
the forward KL, and for large T, q_T - p_T ~ (z_s - z_t) / (T V), so the gradient shrinks like 1/T^2.
Multiplying by T^2 keeps its scale when T changes, so the mix alpha * kd + (1 - alpha) * CE means the same
thing at every temperature.

JSD conventions follow TRL's `generalized_jsd_loss` (the GKD paper's Eq. 1): at beta = 0.5 the plain
Jensen-Shannon divergence. JSD_beta itself goes to 0 as beta -> 0 or 1 (m becomes one of the two
distributions); what tends to the KLs is JSD_beta / beta (forward) and JSD_beta / (1 - beta) (reverse). TRL, and
we, *define* beta = 0 as the forward KL and beta = 1 as the reverse KL, so the loss jumps between beta = 0.01
(nearly 0) and beta = 0. TRL has no T^2 factor; `kd_loss(...) / T^2` equals TRL's loss.

`fit_gaussian` fits one Gaussian to a two-bump mixture under either KL on a 1-D grid: the picture of
forward KL spreading over both modes and reverse KL settling on one (lesson 10).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KINDS = ("forward_kl", "reverse_kl", "jsd")


def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) over the last dimension, from log-probabilities.

    0 * log 0 counts as 0 (xlogy-style via `where`), so a teacher that puts exactly zero mass on a token
    does not produce NaN.
    """
    # BEGIN ASSIGNMENT kd-divergence
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
    # END ASSIGNMENT


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0,
               kind: str = "forward_kl", beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence D(p_T, q_T) between softmax(teacher / T) and softmax(student / T), no T^2.

    student_logits, teacher_logits: (..., V). Returns (...). kind: "forward_kl" KL(p || q), "reverse_kl"
    KL(q || p), "jsd" beta KL(p || m) + (1 - beta) KL(q || m) with m = beta p + (1 - beta) q.
    Computed in float32 (or float64 if given) whatever the logits' dtype.
    """
    _check_args(student_logits, teacher_logits, None, temperature, kind, beta)
    # BEGIN ASSIGNMENT kd-divergence
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # student
    log_p = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)  # teacher
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return kl_rows(log_p, log_q)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return kl_rows(log_q, log_p)
    # log m = log(beta p + (1 - beta) q), in log space so that tiny probabilities stay exact
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
    return beta * kl_rows(log_p, log_m) + (1 - beta) * kl_rows(log_q, log_m)
    # END ASSIGNMENT


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None,
            temperature: float = 2.0, kind: str = "forward_kl", beta: float = 0.5) -> torch.Tensor:
    """The distillation term: T^2 * (masked mean over positions of D(softmax(teacher/T), softmax(student/T))).

        kd = T^2 * sum_{b,t} mask_bt D_bt / sum_{b,t} mask_bt

    student_logits, teacher_logits: (B, T, V) at the same positions (logits at t predict token t + 1);
    mask: (B, T) bool or 0/1, True where the position is scored (the response tokens); None scores all.
    A mask with no True position gives 0 (with a zero gradient). The teacher's logits are used as given:
    detach them (or compute them under no_grad) so that only the student learns.
    """
    _check_args(student_logits, teacher_logits, mask, temperature, kind, beta)
    d = divergence(student_logits, teacher_logits, temperature, kind, beta)  # (B, T)
    if mask is None:
        return temperature**2 * d.mean()
    m = mask.to(d.dtype)
    return temperature**2 * (d * m).sum() / m.sum().clamp(min=1)


def mix_loss(kd: torch.Tensor, ce: torch.Tensor, alpha: float) -> torch.Tensor:
    """What the distillation stage minimises: alpha * kd + (1 - alpha) * CE (hard labels)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"mix_loss: alpha must be in [0, 1], got {alpha}")
    return alpha * kd + (1.0 - alpha) * ce


def fit_gaussian(log_target: torch.Tensor, grid: torch.Tensor, kind: str = "forward_kl", steps: int = 500,
                 lr: float = 0.05, init: tuple[float, float] = (1.0, 0.0)) -> tuple[float, float]:
    """Fit q = N(mu, sigma^2) (discretised on `grid`) to a target p under KL(p || q) or KL(q || p).

    log_target: (G,) log-probabilities of p on the points `grid` (G,). Returns (mu, sigma) after `steps`
    Adam steps from init = (mu, log sigma). The forward KL puts q's mass wherever p has mass (mode
    covering: between two bumps); the reverse KL is infinite where q has mass and p has none, so q hides
    inside one bump (mode seeking). A start exactly halfway between two equal bumps would be a saddle
    of the reverse KL by symmetry, hence the default mu = 1.
    """
    if kind not in ("forward_kl", "reverse_kl"):
        raise ValueError(f"fit_gaussian: kind must be 'forward_kl' or 'reverse_kl', got {kind!r}")
    if log_target.shape != grid.shape or grid.dim() != 1:
        raise ValueError(f"fit_gaussian: log_target {tuple(log_target.shape)} and grid {tuple(grid.shape)} "
                         "must be the same 1-D shape")
    mu = torch.tensor(float(init[0]), requires_grad=True)
    log_sigma = torch.tensor(float(init[1]), requires_grad=True)
    opt = torch.optim.Adam([mu, log_sigma], lr=lr)
    log_p = log_target.float()
    for _ in range(steps):
        log_q = torch.log_softmax(-0.5 * ((grid - mu) / log_sigma.exp()) ** 2, dim=0)  # normalised on the grid
        loss = kl_rows(log_p, log_q) if kind == "forward_kl" else kl_rows(log_q, log_p)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(mu.detach()), float(log_sigma.detach().exp())


def _check_args(student_logits: object, teacher_logits: object, mask: object, temperature: object, kind: object,
                beta: object) -> None:
    if not isinstance(student_logits, torch.Tensor) or not isinstance(teacher_logits, torch.Tensor):
        raise TypeError("kd_loss: student_logits and teacher_logits must be torch.Tensor")
    if not student_logits.dtype.is_floating_point or not teacher_logits.dtype.is_floating_point:
        raise TypeError(f"kd_loss: logits must be floating point, got {student_logits.dtype} and "
                        f"{teacher_logits.dtype}")
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"kd_loss: the student's vocabulary ({student_logits.shape[-1]}) differs from the "
                         f"teacher's ({teacher_logits.shape[-1]}); distillation needs one tokenizer")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"kd_loss: student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError("kd_loss: mask must be a torch.Tensor or None")
        if mask.shape != student_logits.shape[:-1]:
            raise ValueError(f"kd_loss: mask {tuple(mask.shape)} must match the logits' positions "
                             f"{tuple(student_logits.shape[:-1])}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 \
            or not math.isfinite(temperature):
        raise ValueError(f"kd_loss: temperature must be a finite number > 0, got {temperature!r}")
    if kind not in KINDS:
        raise ValueError(f"kd_loss: kind must be one of {KINDS}, got {kind!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"kd_loss: beta must be in [0, 1], got {beta!r}")
