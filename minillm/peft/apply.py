"""One entry point for every parameter-efficient fine-tuning method: `apply_peft(model, method, ...)`.

Weight-space methods replace targeted GPT-2 modules by wrappers around them (a frozen base plus a small
trained update); activation-space methods (prefix, prompt) wrap the whole GPT; partial fine-tuning only
changes which existing parameters train. Everything not belonging to the method is frozen:

    theta = theta_0 (frozen) + phi (trained),   |phi| << |theta_0|

Targets are matched as in Hugging Face PEFT (`check_target_module_exists`): a list entry matches a module
whose name equals it or ends with "." + entry (so "c_proj" matches h.0.attn.c_proj and h.0.mlp.c_proj,
"attn.c_proj" only the first); a single string is a regular expression that must match the whole name.
The default targets are PEFT's GPT-2 default, ["c_attn"].

    method      what trains                                        mergeable   defaults
    lora        B A per target (Hu et al., 2021)                   yes         r=8, lora_alpha=8
    vera        lambda_b, lambda_d per target (Kopiczko, 2024)     yes         r=256 (clipped), seed 0
    krona       A, B with W + s A kron B (Edalati et al., 2022)    yes         factors near sqrt, s=1
    houlsby     series adapters after attn.c_proj and mlp.c_proj   no          m = d / 16, swish
    pfeiffer    series adapter after mlp.c_proj                    no          m = d / 16, relu
    parallel    adapter beside the MLP (He et al., 2022)           no          m = d / 2, relu, s=4
    prefix      per-layer key/value prefixes (Li & Liang, 2021)    no          num_virtual_tokens required
    prompt      input soft prompt (Lester et al., 2021)            no          num_virtual_tokens required
    last_k      the last k blocks (+ ln_f)                         n/a         k=1
    bitfit      every bias (Ben Zaken et al., 2022)                n/a
    qlora       B A on NF4 4-bit linears (Dettmers et al., 2023)   no (4-bit)  r=8, lora_alpha=16, all linears

Any method also takes `trainable_token_indices=[ids]` (PEFT's name): the embedding rows of those tokens
train too, shared with the tied LM head (`minillm.peft.tokens`); SFT needs it for the chat template's
tokens, which pretraining never saw.
"""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn

from minillm.model import GPT
from minillm.peft.adapters import BottleneckAdapter, ParallelAdapter, SeriesAdapter
from minillm.peft.krona import KronALinear
from minillm.peft.loftq import loftq_linear
from minillm.peft.lora import LoRALinear, check_linear_like
from minillm.peft.partial import apply_bitfit, apply_last_k
from minillm.peft.prefix import PrefixTunedGPT, PromptTunedGPT
from minillm.peft.qlora import Linear4bit, QLoRALinear, quantized_layers
from minillm.peft.tokens import TrainableTokensLayer, apply_trainable_tokens, check_trainable_tokens
from minillm.peft.vera import VeRALinear, VeRAProjections
from minillm.utils import atomic_torch_save, safe_torch_load

TargetModules = Sequence[str] | str | None
MERGEABLE_LAYERS = (LoRALinear, VeRALinear, KronALinear, TrainableTokensLayer)
ADAPTER_LAYERS = (SeriesAdapter, ParallelAdapter)
WRAPPERS = (PrefixTunedGPT, PromptTunedGPT)
VERA_SEED_KEY = "vera.projection_seed"


# ---------------------------------------------------------------------- finding and replacing modules
def _short_name(name: str) -> str:
    """'h.3.attn.c_attn' -> 'attn.c_attn': the name without the block index, for error messages."""
    return re.sub(r"^h\.\d+\.?", "", name) or name


