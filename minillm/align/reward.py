"""Reward modelling with the Bradley-Terry preference model (Bradley & Terry, 1952; Ouyang et al., 2022).

A reward model r_phi(x, y) scores a response with one number. The probability that y_w is preferred
to y_l is modelled as sigma(r_w - r_l), so maximum likelihood on human comparisons gives

    L_BT = -mean_pairs log sigma(r_phi(x, y_w) - r_phi(x, y_l) [- m])      m: optional margin (Llama 2)
         [+ c * mean_pairs (r_w + r_l)^2]                         reward centering (Eisenstein et al., 2023)

as in TRL's `RewardTrainer` (`center_rewards_coefficient` c, recommended 0.01). Only reward differences
are identified, so centering just pins the rewards' offset near 0.

The network is the GPT backbone with a scalar head `score` on the final hidden state of the LAST REAL
(non-padding) token of each sequence, the pooling of Hugging Face's GPT2ForSequenceClassification.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.sampling import positions_from_mask

__all__ = [
    "bradley_terry_loss", "bradley_terry_loss_sum", "reward_metrics", "last_token_index", "RewardModel",
    "score_sequences", "sequence_loglik",
]


def bradley_terry_loss_sum(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed Bradley-Terry loss over pairs and the number of pairs, for the training loop.

        loss_sum = sum_i [ -log sigma(r_c,i - r_r,i [- m_i]) [+ c * (r_c,i + r_r,i)^2] ],   n = number of pairs

    r_chosen, r_rejected (and margin, if given): (B,). loss_sum / n equals `bradley_terry_loss`.
    """
    _check_rewards(r_chosen, r_rejected, margin)
    if center_coef is not None and (not isinstance(center_coef, (int, float)) or center_coef < 0):
        raise ValueError(f"center_coef must be None or a number >= 0, got {center_coef!r}")
    # BEGIN ASSIGNMENT bradley-terry
    diff = r_chosen - r_rejected  # (B,)
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)  # (B,)
    if center_coef is not None:
        losses = losses + center_coef * (r_chosen + r_rejected) ** 2
    return losses.sum(), r_chosen.shape[0]
    # END ASSIGNMENT


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float | None = None,
) -> torch.Tensor:
    """Mean Bradley-Terry loss: -mean log sigma(r_c - r_r [- margin]) [+ c * mean((r_c + r_r)^2)]; a scalar."""
    loss_sum, n = bradley_terry_loss_sum(r_chosen, r_rejected, margin, center_coef)
    return loss_sum / n


def reward_metrics(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict[str, float]:
    """Batch statistics of a reward model.

        accuracy = mean [r_c > r_r] (strict: a tie counts as wrong)     margin = mean (r_c - r_r)
        mean, std, min, max over all 2B rewards (std is the population std, divisor 2B)
    """
    _check_rewards(r_chosen, r_rejected, None)
    r_c, r_r = r_chosen.detach().float(), r_rejected.detach().float()
    both = torch.cat([r_c, r_r])  # (2B,)
    return {
        "accuracy": (r_c > r_r).float().mean().item(),
        "margin": (r_c - r_r).mean().item(),
        "mean": both.mean().item(),
        "std": both.std(correction=0).item(),
        "min": both.min().item(),
        "max": both.max().item(),
    }


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of attention_mask (B, T) -> (B,); right or left padding.

        last[b] = max { t : mask[b, t] = 1 }, computed as argmax_t (t * mask[b, t])
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (B, T), got shape {tuple(attention_mask.shape)}")
    real = attention_mask != 0  # (B, T)
    if not bool(real.any(dim=-1).all()):
        rows = torch.nonzero(~real.any(dim=-1)).flatten().tolist()
        raise ValueError(f"attention_mask has no real token in row(s) {rows}")
    t = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # (T,)
    return (t * real).argmax(dim=-1)  # positions of real tokens are distinct, so the max is the last one


class RewardModel(nn.Module):
    """r(x, y) = score(h_last): a GPT backbone with a scalar linear head on the last real token.

    `score` has no bias, like Hugging Face's GPT2ForSequenceClassification (a bias would cancel in
    r_w - r_l anyway), and is initialised N(0, 0.02) as GPT-2's other weights.
    """

    def __init__(self, backbone: nn.Module, loglik: bool = False) -> None:
        super().__init__()
        n_embd = getattr(getattr(backbone, "config", None), "n_embd", None)
        if not isinstance(n_embd, int):
            raise TypeError("RewardModel: backbone must be a minillm GPT (with config.n_embd)")
        self.backbone = backbone
        self.score = nn.Linear(n_embd, 1, bias=False)
        nn.init.normal_(self.score.weight, mean=0.0, std=0.02)
        # loglik=True: r = score(h_last) + loglik_scale * sum_t log p_LM(x_t | x_<t) over the real tokens.
        # Why: a linear head on the last token cannot tell "Corin ... grey" from "Corin ... white" for a
        # character it was never trained on (held-out wrong_fact accuracy 0.44-0.56 at the cpu preset, with
        # more pairs, more steps or a base init alike), but the backbone's own next-token distribution knows
        # the fact. The prompt's log-likelihood is the same for both answers, so it cancels in r_w - r_l.
        self.loglik_scale = nn.Parameter(torch.ones(())) if loglik else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                loglik_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards (B,) for input_ids (B, T); attention_mask (B, T) is 1 on real tokens (either padding side).

        loglik_mask (B, T), loglik models only: 1 on the tokens whose log-likelihood enters r (default: every real
        token). Bradley-Terry identifies r only up to a constant per prompt, so leaving the prompt's log-likelihood
        out (as PPO does) gives the same preferences with far less variance across prompts.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"RewardModel: input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            h, _ = self.backbone.hidden_states(input_ids)  # (B, T, C)
            h_last = h[:, -1]  # (B, C)
        else:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"RewardModel: attention_mask shape {tuple(attention_mask.shape)} "
                    f"!= input_ids shape {tuple(input_ids.shape)}"
                )
            last = last_token_index(attention_mask)  # (B,)
            # positions restart at 0 on each row's first real token, so left padding changes nothing
            h, _ = self.backbone.hidden_states(
                input_ids, attention_mask=attention_mask, position_ids=positions_from_mask(attention_mask)
            )  # (B, T, C)
            h_last = h[torch.arange(h.shape[0], device=h.device), last]  # (B, C)
        r = self.score(h_last).squeeze(-1)  # (B,)
        if self.loglik_scale is not None:
            r = r + self.loglik_scale * sequence_loglik(self.backbone, h, input_ids, attention_mask, loglik_mask)
        return r


