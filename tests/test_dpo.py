"""DPO and relatives (hand-computed per loss type, gradients, errors) and sequence log-probs."""
import copy
import math

import pytest
import torch
import torch.nn as nn

from minillm.align.dpo import DPO_LOSS_TYPES, dpo_loss, dpo_metrics, orpo_loss, simpo_loss
from minillm.align.logprobs import sequence_logprobs, token_logprobs


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def t(*xs, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(xs, dtype=dtype)


# A 2-pair batch: h = (pc - pr) - (rc - rr) = (2 - 0.5, -2 + 0.5) = (1.5, -1.5)
PC, PR, RC, RR = t(-5.0, -8.0), t(-7.0, -6.0), t(-6.0, -7.0), t(-6.5, -6.5)
H = (1.5, -1.5)


# ----------------------------------------------------------------------------- dpo_loss
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_loss_is_ln2_when_policy_equals_reference(eps):
    logps = t(-3.0, -10.0, -0.5)
    for loss_type in ("sigmoid", "robust"):
        losses, r_w, r_l = dpo_loss(logps, logps - 1, logps, logps - 1, loss_type=loss_type, label_smoothing=eps)
        torch.testing.assert_close(losses, torch.full_like(logps, math.log(2.0)))
        assert torch.all(r_w == 0) and torch.all(r_l == 0)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_sigmoid_by_hand(beta):
    losses, r_w, r_l = dpo_loss(PC, PR, RC, RR, beta=beta)
    expected = [-log_sigmoid(beta * h) for h in H]
    torch.testing.assert_close(losses, t(*expected))
    torch.testing.assert_close(r_w, t(beta * (-5 + 6), beta * (-8 + 7)))
    torch.testing.assert_close(r_l, t(beta * (-7 + 6.5), beta * (-6 + 6.5)))


def test_cdpo_label_smoothing_by_hand():
    eps, beta = 0.2, 0.1
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=beta, label_smoothing=eps)
    expected = [-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h) for h in H]
    torch.testing.assert_close(losses, t(*expected))


def test_robust_by_hand():
    eps, beta = 0.2, 0.1
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="robust", label_smoothing=eps)
    expected = [(-(1 - eps) * log_sigmoid(beta * h) + eps * log_sigmoid(-beta * h)) / (1 - 2 * eps) for h in H]
    torch.testing.assert_close(losses, t(*expected))


def test_hinge_by_hand():
    beta = 0.5  # beta * h = 0.75, -0.75: both inside the hinge
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="hinge")
    torch.testing.assert_close(losses, t(1 - 0.75, 1 + 0.75))
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=1.0, loss_type="hinge")  # 1 - 1.5 < 0 -> 0
    torch.testing.assert_close(losses, t(0.0, 2.5))


def test_ipo_by_hand():
    beta = 0.25  # target margin 1 / (2 beta) = 2
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="ipo")
    torch.testing.assert_close(losses, t((1.5 - 2) ** 2, (-1.5 - 2) ** 2))


def test_reference_free_by_hand():
    beta = 0.1  # h = pc - pr = (2, -2)
    losses, r_w, r_l = dpo_loss(PC, PR, RC, RR, beta=beta, reference_free=True)
    torch.testing.assert_close(losses, t(-log_sigmoid(0.2), -log_sigmoid(-0.2)))
    torch.testing.assert_close(r_w, beta * (PC - RC))  # rewards still use the reference given (as TRL)
    losses_none, r_w_none, _ = dpo_loss(PC, PR, None, None, beta=beta, reference_free=True)
    torch.testing.assert_close(losses_none, losses)
    torch.testing.assert_close(r_w_none, beta * PC)


def test_default_beta_is_0_1():
    torch.testing.assert_close(dpo_loss(PC, PR, RC, RR)[0], dpo_loss(PC, PR, RC, RR, beta=0.1)[0])
    assert not torch.allclose(dpo_loss(PC, PR, RC, RR)[0], dpo_loss(PC, PR, RC, RR, beta=0.5)[0])


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.2), ("hinge", 0.0),
                                           ("ipo", 0.0)])
