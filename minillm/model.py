"""The GPT-2 decoder (Radford et al., 2019), written to be read next to the lecture slides.

One block is pre-LayerNorm:

    x = x + Attn(LN_1(x))            Attn(Q, K, V) = softmax(Q K^T / sqrt(d_head) + M) V
    x = x + MLP(LN_2(x))             MLP(x) = W_2 GELU_tanh(W_1 x),  width 4 * n_embd

with learned absolute positions (`wpe`), token embeddings `wte` tied to the LM head, a final `ln_f`, and
GPT-2's parameter names (`h.N.attn.c_attn`, `h.N.mlp.c_fc`, ...), so Hugging Face GPT-2 checkpoints load
(`GPT.from_hf_gpt2`) and PEFT methods target familiar names.

Every attention layer accepts *past keys and values* to prepend to its own. This one mechanism serves
the KV cache for generation (the past is the tokens already processed) and prefix tuning (the past is
a trained prefix): new tokens attend to the past and their positions continue after it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

# One layer's cache: (keys, values), each (B, n_head, T_past, head_dim).
KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class GPTConfig:
    """Shape of the network. `attn_impl` picks fused SDPA or the explicit softmax the lesson steps through."""

    vocab_size: int = 2048
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    bias: bool = True
    attn_impl: str = "sdpa"  # "sdpa" | "explicit"
    # Hugging Face GPT-2 variants (`GPT.from_hf_gpt2`); the defaults are GPT-2's.
    layer_norm_eps: float = 1e-5
    n_inner: int | None = None  # MLP width; None: 4 * n_embd
    activation: str = "gelu_tanh"  # "gelu_tanh" (GPT-2's gelu_new) | "gelu" (exact, erf)

    @property
    def mlp_width(self) -> int:
        return 4 * self.n_embd if self.n_inner is None else self.n_inner

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.attn_impl not in ("sdpa", "explicit"):
            raise ValueError(f"GPTConfig.attn_impl must be 'sdpa' or 'explicit', got {self.attn_impl!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"GPTConfig.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.n_inner is not None and (isinstance(self.n_inner, bool) or not isinstance(self.n_inner, int)
                                         or self.n_inner < 1):
            raise ValueError(f"GPTConfig.n_inner must be a positive integer or None, got {self.n_inner!r}")
        if not (isinstance(self.layer_norm_eps, (int, float)) and 0 < self.layer_norm_eps < 1):
            raise ValueError(f"GPTConfig.layer_norm_eps must be in (0, 1), got {self.layer_norm_eps!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GPTConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (GPT-2): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return F.gelu(x, approximate="tanh")


def gelu_exact(x: torch.Tensor) -> torch.Tensor:
    """GELU as defined: x Phi(x) = 0.5 x (1 + erf(x / sqrt(2))) (BERT; GPT-2 variants with activation "gelu")."""
    return F.gelu(x)


ACTIVATIONS = {"gelu_tanh": gelu_tanh, "gelu": gelu_exact}


def attention_mask_4d(
    t_new: int, t_total: int, key_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Boolean mask, True where query i may attend key j: (1, 1, T, T_total) or (B, 1, T, T_total).

    Query i is the token at absolute position t_total - t_new + i (the past comes first), so it sees
    every key up to and including its own position. Keys where key_mask is False (padding) are hidden,
    but a query always sees itself, so no row is empty (an empty row would give NaN and poison the
    later layers through the values of padding positions).
    """
    q_pos = torch.arange(t_new, device=device)[:, None] + (t_total - t_new)
    k_pos = torch.arange(t_total, device=device)[None, :]
    allowed = k_pos <= q_pos  # (T, T_total): the causal mask
    if key_mask is not None:
        allowed = (allowed & key_mask[:, None, :].bool()) | (k_pos == q_pos)  # (B, T, T_total)
    return allowed.view(-1, 1, t_new, t_total)