def sequence_loglik(backbone: nn.Module, h: torch.Tensor, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None, loglik_mask: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """sum_t log p(x_t | x_<t) over the real tokens after each row's first (only those with loglik_mask = 1, if
    given), from final hidden states h (B, T, C) through the backbone's (tied) LM head; (B,) fp32."""
    logp = F.log_softmax(backbone.lm_head(h[:, :-1]).float(), dim=-1)  # (B, T-1, V)
    tok = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    if attention_mask is not None:
        real = (attention_mask[:, 1:] != 0) & (attention_mask[:, :-1] != 0)  # both ends real: no pad context
        tok = tok * real
    if loglik_mask is not None:
        if loglik_mask.shape != input_ids.shape:
            raise ValueError(f"loglik_mask shape {tuple(loglik_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        tok = tok * (loglik_mask[:, 1:] != 0)
    return tok.sum(dim=-1)


def _check_rewards(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None) -> None:
    named = {"r_chosen": r_chosen, "r_rejected": r_rejected}
    if margin is not None:
        named["margin"] = margin
    for name, t in named.items():
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point torch.Tensor")
        if t.dim() != 1 or t.shape != r_chosen.shape:
            raise ValueError(
                f"{name} must be 1-D with the shape of r_chosen {tuple(r_chosen.shape)}, got {tuple(t.shape)}"
            )
    if r_chosen.shape[0] == 0:
        raise ValueError("r_chosen is empty: need at least one pair")


@torch.no_grad()
def score_sequences(rm: RewardModel, sequences: list[list[int]], pad_id: int, batch_size: int = 64,
                    prompt_lengths: list[int] | None = None) -> torch.Tensor:
    """r(x, y) of chat-template token sequences (each ending with the response's <|end|>); returns (N,) fp32 on CPU.

    prompt_lengths (one per sequence): a loglik reward model counts the log-likelihood of the response tokens only
    (see `RewardModel.forward`); a plain one ignores them.
    """
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("score_sequences: need at least one sequence, none of them empty")
    if prompt_lengths is not None and len(prompt_lengths) != len(sequences):
        raise ValueError(f"score_sequences: {len(prompt_lengths)} prompt_lengths for {len(sequences)} sequences")
    device = next(rm.parameters()).device
    was_training = rm.training
    rm.eval()
    out = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        T = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)  # (b, T), right-padded
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        loglik_mask = None
        if prompt_lengths is not None:
            loglik_mask = mask.clone()
            for i, n in enumerate(prompt_lengths[start:start + batch_size]):
                loglik_mask[i, :n] = 0
            loglik_mask = loglik_mask.to(device)
        out.append(rm(ids.to(device), attention_mask=mask.to(device), loglik_mask=loglik_mask).float().cpu())
    rm.train(was_training)
    return torch.cat(out)
