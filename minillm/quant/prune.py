"""Pruning: unstructured (magnitude, Wanda, N:M), structured (heads and MLP neurons) and L0 gates.

Unstructured pruning zeroes single weights of the block Linears (`h.N.attn.c_attn`, `h.N.attn.c_proj`,
`h.N.mlp.c_fc`, `h.N.mlp.c_proj`); the shapes stay, only a boolean mask M (True = keep) is applied,
W <- W * M. With sparsity s a matrix of numel weights loses exactly k = round(s * numel) of them.

    magnitude (per layer):   score S_ij = |W_ij|, prune the k smallest of the whole matrix
    magnitude (global):      the same with one threshold over all the matrices together
    Wanda (Sun et al. 2023): S_ij = |W_ij| * ||X_j||_2, X_j = input feature j over all calibration tokens;
                             prune the round(s * d_in) smallest of *each output row* i (no weight update)
    N:M (e.g. 2:4):          in every group of m consecutive weights along the input dimension keep the n
                             of largest score (|W| or the Wanda score)

Ties are broken by position: a stable sort puts equal scores in index order, and the earlier one is pruned
(for N:M the earlier one is kept). `round` is Python's (half to even), so k is exact and reproducible.

Structured pruning really removes rows and columns, so the smaller model is faster, not only sparser.
Head h of a layer owns rows h*D..(h+1)*D-1 of each of the q, k and v thirds of c_attn and the same
columns of the attention c_proj; MLP hidden unit j owns row j of c_fc (and its bias) and column j of
the MLP c_proj. Which to remove comes from an importance score:

    heads (Michel et al. 2019):  gate xi_h = 1 on each head's output, I_h = E_x |dL(x) / d xi_h|
    neurons (activation-based):  I_j = E_tokens |GELU(c_fc x)_j| * ||c_proj[:, j]||_2

L0 regularisation (Louizos et al. 2018; LLM-Shearing, Xia et al. 2023) learns the structure instead:
each head / neuron output is multiplied by a hard-concrete gate z with learned log alpha,

    u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + log alpha) / beta),  z = clamp(s (zeta - gamma) + gamma, 0, 1)
    P(z != 0) = sigmoid(log alpha - beta log(-gamma / zeta)),   E[L0] = sum of P(z != 0)
    eval:  z = clamp(sigmoid(log alpha) (zeta - gamma) + gamma, 0, 1)
    beta = 2/3, gamma = -0.1, zeta = 1.1

and the expected model size S_hat (parameters weighted by P(z != 0)) is pulled to a target S_t by
LLM-Shearing's Lagrangian, minimised over the gates and maximised over lambda_1, lambda_2:

    L = L_CE + lambda_1 (S_hat - S_t) + lambda_2 (S_hat - S_t)^2

Afterwards gates with eval z == 0 become real removals and the other z are folded into c_proj.

Read top to bottom:
  1. unstructured masks: `magnitude_mask`, `global_magnitude_masks`, `wanda_scores`, `wanda_mask`, `nm_mask`;
  2. applying them to a GPT: `block_linears`, `input_norms_from_calibration`, `prune_model`, `apply_masks`,
     `reapply_masks`;
  3. structured: `head_importance`, `neuron_importance`, `remove_heads`, `remove_neurons`, `prune_structured`;
  4. L0: `hard_concrete_z`, `hard_concrete_eval_z`, `prob_nonzero`, `HardConcreteGate`, `lagrangian_penalty`,
     `attach_head_gates`, `attach_neuron_gates`, `expected_model_size`, `harden_gates`, `remove_gated`,
     `l0_prune`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from minillm.model import GPT

__all__ = [
    "BETA",
    "BLOCK_LINEARS",
    "GAMMA",
    "ZETA",
    "HardConcreteGate",
    "LayerGates",
    "apply_masks",
    "attach_head_gates",
    "attach_neuron_gates",
    "block_linears",
    "expected_model_size",
    "global_magnitude_masks",
    "hard_concrete_eval_z",
    "hard_concrete_z",
    "harden_gates",
    "head_importance",
    "input_norms_from_calibration",
    "l0_prune",
    "lagrangian_penalty",
    "magnitude_mask",
    "neuron_importance",
    "next_token_loss",
    "nm_mask",
    "params_per_head",
    "params_per_neuron",
    "prob_nonzero",
    "prune_model",
    "prune_structured",
    "reapply_masks",
    "remove_gated",
    "remove_heads",
    "remove_neurons",
    "wanda_mask",
    "wanda_scores",
]

# The Linears of one block that pruning touches; wte/wpe/lm_head, LayerNorms and biases stay dense.
BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

# Hard-concrete constants (Louizos et al. 2018): temperature beta, stretch interval (gamma, zeta).
BETA = 2.0 / 3.0
GAMMA = -0.1
ZETA = 1.1

# ====================================================================================================
# 1. unstructured masks


def _n_pruned(count: int, sparsity: float) -> int:
    """k = round(s * count): how many of `count` weights a sparsity s removes."""
    return round(sparsity * count)


def _lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask over the last dim of 2-D scores (R, N): False on the k lowest of each row.

    A stable ascending sort keeps equal scores in index order, so of two equal scores the earlier is pruned.
    """
    order = torch.sort(scores, dim=-1, stable=True).indices  # (R, N), lowest first
    mask = torch.ones_like(scores, dtype=torch.bool)
    mask.scatter_(-1, order[:, :k], False)
    return mask


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask (True = keep) pruning the k = round(s * numel) weights of smallest |W_ij| in the matrix.

    Ties in |W| go by flat (row-major) index: the earlier weight is pruned first.
    """
    _check_weight(weight, "weight", ndim=None)
    _check_sparsity(sparsity)
    scores = weight.detach().abs().reshape(1, -1)  # (1, numel): one ranking over the whole matrix
    return _lowest_k_mask(scores, _n_pruned(weight.numel(), sparsity)).view(weight.shape)


def global_magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold for all matrices: prune the round(s * sum numel) smallest |W| of their union.

    Layers with small weights lose more than s, layers with large weights less. Ties go by the order of
    the dict, then by flat index (the earlier weight is pruned first).
    """
    if not isinstance(weights, dict) or not weights:
        raise ValueError("weights must be a non-empty dict of name -> weight tensor")
    for name, w in weights.items():
        _check_weight(w, f"weights[{name!r}]", ndim=None)
    _check_sparsity(sparsity)
    flat = torch.cat([w.detach().abs().reshape(-1).float() for w in weights.values()])  # (total,)
    keep = _lowest_k_mask(flat[None, :], _n_pruned(flat.numel(), sparsity))[0]
    masks, start = {}, 0
    for name, w in weights.items():
        masks[name] = keep[start:start + w.numel()].view(w.shape)
        start += w.numel()
    return masks


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """Wanda's S_ij = |W_ij| * ||X_j||_2. weight (d_out, d_in), input_norms (d_in,) -> (d_out, d_in)."""
    _check_weight(weight, "weight", ndim=2)
    _check_input_norms(input_norms, weight.shape[1])
    return weight.detach().abs() * input_norms.to(weight.dtype)[None, :]


