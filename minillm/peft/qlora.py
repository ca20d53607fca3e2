"""QLoRA layers: a frozen 4-bit (NF4) linear layer, and LoRA on top of it (Dettmers et al., 2023).

QLoRA keeps the pretrained weight in 4 bits and trains only a LoRA update in higher precision:

    y = dequant(W_nf4) x + b + s * B A x,      dequant(W_nf4) = code[q] * absmax (see nf4.py)

W is dequantised on the fly to the compute dtype (bf16 in the paper) for each forward and again for
the backward pass, so no full-precision copy of W is kept between them; gradients flow to x (and so
to the LoRA parameters of earlier layers) but never to W.

`Linear4bit` mirrors bitsandbytes' `nn.Linear4bit` (`quant_type`, `compress_statistics` ->
`double_quant`, `compute_dtype`): its `weight` is the packed uint8 tensor, the rest of the
quantisation state sits in buffers, so `.to(device)` and `state_dict` carry it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.peft.lora import LoRALinear
from minillm.quant.nf4 import QuantState4bit, dequantize_4bit, quantize_4bit

__all__ = ["Linear4bit", "QLoRALinear", "quantize_model", "quantized_layers"]


class _DequantizeLinear(torch.autograd.Function):
    """y = x W^T + b with W = dequant(state). Backward re-dequantises W rather than saving it:
    dL/dx = dL/dy W, dL/db = sum dL/dy; W is frozen and gets no gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, state: QuantState4bit, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.state = state
        return F.linear(x, dequantize_4bit(state, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ dequantize_4bit(ctx.state, grad_y.dtype)  # (..., out) @ (out, in)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, None, grad_bias


# Buffers that hold the quantised weight, by storage mode. The 16-entry code table travels with the
# weights (like bitsandbytes' `quant_map`), so a state dict is self-describing.
_PLAIN = ("weight", "weight_code", "weight_absmax")
_DOUBLE = ("weight", "weight_code", "weight_absmax_q", "weight_absmax_scale", "weight_absmax_offset",
           "weight_absmax_code")


class Linear4bit(nn.Module):
    """A frozen linear layer stored in 4 bits: y = x dequant(W)^T + b.

    `linear_or_weight` is an nn.Linear (its bias is used) or a (out_features, in_features) weight
    tensor with an optional `bias`. The bias stays in full precision (frozen). With `compute_dtype`
    None the input's dtype is used; the output has the input's dtype.
    """

    def __init__(
        self,
        linear_or_weight: nn.Linear | torch.Tensor,
        bias: torch.Tensor | None = None,
        quant_type: str = "nf4",
        double_quant: bool = True,
        blocksize: int = 64,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(linear_or_weight, Linear4bit):
            raise TypeError("Linear4bit: the layer is already quantized (got a Linear4bit)")
        if isinstance(linear_or_weight, nn.Linear):
            if bias is not None:
                raise ValueError("Linear4bit: pass either an nn.Linear or (weight, bias), not an nn.Linear and a bias")
            weight, bias = linear_or_weight.weight, linear_or_weight.bias
        elif isinstance(linear_or_weight, torch.Tensor):
            weight = linear_or_weight
        else:
            raise TypeError(
                f"Linear4bit: expected an nn.Linear or a weight tensor, got {type(linear_or_weight).__name__}"
            )
        if weight.dim() != 2:
            raise ValueError(
                f"Linear4bit: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}"
            )
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"Linear4bit: bias shape {tuple(bias.shape)} does not match out_features {weight.shape[0]}"
            )
        floating = isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point
        if compute_dtype is not None and not floating:
            raise TypeError(f"Linear4bit: compute_dtype must be a floating torch.dtype or None, got {compute_dtype!r}")
        self.compute_dtype = compute_dtype
        self._set_state(quantize_4bit(weight.detach(), blocksize, quant_type, double_quant))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "Linear4bit":
        """Quantise an nn.Linear (weight and bias); kwargs as in the constructor."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Linear4bit.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        return cls(linear, **kwargs)

    @classmethod
    def from_quant_state(
        cls, state: QuantState4bit, bias: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None
    ) -> "Linear4bit":
        """Wrap an existing 4-bit state (e.g. from `loftq_init`) as a layer."""
        if not isinstance(state, QuantState4bit) or len(state.shape) != 2:
            raise ValueError("Linear4bit.from_quant_state: need a QuantState4bit of a 2-D weight")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.compute_dtype = compute_dtype
        layer._set_state(state)
        layer.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    def _set_state(self, state: QuantState4bit) -> None:
        self.out_features, self.in_features = state.shape
        self.blocksize = state.blocksize
        self.quant_type = state.quant_type
        self.double_quant = state.double_quant
        self.dq_blocksize = state.dq_blocksize
        self.weight_dtype = state.dtype  # dtype the weight had before quantisation
        self.register_buffer("weight", state.packed)
        self.register_buffer("weight_code", state.code)
        if state.double_quant:
            self.register_buffer("weight_absmax_q", state.absmax_q)
            self.register_buffer("weight_absmax_scale", state.absmax_scale)
            self.register_buffer("weight_absmax_offset", state.absmax_offset)
            self.register_buffer("weight_absmax_code", state.absmax_code)
        else:
            self.register_buffer("weight_absmax", state.absmax)

    @property
    def quant_state(self) -> QuantState4bit:
        """The layer's buffers viewed as a QuantState4bit (no copy)."""
        state = QuantState4bit(
            packed=self.weight,
            code=self.weight_code,
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            dq_blocksize=self.dq_blocksize,
        )
        if self.double_quant:
            state.absmax_q, state.absmax_scale = self.weight_absmax_q, self.weight_absmax_scale
            state.absmax_offset, state.absmax_code = self.weight_absmax_offset, self.weight_absmax_code
        else:
            state.absmax = self.weight_absmax
        return state

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out_features, in_features) weight the layer computes with, as `dtype` (default: original)."""
        return dequantize_4bit(self.quant_state, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x dequant(W)^T + b in the compute dtype, returned in x's dtype. (..., in) -> (..., out)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear4bit: input has {x.shape[-1]} features, expected in_features={self.in_features}")
        dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return _DequantizeLinear.apply(x.to(dtype), self.quant_state, bias).to(x.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored 4-bit weight (packed codes + scales), without code tables and bias."""
        return self.quant_state.nbytes

    def _apply(self, fn, recurse=True):
        # The fp32 scales are part of the 4-bit format: model.to(torch.bfloat16) / .half() must cast the
        # bias but not round the scales. Device moves apply to everything.
        before = {name: getattr(self, name) for name in (_DOUBLE if self.double_quant else _PLAIN)}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        code = state_dict.get(prefix + "weight_code")
        if code is not None and not torch.equal(code.to(self.weight_code), self.weight_code):
            error_msgs.append(
                f"{prefix}weight_code: the checkpoint was quantized with another code table than this layer's "
                f"quant_type={self.quant_type!r}"
            )
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type!r}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"compute_dtype={self.compute_dtype}")


