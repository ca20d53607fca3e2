"""LoRA, VeRA, KronA and bottleneck-adapter layers: formulas by hand, init, gradcheck, merge/unmerge."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.peft.adapters import BottleneckAdapter, ParallelAdapter, SeriesAdapter, adapter_num_parameters
from minillm.peft.krona import KronALinear, factorization, kron_matvec, kron_shapes
from minillm.peft.lora import LoRALinear
from minillm.peft.vera import VeRALinear, VeRAProjections


def linear(in_f: int, out_f: int, seed: int = 0, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_f, out_f).to(dtype)
    with torch.no_grad():
        layer.bias.normal_()
    return layer


def randomize_(*params: torch.Tensor, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


class NotALinear(nn.Module):
    """A linear-like base that is not nn.Linear (stands in for an NF4 Linear4bit)."""

    def __init__(self, inner: nn.Linear) -> None:
        super().__init__()
        self.inner = inner
        self.in_features, self.out_features = inner.in_features, inner.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


# ---------------------------------------------------------------------- LoRA
def test_lora_init_shapes_and_kaiming_bound():
    layer = LoRALinear(linear(256, 64), r=8, lora_alpha=16)
    assert layer.lora_A.shape == (8, 256) and layer.lora_B.shape == (64, 8)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) on fan_in=256
    assert layer.lora_A.abs().max() <= bound
    assert layer.lora_A.abs().max() > 0.95 * bound
    assert abs(layer.lora_A.std().item() - bound / math.sqrt(3)) < 0.1 * bound
    assert layer.scaling == 2.0


@pytest.mark.parametrize("use_rslora, expected", [(False, 8 / 4), (True, 8 / 2)])
def test_lora_forward_matches_hand_formula(use_rslora, expected):
    base = linear(6, 5)
    layer = LoRALinear(base, r=4, lora_alpha=8, use_rslora=use_rslora)
    randomize_(layer.lora_B)
    assert layer.scaling == expected
    x = torch.randn(2, 3, 6)
    W = base.weight + expected * layer.lora_B @ layer.lora_A
    torch.testing.assert_close(layer(x), F.linear(x, W, base.bias), atol=1e-5, rtol=1e-5)


def test_lora_gradcheck_float64():
    layer = LoRALinear(linear(5, 4, dtype=torch.float64), r=2, lora_alpha=3)
    randomize_(layer.lora_B)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)

    def f(x, A, B):
        return layer.base(x) + (x @ A.T @ B.T) * layer.scaling

    assert torch.autograd.gradcheck(f, (x, layer.lora_A, layer.lora_B))
    # and the module itself gives the same gradients as the formula
    layer(x).sum().backward()
    gA = layer.lora_A.grad.clone()
    expected = torch.autograd.grad(f(x, layer.lora_A, layer.lora_B).sum(), layer.lora_A)[0]
    torch.testing.assert_close(gA, expected)
    assert layer.base.weight.grad is None


def test_lora_dropout_only_on_branch():
    layer = LoRALinear(linear(8, 8), r=2, lora_alpha=2, lora_dropout=0.5).train()
    randomize_(layer.lora_B)
    x = torch.randn(4, 8)
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    dropped = F.dropout(x, 0.5, training=True)
    expected = layer.base(x) + (dropped @ layer.lora_A.T @ layer.lora_B.T) * layer.scaling
    torch.testing.assert_close(y, expected)
    layer.eval()
    expected_eval = layer.base(x) + (x @ layer.lora_A.T @ layer.lora_B.T) * layer.scaling
    torch.testing.assert_close(layer(x), expected_eval)


def test_lora_merge_exact_unmerge_and_idempotent():
    layer = LoRALinear(linear(16, 12), r=4, lora_alpha=8)
    randomize_(layer.lora_A, layer.lora_B)
    W0 = layer.base.weight.detach().clone()
    x = torch.randn(3, 16)
    y_unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y_unmerged, atol=1e-5, rtol=1e-5)
    W_merged = layer.base.weight.detach().clone()
    assert not torch.equal(W_merged, W0)
    layer.merge()  # a second merge must not add the update again
    assert torch.equal(layer.base.weight, W_merged)
    torch.testing.assert_close(layer(x), y_unmerged, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.base.weight, W0)
    layer.unmerge()  # nothing to do
    assert torch.equal(layer.base.weight, W0)
    torch.testing.assert_close(layer(x), y_unmerged)


def test_lora_wraps_non_linear_base_but_merge_needs_linear():
    inner = linear(6, 4)
    layer = LoRALinear(NotALinear(inner), r=2, lora_alpha=2)
    randomize_(layer.lora_B)
    x = torch.randn(2, 6)
    torch.testing.assert_close(layer(x), inner(x) + x @ layer.lora_A.T @ layer.lora_B.T)
    with pytest.raises(TypeError, match="nn.Linear"):
        layer.merge()
    with pytest.raises(TypeError, match="in_features"):
        LoRALinear(nn.LayerNorm(4), r=1, lora_alpha=1)


@pytest.mark.parametrize("r", [0, -2, 5])
def test_lora_bad_rank(r):
    with pytest.raises(ValueError, match="r"):
        LoRALinear(linear(4, 8), r=r, lora_alpha=1)


def test_lora_several_adapters_swap():
    layer = LoRALinear(linear(8, 8), r=2, lora_alpha=2)
    randomize_(layer.lora_B, seed=1)
    first_A, first_B = layer.lora_A, layer.lora_B
    layer.add_adapter("second", r=4, lora_alpha=2)
    assert layer.active_adapter == "default" and layer.lora_A is first_A
    layer.set_adapter("second")
    assert layer.lora_A.shape == (4, 8) and layer.scaling == 0.5
    randomize_(layer.lora_B, seed=2)
    x = torch.randn(3, 8)
    base = layer.base(x)
    torch.testing.assert_close(layer(x), base + 0.5 * x @ layer.lora_A.T @ layer.lora_B.T)
    assert layer.lora_B.requires_grad and not first_B.requires_grad
    layer.set_adapter("default")
    torch.testing.assert_close(layer(x), base + x @ first_A.T @ first_B.T)
    assert first_B.requires_grad and not layer.adapters["second"].lora_B.requires_grad
    with pytest.raises(ValueError, match="no adapter 'third'"):
        layer.set_adapter("third")
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("second")
    layer.merge()
    with pytest.raises(ValueError, match="unmerge"):
        layer.set_adapter("second")


def test_lora_disabled_is_base_and_refuses_merged():
    layer = LoRALinear(linear(8, 8), r=2, lora_alpha=2)
    randomize_(layer.lora_B)
    x = torch.randn(3, 8)
    layer.disabled = True
    torch.testing.assert_close(layer(x), layer.base(x))
    layer.disabled = False
    assert not torch.allclose(layer(x), layer.base(x))
    layer.merge()
    layer.disabled = True
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(x)


# ---------------------------------------------------------------------- VeRA
def test_vera_projections_seeded_kaiming_gain_sqrt2():
    p1, p2 = VeRAProjections(16, 96, 48, projection_seed=3), VeRAProjections(16, 96, 48, projection_seed=3)
    assert torch.equal(p1.vera_A, p2.vera_A) and torch.equal(p1.vera_B, p2.vera_B)
    p3 = VeRAProjections(16, 96, 48, projection_seed=4)
    assert not torch.equal(p1.vera_A, p3.vera_A)
    bound_A, bound_B = math.sqrt(6 / 96), math.sqrt(6 / 16)
    assert bound_A * 0.9 < p1.vera_A.abs().max() <= bound_A
    assert bound_B * 0.9 < p1.vera_B.abs().max() <= bound_B
    # A is drawn first, then B, from one generator: B is the second draw, not a fresh stream.
    g = torch.Generator().manual_seed(3)
    torch.empty(16, 96).uniform_(generator=g)  # advance past A's draws
    fresh = torch.Generator().manual_seed(3)
    assert not torch.equal(p1.vera_B, torch.empty(48, 16).uniform_(-bound_B, bound_B, generator=fresh))
    assert torch.equal(p1.vera_B, torch.empty(48, 16).uniform_(-bound_B, bound_B, generator=g))
    assert "vera_A" not in p1.state_dict()  # the seed stands for them


def test_vera_forward_formula_and_slices():
    proj = VeRAProjections(4, 10, 9, projection_seed=0)
    base = linear(6, 5)
    layer = VeRALinear(base, proj)
    assert torch.equal(layer.lambda_d, torch.full((4,), 0.1)) and torch.count_nonzero(layer.lambda_b) == 0
    assert layer.vera_A.data_ptr() == proj.vera_A.data_ptr() and layer.vera_A.shape == (4, 6)
    assert torch.equal(layer.vera_B, proj.vera_B[:5])
    x = torch.randn(2, 6)
    torch.testing.assert_close(layer(x), base(x))  # lambda_b = 0
    randomize_(layer.lambda_b, layer.lambda_d)
    W = base.weight + torch.diag(layer.lambda_b) @ proj.vera_B[:5] @ torch.diag(layer.lambda_d) @ proj.vera_A[:, :6]
    torch.testing.assert_close(layer(x), F.linear(x, W, base.bias), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="smaller than this layer"):
        VeRALinear(linear(11, 5), proj)


def test_vera_gradcheck_float64():
    proj = VeRAProjections(3, 5, 4, dtype=torch.float64)
    layer = VeRALinear(linear(5, 4, dtype=torch.float64), proj)
    randomize_(layer.lambda_b)
    x = torch.randn(2, 5, dtype=torch.float64)

    def f(ld, lb):
        return layer.base(x) + lb * ((ld * (x @ layer.vera_A.T)) @ layer.vera_B.T)

    assert torch.autograd.gradcheck(f, (layer.lambda_d, layer.lambda_b))
    layer(x).square().sum().backward()
    torch.testing.assert_close(
        layer.lambda_d.grad, torch.autograd.grad(f(layer.lambda_d, layer.lambda_b).square().sum(), layer.lambda_d)[0]
    )


def test_vera_merge_unmerge():
    layer = VeRALinear(linear(6, 5), VeRAProjections(4, 6, 5))
    randomize_(layer.lambda_b, layer.lambda_d)
    W0, x = layer.base.weight.detach().clone(), torch.randn(3, 6)
    y = layer(x)
    layer.merge()
    layer.merge()
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.base.weight, W0)


# ---------------------------------------------------------------------- KronA
@pytest.mark.parametrize("dim, expected", [(256, (16, 16)), (128, (8, 16)), (127, (1, 127)), (48, (6, 8)), (1, (1, 1))])
def test_factorization_closest_to_sqrt(dim, expected):
    assert factorization(dim) == expected


def test_kron_shapes_auto_override_and_errors():
    assert kron_shapes(16, 48) == ((6, 4), (8, 4))
    assert kron_shapes(16, 48, a_shape=(3, 2)) == ((3, 2), (16, 8))
    assert kron_shapes(16, 48, b_shape=(12, 4)) == ((4, 4), (12, 4))
    with pytest.raises(ValueError, match="does not divide"):
        kron_shapes(16, 48, a_shape=(5, 4))
    with pytest.raises(ValueError, match="product"):
        kron_shapes(16, 48, a_shape=(6, 4), b_shape=(8, 2))


def test_kron_matvec_equals_explicit_kron():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 5, generator=g, dtype=torch.float64)
    B = torch.randn(4, 2, generator=g, dtype=torch.float64)
    x = torch.randn(2, 7, 10, generator=g, dtype=torch.float64)
    torch.testing.assert_close(kron_matvec(A, B, x), x @ torch.kron(A, B).T)


def test_krona_layer_forward_vs_torch_kron_and_init():
    base = linear(16, 48)
    layer = KronALinear(base, scale=0.5)
    assert layer.krona_A.shape == (6, 4) and layer.krona_B.shape == (8, 4)
    assert torch.count_nonzero(layer.krona_A) == 0 and torch.count_nonzero(layer.krona_B) > 0
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(layer(x), base(x))
    randomize_(layer.krona_A)
    W = base.weight + 0.5 * torch.kron(layer.krona_A, layer.krona_B)
    torch.testing.assert_close(layer(x), F.linear(x, W, base.bias), atol=1e-5, rtol=1e-5)


def test_krona_gradcheck_and_merge():
    layer = KronALinear(linear(6, 4, dtype=torch.float64), a_shape=(2, 3))
    randomize_(layer.krona_A)
    x = torch.randn(3, 6, dtype=torch.float64)

    def f(A, B):
        return layer.base(x) + x @ torch.kron(A, B).T

    assert torch.autograd.gradcheck(f, (layer.krona_A, layer.krona_B))
    layer(x).sum().backward()
    expected = torch.autograd.grad(f(layer.krona_A, layer.krona_B).sum(), layer.krona_B)[0]
    torch.testing.assert_close(layer.krona_B.grad, expected)
    W0, y = layer.base.weight.detach().clone(), layer(x).detach()
    layer.merge()
    layer.merge()
    torch.testing.assert_close(layer(x), y)
    layer.unmerge()
    assert torch.equal(layer.base.weight, W0)


# ---------------------------------------------------------------------- bottleneck adapters
def test_adapter_parameter_count_formula():
    for d, m in [(16, 1), (32, 8), (64, 5)]:
        adapter = BottleneckAdapter(d, m)
        assert sum(p.numel() for p in adapter.parameters()) == adapter_num_parameters(d, m) == 2 * m * d + d + m


def test_houlsby_init_is_near_identity():
    torch.manual_seed(0)
    adapter = BottleneckAdapter(64, 16, "swish", init_weights="houlsby")
    for w in (adapter.adapter_down.weight, adapter.adapter_up.weight):
        assert w.abs().max() <= 2e-2 and w.abs().max() > 1e-2
    assert torch.count_nonzero(adapter.adapter_down.bias) == 0 == torch.count_nonzero(adapter.adapter_up.bias)
    series = SeriesAdapter(nn.Identity(), adapter)
    h = torch.randn(4, 64)
    assert (series(h) - h).abs().max() < 1e-2 * h.abs().max()


def test_series_adapter_formula():
    base = linear(8, 6)
    adapter = BottleneckAdapter(6, 3, "swish", init_weights="bert")
    randomize_(adapter.adapter_down.bias, adapter.adapter_up.bias)
    x = torch.randn(2, 8)
    h = base(x)
    down = h @ adapter.adapter_down.weight.T + adapter.adapter_down.bias
    expected = h + (down * torch.sigmoid(down)) @ adapter.adapter_up.weight.T + adapter.adapter_up.bias
    torch.testing.assert_close(SeriesAdapter(base, adapter)(x), expected)


def test_parallel_adapter_formula_and_zero_init():
    base = linear(8, 8)
    adapter = BottleneckAdapter(8, 4, "relu", scaling=4.0, init_weights="mam_adapter")
    wrapped = ParallelAdapter(base, adapter)
    x = torch.randn(3, 8)
    assert torch.equal(wrapped(x), base(x))  # W_up = 0, b_up = 0
    randomize_(adapter.adapter_up.weight, adapter.adapter_up.bias)
    down = torch.relu(x @ adapter.adapter_down.weight.T)  # b_down = 0
    expected = base(x) + 4.0 * (down @ adapter.adapter_up.weight.T + adapter.adapter_up.bias)
    torch.testing.assert_close(wrapped(x), expected)


def test_adapter_bad_arguments():
    with pytest.raises(ValueError, match="bottleneck size"):
        BottleneckAdapter(8, 0)
    with pytest.raises(ValueError, match="non_linearity"):
        BottleneckAdapter(8, 2, "sigmoidish")
    with pytest.raises(ValueError, match="init_weights"):
        BottleneckAdapter(8, 2, init_weights="zeros")
