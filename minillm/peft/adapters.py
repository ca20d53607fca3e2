"""Bottleneck adapters: small trained MLPs inserted into a frozen network.

Series adapter (Houlsby et al., 2019; Pfeiffer et al., 2020), applied to a sublayer's output h:

    h' = h + s * W_up f(W_down h + b_down) + b_up        W_down: (m, d), W_up: (d, m), m << d

Houlsby placement puts one after the attention output projection and one after the MLP (two per block);
Pfeiffer placement only the one after the MLP. The internal skip connection plus a near-zero init
(weights ~ truncated normal, std 1e-2, cut at +-2e-2; biases 0) makes each adapter start near the identity.

Parallel adapter (He et al., 2022), computed from the sublayer's *input* x beside it:

    y = FFN(x) + s * (W_up f(W_down x + b_down) + b_up)      s = 4, W_up = 0, b_up = 0 at init

Defaults follow the adapters library (adapter-hub): Houlsby (`DoubleSeqBnConfig`) reduction factor 16 and
swish; Pfeiffer (`SeqBnConfig`) 16 and relu; parallel (`ParBnConfig`) reduction factor 2, relu, scaling 4,
"mam_adapter" init (W_down kaiming-uniform(a=sqrt(5)), every other tensor 0). Each adapter has
2 m d + d + m parameters. The bottleneck is nonlinear, so adapters cannot be merged into the weights.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

NON_LINEARITIES = {"relu": F.relu, "swish": F.silu, "silu": F.silu, "tanh": torch.tanh, "gelu": F.gelu}
INIT_WEIGHTS = ("houlsby", "mam_adapter", "bert")


class BottleneckAdapter(nn.Module):
    """s * (W_up f(W_down x + b_down) + b_up): the residual branch only, shape (..., d) -> (..., d)."""

    def __init__(
        self,
        d: int,
        m: int,
        non_linearity: str = "relu",
        scaling: float = 1.0,
        init_weights: str = "houlsby",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(m, int) or isinstance(m, bool) or not 1 <= m <= d:
            raise ValueError(f"adapter: bottleneck size m must be an integer in [1, d={d}], got {m!r}")
        if non_linearity not in NON_LINEARITIES:
            raise ValueError(f"adapter: unknown non_linearity {non_linearity!r}; choose from {sorted(NON_LINEARITIES)}")
        if init_weights not in INIT_WEIGHTS:
            raise ValueError(f"adapter: unknown init_weights {init_weights!r}; choose from {list(INIT_WEIGHTS)}")
        self.non_linearity = non_linearity
        self.scaling = float(scaling)
        self.adapter_down = nn.Linear(d, m, device=device, dtype=dtype)  # weight (m, d)
        self.adapter_up = nn.Linear(m, d, device=device, dtype=dtype)  # weight (d, m)
        self.reset_parameters(init_weights)

    def reset_parameters(self, init_weights: str) -> None:
        with torch.no_grad():
            self.adapter_down.bias.zero_()
            self.adapter_up.bias.zero_()
            if init_weights == "houlsby":  # near-identity: the branch starts at ~1e-2 of the input
                for w in (self.adapter_down.weight, self.adapter_up.weight):
                    nn.init.trunc_normal_(w, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
            elif init_weights == "mam_adapter":  # exactly zero branch at the start
                nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
                self.adapter_up.weight.zero_()
            else:  # "bert": the adapters library's default, N(0, 0.02)
                nn.init.normal_(self.adapter_down.weight, std=0.02)
                nn.init.normal_(self.adapter_up.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """s * (W_up f(W_down x + b_down) + b_up), (..., d) -> (..., d)."""
        f = NON_LINEARITIES[self.non_linearity]
        return self.scaling * self.adapter_up(f(self.adapter_down(x)))


class SeriesAdapter(nn.Module):
    """h = base(x); returns h + adapter(h) (Houlsby / Pfeiffer placement after a sublayer's output)."""

    def __init__(self, base: nn.Module, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.disabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        if self.disabled:
            return h
        return h + self.adapter(h.to(self.adapter.adapter_down.weight.dtype)).to(h.dtype)


class ParallelAdapter(nn.Module):
    """Returns base(x) + adapter(x): the adapter reads the sublayer's input, beside it (He et al., 2022)."""

    def __init__(self, base: nn.Module, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.disabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        if self.disabled:
            return h
        return h + self.adapter(x.to(self.adapter.adapter_down.weight.dtype)).to(h.dtype)


def adapter_num_parameters(d: int, m: int) -> int:
    """2 m d + d + m: W_down (m, d), W_up (d, m), b_down (m,), b_up (d,)."""
    return 2 * m * d + d + m