def wanda_mask(weight: torch.Tensor, input_norms: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask removing, in each output row i, the round(s * d_in) weights of lowest S_ij = |W_ij| ||X_j||_2.

    Comparing within a row (per output) rather than over the matrix is what Wanda found to matter for LLMs.
    """
    scores = wanda_scores(weight, input_norms)
    _check_sparsity(sparsity)
    return _lowest_k_mask(scores, _n_pruned(weight.shape[1], sparsity))


def nm_mask(weight: torch.Tensor, n: int = 2, m: int = 4, scores: torch.Tensor | None = None) -> torch.Tensor:
    """N:M keep-mask: in each group of m consecutive weights along the last (input) dim keep the n best.

    "Best" is the largest |W|, or the largest `scores` when given (pass `wanda_scores(...)` for Wanda N:M).
    Of equal scores the earlier one is kept. The mask has exactly n Trues in every group of m.
    """
    _check_weight(weight, "weight", ndim=None)
    for name, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    if not 1 <= n <= m:
        raise ValueError(f"n must be in [1, m] = [1, {m}], got n={n}")
    d_in = weight.shape[-1]
    if d_in % m:
        raise ValueError(f"nm_mask: the input dimension {d_in} of weight is not divisible by m={m}")
    if scores is None:
        scores = weight.detach().abs()
    elif not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor or None, got {type(scores).__name__}")
    elif scores.shape != weight.shape:
        raise ValueError(f"scores must have the shape of weight {tuple(weight.shape)}, got {tuple(scores.shape)}")
    groups = scores.detach().reshape(-1, m)  # (numel / m, m): one row per group
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices  # best first
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[:, :n], True)
    return keep.view(weight.shape)


# ====================================================================================================
# 2. applying masks to a GPT


def block_linears(model: GPT) -> dict[str, nn.Linear]:
    """The prunable Linears by module name, `h.{i}.attn.c_attn`, ..., `h.{i}.mlp.c_proj`, in block order."""
    _check_gpt(model)
    return {f"h.{i}.{name}": block.get_submodule(name) for i, block in enumerate(model.h) for name in BLOCK_LINEARS}


@torch.no_grad()
def input_norms_from_calibration(model: GPT, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """||X_j||_2 = sqrt(sum over every calibration token t of x_tj^2) for each input feature j of each block Linear.

    batches: token ids, each (B, T). Forward hooks read the input of every Linear; the model runs in eval
    mode (no dropout) and is put back in its previous mode afterwards. Returns name -> (d_in,) float32.
    """
    linears = block_linears(model)
    sq_sums = {name: torch.zeros(lin.in_features, dtype=torch.float64, device=lin.weight.device)
               for name, lin in linears.items()}

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()  # (B * T, d_in): every token is one sample
            sq_sums[name] += (x * x).sum(dim=0)
        return hook

    _run_no_grad(model, batches, [lin.register_forward_hook(hook_for(name)) for name, lin in linears.items()])
    return {name: s.sqrt().float() for name, s in sq_sums.items()}


@torch.no_grad()
def prune_model(
    model: GPT,
    sparsity: float | None,
    method: str = "magnitude",
    nm: tuple[int, int] | None = None,
    calibration: Iterable[torch.Tensor] | None = None,
) -> dict:
    """Zero weights of every block Linear in place, W <- W * M; returns the masks and the sparsity reached.

    method: "magnitude" (|W| per layer), "magnitude_global" (|W|, one threshold over all block Linears) or
    "wanda" (|W| ||X_j||, per output row; needs `calibration`, token batches (B, T)).
    nm=(n, m): N:M groups instead of a sparsity (the sparsity is then 1 - n/m; pass None or that value).

    Returns {"masks": name -> keep-mask, "layers": name -> pruned fraction, "pruned": int, "total": int,
    "overall": pruned / total}. Keep the masks to hold the zeros during fine-tuning (`apply_masks`).
    """
    _check_gpt(model)
    if method not in ("magnitude", "magnitude_global", "wanda"):
        raise ValueError(f"method must be 'magnitude', 'magnitude_global' or 'wanda', got {method!r}")
    if nm is not None:
        if not (isinstance(nm, tuple) and len(nm) == 2):
            raise TypeError(f"nm must be a tuple (n, m) or None, got {nm!r}")
        if method == "magnitude_global":
            raise ValueError("nm: N:M groups are local, they cannot be combined with method='magnitude_global'")
        if sparsity is not None and not math.isclose(sparsity, 1 - nm[0] / nm[1]):
            raise ValueError(f"sparsity {sparsity} contradicts nm={nm} (which means {1 - nm[0] / nm[1]}); pass None")
    elif sparsity is None:
        raise ValueError("sparsity must be given unless nm is")
    else:
        _check_sparsity(sparsity)
    if method == "wanda" and calibration is None:
        raise ValueError("calibration: method='wanda' needs calibration token batches (B, T)")
    linears = block_linears(model)
    norms = input_norms_from_calibration(model, calibration) if method == "wanda" else {}
    if method == "magnitude_global":
        masks = global_magnitude_masks({name: lin.weight for name, lin in linears.items()}, sparsity)
    else:
        masks = {}
        for name, lin in linears.items():
            if nm is not None:
                scores = wanda_scores(lin.weight, norms[name]) if method == "wanda" else None
                masks[name] = nm_mask(lin.weight, nm[0], nm[1], scores=scores)
            elif method == "wanda":
                masks[name] = wanda_mask(lin.weight, norms[name], sparsity)
            else:
                masks[name] = magnitude_mask(lin.weight, sparsity)
    reapply_masks(model, masks)
    layers = {name: 1.0 - mask.float().mean().item() for name, mask in masks.items()}
    pruned = sum(int((~mask).sum()) for mask in masks.values())
    total = sum(mask.numel() for mask in masks.values())
    return {"masks": masks, "layers": layers, "pruned": pruned, "total": total, "overall": pruned / total}


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> list[RemovableHandle]:
    """Zero the pruned weights and register gradient hooks grad <- grad * M, so they get no gradient.

    A zero weight with zero gradient stays zero under SGD and under Adam(W) whose state starts after
    pruning (its moments stay 0). An optimizer with older moments, or any other write to the weights,
    can move them, so the safe recipe for a recovery fine-tune is both: `apply_masks` once, then
    `reapply_masks(model, masks)` after every optimizer step. Remove the hooks with `h.remove()`.
    """
    reapply_masks(model, masks)
    handles = []
    for name, mask in masks.items():
        weight = _masked_weight(model, name, mask)
        keep = mask.to(device=weight.device, dtype=weight.dtype)
        handles.append(weight.register_hook(lambda grad, keep=keep: grad * keep))
    return handles


@torch.no_grad()
def reapply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """W <- W * M for each `name -> mask` (name = module name, e.g. `h.0.mlp.c_fc`), in place."""
    for name, mask in masks.items():
        weight = _masked_weight(model, name, mask)
        weight.mul_(mask.to(device=weight.device, dtype=weight.dtype))


def _masked_weight(model: nn.Module, name: str, mask: torch.Tensor) -> torch.Tensor:
    try:
        weight = model.get_submodule(name).weight
    except AttributeError as exc:
        raise ValueError(f"masks: the model has no module {name!r} with a weight") from exc
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != weight.shape:
        raise ValueError(f"masks[{name!r}] must be a bool tensor of shape {tuple(weight.shape)}")
    return weight


# ====================================================================================================
# 3. structured pruning: importance, then real removal


def next_token_loss(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: position t predicts idx[:, t + 1]. idx (B, T) with T >= 2."""
    _check_ids(idx, "idx")
    if idx.shape[1] < 2:
        raise ValueError(f"idx needs at least 2 tokens per row for a next-token loss, got shape {tuple(idx.shape)}")
    logits = model(idx)  # (B, T, V)
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), idx[:, 1:].reshape(-1))  # (B * (T-1), V) vs (B * (T-1),)