def test_gradient_raises_chosen_and_lowers_rejected(loss_type, eps):
    pc, pr = PC.clone().requires_grad_(True), PR.clone().requires_grad_(True)
    losses, _, _ = dpo_loss(pc, pr, RC, RR, beta=0.1, loss_type=loss_type, label_smoothing=eps)
    losses.sum().backward()
    assert torch.all(pc.grad < 0), pc.grad
    assert torch.all(pr.grad > 0), pr.grad


def test_rewards_are_detached():
    pc = PC.clone().requires_grad_(True)
    losses, r_w, r_l = dpo_loss(pc, PR, RC, RR)
    assert losses.requires_grad and not r_w.requires_grad and not r_l.requires_grad


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.1), ("hinge", 0.0),
                                           ("ipo", 0.0)])
def test_gradcheck_float64(loss_type, eps):
    g = torch.Generator().manual_seed(0)
    logps = [-10 * torch.rand(4, generator=g, dtype=torch.float64) for _ in range(4)]
    inputs = tuple(x.requires_grad_(True) for x in logps)
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: dpo_loss(a, b, c, d, beta=0.3, loss_type=loss_type, label_smoothing=eps)[0], inputs
    )


def test_bad_inputs():
    for eps in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError, match="label_smoothing"):
            dpo_loss(PC, PR, RC, RR, label_smoothing=eps)
    for beta in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            dpo_loss(PC, PR, RC, RR, beta=beta)
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge, robust"):
        dpo_loss(PC, PR, RC, RR, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="reference_free"):
        dpo_loss(PC, PR, None, None)
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(PC, PR, RC, t(-1.0, -2.0, -3.0))
    with pytest.raises(ValueError, match="1-D"):
        dpo_loss(PC[:, None], PR[:, None], RC[:, None], RR[:, None])
    with pytest.raises(TypeError, match="policy_chosen_logps"):
        dpo_loss(torch.tensor([1, 2]), PR, RC, RR)
    assert set(DPO_LOSS_TYPES) == {"sigmoid", "ipo", "hinge", "robust"}


def test_metrics_by_hand():
    r_w, r_l = t(0.1, 0.2, 0.3), t(0.0, 0.2, 0.5)  # the tie in the middle counts as wrong
    m = dpo_metrics(r_w, r_l, t(-1.0, -2.0, -3.0), t(-4.0, -5.0, -9.0))
    assert m["rewards/chosen"] == pytest.approx(0.2)
    assert m["rewards/rejected"] == pytest.approx(0.7 / 3)
    assert m["rewards/accuracies"] == pytest.approx(1 / 3)
    assert m["rewards/margins"] == pytest.approx((0.1 + 0.0 - 0.2) / 3)
    assert m["logps/chosen"] == pytest.approx(-2.0)
    assert m["logps/rejected"] == pytest.approx(-6.0)


# ----------------------------------------------------------------------------- SimPO, ORPO
def test_simpo_by_hand():
    avg_c, avg_r = t(-1.0, -2.0), t(-1.5, -1.0)
    losses, r_w, r_l = simpo_loss(avg_c, avg_r, beta=2.0, gamma=0.5)  # z = 2 * 0.5 - 0.5, 2 * (-1) - 0.5
    torch.testing.assert_close(losses, t(-log_sigmoid(0.5), -log_sigmoid(-2.5)))
    torch.testing.assert_close(r_w, 2.0 * avg_c)
    torch.testing.assert_close(r_l, 2.0 * avg_r)
    losses, _, _ = simpo_loss(avg_c, avg_r)  # TRL defaults beta 0.1, gamma 0.5
    torch.testing.assert_close(losses, t(-log_sigmoid(0.05 - 0.5), -log_sigmoid(-0.1 - 0.5)))
    eps = 0.1
    losses, _, _ = simpo_loss(avg_c, avg_r, beta=2.0, label_smoothing=eps)
    expected = [-(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z) for z in (0.5, -2.5)]
    torch.testing.assert_close(losses, t(*expected))


