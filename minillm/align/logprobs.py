"""Sequence log-probabilities of responses, the quantity DPO, IPO, SimPO and ORPO compare.

For a prompt x and response y = (y_1 .. y_n), a causal language model gives

    log pi(y | x) = sum_{t in R} log pi(x_t | x_<t)                   (average=False, DPO; Rafailov et al., 2023)
    avg log pi    = log pi(y | x) / |R|                               (average=True, IPO in TRL, SimPO, ORPO)
    log pi(x_t | x_<t) = z_{t-1}[x_t] - logsumexp_v z_{t-1}[v]

where R are the positions of response tokens in the concatenated sequence x ++ y and z_{t-1} the logits
at position t-1. This is `_get_batch_logps` of the DPO reference code / `concatenated_forward` of TRL:
logits are shifted by one against the tokens, prompt and padding are masked out.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from minillm.sampling import positions_from_mask

__all__ = ["token_logprobs", "sequence_logprobs"]


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of each next token: out[b, t] = log p(input_ids[b, t+1] | input_ids[b, :t+1]).

        out[b, t] = z[b, t, x_{t+1}] - logsumexp_v z[b, t, v]

    logits: (B, T, V), the model's output for input_ids (B, T). Returns (B, T-1): the first token has
    no prefix and is not scored. fp16/bf16 logits are upcast to fp32 (log-probs of long responses are
    sums of many small numbers). Uses gather - logsumexp rather than log_softmax, which would keep a
    second (B, T, V) tensor alive for the backward pass.
    """
    if logits.dim() != 3 or input_ids.dim() != 2 or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"token_logprobs: logits must be (B, T, V) and input_ids (B, T), got "
            f"{tuple(logits.shape)} and {tuple(input_ids.shape)}"
        )
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    z = logits[:, :-1]  # (B, T-1, V): position t predicts token t+1
    nxt = input_ids[:, 1:]  # (B, T-1)
    z_next = z.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return z_next - torch.logsumexp(z, dim=-1)


def sequence_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    average: bool = False,
) -> torch.Tensor:
    """Sum (or mean) over response tokens of log pi(x_t | x_<t); returns (B,).

        logp[b] = sum_t m[b, t] * log pi(x[b, t] | x[b, <t])     m = loss_mask (* attention_mask), t >= 1
        average=True divides by sum_t m[b, t] (per-token average, as TRL uses for IPO).

    input_ids: (B, T) prompt ++ response (++ padding); loss_mask: (B, T), aligned with input_ids, 1 on
    the response tokens to score (its column 0 is ignored: the first token has no prefix). The shift by
    one between logits and tokens happens here. attention_mask (B, T), 1 on real tokens, is passed to
    the model with position ids that start at 0 on each row's first real token, so left padding gives
    the same log-probs as no padding. `model(input_ids, attention_mask=..., position_ids=...)` must
    return logits (B, T, V). Raises ValueError if a row scores no token.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"sequence_logprobs: input_ids must be (B, T), got {tuple(input_ids.shape)}")
    if loss_mask.shape != input_ids.shape:
        raise ValueError(
            f"sequence_logprobs: loss_mask shape {tuple(loss_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    if attention_mask is None:
        logits = model(input_ids)
    else:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"sequence_logprobs: attention_mask shape {tuple(attention_mask.shape)} "
                f"!= input_ids shape {tuple(input_ids.shape)}"
            )
        logits = model(input_ids, attention_mask=attention_mask, position_ids=positions_from_mask(attention_mask))
        loss_mask = (loss_mask != 0) & (attention_mask != 0)  # padding is never scored, whatever loss_mask says
    logp = token_logprobs(logits, input_ids)  # (B, T-1)
    m = loss_mask[:, 1:] != 0  # (B, T-1): the mask of the *predicted* tokens
    n_tokens = m.sum(dim=-1).to(logp.dtype)  # (B,)
    if bool((n_tokens == 0).any()):
        rows = torch.nonzero(n_tokens == 0).flatten().tolist()
        raise ValueError(f"sequence_logprobs: loss_mask marks no response token after position 0 in row(s) {rows}")
    # `where`, not multiply: a masked position with logp = -inf must add 0, not NaN
    total = torch.where(m, logp, torch.zeros_like(logp)).sum(dim=-1)  # (B,)
    return total / n_tokens if average else total