def QLoRALinear(
    linear: nn.Linear,
    r: int = 8,
    lora_alpha: float = 8,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    quant_type: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    compute_dtype: torch.dtype | None = None,
) -> LoRALinear:
    """QLoRA = LoRA around a 4-bit base: LoRALinear(Linear4bit(linear), r, lora_alpha, ...).

    y = dequant(W_nf4) x + b + s B A dropout(x); only A and B train.
    """
    base = Linear4bit.from_linear(
        linear, quant_type=quant_type, double_quant=double_quant, blocksize=blocksize, compute_dtype=compute_dtype
    )
    return LoRALinear(base, r, lora_alpha, lora_dropout, use_rslora)


def quantized_layers(model: nn.Module) -> list[tuple[str, Linear4bit]]:
    """(name, layer) of every Linear4bit in the model."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Linear4bit)]


def _skipped(name: str, skip: Iterable[str]) -> bool:
    """A module is skipped if one of its dotted name's parts is in `skip` ("lm_head", "transformer.wte")."""
    return any(part in skip for part in name.split("."))


def quantize_model(
    model: nn.Module,
    skip: Iterable[str] = ("lm_head", "wte", "wpe"),
    quant_type: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Replace every nn.Linear (not named in `skip`) by a frozen Linear4bit, in place; returns the model.

    QLoRA quantises all linear layers of the transformer blocks and keeps the embeddings and the
    output layer (tied to wte in GPT-2) in full precision.
    """
    if isinstance(skip, str):
        raise TypeError(f"quantize_model: skip must be a collection of names, got the string {skip!r}")
    skip = set(skip)
    already = quantized_layers(model)
    if already:
        raise ValueError(f"quantize_model: the model is already quantized ({already[0][0]!r} is a Linear4bit)")
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name and not _skipped(name, skip)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Linear4bit.from_linear(
            linear, quant_type=quant_type, double_quant=double_quant, blocksize=blocksize, compute_dtype=compute_dtype
        ))
    return model
