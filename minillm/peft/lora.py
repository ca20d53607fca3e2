"""LoRA: low-rank adaptation of a frozen linear layer (Hu et al., 2021), with rsLoRA (Kalajdzievski, 2023).

The pretrained weight W (out, in) stays frozen; only a rank-r update is trained:

    y = W x + b + s * B A dropout(x)        A: (r, in),  B: (out, r),  s = lora_alpha / r
                                            (rsLoRA: s = lora_alpha / sqrt(r))

A starts kaiming-uniform(a=sqrt(5)) (the nn.Linear default, as in PEFT and loralib) and B starts at zero, so
B A = 0 and the adapted model begins exactly equal to the base model. Dropout touches only the LoRA branch.
After training the update can be folded into the weight, W' = W + s B A ("merge"), and the model runs
at the base model's speed. Defaults follow Hugging Face PEFT's LoraConfig: r=8, lora_alpha=8, dropout 0.

One layer may hold several named adapters ("default" first); one is active at a time (`set_adapter`), and
`disabled = True` runs the frozen base alone, which is how DPO/PPO get the reference model for free.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

DEFAULT_ADAPTER = "default"


def check_linear_like(base: nn.Module, who: str) -> tuple[int, int]:
    """(in_features, out_features) of a module that a weight-space adapter can wrap, or a TypeError."""
    for attr in ("in_features", "out_features", "weight"):
        if not hasattr(base, attr):
            raise TypeError(
                f"{who}: base must be a linear layer with in_features, out_features and weight; "
                f"{type(base).__name__} has no {attr!r}"
            )
    return int(base.in_features), int(base.out_features)


def adapter_dtype(base: nn.Module) -> torch.dtype:
    """Adapters train in the base weight's float dtype; a packed (integer) weight, e.g. NF4, gets fp32."""
    dtype = base.weight.dtype
    return dtype if dtype.is_floating_point else torch.get_default_dtype()


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """s = lora_alpha / r, or lora_alpha / sqrt(r) for rsLoRA (keeps the update's scale stable as r grows)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


class LoRAAdapter(nn.Module):
    """One named adapter: the pair (A, B), its scaling s and its dropout. Computes s * B A dropout(x)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        use_rslora: bool,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"LoRA: r must be a positive integer, got {r!r}")
        if r > min(in_features, out_features):
            raise ValueError(
                f"LoRA: r={r} exceeds min(in_features, out_features) = {min(in_features, out_features)} "
                f"of this ({out_features}x{in_features}) layer; B A cannot have a larger rank"
            )
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"LoRA: lora_dropout must be in [0, 1), got {lora_dropout}")
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # U(-1/sqrt(in), 1/sqrt(in))
        self.dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        """Delta W = s * B A, shape (out, in)."""
        # BEGIN ASSIGNMENT lora
        return (self.lora_B @ self.lora_A) * self.scaling
        # END ASSIGNMENT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """s * B A dropout(x), (..., in) -> (..., out)."""
        # Two thin matmuls, never the (out, in) product: O(r (in + out)) per token.
        # BEGIN ASSIGNMENT lora
        return (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling
        # END ASSIGNMENT


class LoRALinear(nn.Module):
    """A frozen `base` layer plus trainable low-rank adapters: y = base(x) + s * B A dropout(x).

    `base` is any module with in_features, out_features, weight and forward (an nn.Linear, or an NF4
    Linear4bit under QLoRA); only `merge` needs a real nn.Linear. `lora_A`, `lora_B` and `scaling` are
    those of the active adapter.
    """

    def __init__(
        self,
        base: nn.Module,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = check_linear_like(base, "LoRALinear")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.adapters = nn.ModuleDict()
        self.active_adapter = DEFAULT_ADAPTER
        self.disabled = False
        self.merged_adapters: list[str] = []
        self.add_adapter(DEFAULT_ADAPTER, r, lora_alpha, lora_dropout, use_rslora)

    # ------------------------------------------------------------------ the active adapter
    @property
    def lora_A(self) -> nn.Parameter:
        """A of the active adapter, (r, in_features)."""
        return self.adapters[self.active_adapter].lora_A

    @property
    def lora_B(self) -> nn.Parameter:
        """B of the active adapter, (out_features, r)."""
        return self.adapters[self.active_adapter].lora_B

    @property
    def scaling(self) -> float:
        return self.adapters[self.active_adapter].scaling

    @property
    def r(self) -> int:
        return self.adapters[self.active_adapter].r

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    # ------------------------------------------------------------------ several adapters
    def add_adapter(
        self, name: str, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0, use_rslora: bool = False
    ) -> None:
        """Add a new adapter (A random, B zero) beside the existing ones; it does not become active."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"LoRALinear: adapter name must be a non-empty string without '.', got {name!r}")
        if name in self.adapters:
            raise ValueError(f"LoRALinear: adapter {name!r} already exists; have {list(self.adapters)}")
        self.adapters[name] = LoRAAdapter(
            self.in_features, self.out_features, r, lora_alpha, lora_dropout, use_rslora,
            device=self.base.weight.device, dtype=adapter_dtype(self.base),
        )
        self.adapters[name].requires_grad_(name == self.active_adapter)

    def set_adapter(self, name: str) -> None:
        """Make `name` the active adapter: only its parameters train, and forward adds only its update."""
        if name not in self.adapters:
            raise ValueError(f"LoRALinear: no adapter {name!r}; have {list(self.adapters)}")
        if self.merged and name not in self.merged_adapters:
            raise ValueError(
                f"LoRALinear: adapters {self.merged_adapters} are merged into the weight; unmerge() before "
                f"switching to {name!r}"
            )
        self.active_adapter = name
        for key, adapter in self.adapters.items():
            adapter.requires_grad_(key == name)

    # ------------------------------------------------------------------ forward, merge
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = base(x) + s B A dropout(x) with the active adapter; base(x) alone when disabled or merged."""
        result = self.base(x)
        if self.disabled:
            check_not_merged_when_disabled(self)
            return result
        if self.active_adapter in self.merged_adapters:
            return result
        adapter = self.adapters[self.active_adapter]
        return result + adapter(x.to(adapter.lora_A.dtype)).to(result.dtype)

    def merge(self) -> None:
        """W <- W + s B A for the active adapter; a second call does nothing (no double add)."""
        if self.active_adapter in self.merged_adapters:
            return
        merge_weight(self, self.adapters[self.active_adapter].delta_weight, "LoRALinear")
        self.merged_adapters.append(self.active_adapter)

    def unmerge(self) -> None:
        """Restore the base weight exactly as it was before the first merge; nothing to do if unmerged."""
        unmerge_weight(self)
        self.merged_adapters = []

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, active_adapter={self.active_adapter!r}")


def merge_target_weight(base: nn.Module, who: str) -> torch.Tensor:
    """The float weight of an nn.Linear that an update can be added to, or a clear error."""
    if not isinstance(base, nn.Linear):
        raise TypeError(
            f"{who}.merge: can only merge into an nn.Linear base, got {type(base).__name__} "
            "(a quantized base cannot absorb a float update: dequantize it first)"
        )
    if not base.weight.dtype.is_floating_point:
        raise TypeError(f"{who}.merge: base weight has non-float dtype {base.weight.dtype}")
    return base.weight.data


def check_not_merged_when_disabled(layer: nn.Module) -> None:
    """A disabled layer must compute the base alone, which a merged weight no longer is."""
    if getattr(layer, "unmerged_weight", None) is not None:
        raise RuntimeError(
            f"{type(layer).__name__}: adapters are disabled but merged into the weight; unmerge() first "
            "(the disable_adapters context manager does this for you)"
        )


def merge_weight(layer: nn.Module, delta_weight, who: str) -> None:
    """W <- W + delta_weight() in place (shared by LoRA, VeRA and KronA layers).

    The first merge keeps a copy of W so that unmerge restores it bit for bit (W + dW - dW is only equal
    up to rounding)."""
    weight = merge_target_weight(layer.base, who)
    if getattr(layer, "unmerged_weight", None) is None:
        layer.register_buffer("unmerged_weight", weight.detach().clone(), persistent=False)
    with torch.no_grad():
        weight.add_(delta_weight().to(weight.dtype))


def unmerge_weight(layer: nn.Module) -> None:
    """Copy back the weight saved at the first merge (shared by LoRA, VeRA and KronA layers)."""
    saved = getattr(layer, "unmerged_weight", None)
    if saved is None:
        return
    with torch.no_grad():
        layer.base.weight.data.copy_(saved)
    del layer.unmerged_weight  # drop the buffer: merged state holds a copy, unmerged state none