def find_target_modules(model: nn.Module, target_modules: TargetModules) -> list[str]:
    """Names of the modules matched by `target_modules` (PEFT rules), or a ValueError listing the names."""
    names = [name for name, _ in model.named_modules() if name]
    if isinstance(target_modules, str):
        found = [n for n in names if re.fullmatch(target_modules, n)]
        unmatched = [] if found else [target_modules]
    else:
        if not target_modules or not all(isinstance(k, str) and k for k in target_modules):
            raise ValueError(
                f"target_modules must be a regex string or a non-empty list of names, got {target_modules!r}"
            )
        found = [n for n in names if any(n == k or n.endswith("." + k) for k in target_modules)]
        unmatched = [k for k in target_modules if not any(n == k or n.endswith("." + k) for n in names)]
    if unmatched:
        available = sorted({_short_name(n) for n in names})
        raise ValueError(f"target_modules entry {unmatched[0]!r} matches no module; available names: {available}")
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Set the submodule at dotted path `name` to `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _replace_all(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> nn.Module:
    """Swap every target for its wrapper, only once all were built (a bad target changes nothing)."""
    for name, layer in layers:
        replace_module(model, name, layer)
    return model


def _check_not_tied(model: nn.Module, name: str, module: nn.Module) -> None:
    """A weight shared with another module (lm_head <-> wte) cannot take an update of its own."""
    weight = getattr(module, "weight", None)
    uses = [n for n, p in model.named_parameters(remove_duplicate=False) if p is weight]
    if len(uses) > 1:
        raise ValueError(f"cannot adapt {name!r}: its weight is tied to {uses}; choose another target")


def _linear_targets(model: nn.Module, target_modules: TargetModules, method: str) -> list[tuple[str, nn.Module]]:
    targets = []
    for name in find_target_modules(model, target_modules):
        module = model.get_submodule(name)
        try:
            check_linear_like(module, method)
        except TypeError as e:
            raise ValueError(f"{method}: target {name!r} is not a linear layer ({e})") from None
        _check_not_tied(model, name, module)
        targets.append((name, module))
    return targets


def _has_peft(model: nn.Module) -> bool:
    return isinstance(model, WRAPPERS) or any(isinstance(m, MERGEABLE_LAYERS + ADAPTER_LAYERS) for m in model.modules())


def _check_plain(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_peft: model must be an nn.Module, got {type(model).__name__}")
    if _has_peft(model):
        raise ValueError("apply_peft: the model already has a PEFT method applied; start from a plain GPT")


# ---------------------------------------------------------------------- one function per method
def apply_lora(
    model: nn.Module,
    target_modules: TargetModules = None,
    r: int = 8,
    lora_alpha: float = 8,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
) -> nn.Module:
    """Wrap each target in LoRALinear: y = W x + (lora_alpha / r) B A x."""
    targets = _linear_targets(model, target_modules or ["c_attn"], "lora")
    return _replace_all(model, [(name, LoRALinear(m, r, lora_alpha, lora_dropout, use_rslora)) for name, m in targets])


def apply_vera(
    model: nn.Module,
    target_modules: TargetModules = None,
    r: int | None = None,
    projection_seed: int = 0,
    d_initial: float = 0.1,
    vera_dropout: float = 0.0,
) -> nn.Module:
    """Wrap each target in VeRALinear, all sharing one seeded (A, B) pair sized by the largest target.

    r=None is PEFT's default 256, clipped to the smallest min(in, out) among the targets.
    """
    targets = _linear_targets(model, target_modules or ["c_attn"], "vera")
    fits = min(min(m.in_features, m.out_features) for _, m in targets)
    if r is None:
        r = min(256, fits)
    elif isinstance(r, int) and r > fits:
        raise ValueError(f"vera: r={r} exceeds the smallest min(in, out) = {fits} among the targeted layers")
    first = targets[0][1]
    projections = VeRAProjections(
        r, max(m.in_features for _, m in targets), max(m.out_features for _, m in targets), projection_seed,
        device=first.weight.device, dtype=first.weight.dtype if first.weight.dtype.is_floating_point else None,
    )
    return _replace_all(model, [(name, VeRALinear(m, projections, d_initial, vera_dropout)) for name, m in targets])


def apply_krona(
    model: nn.Module,
    target_modules: TargetModules = None,
    a_shape: tuple[int, int] | None = None,
    b_shape: tuple[int, int] | None = None,
    scale: float = 1.0,
) -> nn.Module:
    """Wrap each target in KronALinear: y = W x + s (A kron B) x."""
    layers = []
    for name, module in _linear_targets(model, target_modules or ["c_attn"], "krona"):
        try:
            layers.append((name, KronALinear(module, a_shape, b_shape, scale)))
        except ValueError as e:
            raise ValueError(f"krona: target {name!r}: {e}") from None
    return _replace_all(model, layers)


def _bottleneck_size(d: int, reduction_factor: int, bottleneck_dim: int | None, method: str) -> int:
    if bottleneck_dim is not None:
        return bottleneck_dim
    if not isinstance(reduction_factor, int) or reduction_factor < 1 or d // reduction_factor < 1:
        raise ValueError(
            f"{method}: reduction_factor={reduction_factor!r} gives no bottleneck for d={d}; "
            "use a smaller factor or set bottleneck_dim"
        )
    return d // reduction_factor


def _feature_dim(module: nn.Module, model: nn.Module) -> int:
    """Width of a module's output: out_features for a linear layer, else the model's n_embd."""
    if hasattr(module, "out_features"):
        return int(module.out_features)
    return int(model.config.n_embd)


def _insert_adapters(
    model: nn.Module,
    target_modules: Sequence[str] | str,
    method: str,
    wrapper: type[SeriesAdapter] | type[ParallelAdapter],
    reduction_factor: int,
    bottleneck_dim: int | None,
    non_linearity: str,
    scaling: float,
    init_weights: str,
) -> nn.Module:
    layers = []
    for name in find_target_modules(model, target_modules):
        module = model.get_submodule(name)
        d = _feature_dim(module, model)
        if wrapper is ParallelAdapter and getattr(module, "in_features", d) != d:
            raise ValueError(f"{method}: a parallel adapter needs a d -> d module; {name!r} is not")
        param = next(module.parameters(), None)
        adapter = BottleneckAdapter(
            d, _bottleneck_size(d, reduction_factor, bottleneck_dim, method), non_linearity, scaling, init_weights,
            device=None if param is None else param.device, dtype=None if param is None else param.dtype,
        )
        layers.append((name, wrapper(module, adapter)))
    return _replace_all(model, layers)


def apply_houlsby(
    model: nn.Module,
    target_modules: TargetModules = None,
    reduction_factor: int = 16,
    bottleneck_dim: int | None = None,
    non_linearity: str = "swish",
    init_weights: str = "houlsby",
) -> nn.Module:
    """Series adapters after the attention output projection and after the MLP (two per block)."""
    return _insert_adapters(model, target_modules or ["attn.c_proj", "mlp.c_proj"], "houlsby", SeriesAdapter,
                            reduction_factor, bottleneck_dim, non_linearity, 1.0, init_weights)


def apply_pfeiffer(
    model: nn.Module,
    target_modules: TargetModules = None,
    reduction_factor: int = 16,
    bottleneck_dim: int | None = None,
    non_linearity: str = "relu",
    init_weights: str = "houlsby",
) -> nn.Module:
    """One series adapter per block, after the MLP."""
    return _insert_adapters(model, target_modules or ["mlp.c_proj"], "pfeiffer", SeriesAdapter,
                            reduction_factor, bottleneck_dim, non_linearity, 1.0, init_weights)


def apply_parallel(
    model: nn.Module,
    target_modules: TargetModules = None,
    reduction_factor: int = 2,
    bottleneck_dim: int | None = None,
    non_linearity: str = "relu",
    scaling: float = 4.0,
    init_weights: str = "mam_adapter",
) -> nn.Module:
    """Parallel adapters beside each MLP: MLP(x) + s * W_up f(W_down x)."""
    return _insert_adapters(model, target_modules or ["mlp"], "parallel", ParallelAdapter,
                            reduction_factor, bottleneck_dim, non_linearity, scaling, init_weights)


def apply_prefix(
    model: GPT,
    target_modules: TargetModules = None,
    *,
    num_virtual_tokens: int,
    prefix_projection: bool = False,
    encoder_hidden_size: int | None = None,
    init_weights: str = "random",
) -> PrefixTunedGPT:
    """Wrap the GPT in PrefixTunedGPT (every layer; target_modules does not apply)."""
    _no_targets(target_modules, "prefix")
    return PrefixTunedGPT(model, num_virtual_tokens, prefix_projection, encoder_hidden_size, init_weights)


def apply_prompt(
    model: GPT,
    target_modules: TargetModules = None,
    *,
    num_virtual_tokens: int,
    prompt_init: str = "random",
    init_token_ids: list[int] | None = None,
    generator: torch.Generator | None = None,
) -> PromptTunedGPT:
    """Wrap the GPT in PromptTunedGPT (input embeddings only; target_modules does not apply)."""
    _no_targets(target_modules, "prompt")
    return PromptTunedGPT(model, num_virtual_tokens, prompt_init, init_token_ids, generator)


def apply_partial_last_k(
    model: GPT, target_modules: TargetModules = None, k: int = 1, train_ln_f: bool = True
) -> GPT:
    """Train the last k blocks (and ln_f) only."""
    _no_targets(target_modules, "last_k")
    return apply_last_k(model, k, train_ln_f)


def apply_partial_bitfit(model: GPT, target_modules: TargetModules = None) -> GPT:
    """Train the biases only."""
    _no_targets(target_modules, "bitfit")
    return apply_bitfit(model)


QLORA_TARGETS = ["c_attn", "c_proj", "c_fc"]  # every linear layer, as the QLoRA repo does (lm_head excepted)
QLORA_SKIP = ("lm_head", "wte", "wpe")  # kept in full precision (quantize_model's default)


def apply_qlora(
    model: nn.Module,
    target_modules: TargetModules = None,
    r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    quant_type: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    loftq_iters: int = 0,
) -> nn.Module:
    """QLoRA (Dettmers et al., 2023): y = dequant(W_nf4) x + b + s B A x on the targets (default: all linears).

    Every other linear layer but lm_head/wte/wpe is frozen in 4 bits too (`minillm.peft.qlora.Linear4bit`).
    loftq_iters > 0 initialises (W_nf4, A, B) with LoftQ's alternating steps (Li et al., 2023) instead of B = 0.
    A 4-bit base cannot absorb the update, so merge_peft raises: dequantize the base first.
    """

    if isinstance(loftq_iters, bool) or not isinstance(loftq_iters, int) or loftq_iters < 0:
        raise ValueError(f"qlora: loftq_iters must be an integer >= 0 (0 = plain QLoRA), got {loftq_iters!r}")
    targets = _linear_targets(model, target_modules or QLORA_TARGETS, "qlora")
    quant = {"quant_type": quant_type, "double_quant": double_quant, "blocksize": blocksize}
    if loftq_iters:  # LoftQ reads the float weights, so it runs before anything is quantized
        layers = [(name, loftq_linear(m, r, lora_alpha, loftq_iters, lora_dropout, use_rslora, **quant))
                  for name, m in targets]
    else:
        layers = [(name, QLoRALinear(m, r, lora_alpha, lora_dropout, use_rslora, **quant)) for name, m in targets]
    target_names = {name for name, _ in targets}
    rest = [(name, Linear4bit.from_linear(m, **quant)) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name not in target_names
            and not any(part in QLORA_SKIP for part in name.split("."))]
    return _replace_all(model, layers + rest)  # built first: bad input leaves the model as it was


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every Linear4bit by a frozen nn.Linear holding deq(W_nf4) (and the bias), in place.

    A 4-bit base cannot absorb the float update B A (`merge_peft` refuses it). After this the model computes
    exactly what it computed before (Linear4bit is F.linear with deq(W_nf4)), but the LoRA layers can merge:
    merge_peft(dequantize_model(model)) gives a plain GPT with W' = deq(W_nf4) + s B A at full-precision size.
    """
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("dequantize_model: the model has no Linear4bit layer (nothing is quantized)")
    for name, q in layers:
        linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=q.weight.device,
                           dtype=q.weight_dtype)
        with torch.no_grad():
            linear.weight.copy_(q.dequantize())
            if q.bias is not None:
                linear.bias.copy_(q.bias)
        linear.requires_grad_(False)
        replace_module(model, name, linear)
    return model


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weight of every nn.Linear QLoRA quantises (all but lm_head/wte/wpe), by module name."""
    weights = {name: m.weight.detach() for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name and not any(p in QLORA_SKIP for p in name.split("."))}
    if not weights:
        raise ValueError("linear_weights: the model has no quantizable nn.Linear layer")
    return weights


def _no_targets(target_modules: TargetModules, method: str) -> None:
    if target_modules is not None:
        raise ValueError(f"{method}: target_modules does not apply to this method, got {target_modules!r}")


PEFT_METHODS: dict[str, Callable[..., nn.Module]] = {
    "lora": apply_lora,
    "vera": apply_vera,
    "krona": apply_krona,
    "houlsby": apply_houlsby,
    "pfeiffer": apply_pfeiffer,
    "parallel": apply_parallel,
    "prefix": apply_prefix,
    "prompt": apply_prompt,
    "last_k": apply_partial_last_k,
    "bitfit": apply_partial_bitfit,
    "qlora": apply_qlora,
}


def apply_peft(model: nn.Module, method: str, target_modules: TargetModules = None, **hyperparams: Any) -> nn.Module:
    """Apply `method` to `model` and freeze everything else. Returns the model (changed in place), or
    for "prefix"/"prompt" a wrapper around it. The call (method and explicit arguments) is kept as `.peft_config`,
    so `save_adapter` can record it and `load_adapter` can rebuild the same adapter on a fresh GPT.
    `trainable_token_indices` (any method) also trains those tokens' embedding rows.
    """
    if method not in PEFT_METHODS:
        raise ValueError(f"apply_peft: unknown method {method!r}; choose from {sorted(PEFT_METHODS)}")
    _check_plain(model)
    token_indices = hyperparams.pop("trainable_token_indices", None)
    if token_indices is not None:
        token_indices = check_trainable_tokens(model, token_indices)  # before anything changes
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    try:
        result = PEFT_METHODS[method](model, target_modules, **hyperparams)
        if token_indices is not None:
            apply_trainable_tokens(getattr(result, "model", result), token_indices)  # the GPT inside a wrapper
    except (TypeError, ValueError) as e:
        for p, flag in flags:  # bad input leaves the model as it was
            p.requires_grad_(flag)
        if isinstance(e, TypeError) and "argument" in str(e):  # a misspelt or missing hyperparameter
            raise TypeError(f"apply_peft({method!r}): {e}") from None
        raise
    result.peft_config = {"method": method, "target_modules": _plain(target_modules), **_plain(hyperparams)}
    if token_indices is not None:
        result.peft_config["trainable_token_indices"] = token_indices
    return result


def _plain(value: Any) -> Any:
    """What torch.load(weights_only=True) reads back: numbers, strings, lists, dicts (a Generator is dropped)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if _is_plain(v)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _is_plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str, dict))


# ---------------------------------------------------------------------- counting, merging, disabling
def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied weight is counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _method_of(model: nn.Module) -> str:
    return getattr(model, "peft_config", {}).get("method", "?")


def merge_adapters(model: nn.Module) -> None:
    """Fold every LoRA/VeRA/KronA update (and trained token rows) into its base weight, in place (idempotent);
    `unmerge_adapters` undoes it."""
    layers = [m for m in model.modules() if isinstance(m, MERGEABLE_LAYERS)]
    if not layers:
        raise ValueError(f"merge: the model has no mergeable (lora/vera/krona) layer (method {_method_of(model)!r})")
    for layer in layers:
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """Restore every merged base weight exactly."""
    for layer in model.modules():
        if isinstance(layer, MERGEABLE_LAYERS):
            layer.unmerge()


def merge_peft(model: nn.Module) -> GPT:
    """Merge the (active) LoRA/VeRA/KronA updates and return the plain GPT, all parameters trainable again.

    In place: the adapted model is consumed. Partial fine-tuning (last_k, bitfit) already is a plain GPT
    and is returned as it is. Adapters and prefix/prompt tuning cannot be merged (ValueError).
    """
    if isinstance(model, WRAPPERS):
        raise ValueError(
            f"merge_peft: {type(model).__name__} cannot be merged: its virtual tokens are activations, not a "
            "weight update; keep the wrapper for inference"
        )
    adapters = [n for n, m in model.named_modules() if isinstance(m, ADAPTER_LAYERS)]
    if adapters:
        raise ValueError(
            f"merge_peft: bottleneck adapters ({adapters[0]!r}, ...) cannot be merged: f(W_down h) is nonlinear"
        )
    for name, layer in list(model.named_modules()):
        if isinstance(layer, MERGEABLE_LAYERS):
            if layer.disabled:
                raise ValueError(f"merge_peft: adapters of {name!r} are disabled; leave disable_adapters first")
            layer.merge()
            replace_module(model, name, layer.base)
    model.requires_grad_(True)
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes the frozen base model alone (e.g. DPO's reference policy).

    Merged layers are unmerged for the block and merged again after it; flags are restored on exit,
    even after an exception.
    """
    layers = [m for m in model.modules() if isinstance(m, MERGEABLE_LAYERS + ADAPTER_LAYERS + WRAPPERS)]
    if not layers:
        raise ValueError(
            f"disable_adapters: the model has no adapter to disable (method {_method_of(model)!r}; "
            "last_k and bitfit change the base weights themselves)"
        )
    merged = [m for m in layers if getattr(m, "merged", False)]
    previous = [m.disabled for m in layers]
    for m in merged:
        m.unmerge()
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(layers, previous):
            m.disabled = was
        for m in merged:
            m.merge()


# ---------------------------------------------------------------------- several LoRA adapters
def _lora_layers(model: nn.Module) -> list[LoRALinear]:
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError("the model has no LoRA layer; apply_peft(model, 'lora', ...) first")
    return layers


def add_lora_adapter(
    model: nn.Module, name: str, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0, use_rslora: bool = False
) -> None:
    """Add a second (third, ...) LoRA adapter called `name` to every LoRA layer; `set_adapter` activates it."""
    for layer in _lora_layers(model):
        layer.add_adapter(name, r, lora_alpha, lora_dropout, use_rslora)


def set_adapter(model: nn.Module, name: str) -> None:
    """Make `name` the active LoRA adapter in every LoRA layer (only its parameters train)."""
    for layer in _lora_layers(model):
        layer.set_adapter(name)


# ---------------------------------------------------------------------- saving only the adapter
def _base_of(module: nn.Module) -> nn.Module | None:
    if isinstance(module, MERGEABLE_LAYERS + ADAPTER_LAYERS):
        return module.base
    if isinstance(module, WRAPPERS):
        return module.model
    return None


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters a PEFT method added (every LoRA adapter, not just the active one), by name.

    For last_k and bitfit, which add nothing (but trained token rows), the parameters they train.
    """
    frozen_base, added = set(), set()
    for module in model.modules():
        base = _base_of(module)
        if base is not None:
            frozen_base |= {id(p) for p in base.parameters()}
            added |= {id(p) for p in module.parameters()}
    if _method_of(model) in ("last_k", "bitfit"):
        return {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not added:
        raise ValueError("adapter_state_dict: the model has no PEFT adapter; apply_peft(model, method) first")
    # Token rows live inside the GPT, which a prefix/prompt wrapper counts as its frozen base.
    rows = {id(p) for m in model.modules() if isinstance(m, TrainableTokensLayer) for p in m.tokens.parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) in rows or (id(p) in added and id(p) not in frozen_base)}


def _vera_seed(model: nn.Module) -> int | None:
    seeds = {m.projection_seed for m in model.modules() if isinstance(m, VeRAProjections)}
    return seeds.pop() if seeds else None


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter's tensors (detached copies), by parameter name; VeRA adds its projection seed."""
    sd = {name: p.detach().clone() for name, p in adapter_parameters(model).items()}
    seed = _vera_seed(model)
    if seed is not None:
        sd[VERA_SEED_KEY] = torch.tensor(seed, dtype=torch.int64)
    return sd


def load_adapter_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy an adapter state dict into a model with the same PEFT method applied; every key and shape must match."""
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise TypeError("load_adapter_state_dict: state_dict must be a dict of name -> tensor")
    params = adapter_parameters(model)
    seed = _vera_seed(model)
    expected = set(params) | ({VERA_SEED_KEY} if seed is not None else set())
    unexpected, missing = sorted(set(state_dict) - expected), sorted(expected - set(state_dict))
    if unexpected:
        raise ValueError(
            f"load_adapter_state_dict: key {unexpected[0]!r} is not an adapter parameter of this model "
            f"(saved for another method or target?); the model's adapter keys are {sorted(expected)}"
        )
    if missing:
        raise ValueError(f"load_adapter_state_dict: key {missing[0]!r} is missing from the state dict")
    if seed is not None and int(state_dict[VERA_SEED_KEY]) != seed:
        raise ValueError(
            f"load_adapter_state_dict: {VERA_SEED_KEY} is {int(state_dict[VERA_SEED_KEY])}, the model's "
            f"projections were drawn with seed {seed}"
        )
    for name, p in params.items():
        if tuple(state_dict[name].shape) != tuple(p.shape):
            raise ValueError(
                f"load_adapter_state_dict: key {name!r} has shape {tuple(state_dict[name].shape)}, the model "
                f"expects {tuple(p.shape)} (adapter saved for another model shape or rank?)"
            )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state_dict[name].to(device=p.device, dtype=p.dtype))


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write {"peft_config", "adapter"} atomically: the method's call and only the adapter's tensors."""
    atomic_torch_save({"peft_config": getattr(model, "peft_config", None), "adapter": adapter_state_dict(model)}, path)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter file. A plain GPT first gets the saved method applied (so the result may be a wrapper).

    Returns the adapted model.
    """
    blob = safe_torch_load(path)
    if not isinstance(blob, dict) or "adapter" not in blob or not isinstance(blob.get("peft_config"), dict):
        raise ValueError(f"{path}: not an adapter file written by save_adapter")
    config = dict(blob["peft_config"])
    if not _has_peft(model) and "peft_config" not in vars(model):
        model = apply_peft(model, config.pop("method"), **config)
    elif _method_of(model) != config["method"]:
        raise ValueError(f"{path}: adapter is for method {config['method']!r}, the model has {_method_of(model)!r}")
    try:
        load_adapter_state_dict(model, blob["adapter"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return model
