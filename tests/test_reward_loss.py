"""Reward modelling: Bradley-Terry loss and metrics by hand, and the reward read at the last real token."""
import math

import pytest
import torch

from minillm.align.reward import (
    RewardModel, bradley_terry_loss, bradley_terry_loss_sum, last_token_index, reward_metrics,
)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def t(*xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


RC, RR = t(1.0, 0.0, -0.5), t(0.0, 2.0, -0.5)


def test_bradley_terry_by_hand():
    expected = -(log_sigmoid(1.0) + log_sigmoid(-2.0) + log_sigmoid(0.0)) / 3
    assert bradley_terry_loss(RC, RR).item() == pytest.approx(expected, rel=1e-12)


def test_bradley_terry_margin_and_centering_by_hand():
    margin = t(0.5, 1.0, -1.0)
    expected = -(log_sigmoid(0.5) + log_sigmoid(-3.0) + log_sigmoid(1.0)) / 3
    assert bradley_terry_loss(RC, RR, margin=margin).item() == pytest.approx(expected, rel=1e-12)
    c = 0.01
    centred = -(log_sigmoid(1.0) + log_sigmoid(-2.0) + log_sigmoid(0.0)) / 3 + c * (1.0 + 4.0 + 1.0) / 3
    assert bradley_terry_loss(RC, RR, center_coef=c).item() == pytest.approx(centred, rel=1e-12)


def test_sum_variant_divided_by_count_is_the_mean():
    margin = t(0.5, 1.0, -1.0)
    s, n = bradley_terry_loss_sum(RC, RR, margin=margin, center_coef=0.01)
    assert n == 3
    torch.testing.assert_close(s / n, bradley_terry_loss(RC, RR, margin=margin, center_coef=0.01))


def test_loss_depends_only_on_differences_without_centering():
    shifted = bradley_terry_loss(RC + 7.0, RR + 7.0)
    torch.testing.assert_close(shifted, bradley_terry_loss(RC, RR))
    assert not torch.allclose(bradley_terry_loss(RC + 7.0, RR + 7.0, center_coef=0.01),
                              bradley_terry_loss(RC, RR, center_coef=0.01))


def test_gradient_raises_chosen_lowers_rejected_and_gradcheck():
    rc, rr = RC.clone().requires_grad_(True), RR.clone().requires_grad_(True)
    bradley_terry_loss(rc, rr).backward()
    assert torch.all(rc.grad < 0) and torch.all(rr.grad > 0)
    # d/dr_c of -log sigma(d) / B = -sigma(-d) / B
    torch.testing.assert_close(rc.grad, t(*[-1 / (1 + math.exp(d)) / 3 for d in (1.0, -2.0, 0.0)]))
    inputs = (RC.clone().requires_grad_(True), RR.clone().requires_grad_(True), t(0.1, 0.2, 0.3).requires_grad_(True))
    assert torch.autograd.gradcheck(lambda a, b, m: bradley_terry_loss(a, b, m, center_coef=0.05), inputs)


def test_large_reward_gaps_are_stable():
    loss = bradley_terry_loss(t(-1e4), t(1e4))
    assert loss.item() == pytest.approx(2e4)


def test_metrics_by_hand():
    m = reward_metrics(RC, RR)  # pairs: 1 > 0 yes, 0 > 2 no, tie -0.5 = -0.5 counts as wrong
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["margin"] == pytest.approx((1.0 - 2.0 + 0.0) / 3)
    values = [1.0, 0.0, -0.5, 0.0, 2.0, -0.5]
    mean = sum(values) / 6
    assert m["mean"] == pytest.approx(mean)
    assert m["std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / 6))
    assert m["min"] == pytest.approx(-0.5) and m["max"] == pytest.approx(2.0)


def test_loss_bad_inputs():
    with pytest.raises(ValueError, match="r_rejected"):
        bradley_terry_loss(RC, t(1.0, 2.0))
    with pytest.raises(ValueError, match="margin"):
        bradley_terry_loss(RC, RR, margin=t(1.0))
    with pytest.raises(ValueError, match="center_coef"):
        bradley_terry_loss(RC, RR, center_coef=-0.1)
    with pytest.raises(TypeError, match="r_chosen"):
        bradley_terry_loss(torch.tensor([1, 2, 3]), RR)
    with pytest.raises(ValueError, match="empty"):
        bradley_terry_loss(t(), t())


# ----------------------------------------------------------------------------- last real token
def test_last_token_index():
    mask = torch.tensor([
        [1, 1, 1, 0, 0],  # right padding -> 2
        [0, 0, 1, 1, 1],  # left padding -> 4
        [1, 1, 1, 1, 1],  # none -> 4
        [1, 0, 0, 0, 0],  # a single token -> 0
    ])
    assert last_token_index(mask).tolist() == [2, 4, 4, 0]
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))