def _scale_heads(attn: nn.Module, z: Callable[[], torch.Tensor]) -> RemovableHandle:
    """Multiply head h's output by z()[h] on its way into c_proj (a forward pre-hook; z() is called per forward)."""
    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        y = inputs[0]
        gate = z().to(y.dtype)
        heads = y.unflatten(-1, (gate.numel(), attn.head_dim))  # (B, T, H * D) -> (B, T, H, D)
        return ((heads * gate[:, None]).flatten(-2),)
    return attn.c_proj.register_forward_pre_hook(hook)


def _scale_neurons(mlp: nn.Module, z: Callable[[], torch.Tensor]) -> RemovableHandle:
    """Multiply hidden unit j, GELU(c_fc x)_j, by z()[j] on its way into the MLP's c_proj."""
    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        return (inputs[0] * z().to(inputs[0].dtype),)
    return mlp.c_proj.register_forward_pre_hook(hook)


def head_importance(
    model: GPT,
    batches: Iterable[torch.Tensor],
    loss_fn: Callable[[GPT, torch.Tensor], torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Michel et al. (2019): I_h = E_x |dL(x) / d xi_h| with a gate xi_h = 1 on each head's output.

    The expectation runs over calibration batches (each (B, T)); L is the batch's mean next-token
    cross-entropy (or `loss_fn(model, idx)`), so this is the per-batch version of the paper's per-example
    average. With xi = 1 the model is unchanged; only d/d xi is computed (no .grad lands on the weights).
    Michel et al. also normalise I per layer before a global ranking; `prune_structured` ranks within each
    layer, where that makes no difference. Returns one (n_head_l,) tensor per layer.
    """
    _check_gpt(model)
    loss_fn = next_token_loss if loss_fn is None else loss_fn
    xis = [torch.ones(b.attn.n_head, device=model.wte.weight.device, requires_grad=True) for b in model.h]
    handles = [_scale_heads(b.attn, lambda xi=xi: xi) for b, xi in zip(model.h, xis)]
    return _mean_abs_grad(model, batches, loss_fn, xis, handles)


def neuron_importance(model: GPT, batches: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Activation-based importance of MLP hidden unit j: I_j = E_tokens |GELU(c_fc x)_j| * ||c_proj[:, j]||_2.

    The mean |activation| says how much unit j is used, the column norm how much its use moves the
    residual stream: the Wanda score of the whole column (a gradient-free alternative to the heads' I_h).
    Returns one (d_hidden_l,) tensor per layer.
    """
    _check_gpt(model)
    sums = [torch.zeros(b.mlp.c_proj.in_features, dtype=torch.float64, device=model.wte.weight.device)
            for b in model.h]
    count = [0]

    def hook_for(i: int) -> Callable:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            act = inputs[0].reshape(-1, inputs[0].shape[-1])  # (B * T, d_hidden)
            sums[i] += act.abs().double().sum(dim=0)
            if i == 0:
                count[0] += act.shape[0]
        return hook

    handles = [b.mlp.c_proj.register_forward_pre_hook(hook_for(i)) for i, b in enumerate(model.h)]
    _run_no_grad(model, batches, handles)
    return [(s / count[0]).float() * b.mlp.c_proj.weight.detach().float().norm(dim=0) for s, b in zip(sums, model.h)]


def remove_heads(model: GPT, layer: int, heads: list[int]) -> None:
    """Delete attention heads of block `layer`: smaller c_attn and c_proj, and attn.n_head reduced.

    c_attn (3 H D, C) keeps the q, k and v rows of the kept heads; c_proj (C, H D) keeps their input
    columns (its bias belongs to no head and stays). The model then computes exactly what it computed
    with those heads' outputs set to zero.
    """
    attn = _check_layer(model, layer).attn
    H, D = attn.n_head, attn.head_dim
    drop = _check_indices(heads, H, "heads")
    keep = [h for h in range(H) if h not in drop]
    if not keep:
        raise ValueError(f"heads: cannot remove all {H} heads of layer {layer}; keep at least one")
    if not drop:
        return
    cols = torch.cat([torch.arange(h * D, (h + 1) * D) for h in keep])  # kept head's slice of H * D
    rows = torch.cat([part * H * D + cols for part in range(3)])  # the same slice of each of q | k | v
    attn.c_attn = _select(attn.c_attn, rows=rows)
    attn.c_proj = _select(attn.c_proj, cols=cols)
    attn.n_head = len(keep)


def remove_neurons(model: GPT, layer: int, neurons: list[int]) -> None:
    """Delete MLP hidden units of block `layer`: rows (and bias) of c_fc, columns of the MLP c_proj."""
    mlp = _check_layer(model, layer).mlp
    d_hidden = mlp.c_fc.out_features
    drop = _check_indices(neurons, d_hidden, "neurons")
    keep = torch.tensor([j for j in range(d_hidden) if j not in drop], dtype=torch.long)
    if keep.numel() == 0:
        raise ValueError(f"neurons: cannot remove all {d_hidden} hidden units of layer {layer}; keep at least one")
    if not drop:
        return
    mlp.c_fc = _select(mlp.c_fc, rows=keep)
    mlp.c_proj = _select(mlp.c_proj, cols=keep)


def prune_structured(
    model: GPT, head_fraction: float, neuron_fraction: float, batches: Iterable[torch.Tensor]
) -> dict:
    """Remove the least important round(f * H) heads and round(f * d_hidden) neurons of every layer.

    The ranking is per layer (every layer shrinks alike, and the count is known in advance); at least one
    head and one neuron stay in each layer. Heads by `head_importance`, neurons by `neuron_importance`,
    both measured on the unpruned model; ties go to the lower index (stable sort). `batches` is read
    twice, so pass a list. Returns params before/after and the removed indices per layer.
    """
    _check_gpt(model)
    _check_sparsity(head_fraction, "head_fraction")
    _check_sparsity(neuron_fraction, "neuron_fraction")
    batches = list(batches)
    before = model.num_parameters()
    head_scores = head_importance(model, batches)
    neuron_scores = neuron_importance(model, batches)
    removed_heads, removed_neurons = {}, {}
    for layer, (hs, ns) in enumerate(zip(head_scores, neuron_scores)):
        n_h = min(_n_pruned(hs.numel(), head_fraction), hs.numel() - 1)
        n_n = min(_n_pruned(ns.numel(), neuron_fraction), ns.numel() - 1)
        removed_heads[layer] = sorted(torch.sort(hs, stable=True).indices[:n_h].tolist())
        removed_neurons[layer] = sorted(torch.sort(ns, stable=True).indices[:n_n].tolist())
        remove_heads(model, layer, removed_heads[layer])
        remove_neurons(model, layer, removed_neurons[layer])
    return {
        "params_before": before,
        "params_after": model.num_parameters(),
        "heads_removed": removed_heads,
        "neurons_removed": removed_neurons,
        "n_head": [b.attn.n_head for b in model.h],
        "d_hidden": [b.mlp.c_fc.out_features for b in model.h],
    }


def _select(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new, smaller nn.Linear holding W[rows][:, cols] (and b[rows]), on the old one's device and dtype."""
    w = linear.weight.detach()
    rows = torch.arange(w.shape[0]) if rows is None else rows
    cols = torch.arange(w.shape[1]) if cols is None else cols
    rows, cols = rows.to(w.device), cols.to(w.device)
    new = nn.Linear(cols.numel(), rows.numel(), bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w[rows][:, cols])  # (out, in) -> (len(rows), len(cols))
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach()[rows])
    new.weight.requires_grad_(linear.weight.requires_grad)
    if linear.bias is not None:
        new.bias.requires_grad_(linear.bias.requires_grad)
    return new


# ====================================================================================================
# 4. L0 regularisation with hard-concrete gates


def hard_concrete_z(log_alpha: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A training sample: s = sigmoid((log u - log(1 - u) + log alpha) / beta),
    z = clamp(s (zeta - gamma) + gamma, 0, 1).

    The stretch to (gamma, zeta) = (-0.1, 1.1) and the clamp give z exactly 0 or 1 with positive
    probability, while z stays differentiable in log alpha (reparameterisation through u).
    """
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def hard_concrete_eval_z(log_alpha: torch.Tensor) -> torch.Tensor:
    """The deterministic test-time gate: z = clamp(sigmoid(log alpha) (zeta - gamma) + gamma, 0, 1)."""
    return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def prob_nonzero(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z != 0) = sigmoid(log alpha - beta log(-gamma / zeta)): the probability that the gate is open."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


class HardConcreteGate(nn.Module):
    """n hard-concrete gates with a learned log alpha (n,); forward() returns z (n,).

    Training mode samples u ~ U(0, 1) (clamped to [eps, 1 - eps] so that log u stays finite); eval mode
    returns the deterministic z. The default log alpha = 3 starts every gate open (eval z = 1,
    P(z != 0) ~ 0.99), so the gated model begins as the original model.
    """

    def __init__(self, n: int, init_log_alpha: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        self.log_alpha = nn.Parameter(torch.full((n,), float(init_log_alpha)))
        self.eps = eps

    def forward(self, generator: torch.Generator | None = None) -> torch.Tensor:
        if not self.training:
            return hard_concrete_eval_z(self.log_alpha)
        u = torch.rand(self.log_alpha.shape, generator=generator, device=self.log_alpha.device)
        return hard_concrete_z(self.log_alpha, u.clamp(self.eps, 1.0 - self.eps))

    def prob_nonzero(self) -> torch.Tensor:
        """P(z_i != 0) for each gate, (n,)."""
        return prob_nonzero(self.log_alpha)

    def expected_l0(self) -> torch.Tensor:
        """E[L0] = E[number of open gates] = sum_i sigmoid(log alpha_i - beta log(-gamma / zeta))."""
        return self.prob_nonzero().sum()


def lagrangian_penalty(
    expected_size: torch.Tensor,
    target_size: float | torch.Tensor,
    lambda_1: torch.Tensor,
    lambda_2: torch.Tensor,
) -> torch.Tensor:
    """LLM-Shearing's constraint term: lambda_1 (S_hat - S_t) + lambda_2 (S_hat - S_t)^2.

    It is minimised over the gates (through S_hat) and *maximised* over lambda_1, lambda_2, so that the
    multipliers grow until the constraint holds. With one backward pass on `loss = L_CE + penalty` the
    lambdas' gradients point the wrong way for them; give the lambdas their own optimizer built with
    `maximize=True` (e.g. `torch.optim.Adam([lam], lr, maximize=True)`), or negate `lam.grad` before
    stepping (`lam.grad.neg_()`). Both turn the step into gradient ascent; `l0_prune` uses the first.
    """
    gap = expected_size - target_size
    return lambda_1 * gap + lambda_2 * gap * gap


class LayerGates(nn.Module):
    """One HardConcreteGate per layer (`gates[i]`) and the hooks that apply them; `detach()` removes the hooks.

    The gates have their own train/eval mode (call `.train()` to sample z, `.eval()` for the deterministic
    z); it is independent of the model's mode, so the model can run without dropout while the gates sample.
    """

    def __init__(self, kind: str, sizes: list[int], init_log_alpha: float) -> None:
        super().__init__()
        self.kind = kind  # "heads" or "neurons"
        self.gates = nn.ModuleList([HardConcreteGate(n, init_log_alpha) for n in sizes])
        self.handles: list[RemovableHandle] = []

    def detach(self) -> None:
        """Remove the forward hooks: the model computes without gates again."""
        for h in self.handles:
            h.remove()
        self.handles = []

    def expected_l0(self) -> torch.Tensor:
        """Expected number of open gates over all layers."""
        return sum(g.expected_l0() for g in self.gates)


def attach_head_gates(model: GPT, init_log_alpha: float = 3.0) -> LayerGates:
    """Gate z_h on every head's output (before c_proj), one HardConcreteGate (n_head,) per layer."""
    _check_gpt(model)
    gates = LayerGates("heads", [b.attn.n_head for b in model.h], init_log_alpha).to(model.wte.weight.device)
    gates.handles = [_scale_heads(b.attn, g) for b, g in zip(model.h, gates.gates)]
    return gates


def attach_neuron_gates(model: GPT, init_log_alpha: float = 3.0) -> LayerGates:
    """Gate z_j on every MLP hidden unit, GELU(c_fc x)_j, one HardConcreteGate (d_hidden,) per layer."""
    _check_gpt(model)
    gates = LayerGates("neurons", [b.mlp.c_fc.out_features for b in model.h], init_log_alpha)
    gates = gates.to(model.wte.weight.device)
    gates.handles = [_scale_neurons(b.mlp, g) for b, g in zip(model.h, gates.gates)]
    return gates


def params_per_head(attn: nn.Module) -> int:
    """Parameters one head owns: D rows (+ bias) in each of q, k, v of c_attn and D columns of c_proj."""
    C, D = attn.c_proj.out_features, attn.head_dim
    return 3 * D * (C + (attn.c_attn.bias is not None)) + C * D


def params_per_neuron(mlp: nn.Module) -> int:
    """Parameters one MLP hidden unit owns: a row (+ bias) of c_fc and a column of c_proj."""
    C = mlp.c_fc.in_features
    return C + (mlp.c_fc.bias is not None) + C


def expected_model_size(
    model: GPT, head_gates: LayerGates | None = None, neuron_gates: LayerGates | None = None
) -> torch.Tensor:
    """S_hat = (parameters nobody gates) + sum over gated heads/neurons of P(z != 0) * (parameters it owns).

    That is the expected number of model parameters left if every closed gate were removed; it is
    differentiable in log alpha. Without gates it is `model.num_parameters()`.
    """
    _check_gpt(model)
    size = torch.tensor(float(model.num_parameters()), device=model.wte.weight.device)
    for gates, owner, per in ((head_gates, "attn", params_per_head), (neuron_gates, "mlp", params_per_neuron)):
        if gates is None:
            continue
        _check_gates(model, gates)
        for block, gate in zip(model.h, gates.gates):
            p = per(getattr(block, owner))
            size = size - gate.log_alpha.numel() * p + gate.prob_nonzero().sum() * p
    return size


@torch.no_grad()
def remove_gated(model: GPT, head_gates: LayerGates | None = None, neuron_gates: LayerGates | None = None) -> dict:
    """Make the gated model's eval output permanent: remove units with eval z == 0, fold the other z in.

    Detaches the gates' hooks, multiplies the c_proj input columns of each kept head / neuron by its eval
    z (the gate multiplied exactly those inputs, and c_proj is linear), then removes the units whose z is
    0 with `remove_heads` / `remove_neurons`. A layer whose gates are all closed keeps its unit of largest
    log alpha with its columns scaled by 0, which still computes the gated output. Returns removed indices.
    """
    _check_gpt(model)
    removed: dict[str, dict[int, list[int]]] = {}
    for gates, kind in ((head_gates, "heads"), (neuron_gates, "neurons")):
        if gates is None:
            continue
        _check_gates(model, gates)
        gates.detach()
        removed[kind] = {}
        for layer, (block, gate) in enumerate(zip(model.h, gates.gates)):
            z = hard_concrete_eval_z(gate.log_alpha.detach())  # (n,)
            c_proj = block.attn.c_proj if kind == "heads" else block.mlp.c_proj
            width = block.attn.head_dim if kind == "heads" else 1
            c_proj.weight.mul_(z.repeat_interleave(width).to(c_proj.weight.dtype)[None, :])  # column scale
            closed = (z == 0).nonzero().flatten().tolist()
            if len(closed) == z.numel():
                closed.remove(int(gate.log_alpha.argmax()))
            (remove_heads if kind == "heads" else remove_neurons)(model, layer, closed)
            removed[kind][layer] = closed
    return removed


def harden_gates(gates: LayerGates) -> None:
    """Per layer, close the k = round(n - E[L0]) gates of lowest log alpha and fully open the others.

    log alpha <- -inf (z = 0) for the k lowest (ties to the lower index), +inf (z = 1) for the rest.
    Gates that end training near the same log alpha all have an eval z strictly inside (0, 1), or all
    0, so removing only the eval-z == 0 ones can remove nothing, or everything, even though E[L0] says
    half should go. Hardening keeps the expected number of units (CoFi / LLM-Shearing keep that count
    too) at their original scale, so after `remove_gated` the real size equals the expected size
    (up to rounding per layer).
    """
    if not isinstance(gates, LayerGates):
        raise TypeError(f"gates must be a LayerGates, got {type(gates).__name__}")
    with torch.no_grad():
        for gate in gates.gates:
            k = round(gate.log_alpha.numel() - gate.expected_l0().item())
            order = torch.sort(gate.log_alpha, stable=True).indices  # lowest log alpha first
            gate.log_alpha[order[:k]] = float("-inf")
            gate.log_alpha[order[k:]] = float("inf")


def l0_prune(
    model: GPT,
    batches_fn: Callable[[int], torch.Tensor],
    target_fraction: float,
    steps: int,
    lr: float = 0.1,
    lambda_lr: float = 0.1,
    heads: bool = True,
    neurons: bool = True,
    init_log_alpha: float = 3.0,
    snap: bool = True,
) -> dict:
    """Learn hard-concrete gates so the expected size reaches a target, then remove the closed units.

    Sizes are in percent of the prunable parameters P (those the gates own): S_hat = 100 (E[size] - rest) / P,
    S_t = 100 target_fraction. The unit matters: it sets how strong lambda_2 (S_hat - S_t)^2 is next to
    lambda_1 (S_hat - S_t). In fractions the quadratic term is too weak to stop lambda_1's momentum and
    S_hat overshoots far below the target; in percent (or LLM-Shearing's raw counts) it settles.

    Each step: idx = batches_fn(step) (B, T); loss = next-token CE with sampled gates +
    lagrangian_penalty(S_hat, S_t, lambda_1, lambda_2); Adam descends on log alpha (low momentum,
    betas (0.5, 0.9), so the gates turn as soon as the multipliers do) and ascends on the lambdas
    (`maximize=True`). Only the gates learn: the model's weights are frozen (LLM-Shearing trains them
    too; here a recovery fine-tune afterwards plays that part). The model runs in eval mode (no dropout);
    the gates sample. Then `harden_gates` (with snap=True) and `remove_gated` make the structure permanent.
    Returns parameter counts, the expected and the reached kept fraction of P, and a history.
    """
    _check_gpt(model)
    if isinstance(target_fraction, bool) or not isinstance(target_fraction, (int, float)):
        raise TypeError(f"target_fraction must be a float, got {type(target_fraction).__name__}")
    if not 0.0 < target_fraction <= 1.0:
        raise ValueError(f"target_fraction (the fraction of gated parameters to keep) must be in (0, 1], "
                         f"got {target_fraction}")
    if not callable(batches_fn):
        raise TypeError(f"batches_fn must be callable (step -> token ids (B, T)), got {type(batches_fn).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not (heads or neurons):
        raise ValueError("heads, neurons: at least one kind of unit must be gated")
    before = model.num_parameters()
    rest = _rest_size(model, heads, neurons)
    prunable = before - rest  # P: what the gates own
    head_gates = attach_head_gates(model, init_log_alpha) if heads else None
    neuron_gates = attach_neuron_gates(model, init_log_alpha) if neurons else None
    all_gates = [g for g in (head_gates, neuron_gates) if g is not None]

    def s_hat() -> torch.Tensor:
        return 100.0 * (expected_model_size(model, head_gates, neuron_gates) - rest) / prunable

    lam = torch.zeros(2, device=model.wte.weight.device, requires_grad=True)  # (lambda_1, lambda_2)
    opt = torch.optim.Adam([p for g in all_gates for p in g.parameters()], lr=lr, betas=(0.5, 0.9))
    opt_lam = torch.optim.Adam([lam], lr=lambda_lr, maximize=True)  # gradient *ascent* on lambda
    requires_grad = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval().requires_grad_(False)
    for g in all_gates:
        g.train()
    history = []
    try:
        for step in range(steps):
            idx = batches_fn(step)
            _check_ids(idx, "batches_fn(step)")
            ce = next_token_loss(model, idx.to(model.wte.weight.device))
            size = s_hat()
            loss = ce + lagrangian_penalty(size, 100.0 * target_fraction, lam[0], lam[1])
            opt.zero_grad()
            opt_lam.zero_grad()
            loss.backward()
            opt.step()
            opt_lam.step()
            history.append({"step": step, "ce": ce.item(), "expected_fraction": size.item() / 100.0,
                            "lambda_1": lam[0].item(), "lambda_2": lam[1].item()})
    finally:
        for p, flag in zip(model.parameters(), requires_grad):
            p.requires_grad_(flag)
        model.train(was_training)
    for g in all_gates:
        g.eval()
    with torch.no_grad():
        expected = s_hat().item() / 100.0
    if snap:
        for g in all_gates:
            harden_gates(g)
    removed = remove_gated(model, head_gates, neuron_gates)
    after = model.num_parameters()
    return {
        "params_before": before,
        "params_after": after,
        "prunable_before": prunable,
        "prunable_after": after - rest,
        "target_fraction": target_fraction,
        "expected_fraction": expected,
        "kept_fraction": (after - rest) / prunable,
        "removed": removed,
        "history": history,
        "head_gates": head_gates,
        "neuron_gates": neuron_gates,
    }


def _rest_size(model: GPT, heads: bool, neurons: bool) -> int:
    """Parameters no gate owns: everything minus the heads' and/or the neurons' parameters."""
    size = model.num_parameters()
    for block in model.h:
        if heads:
            size -= block.attn.n_head * params_per_head(block.attn)
        if neurons:
            size -= block.mlp.c_fc.out_features * params_per_neuron(block.mlp)
    return size


# ====================================================================================================
# input checks


def _check_gpt(model: object) -> None:
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a minillm.model.GPT, got {type(model).__name__}")


def _check_weight(w: object, name: str, ndim: int | None) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(w.shape)}")
    if ndim is not None and w.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} contains NaN or infinite values; they cannot be ranked")


def _check_sparsity(sparsity: object, name: str = "sparsity") -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(sparsity).__name__}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {sparsity}")


def _check_input_norms(input_norms: object, d_in: int) -> None:
    if not isinstance(input_norms, torch.Tensor):
        raise TypeError(f"input_norms must be a torch.Tensor, got {type(input_norms).__name__}")
    if input_norms.shape != (d_in,):
        raise ValueError(f"input_norms must have shape ({d_in},) (one norm per input column), "
                         f"got {tuple(input_norms.shape)}")
    if not bool(torch.isfinite(input_norms).all()) or bool((input_norms < 0).any()):
        raise ValueError("input_norms must be finite and non-negative (they are L2 norms)")


def _check_ids(idx: object, name: str) -> None:
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.long:
        raise ValueError(f"{name} must yield token ids as a (B, T) torch.long tensor, got {idx!r:.80}")


def _check_layer(model: GPT, layer: object) -> nn.Module:
    _check_gpt(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(model.h):
        raise ValueError(f"layer must be an int in [0, {len(model.h)}), got {layer!r}")
    return model.h[layer]


def _check_indices(indices: object, size: int, name: str) -> set[int]:
    if not isinstance(indices, (list, tuple)):
        raise TypeError(f"{name} must be a list of ints, got {type(indices).__name__}")
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < size:
            raise ValueError(f"{name} must hold ints in [0, {size}), got {i!r}")
    if len(set(indices)) != len(indices):
        raise ValueError(f"{name} has duplicates: {list(indices)}")
    return set(indices)


def _check_gates(model: GPT, gates: object) -> None:
    if not isinstance(gates, LayerGates):
        raise TypeError(f"gates must be a LayerGates from attach_head_gates/attach_neuron_gates, "
                        f"got {type(gates).__name__}")
    if len(gates.gates) != len(model.h):
        raise ValueError(f"gates: {len(gates.gates)} layers of gates for a model with {len(model.h)} layers")


def _run_no_grad(model: GPT, batches: Iterable[torch.Tensor], handles: list[RemovableHandle]) -> None:
    """Run every batch through the model in eval mode without gradients, then remove the hooks."""
    was_training = model.training
    model.eval()
    n = 0
    try:
        with torch.no_grad():
            for idx in batches:
                _check_ids(idx, "batches")
                model(idx.to(model.wte.weight.device))
                n += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n == 0:
        raise ValueError("batches must hold at least one calibration batch")


def _mean_abs_grad(
    model: GPT,
    batches: Iterable[torch.Tensor],
    loss_fn: Callable[[GPT, torch.Tensor], torch.Tensor],
    xis: list[torch.Tensor],
    handles: list[RemovableHandle],
) -> list[torch.Tensor]:
    """E over batches of |dL / d xi| for each gate tensor xi, in eval mode; removes the hooks afterwards."""
    was_training = model.training
    model.eval()
    totals = [torch.zeros_like(xi) for xi in xis]
    n = 0
    try:
        for idx in batches:
            _check_ids(idx, "batches")
            loss = loss_fn(model, idx.to(model.wte.weight.device))
            grads = torch.autograd.grad(loss, xis)  # only d/d xi: the weights' .grad stay untouched
            for t, g in zip(totals, grads):
                t += g.abs()
            n += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n == 0:
        raise ValueError("batches must hold at least one calibration batch")
    return [t / n for t in totals]