def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
    dropout: nn.Module | None = None,
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + M) V, the equation on the slide, one step per line (the explicit path; the
    default path calls PyTorch's fused `F.scaled_dot_product_attention`, which computes the same).

    q: (..., T_q, D); k, v: (..., T_k, D), any T_q and T_k; mask: bool, broadcastable to (..., T_q, T_k), True
    where a query may see a key (M = 0 there, -inf elsewhere; `attention_mask_4d` builds the causal one).
    `dropout` (a module) acts on the attention weights. Returns (..., T_q, D).
    """
    # BEGIN ASSIGNMENT attention-explicit
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (..., T_q, T_k)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # M: -inf where a key is hidden
    weights = torch.softmax(scores, dim=-1)
    if dropout is not None:
        weights = dropout(weights)
    return weights @ v  # (..., T_q, D)
    # END ASSIGNMENT


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with optional past keys/values."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.attn_impl = config.attn_impl
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        past: KV | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KV]:
        """x: (B, T, C). past: keys/values to prepend, each (B or 1, H, T_past, D).

        mask: bool (B or 1, 1, T, T_past + T) from `attention_mask_4d`; None means plain causal
        attention with no past. Returns the output (B, T, C) and the (keys, values) including the
        past, which is the cache for the next call.
        """
        B, T, _ = x.shape
        inner = self.n_head * self.head_dim  # == n_embd, unless heads were pruned away (minillm.quant.prune)
        q, k, v = self.c_attn(x).split(inner, dim=2)
        # (B, T, H * D) -> (B, H, T, D)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if past is not None:
            past_k, past_v = past
            if past_k.shape[0] != B:  # a prefix shared by the whole batch
                past_k, past_v = past_k.expand(B, -1, -1, -1), past_v.expand(B, -1, -1, -1)
            k = torch.cat([past_k.to(k.dtype), k], dim=2)  # (B, H, T_past + T, D)
            v = torch.cat([past_v.to(v.dtype), v], dim=2)
        # mask None: plain causal attention over new tokens (no past), or one new token that may see
        # every key (a decode step without padding) - then there is nothing to mask.
        causal = mask is None and T > 1
        if self.attn_impl == "explicit":
            if causal:
                mask = attention_mask_4d(T, T, None, x.device)
            y = scaled_dot_product_attention(q, k, v, mask, self.attn_dropout)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal,
                dropout_p=self.dropout if self.training else 0.0,
            )
        y = y.transpose(1, 2).contiguous().view(B, T, inner)  # (B, H, T, D) -> (B, T, H * D)
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    """Position-wise feed-forward: c_proj(GELU_tanh(c_fc(x))), hidden width 4 * n_embd (config.mlp_width)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_width, bias=config.bias)
        self.c_proj = nn.Linear(config.mlp_width, config.n_embd, bias=config.bias)
        self.act = ACTIVATIONS[config.activation]
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN_1 x), then x + MLP(LN_2 x)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, past: KV | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, KV]:
        a, present = self.attn(self.ln_1(x), past=past, mask=mask)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present


class GPT(nn.Module):
    """GPT-2: token + position embeddings, n_layer pre-LN blocks, ln_f, tied LM head."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf, 2017)
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer), two residual adds per block.
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (the tied head counted once); optionally without wte/wpe."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.wte.weight.numel() + self.wpe.weight.numel()
        return n

    # ------------------------------------------------------------------ forward
    def hidden_states(
        self,
        idx: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: list[KV] | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[KV]]:
        """Final-LayerNorm outputs (B, T, C) and every layer's (keys, values) including the past.

        idx: token ids (B, T), or inputs_embeds (B, T, C) instead (prompt tuning prepends embeddings).
        attention_mask: (B, T_past + T), 1 for real tokens and 0 for padding (Hugging Face convention).
        past_key_values: one (keys, values) per layer, each (B or 1, H, T_past, D): the KV cache or a prefix.
        position_ids: (B, T) or (T,); default T_past, T_past + 1, ... so new tokens continue after the past.
        """
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("GPT: pass exactly one of idx or inputs_embeds")
        x = self.wte(idx) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        if past_key_values is not None and len(past_key_values) != self.config.n_layer:
            raise ValueError(
                f"GPT: past_key_values has {len(past_key_values)} layers, the model has {self.config.n_layer}"
            )
        t_past = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if position_ids is None:
            last = t_past + T - 1  # known without looking at a tensor (no device sync per decode step)
            position_ids = torch.arange(t_past, t_past + T, device=x.device)
        else:
            last = int(position_ids.max())
        if last >= self.config.block_size:
            raise ValueError(f"GPT: position {last} is beyond block_size {self.config.block_size}")
        if attention_mask is not None and attention_mask.shape != (B, t_past + T):
            raise ValueError(
                f"GPT: attention_mask must have shape {(B, t_past + T)} (past + new tokens), "
                f"got {tuple(attention_mask.shape)}"
            )
        mask = None  # the fast paths: causal attention without a past, or one token seeing all of it
        if attention_mask is not None or (t_past > 0 and T > 1):
            mask = attention_mask_4d(T, t_past + T, attention_mask, x.device)
        x = self.drop(x + self.wpe(position_ids))
        presents: list[KV] = []
        for i, block in enumerate(self.h):
            past = None if past_key_values is None else past_key_values[i]
            x, present = block(x, past=past, mask=mask)
            presents.append(present)
        return self.ln_f(x), presents

    def forward(
        self,
        idx: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: list[KV] | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[KV]]:
        """Logits (B, T, vocab_size); with use_cache=True also the new past_key_values."""
        h, presents = self.hidden_states(idx, attention_mask, past_key_values, position_ids, inputs_embeds)
        logits = self.lm_head(h)
        return (logits, presents) if use_cache else logits
