"""Prefix tuning (Li & Liang, 2021) and prompt tuning (Lester et al., 2021): train activations, not weights.

Prefix tuning gives every layer l its own P trained key and value vectors, prepended to the keys and
values of the real tokens; the frozen model's attention then reads them like an earlier context:

    head_l(x) = softmax(Q_l [K_prefix,l ; K_l]^T / sqrt(d_head)) [V_prefix,l ; V_l]

It uses the model's past-keys/values input, so real tokens' positions start at P (as in PEFT, where the
prefix arrives as a cache of length P) and any attention mask gets P ones prepended. Trainable numbers:
2 L P d. Optionally (Li & Liang's reparameterisation) the prefix is the output of an MLP,
prefix = W_2 tanh(W_1 E + b_1) + b_2 with E (P, d), which trains more stably; `fold_reparameterization`
evaluates it once and keeps only the result. Layout as in PEFT: a (P, 2 L d) table viewed as
(P, 2L, H, D); layer l reads entry 2l as its keys and 2l + 1 as its values.

Prompt tuning prepends P trained vectors to the input embeddings instead (only the first layer's input):

    h_0 = [E_prompt ; wte(x)] + wpe(0 .. P + T - 1)

initialised at random (N(0, 1), PEFT's default), from the embeddings of random vocabulary tokens, or from
the embeddings of a text's tokens (cut or repeated cyclically to P). Trainable numbers: P d.

Both are wrappers around a frozen GPT with the GPT's call signature, so `sampling.generate` runs them, KV
cache included. Their forward returns logits for the real tokens only, (B, T, V): the loss needs no
change, since the virtual positions have no labels. With use_cache the returned past holds the real
tokens only; the wrapper prepends the virtual part again at every call. Their `config` is the GPT's with
block_size reduced by P, the context left for real tokens.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from minillm.model import GPT, KV

PROMPT_INITS = ("random", "sample_vocab", "text")


def _check_virtual_tokens(model: nn.Module, num_virtual_tokens: int, who: str) -> None:
    if not isinstance(model, GPT):
        raise TypeError(f"{who}: model must be a minillm GPT, got {type(model).__name__}")
    if not isinstance(num_virtual_tokens, int) or isinstance(num_virtual_tokens, bool) or num_virtual_tokens < 1:
        raise ValueError(f"{who}: num_virtual_tokens must be a positive integer, got {num_virtual_tokens!r}")
    if num_virtual_tokens >= model.config.block_size:
        raise ValueError(
            f"{who}: num_virtual_tokens={num_virtual_tokens} leaves no room in block_size={model.config.block_size}"
        )


def _prepend_ones(attention_mask: torch.Tensor | None, P: int) -> torch.Tensor | None:
    """(B, T_total) -> (B, P + T_total): the virtual tokens are always visible."""
    if attention_mask is None:
        return None
    ones = torch.ones(attention_mask.shape[0], P, dtype=attention_mask.dtype, device=attention_mask.device)
    return torch.cat([ones, attention_mask], dim=1)


def _prepend_past(virtual: list[KV], past: list[KV] | None, B: int) -> list[KV]:
    """Each layer's virtual (keys, values), (1, H, P, D), in front of the cached real tokens' (B, H, T, D)."""
    if past is None:
        return virtual  # batch 1: attention broadcasts it over the batch
    return [
        (torch.cat([vk.expand(B, -1, -1, -1).to(k.dtype), k], dim=2),
         torch.cat([vv.expand(B, -1, -1, -1).to(v.dtype), v], dim=2))
        for (vk, vv), (k, v) in zip(virtual, past)
    ]


def _strip_virtual(presents: list[KV], P: int) -> list[KV]:
    """Drop the first P positions of every layer's cache: the past handed back holds real tokens only."""
    return [(k[:, :, P:], v[:, :, P:]) for k, v in presents]