def _padded(seqs, T, side):
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[i, sl], mask[i, sl] = s, 1
    return ids, mask


@pytest.fixture
def rm_and_seqs(tiny_model):
    torch.manual_seed(0)
    rm = RewardModel(tiny_model).eval()
    seqs = [torch.randint(1, 97, (n,)) for n in (9, 4, 6)]
    return rm, seqs


def test_reward_same_for_right_and_left_padding(rm_and_seqs):
    rm, seqs = rm_and_seqs
    with torch.no_grad():
        alone = torch.cat([rm(s[None]) for s in seqs])  # (3,): each sequence unpadded
        right = rm(*_padded(seqs, 9, "right"))
        left = rm(*_padded(seqs, 9, "left"))
    assert right.shape == (3,)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)


def test_reward_is_not_read_at_the_last_position_of_right_padded_rows(rm_and_seqs):
    """Reading h[:, -1] would score a padding token: it differs from the reward of the real sequence."""
    rm, seqs = rm_and_seqs
    ids, mask = _padded(seqs, 9, "right")
    with torch.no_grad():
        h, _ = rm.backbone.hidden_states(ids, attention_mask=mask)
        at_last_position = rm.score(h[:, -1]).squeeze(-1)
        rewards = rm(ids, mask)
        alone = torch.cat([rm(s[None]) for s in seqs])
    # row 0 has no padding, rows 1 and 2 do: only they tell the two readings apart
    assert torch.allclose(at_last_position[0], rewards[0], atol=1e-5)
    assert (at_last_position[1:] - alone[1:]).abs().min() > 1e-4
    torch.testing.assert_close(rewards, alone, atol=1e-5, rtol=0)


def test_reward_model_parameters_and_gradients(rm_and_seqs, tiny_config):
    rm, seqs = rm_and_seqs
    assert rm.score.weight.shape == (1, tiny_config.n_embd) and rm.score.bias is None
    assert "backbone.wte.weight" in dict(rm.named_parameters())
    ids, mask = _padded(seqs, 9, "left")
    r = rm(ids, mask)
    bradley_terry_loss(r[:1], r[1:2]).backward()
    assert rm.score.weight.grad.abs().sum() > 0
    assert rm.backbone.h[0].attn.c_attn.weight.grad.abs().sum() > 0


def test_reward_model_bad_inputs(rm_and_seqs):
    rm, _ = rm_and_seqs
    with pytest.raises(ValueError, match="attention_mask shape"):
        rm(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        rm(torch.ones(5, dtype=torch.long))
    with pytest.raises(ValueError, match="no real token"):
        rm(torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 0], [0, 0, 0]]))
    with pytest.raises(TypeError, match="backbone"):
        RewardModel(torch.nn.Linear(3, 3))


def test_loglik_reward_is_head_plus_scaled_sequence_loglik_by_hand(tiny_model):
    """RewardModel(loglik=True): r = score(h_last) + scale * sum_{t>=1} log p(x_t | x_<t), any padding side."""
    torch.manual_seed(0)
    rm = RewardModel(tiny_model, loglik=True).eval()
    seqs = [torch.randint(1, 97, (n,)) for n in (9, 4, 6)]
    with torch.no_grad():
        rm.loglik_scale.fill_(0.5)
        want = []
        for s in seqs:
            h, _ = rm.backbone.hidden_states(s[None])
            logp = torch.log_softmax(rm.backbone(s[None])[0].float(), dim=-1)  # (T, V)
            ll = sum(logp[t - 1, s[t]] for t in range(1, len(s)))
            want.append(rm.score(h[0, -1]).squeeze() + 0.5 * ll)
        want = torch.stack(want)
        for side in ("right", "left"):
            torch.testing.assert_close(rm(*_padded(seqs, 9, side)), want, atol=1e-4, rtol=0)
    assert "loglik_scale" in dict(rm.named_parameters())
    assert RewardModel(tiny_model).loglik_scale is None  # the default reads the last token only
