"""Our kd_loss / T^2 equals TRL's GKD `generalized_jsd_loss` (skipped without trl)."""
from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")

from minillm.align.distill import kd_loss  # noqa: E402


def trl_jsd():
    try:
        from trl import GKDTrainer
    except ImportError:  # newer TRL moved GKD to trl.experimental
        from trl.experimental.gkd import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_kd_loss_matches_trl_generalized_jsd(beta, temperature):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 7, 50, generator=g, dtype=torch.float64)
    t = torch.randn(3, 7, 50, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 50, (3, 7), generator=g)
    labels[0, :3] = -100
    labels[2, 5:] = -100
    ref = trl_jsd()(s, t, labels=labels, beta=beta, temperature=temperature)
    kind = "forward_kl" if beta == 0 else "reverse_kl" if beta == 1 else "jsd"
    ours = kd_loss(s, t, labels != -100, temperature=temperature, kind="jsd", beta=beta) / temperature**2
    named = kd_loss(s, t, labels != -100, temperature=temperature, kind=kind, beta=beta) / temperature**2
    assert float(ours) == pytest.approx(float(ref), rel=1e-9)
    assert float(named) == pytest.approx(float(ref), rel=1e-9)
