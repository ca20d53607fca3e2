"""Supervised fine-tuning (SFT) loss: next-token cross-entropy on the response tokens only.

For a chat or instruction example x = (prompt, response) the model is trained to predict each response
token from everything before it (Ouyang et al., 2022, "Training language models to follow instructions
with human feedback"; Radford et al., 2018 for the language-modelling objective):

    L = - sum_{t in R} log p_theta(x_t | x_<t)        R = positions of response tokens
    log p_theta(x_t | x_<t) = z_{t-1}[x_t] - logsumexp_v z_{t-1}[v]

where z_{t-1} are the logits the model outputs at position t-1. Prompt and padding tokens are context
but are never predicted: their targets are set to `ignore_index` (-100, the PyTorch / Hugging Face
convention) and contribute nothing to the loss or its gradient.

`masked_cross_entropy` reads like `F.cross_entropy` (a mean by default; `reduction="sum"` or `"none"`). The training
loop asks for the *sum* and the number of predicted tokens (`masked_cross_entropy_sum`, used by `sft_loss`),
because it divides the gradient by the token count of the whole effective batch: then one batch of 8 and four
micro-batches of 2 give the same update.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100

def shift_for_next_token(ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a token sequence into model inputs and next-token targets.

        inputs[b, t]  = ids[b, t]                                   t = 0 .. T-2
        targets[b, t] = ids[b, t+1]  if loss_mask[b, t+1] == 1 else -100

    `loss_mask` (aligned with `ids`) marks the tokens to be *predicted* (the response), so the mask is
    shifted together with the targets: position t of the model predicts token t+1, and it is scored
    only if token t+1 is a response token. loss_mask[:, 0] is never used (no prefix predicts token 0).

    ids: (B, T) integer token ids; loss_mask: (B, T) of 0/1 (or bool). Returns two (B, T-1) tensors.
    """
    _check_ids_and_mask(ids, loss_mask)
    inputs = ids[:, :-1]  # (B, T-1)
    targets = ids[:, 1:].masked_fill(loss_mask[:, 1:] == 0, IGNORE_INDEX)  # (B, T-1)
    return inputs, targets


def masked_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX, reduction: str = "mean"
) -> torch.Tensor:
    """Next-token cross-entropy over the targets that are not `ignore_index`, a drop-in for
    `F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)`:

        nll_i = logsumexp_v z_i[v] - z_i[y_i]   if y_i != ignore, else 0
        "mean": sum_i nll_i / |{i : y_i != ignore}|      "sum": sum_i nll_i      "none": nll, shaped like targets

    logits: (..., V) floating; targets: (...) integer, `targets[b, t]` is the token position t must predict (use
    `shift_for_next_token`). When every target is ignored the mean is 0 with a zero gradient (F.cross_entropy
    gives NaN). fp16/bf16 logits are upcast to fp32 first, as F.cross_entropy does under autocast.
    """
    _check_logits_and_targets(logits, targets, ignore_index)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"masked_cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    # BEGIN ASSIGNMENT masked-cross-entropy
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    V = logits.shape[-1]
    z = logits.reshape(-1, V)  # (N, V) with N = B * T
    y = targets.reshape(-1)  # (N,)
    keep = y != ignore_index  # (N,)
    # gather needs a valid index everywhere; ignored rows read class 0 and are then zeroed by `where`
    y_safe = y.masked_fill(~keep, 0)
    log_z = torch.logsumexp(z, dim=-1)  # (N,) stable for large logits: max is subtracted inside
    z_y = z.gather(-1, y_safe[:, None]).squeeze(-1)  # (N,)
    nll = torch.where(keep, log_z - z_y, torch.zeros_like(log_z))  # (N,) `where`: ignored rows get gradient 0
    # END ASSIGNMENT
    if reduction == "none":
        return nll.reshape(targets.shape)
    if reduction == "sum":
        return nll.sum()
    return nll.sum() / count_targets(targets, ignore_index).clamp(min=1)


def count_targets(targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """n_tokens = |{i : y_i != ignore_index}|, the number of positions the loss scores (0-dim tensor)."""
    return (targets != ignore_index).sum()


def masked_cross_entropy_sum(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_sum, n_tokens): what the training loop asks for, so that it can divide the gradient by the token
    count of the whole effective batch (one batch of 8 and four micro-batches of 2 then give the same update)."""
    return masked_cross_entropy(logits, targets, ignore_index, "sum"), count_targets(targets, ignore_index)


def masked_cross_entropy_mean(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Mean next-token NLL over non-ignored targets (0 if all are ignored): `masked_cross_entropy`'s default."""
    return masked_cross_entropy(logits, targets, ignore_index, "mean")


def sft_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed masked cross-entropy over the response tokens, and their count (see `minillm.train`)."""
    logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
    return masked_cross_entropy_sum(logits, batch["targets"])


# Input checks: a wrong shape or dtype gets an error that names the argument.
def _check_ids_and_mask(ids: torch.Tensor, loss_mask: torch.Tensor) -> None:
    if not isinstance(ids, torch.Tensor) or not isinstance(loss_mask, torch.Tensor):
        raise TypeError("shift_for_next_token: ids and loss_mask must be torch.Tensor")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"shift_for_next_token: ids must be an integer tensor, got {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"shift_for_next_token: ids must be (B, T), got shape {tuple(ids.shape)}")
    if loss_mask.shape != ids.shape:
        raise ValueError(
            f"shift_for_next_token: loss_mask shape {tuple(loss_mask.shape)} != ids shape {tuple(ids.shape)}"
        )
    if ids.shape[1] < 2:
        raise ValueError(f"shift_for_next_token: need at least 2 tokens per row to predict one, got T={ids.shape[1]}")


def _check_logits_and_targets(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> None:
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("masked_cross_entropy: logits and targets must be torch.Tensor")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"masked_cross_entropy: logits must be floating point, got {logits.dtype}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
        raise TypeError(f"masked_cross_entropy: targets must be an integer tensor, got {targets.dtype}")
    if logits.dim() < 1 or logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"masked_cross_entropy: logits (..., V) must match targets (...): "
            f"got logits {tuple(logits.shape)} and targets {tuple(targets.shape)}"
        )
    V = logits.shape[-1]
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bool(bad.any()):
        value = int(targets[bad][0])
        raise ValueError(
            f"masked_cross_entropy: targets must be in [0, {V}) or ignore_index={ignore_index}, found {value}"
        )
