"""SFT loss: masked cross-entropy by hand vs PyTorch (every reduction), the (sum, count) the loop asks for, the target
shift."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.align.sft import (
    IGNORE_INDEX, masked_cross_entropy, masked_cross_entropy_mean, masked_cross_entropy_sum, shift_for_next_token,
)


def random_case(seed: int, B: int = 3, T: int = 7, V: int = 11, p_ignore: float = 0.4, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, T, V, generator=g)).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[torch.rand(B, T, generator=g) < p_ignore] = IGNORE_INDEX
    targets[1] = IGNORE_INDEX  # one fully masked row (a prompt-only example)
    return logits, targets


def test_hand_computed_value():
    # logits (0, ln 2, 0): softmax = (1/4, 2/4, 1/4); target 1 -> -log(1/2); second row is ignored
    logits = torch.tensor([[0.0, math.log(2.0), 0.0], [5.0, -1.0, 2.0]])
    targets = torch.tensor([1, IGNORE_INDEX])
    loss_sum, n = masked_cross_entropy_sum(logits, targets)
    assert int(n) == 1
    assert loss_sum.item() == pytest.approx(math.log(2.0), abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_f_cross_entropy_value_and_grad(seed):
    logits, targets = random_case(seed)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    ours = masked_cross_entropy_mean(a, targets)
    ref = F.cross_entropy(b.view(-1, b.shape[-1]), targets.view(-1), ignore_index=-100)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 4), T=st.integers(1, 6), V=st.integers(2, 9),
    p_ignore=st.floats(0.0, 0.9), seed=st.integers(0, 10_000),
)
def test_sum_and_count_match_f_cross_entropy_sum(B, T, V, p_ignore, seed):
    g = torch.Generator().manual_seed(seed)
    logits = 4 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[torch.rand(B, T, generator=g) < p_ignore] = IGNORE_INDEX
    loss_sum, n = masked_cross_entropy_sum(logits, targets)
    ref_sum = F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-100, reduction="sum")
    assert int(n) == int((targets != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss_sum, ref_sum, atol=1e-10, rtol=1e-10)


def test_all_ignored_gives_zero_loss_and_zero_grad():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    targets = torch.full((2, 5), IGNORE_INDEX)
    loss_sum, n = masked_cross_entropy_sum(logits, targets)
    mean = masked_cross_entropy_mean(logits, targets)
    assert int(n) == 0 and loss_sum.item() == 0.0 and mean.item() == 0.0
    mean.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_ignored_positions_get_no_gradient():
    logits, targets = random_case(3)
    logits.requires_grad_(True)
    masked_cross_entropy(logits, targets, reduction="sum").backward()
    ignored = targets == IGNORE_INDEX
    assert ignored.any() and (~ignored).any()
    assert torch.all(logits.grad[ignored] == 0)
    assert torch.all(logits.grad[~ignored].abs().sum(-1) > 0)


def test_ignored_rows_cannot_poison_the_value():
    # an ignored position whose logits are all -inf (e.g. a fully masked vocabulary) has NaN NLL;
    # it must be dropped, not multiplied by 0 (0 * NaN = NaN)
    logits = torch.tensor([[0.0, math.log(2.0), 0.0], [-math.inf, -math.inf, -math.inf]])
    loss_sum, n = masked_cross_entropy_sum(logits, torch.tensor([1, IGNORE_INDEX]))
    assert int(n) == 1 and loss_sum.item() == pytest.approx(math.log(2.0))


def test_large_logits_are_stable():
    # exact: -log softmax = logsumexp - z_y; with 1e4 gaps exp() of the others underflows to 0
    logits = torch.tensor([[1e4, 0.0, -1e4], [1e4, 0.0, -1e4]], requires_grad=True)
    targets = torch.tensor([0, 1])
    loss_sum, n = masked_cross_entropy_sum(logits, targets)
    assert torch.isfinite(loss_sum)
    assert loss_sum.item() == pytest.approx(0.0 + 1e4, rel=1e-7)
    loss_sum.backward()
    assert torch.isfinite(logits.grad).all()
    # d/dz of -log softmax_y = softmax - onehot: row 0 -> (0, 0, 0); row 1 -> (1, -1, 0)
    torch.testing.assert_close(logits.grad, torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, 0.0]]))


def test_gradcheck_float64():
    logits, targets = random_case(4, B=2, T=3, V=5, dtype=torch.float64)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: masked_cross_entropy(z, targets, reduction="sum"), (logits,))
    assert torch.autograd.gradcheck(lambda z: masked_cross_entropy_mean(z, targets), (logits,))


def test_sum_over_micro_batches_equals_full_batch_mean():
    """The training loop's contract: sum of sums / sum of counts is the token mean of the whole batch."""
    logits, targets = random_case(5, B=4, T=6)
    targets[0, :5] = IGNORE_INDEX  # rows with very different token counts
    full = masked_cross_entropy_mean(logits, targets)
    parts = [masked_cross_entropy_sum(logits[i:i + 1], targets[i:i + 1]) for i in range(4)]
    total = sum(s for s, _ in parts) / sum(int(n) for _, n in parts)
    torch.testing.assert_close(total, full)
    mean_of_means = sum(masked_cross_entropy_mean(logits[i:i + 1], targets[i:i + 1]) for i in range(4)) / 4
    assert not torch.allclose(mean_of_means, full)  # the naive average would weight short rows more