def test_orpo_by_hand():
    avg_c, avg_r, beta = t(-0.5, -2.0), t(-1.0, -0.3), 0.1
    nll = t(0.5, 2.0)
    expected = []
    for lc, lr, n in zip((-0.5, -2.0), (-1.0, -0.3), (0.5, 2.0)):
        log_odds = (lc - lr) - (math.log(1 - math.exp(lc)) - math.log(1 - math.exp(lr)))
        expected.append(n - beta * log_sigmoid(log_odds))
    losses, r_w, _ = orpo_loss(avg_c, avg_r, nll, beta=beta)
    torch.testing.assert_close(losses, t(*expected))
    torch.testing.assert_close(r_w, beta * avg_c)
    scalar, _, _ = orpo_loss(avg_c, avg_r, nll.mean(), beta=beta)  # TRL passes one batch-mean NLL
    torch.testing.assert_close(scalar - nll.mean(), losses - nll)


def test_orpo_accurate_near_probability_one():
    # log(1 - e^l) for l = -1e-6 in float32: log1p(-exp(l)) loses digits, log(-expm1(l)) does not
    avg_c, avg_r = torch.tensor([-1e-6]), torch.tensor([-2.0])
    losses, _, _ = orpo_loss(avg_c, avg_r, torch.tensor(0.0), beta=1.0)
    log_odds = (-1e-6 + 2.0) - (math.log(-math.expm1(-1e-6)) - math.log(-math.expm1(-2.0)))
    assert losses.item() == pytest.approx(-log_sigmoid(log_odds), rel=1e-5)


