"""kd_loss and its divergences: hand-computed cases, the T^2 factor, masking, gradients, bad input."""
from __future__ import annotations

import math

import pytest
import torch

from minillm.align.distill import divergence, fit_gaussian, kd_loss, mix_loss


def softmax_list(z: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def kl_by_hand(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


S = [1.0, -0.5, 2.0]
TCH = [0.3, 0.8, -1.2]


def as_logits(z: list[float]) -> torch.Tensor:
    return torch.tensor(z, dtype=torch.float64).view(1, 1, 3)


def test_forward_kl_at_t1_equals_hand_kl():
    p, q = softmax_list(TCH, 1.0), softmax_list(S, 1.0)
    got = kd_loss(as_logits(S), as_logits(TCH), None, temperature=1.0)
    assert float(got) == pytest.approx(kl_by_hand(p, q), rel=1e-12)


def test_temperature_and_t_squared_by_hand():
    p, q = softmax_list(TCH, 3.0), softmax_list(S, 3.0)
    got = kd_loss(as_logits(S), as_logits(TCH), None, temperature=3.0)
    assert float(got) == pytest.approx(9.0 * kl_by_hand(p, q), rel=1e-12)


def test_reverse_kl_and_jsd_by_hand():
    p, q = softmax_list(TCH, 2.0), softmax_list(S, 2.0)
    rev = kd_loss(as_logits(S), as_logits(TCH), None, temperature=2.0, kind="reverse_kl")
    assert float(rev) == pytest.approx(4.0 * kl_by_hand(q, p), rel=1e-12)
    for beta in (0.5, 0.2, 0.9):
        m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
        want = beta * kl_by_hand(p, m) + (1 - beta) * kl_by_hand(q, m)
        got = kd_loss(as_logits(S), as_logits(TCH), None, temperature=2.0, kind="jsd", beta=beta)
        assert float(got) == pytest.approx(4.0 * want, rel=1e-12)


def test_jsd_limits_and_symmetry():
    s, t = torch.randn(2, 5, 11, dtype=torch.float64), torch.randn(2, 5, 11, dtype=torch.float64)
    fwd = divergence(s, t, 1.0, "forward_kl")
    rev = divergence(s, t, 1.0, "reverse_kl")
    assert torch.equal(divergence(s, t, 1.0, "jsd", beta=0.0), fwd)
    assert torch.equal(divergence(s, t, 1.0, "jsd", beta=1.0), rev)
    jsd = divergence(s, t, 1.0, "jsd", beta=0.5)
    assert torch.allclose(jsd, divergence(t, s, 1.0, "jsd", beta=0.5), atol=1e-12)  # plain JSD is symmetric
    assert bool((jsd <= math.log(2) + 1e-12).all()) and bool((jsd >= 0).all())
    assert not torch.allclose(fwd, rev)  # KL is not


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_zero_when_student_equals_teacher(kind):
    z = torch.randn(3, 4, 7)
    assert float(kd_loss(z, z.clone(), None, kind=kind)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(1.5 * z, z, None, kind=kind)) > 1e-3  # different distributions: positive


def test_shift_invariance_of_logits():
    s, t = torch.randn(2, 3, 9, dtype=torch.float64), torch.randn(2, 3, 9, dtype=torch.float64)
    assert float(kd_loss(s + 5.0, t - 2.0, None)) == pytest.approx(float(kd_loss(s, t, None)), rel=1e-10)


def test_gradient_scale_independent_of_temperature():
    torch.manual_seed(0)
    s0, t = torch.randn(4, 6, 50, dtype=torch.float64), torch.randn(4, 6, 50, dtype=torch.float64)
    norms = {}
    for temp in (5.0, 10.0, 20.0, 40.0):
        s = s0.clone().requires_grad_(True)
        kd_loss(s, t, None, temperature=temp).backward()
        norms[temp] = float(s.grad.norm())
    # with T^2 the gradient tends to a constant; without it, it would fall by 4x per doubling of T
    assert norms[20.0] / norms[40.0] == pytest.approx(1.0, abs=0.02)
    assert norms[10.0] / norms[20.0] == pytest.approx(1.0, abs=0.05)
    assert norms[5.0] / norms[40.0] == pytest.approx(1.0, abs=0.2)


def test_forward_kl_gradient_is_q_minus_p_over_t():
    s = torch.randn(1, 2, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(1, 2, 5, dtype=torch.float64)
    kd_loss(s, t, None, temperature=2.0).backward()
    q, p = torch.softmax(s.detach() / 2.0, -1), torch.softmax(t / 2.0, -1)
    # d/ds of T^2 * mean_pos KL(p||q) = T^2 * (q - p) / T / n_positions
    assert torch.allclose(s.grad, 4.0 * (q - p) / 2.0 / 2, atol=1e-12)


def test_mask_selects_positions():
    s, t = torch.randn(2, 4, 6, dtype=torch.float64), torch.randn(2, 4, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 1]], dtype=torch.bool)
    d = divergence(s, t, 2.0)
    assert float(kd_loss(s, t, mask)) == pytest.approx(4.0 * float(d[mask].mean()), rel=1e-12)
    s2 = s.clone()
    s2[~mask] = 100.0 * torch.randn_like(s2[~mask])  # unscored positions do not matter
    assert float(kd_loss(s2, t, mask)) == pytest.approx(float(kd_loss(s, t, mask)), rel=1e-12)
    empty = torch.zeros(2, 4, dtype=torch.bool)
    x = s.clone().requires_grad_(True)
    loss = kd_loss(x, t, empty)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(x.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_gradcheck_float64(kind):
    s = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda x: kd_loss(x, t, mask, temperature=1.5, kind=kind, beta=0.3), (s,))


def test_zero_teacher_probability_is_finite():
    t = torch.tensor([[[0.0, -math.inf, 1.0]]])
    s = torch.randn(1, 1, 3)
    assert torch.isfinite(kd_loss(s, t, None, temperature=1.0))


def test_mix_loss():
    assert float(mix_loss(torch.tensor(2.0), torch.tensor(4.0), 0.25)) == pytest.approx(3.5)
    with pytest.raises(ValueError, match="alpha"):
        mix_loss(torch.tensor(1.0), torch.tensor(1.0), 1.5)


def test_forward_kl_covers_modes_reverse_kl_seeks_one():
    grid = torch.linspace(-8, 8, 401)
    p = 0.5 * torch.exp(-0.5 * ((grid + 3) / 0.7) ** 2) + 0.5 * torch.exp(-0.5 * ((grid - 3) / 0.7) ** 2)
    log_p = torch.log(p / p.sum())
    mu_f, sigma_f = fit_gaussian(log_p, grid, "forward_kl", init=(1.0, 0.0))
    mu_r, sigma_r = fit_gaussian(log_p, grid, "reverse_kl", init=(1.0, 0.0))
    assert abs(mu_f) < 0.3 and sigma_f > 2.5  # between the bumps, wide enough to cover both
    assert abs(mu_r - 3.0) < 0.3 and sigma_r < 1.0  # inside the nearer bump


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": 0.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"kind": "kl"}, "kind"), ({"beta": 1.5}, "beta"),
])
def test_bad_arguments(kwargs, match):
    s = torch.randn(1, 2, 4)
    with pytest.raises(ValueError, match=match):
        kd_loss(s, s, None, **kwargs)


def test_bad_shapes_and_vocabularies():
    with pytest.raises(ValueError, match="vocabulary"):
        kd_loss(torch.randn(1, 2, 4), torch.randn(1, 2, 5), None)
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(torch.randn(1, 2, 4), torch.randn(1, 3, 4), None)
    with pytest.raises(ValueError, match="mask"):
        kd_loss(torch.randn(1, 2, 4), torch.randn(1, 2, 4), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="floating"):
        kd_loss(torch.ones(1, 2, 4, dtype=torch.long), torch.randn(1, 2, 4), None)