def test_bf16_logits_are_upcast():
    logits, targets = random_case(6)
    low = logits.to(torch.bfloat16)
    loss = masked_cross_entropy_mean(low, targets)
    assert loss.dtype == torch.float32
    ref = F.cross_entropy(low.float().view(-1, 11), targets.view(-1), ignore_index=-100)
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)


def test_custom_ignore_index():
    logits, targets = random_case(7)
    t2 = targets.masked_fill(targets == IGNORE_INDEX, -1)
    a = masked_cross_entropy_sum(logits, targets)
    b = masked_cross_entropy_sum(logits, t2, ignore_index=-1)
    torch.testing.assert_close(a[0], b[0])
    assert int(a[1]) == int(b[1])
    torch.testing.assert_close(masked_cross_entropy(logits, t2, ignore_index=-1),
                               F.cross_entropy(logits.view(-1, 11), t2.view(-1), ignore_index=-1))


def test_shift_for_next_token_by_hand():
    ids = torch.tensor([[10, 11, 12, 13, 14], [20, 21, 22, 0, 0]])
    # prompt = first two tokens; response after; second row padded with 0 at the end
    loss_mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    inputs, targets = shift_for_next_token(ids, loss_mask)
    assert torch.equal(inputs, torch.tensor([[10, 11, 12, 13], [20, 21, 22, 0]]))
    assert torch.equal(targets, torch.tensor([[-100, 12, 13, 14], [21, 22, -100, -100]]))


def test_shift_then_loss_scores_only_response_tokens():
    """Only response tokens 3..5 are scored, each from the logits one position earlier (rows 2..4)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 9, (1, 6))
    loss_mask = torch.tensor([[0, 0, 0, 1, 1, 1]])
    inputs, targets = shift_for_next_token(ids, loss_mask)
    logits = torch.randn(1, 5, 9)
    by_hand = -sum(torch.log_softmax(logits[0, t], -1)[ids[0, t + 1]] for t in (2, 3, 4))
    loss_sum, n = masked_cross_entropy_sum(logits, targets)
    assert int(n) == 3
    torch.testing.assert_close(loss_sum, by_hand)


def test_bad_inputs():
    logits = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="targets"):
        masked_cross_entropy(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="targets"):
        masked_cross_entropy(logits, torch.zeros(2, 3))
    with pytest.raises(TypeError, match="logits"):
        masked_cross_entropy(torch.zeros(2, 3, 5, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        masked_cross_entropy(logits, torch.full((2, 3), 5))
    with pytest.raises(ValueError, match="-7"):
        masked_cross_entropy(logits, torch.full((2, 3), -7))
    with pytest.raises(ValueError, match="loss_mask"):
        shift_for_next_token(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="at least 2"):
        shift_for_next_token(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1))
    with pytest.raises(TypeError, match="ids"):
        shift_for_next_token(torch.zeros(2, 3), torch.zeros(2, 3))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_reduction_is_f_cross_entropy(reduction):
    """A drop-in: the same value and gradient as F.cross_entropy for each reduction (the mean is the default,
    so `masked_cross_entropy(logits, targets).backward()` works as it does with PyTorch's)."""
    logits, targets = random_case(8, dtype=torch.float64)
    targets[1] = 3  # keep a scored token in every row (F.cross_entropy's mean is NaN on an all-ignored batch)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    V = logits.shape[-1]
    kwargs = {} if reduction == "mean" else {"reduction": reduction}
    ours = masked_cross_entropy(a, targets, **kwargs)
    ref = F.cross_entropy(b.view(-1, V), targets.view(-1), ignore_index=-100, reduction=reduction)
    torch.testing.assert_close(ours, ref.view(targets.shape) if reduction == "none" else ref, atol=1e-12, rtol=1e-12)
    assert ours.shape == (targets.shape if reduction == "none" else ())
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=1e-12)


def test_an_unknown_reduction_is_refused():
    logits, targets = random_case(9)
    with pytest.raises(ValueError, match="reduction must be 'mean', 'sum' or 'none', got 'avg'"):
        masked_cross_entropy(logits, targets, reduction="avg")