def test_simpo_orpo_bad_inputs():
    with pytest.raises(ValueError, match="beta"):
        simpo_loss(t(-1.0), t(-2.0), beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        simpo_loss(t(-1.0), t(-2.0), label_smoothing=0.5)
    with pytest.raises(ValueError, match="< 0"):
        orpo_loss(t(0.0), t(-2.0), t(1.0))
    with pytest.raises(ValueError, match="chosen_nll"):
        orpo_loss(t(-1.0, -1.0), t(-2.0, -2.0), t(1.0, 1.0, 1.0))


# ----------------------------------------------------------------------------- log-probs
P = [[0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [1 / 3, 1 / 3, 1 / 3]]  # P[a][b] = p(next = b | current = a)


class Bigram(nn.Module):
    """logits[b, t] = log P[x_t]: p(x_{t+1} | x_<=t) = P[x_t][x_{t+1}], so every answer is a hand product."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.tensor(P, dtype=torch.float64).log())
        self.seen: dict = {}

    def forward(self, idx, attention_mask=None, position_ids=None):
        self.seen = {"attention_mask": attention_mask, "position_ids": position_ids}
        return self.table[idx]  # (B, T, V)


def test_sequence_logprobs_by_hand():
    model = Bigram()
    ids = torch.tensor([[0, 1, 2, 2], [2, 0, 1, 0]])
    loss_mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])  # row 1: the last token is padding...
    attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])  # ...which attention_mask excludes
    logps = sequence_logprobs(model, ids, loss_mask, attention_mask)
    row0 = math.log(P[1][2]) + math.log(P[2][2])
    row1 = math.log(P[2][0]) + math.log(P[0][1])
    torch.testing.assert_close(logps, t(row0, row1))
    avg = sequence_logprobs(model, ids, loss_mask, attention_mask, average=True)
    torch.testing.assert_close(avg, t(row0 / 2, row1 / 2))
    no_attn = sequence_logprobs(model, ids, loss_mask)  # without attention_mask the pad token is scored
    torch.testing.assert_close(no_attn, t(row0, row1 + math.log(P[1][0])))


def test_sequence_logprobs_ignores_first_column_and_passes_positions():
    model = Bigram()
    ids = torch.tensor([[1, 1, 0, 2]])
    logps = sequence_logprobs(model, ids, torch.tensor([[1, 0, 0, 1]]), torch.tensor([[0, 1, 1, 1]]))
    torch.testing.assert_close(logps, t(math.log(P[0][2])))
    assert torch.equal(model.seen["position_ids"], torch.tensor([[0, 0, 1, 2]]))  # left pad: start at 0


def test_token_logprobs_matches_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, ids), ref)
    assert token_logprobs(logits.to(torch.bfloat16), ids).dtype == torch.float32


def test_sequence_logprobs_gradcheck():
    ids = torch.tensor([[0, 1, 2, 2, 0]])
    mask = torch.tensor([[0, 1, 1, 0, 1]])
    table = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: sequence_logprobs(_FixedTable(w), ids, mask), (table,))


class _FixedTable(nn.Module):
    """logits = table[idx] for a table that is a function input (for gradcheck)."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, idx, attention_mask=None, position_ids=None):
        return self.table[idx]


def test_sequence_logprobs_errors():
    model = Bigram()
    ids = torch.tensor([[0, 1, 2], [2, 0, 1]])
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        sequence_logprobs(model, ids, torch.tensor([[0, 1, 1], [1, 0, 0]]))
    with pytest.raises(ValueError, match="loss_mask shape"):
        sequence_logprobs(model, ids, torch.ones(2, 4))
    with pytest.raises(ValueError, match="attention_mask shape"):
        sequence_logprobs(model, ids, torch.ones(2, 3), torch.ones(1, 3))


def test_gpt_logprobs_same_with_left_right_or_no_padding(tiny_model):
    torch.manual_seed(0)
    seqs = [torch.randint(1, 97, (7,)), torch.randint(1, 97, (4,))]
    masks = [torch.tensor([0, 0, 0, 1, 1, 1, 1]), torch.tensor([0, 0, 1, 1])]
    alone = torch.cat([sequence_logprobs(tiny_model, s[None], m[None]) for s, m in zip(seqs, masks)])
    T = 7
    right = torch.zeros(2, T, dtype=torch.long)
    left = torch.zeros(2, T, dtype=torch.long)
    lm_r, lm_l, am_r, am_l = (torch.zeros(2, T, dtype=torch.long) for _ in range(4))
    for i, (s, m) in enumerate(zip(seqs, masks)):
        n = len(s)
        right[i, :n], lm_r[i, :n], am_r[i, :n] = s, m, 1
        left[i, T - n:], lm_l[i, T - n:], am_l[i, T - n:] = s, m, 1
    with torch.no_grad():
        torch.testing.assert_close(sequence_logprobs(tiny_model, right, lm_r, am_r), alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(sequence_logprobs(tiny_model, left, lm_l, am_l), alone, atol=1e-5, rtol=0)


def test_dpo_on_tiny_gpt_starts_at_ln2_and_learns(tiny_model):
    """End to end: policy = copy of the reference gives ln 2; a few Adam steps raise the chosen margin."""
    torch.manual_seed(0)
    policy, ref = copy.deepcopy(tiny_model).train(), tiny_model.eval()
    prompt = torch.randint(1, 97, (2, 4))
    chosen, rejected = torch.randint(1, 97, (2, 5)), torch.randint(1, 97, (2, 5))
    ids = torch.cat([torch.cat([prompt, chosen], 1), torch.cat([prompt, rejected], 1)])  # (2B, T): [chosen; rejected]
    loss_mask = torch.cat([torch.zeros(4, 4), torch.ones(4, 5)], 1)
    with torch.no_grad():
        ref_logps = sequence_logprobs(ref, ids, loss_mask)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    history = []
    for _ in range(5):
        logps = sequence_logprobs(policy, ids, loss_mask)
        losses, r_w, r_l = dpo_loss(logps[:2], logps[2:], ref_logps[:2], ref_logps[2:], beta=0.5)
        history.append(losses.mean().item())
        opt.zero_grad()
        losses.mean().backward()
        opt.step()
    assert history[0] == pytest.approx(math.log(2.0), abs=1e-6)
    assert history[-1] < history[0] - 0.05
    assert dpo_metrics(r_w, r_l, logps[:2], logps[2:])["rewards/margins"] > 0