def _batch_size(idx: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> int:
    if (idx is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of idx or inputs_embeds")
    return (idx if idx is not None else inputs_embeds).shape[0]


class PrefixTunedGPT(nn.Module):
    """A frozen GPT whose every attention layer sees P trained key/value vectors before the real tokens."""

    def __init__(
        self,
        model: GPT,
        num_virtual_tokens: int,
        prefix_projection: bool = False,
        encoder_hidden_size: int | None = None,
        init_weights: str = "random",
    ) -> None:
        super().__init__()
        _check_virtual_tokens(model, num_virtual_tokens, "PrefixTunedGPT")
        if init_weights not in ("random", "zero"):
            raise ValueError(f"PrefixTunedGPT: init_weights must be 'random' or 'zero', got {init_weights!r}")
        self.model = model.requires_grad_(False)
        cfg = model.config
        self.config = dataclasses.replace(cfg, block_size=cfg.block_size - num_virtual_tokens)
        self.num_virtual_tokens = num_virtual_tokens
        self.prefix_projection = bool(prefix_projection)
        self.disabled = False
        P, L, d = num_virtual_tokens, cfg.n_layer, cfg.n_embd
        device, dtype = model.wte.weight.device, model.wte.weight.dtype
        if self.prefix_projection:
            hidden = d if encoder_hidden_size is None else encoder_hidden_size
            if not isinstance(hidden, int) or hidden < 1:
                raise ValueError(f"PrefixTunedGPT: encoder_hidden_size must be a positive integer, got {hidden!r}")
            self.prefix_embedding = nn.Parameter(torch.randn(P, d, device=device, dtype=dtype))  # E, N(0, 1)
            self.prefix_mlp = nn.Sequential(
                nn.Linear(d, hidden, device=device, dtype=dtype),
                nn.Tanh(),
                nn.Linear(hidden, 2 * L * d, device=device, dtype=dtype),
            )
            if init_weights == "zero":
                nn.init.zeros_(self.prefix_mlp[-1].weight)
                nn.init.zeros_(self.prefix_mlp[-1].bias)
        else:
            self.prefix = nn.Parameter(torch.randn(P, 2 * L * d, device=device, dtype=dtype))  # N(0, 1) as PEFT
            if init_weights == "zero":
                nn.init.zeros_(self.prefix)

    def prefix_table(self) -> torch.Tensor:
        """The (P, 2 L d) table: the trained parameter, or the MLP's output when reparameterised."""
        if self.prefix_projection:
            return self.prefix_mlp(self.prefix_embedding)
        return self.prefix

    def prefix_key_values(self) -> list[KV]:
        """One (keys, values) per layer, each (1, H, P, D)."""
        cfg = self.model.config
        P, H = self.num_virtual_tokens, cfg.n_head
        table = self.prefix_table().view(P, 2 * cfg.n_layer, H, cfg.n_embd // H)  # (P, 2L, H, D)
        kv = table.permute(1, 2, 0, 3)  # (2L, H, P, D)
        return [(kv[2 * i][None], kv[2 * i + 1][None]) for i in range(cfg.n_layer)]

    @torch.no_grad()
    def fold_reparameterization(self) -> None:
        """Replace the MLP by its output: after training only the (P, 2 L d) table is needed."""
        if not self.prefix_projection:
            return
        table = self.prefix_table().detach().clone()
        del self.prefix_mlp, self.prefix_embedding
        self.prefix_projection = False
        self.prefix = nn.Parameter(table)
        config = getattr(self, "peft_config", None)  # set by apply_peft; a saved adapter now holds the table
        if isinstance(config, dict):
            config["prefix_projection"] = False

    def forward(
        self,
        idx: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: list[KV] | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[KV]]:
        """The GPT's forward with the prefix in front of `past_key_values` (the real tokens' cache, or None).

        attention_mask: (B, T_past + T) over real tokens; position_ids count real tokens from 0 (both are
        shifted by P here). Returns logits (B, T, V), and with use_cache the real tokens' cache.
        """
        if self.disabled:
            return self.model(idx, attention_mask, past_key_values, position_ids, inputs_embeds, use_cache)
        P = self.num_virtual_tokens
        past = _prepend_past(self.prefix_key_values(), past_key_values, _batch_size(idx, inputs_embeds))
        if position_ids is not None:
            position_ids = position_ids + P
        out = self.model(idx, _prepend_ones(attention_mask, P), past, position_ids, inputs_embeds, use_cache)
        if not use_cache:
            return out
        logits, presents = out
        return logits, _strip_virtual(presents, P)


class PromptTunedGPT(nn.Module):
    """A frozen GPT reading P trained embeddings ("soft prompt") before the real tokens' embeddings."""

    def __init__(
        self,
        model: GPT,
        num_virtual_tokens: int,
        prompt_init: str = "random",
        init_token_ids: list[int] | torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        _check_virtual_tokens(model, num_virtual_tokens, "PromptTunedGPT")
        self.model = model.requires_grad_(False)
        self.config = dataclasses.replace(model.config, block_size=model.config.block_size - num_virtual_tokens)
        self.num_virtual_tokens = num_virtual_tokens
        self.disabled = False
        self.prompt = nn.Parameter(self._initial_prompt(prompt_init, init_token_ids, generator))  # (P, d)

    def _initial_prompt(
        self, prompt_init: str, init_token_ids: list[int] | torch.Tensor | None, generator: torch.Generator | None
    ) -> torch.Tensor:
        P, wte = self.num_virtual_tokens, self.model.wte.weight
        if prompt_init not in PROMPT_INITS:
            raise ValueError(f"PromptTunedGPT: prompt_init must be one of {PROMPT_INITS}, got {prompt_init!r}")
        if (prompt_init == "text") != (init_token_ids is not None):
            raise ValueError("PromptTunedGPT: init_token_ids is required for prompt_init='text' and only for it")
        if prompt_init == "random":  # nn.Embedding's default, N(0, 1), as in PEFT
            return torch.randn(P, wte.shape[1], generator=generator).to(device=wte.device, dtype=wte.dtype)
        if prompt_init == "sample_vocab":  # uniformly random token ids from the whole vocabulary
            ids = torch.randint(0, wte.shape[0], (P,), generator=generator)
        else:
            ids = torch.as_tensor(init_token_ids, dtype=torch.long).flatten().cpu()
            if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= wte.shape[0]:
                raise ValueError(
                    f"PromptTunedGPT: init_token_ids must be a non-empty list of ids in [0, {wte.shape[0]})"
                )
            ids = ids.repeat(-(-P // ids.numel()))[:P]  # cut, or repeat cyclically, to P ids
        return wte.detach()[ids.to(wte.device)].clone()

    def prompt_key_values(self) -> list[KV]:
        """Every layer's (keys, values) of the P virtual tokens, (1, H, P, D).

        They attend only to each other (causal mask), so they do not depend on the real tokens: this is
        what the first call computed for them, and what a cached call puts back in front.
        """
        _, presents = self.model(inputs_embeds=self.prompt[None], use_cache=True)
        return presents

    def forward(
        self,
        idx: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: list[KV] | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[KV]]:
        """Logits (B, T, V) for the real tokens only; labels need no -100 padding for the virtual ones.

        attention_mask (B, T_past + T) and position_ids (counted from 0 over real tokens) are shifted by P.
        """
        if self.disabled:
            return self.model(idx, attention_mask, past_key_values, position_ids, inputs_embeds, use_cache)
        B = _batch_size(idx, inputs_embeds)
        P = self.num_virtual_tokens
        embeds = self.model.wte(idx) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        if position_ids is not None:
            position_ids = position_ids.expand(B, -1) + P  # (B, T)
        mask = _prepend_ones(attention_mask, P)
        if past_key_values is None:
            x = torch.cat([self.prompt.to(embeds.dtype)[None].expand(B, -1, -1), embeds], dim=1)  # (B, P+T, C)
            if position_ids is not None:
                virtual_pos = torch.arange(P, device=position_ids.device).expand(B, -1)
                position_ids = torch.cat([virtual_pos, position_ids], dim=1)  # (B, P + T)
            out = self.model(inputs_embeds=x, attention_mask=mask, position_ids=position_ids, use_cache=use_cache)
            logits, presents = out if use_cache else (out, None)
            logits = logits[:, P:]  # (B, T, V): the real positions
        else:
            past = _prepend_past(self.prompt_key_values(), past_key_values, B)
            logits, presents = self.model(
                inputs_embeds=embeds, attention_mask=mask, past_key_values=past,
                position_ids=position_ids, use_cache=True,
            )
        if not use_cache:
            return logits
        return logits, _strip_virtual(presents, P)
