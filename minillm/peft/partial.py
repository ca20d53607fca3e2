"""Partial fine-tuning: train a chosen subset of the existing weights, freeze the rest.

Nothing is added to the model; the gradient step simply skips frozen parameters:

    theta_i <- theta_i - eta * g_i   for i in the trained subset S,   theta_j fixed for j not in S

Two classic subsets:
- last k blocks: S = parameters of blocks h.(L-k) .. h.(L-1) (and, by default, the final LayerNorm
  ln_f they feed). The lower layers, which hold the most general features, stay as pretrained.
- BitFit (Ben Zaken, Ravfogel & Goldberg, 2022): S = every bias term, those of the linear layers and of
  the LayerNorms, about 0.1% of a transformer's parameters.
"""
from __future__ import annotations

import torch.nn as nn

from minillm.model import GPT


def apply_last_k(model: GPT, k: int = 1, train_ln_f: bool = True) -> GPT:
    """Freeze everything except the last k blocks (and ln_f if train_ln_f). In place; returns the model."""
    if not isinstance(model, GPT):
        raise TypeError(f"last_k: model must be a minillm GPT, got {type(model).__name__}")
    n_layer = len(model.h)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n_layer:
        raise ValueError(f"last_k: k must be an integer in [1, n_layer={n_layer}], got {k!r}")
    model.requires_grad_(False)
    for block in model.h[n_layer - k:]:
        block.requires_grad_(True)
    if train_ln_f:
        model.ln_f.requires_grad_(True)
    return model


def apply_bitfit(model: nn.Module) -> nn.Module:
    """Freeze everything except the bias terms (every parameter named `bias`). In place; returns the model."""
    biases = [p for name, p in model.named_parameters() if name == "bias" or name.endswith(".bias")]
    if not biases:
        raise ValueError("bitfit: the model has no bias parameters (was it built with GPTConfig(bias=False)?)")
    model.requires_grad_(False)
    for p in biases:
        p.requires_grad_(True)
    return model
