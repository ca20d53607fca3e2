"""PPO and GRPO math by hand: masked reductions, entropy, KL estimators, rewards, GAE, the clipped losses,
the KL controllers, group advantages, a toy bandit, and the argument checks."""
import math

import pytest
import torch

from minillm.align.grpo import (
    GRPO_LOSS_TYPES,
    group_advantages,
    grpo_loss,
    policy_gradient_loss,
)
from minillm.align.ppo import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_per_token,
    masked_mean,
    masked_normalize,
    masked_sum,
    masked_whiten,
    per_token_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    token_entropy,
)

F64 = torch.float64


def t(*rows, dtype=F64) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype)


# Three rows of different lengths: a prompt token in front, padding behind, one full row.
MASK = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]])


def manual_masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x[mask.bool()].mean()


def random_batch(seed: int, shape=(3, 5)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=F64) for _ in range(4)]


# ----------------------------------------------------------------------------- masked reductions
def test_masked_sum_mean_normalize_by_hand():
    x = t([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    m = torch.tensor([[1, 0, 1], [0, 0, 1]])
    assert masked_sum(x, m).item() == 1 + 3 + 6
    assert masked_mean(x, m).item() == pytest.approx(10 / 3)
    torch.testing.assert_close(masked_sum(x, m, dim=1), t(4.0, 6.0))
    torch.testing.assert_close(masked_mean(x, m, dim=1), t(2.0, 6.0))
    torch.testing.assert_close(masked_mean(x, m, dim=0), t(1.0, float("nan"), 4.5), equal_nan=True)  # 0/0
    assert masked_normalize(x, m, 4.0).item() == pytest.approx(10 / 4)
    torch.testing.assert_close(masked_normalize(x, m, 2.0, dim=1), t(2.0, 3.0))
    # padding holding inf or nan cannot leak in: positions are selected away, not multiplied by 0
    x_bad = x.clone()
    x_bad[0, 1], x_bad[1, 0] = float("inf"), float("nan")
    assert masked_sum(x_bad, m).item() == 10
    assert masked_mean(x_bad, m.bool()).item() == pytest.approx(10 / 3)


def test_masked_whiten_ignores_padding_and_matches_manual_bessel():
    g = torch.Generator().manual_seed(0)
    x = 3 + 2 * torch.randn(3, 5, generator=g, dtype=F64)
    valid = x[MASK.bool()]  # the 9 response values
    mean, var = valid.mean(), valid.var(unbiased=True)
    assert var.item() != pytest.approx(valid.var(unbiased=False).item())  # the test can tell Bessel apart
    out = masked_whiten(x, MASK)
    torch.testing.assert_close(out[MASK.bool()], (valid - mean) / torch.sqrt(var + 1e-8))
    assert torch.all(out[~MASK.bool()] == 0)  # documented: masked-out entries are 0
    assert out[MASK.bool()].mean().abs().item() < 1e-12
    assert out[MASK.bool()].std().item() == pytest.approx(1.0, abs=1e-6)
    out_keep = masked_whiten(x, MASK, shift_mean=False)
    torch.testing.assert_close(out_keep[MASK.bool()], (valid - mean) / torch.sqrt(var + 1e-8) + mean)

    x_other_padding = x.clone()
    x_other_padding[~MASK.bool()] = torch.tensor([1e6, -7.0, 0.0, 1e6, 42.0, -1e3], dtype=F64)
    torch.testing.assert_close(masked_whiten(x_other_padding, MASK), out, rtol=0, atol=0)
    torch.testing.assert_close(masked_whiten(x, MASK.to(F64)), out, rtol=0, atol=0)  # float 0/1 mask works too


# ----------------------------------------------------------------------------- entropy and KL
def test_token_entropy_matches_categorical_and_is_finite_for_huge_logits():
    g = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(2, 4, 7, generator=g, dtype=F64)
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(token_entropy(logits), expected)
    assert token_entropy(logits).shape == (2, 4)

    huge = torch.tensor([[[1e30, 0.0, -1e30], [1e4, 1e4, 0.0]]])  # float32: softmax by hand would overflow
    h = token_entropy(huge)
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h, torch.tensor([[0.0, math.log(2.0)]]))
    banned = torch.tensor([[[0.0, 0.0, float("-inf")]]], requires_grad=True)  # a -inf logit: p = 0
    h = token_entropy(banned)
    h.sum().backward()
    assert h.item() == pytest.approx(math.log(2.0)) and torch.isfinite(banned.grad).all()


def test_k2_and_k1_by_hand():
    logp, ref = t(-1.0, -2.0), t(-1.5, -1.0)
    torch.testing.assert_close(kl_per_token(logp, ref, "k1"), t(0.5, -1.0))  # k1 = logp - ref, can be < 0
    torch.testing.assert_close(kl_per_token(logp, ref, "k2"), t(0.5 * 0.25, 0.5 * 1.0))
    torch.testing.assert_close(kl_per_token(logp, ref, "k3"), t(math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0))


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_k1_and_k3_are_unbiased_by_monte_carlo(estimator):
    q = t(0.5, 0.2, 0.15, 0.1, 0.05)  # pi_theta: the samples come from here
    p = t(0.1, 0.3, 0.2, 0.2, 0.2)    # pi_ref
    exact = (q * (q / p).log()).sum()
    g = torch.Generator().manual_seed(2)
    x = torch.multinomial(q, 200_000, replacement=True, generator=g)
    k = kl_per_token(q.log()[x], p.log()[x], estimator)
    stderr = k.std() / math.sqrt(k.numel())
    assert abs(k.mean() - exact) < 4 * stderr, (k.mean().item(), exact.item(), stderr.item())
    if estimator == "k3":
        assert (k >= 0).all()
    else:
        assert (k < 0).any()  # k1 is unbiased but single samples can be negative
    # k2 is biased: its mean is visibly off at this sample size
    k2 = kl_per_token(q.log()[x], p.log()[x], "k2")
    assert abs(k2.mean() - exact) > 10 * k2.std() / math.sqrt(k2.numel())


def test_k3_is_nonnegative_everywhere():
    d = torch.linspace(-20, 20, 401, dtype=F64)
    assert (kl_per_token(torch.zeros_like(d), d, "k3") >= 0).all()


# ----------------------------------------------------------------------------- rewards and GAE
def test_scores_land_on_each_rows_last_response_token():
    logp = t([-1.0, -1.0, -2.0, -3.0, -1.0], [-1.0, -1.0, -1.0, -1.0, -0.5], [-9.0, -9.0, -4.0, -9.0, -9.0])
    ref = t([-5.0, -1.5, -1.0, -3.0, -7.0], [-1.0, -2.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -4.5, -1.0, -1.0])
    scores = t(1.0, 2.0, 3.0)
    rewards, kl = per_token_rewards(scores, logp, ref, MASK, kl_coef=0.1)
    # k1 = logp - ref on response tokens: row 0 (0.5, -1, 0), row 1 (0, 1, 0, 0, 0.5), row 2 (0.5)
    torch.testing.assert_close(kl, t([0, 0.5, -1.0, 0, 0], [0, 1.0, 0, 0, 0.5], [0, 0, 0.5, 0, 0]))
    torch.testing.assert_close(rewards, t([0, -0.05, 0.1, 1.0, 0],           # score at index 3
                                          [0, -0.1, 0, 0, -0.05 + 2.0],       # score at index 4
                                          [0, 0, -0.05 + 3.0, 0, 0]))         # score at index 2


def test_per_token_rewards_k3_and_no_gradient():
    logp = torch.tensor([[-1.0, -2.0]], dtype=F64, requires_grad=True)
    ref = t([-1.5, -1.0])
    rewards, kl = per_token_rewards(t(0.0), logp, ref, torch.ones(1, 2), kl_coef=0.5, estimator="k3")
    torch.testing.assert_close(kl, t([math.exp(-0.5) - 0.5, math.exp(1.0) - 2.0]))
    torch.testing.assert_close(rewards, -0.5 * kl)
    assert not rewards.requires_grad and not kl.requires_grad


# rewards and values at mask-0 positions are garbage (9) to show they are never read
GAE_R = t([9.0, 0.0, 0.5, 1.0, 9.0], [-0.1, 2.0, 9.0, 9.0, 9.0])
GAE_V = t([9.0, 0.2, 0.4, 0.6, 9.0], [0.5, 1.0, 9.0, 9.0, 9.0])
GAE_M = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]])


def test_gae_by_hand():
    # gamma = 0.9, lam = 0.5, gamma * lam = 0.45
    # row 0 (positions 1..3): t=3: delta = 1.0 + 0 - 0.6 = 0.4                A = 0.4
    #                         t=2: delta = 0.5 + 0.9*0.6 - 0.4 = 0.64         A = 0.64 + 0.45*0.4  = 0.82
    #                         t=1: delta = 0.0 + 0.9*0.4 - 0.2 = 0.16         A = 0.16 + 0.45*0.82 = 0.529
    # row 1 (positions 0..1): t=1: delta = 2.0 + 0 - 1.0 = 1.0                A = 1.0
    #                         t=0: delta = -0.1 + 0.9*1.0 - 0.5 = 0.3         A = 0.3 + 0.45*1.0   = 0.75
    adv, ret = gae(GAE_R, GAE_V, GAE_M, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, t([0, 0.529, 0.82, 0.4, 0], [0.75, 1.0, 0, 0, 0]))
    torch.testing.assert_close(ret, t([0, 0.729, 1.22, 1.0, 0], [1.25, 2.0, 0, 0, 0]))  # A + V


def gae_limits_reference(r, v, mask, gamma, lam):
    """lam = 0: one-step TD error; lam = 1: discounted Monte-Carlo return minus V (per row, response only)."""
    adv = torch.zeros_like(r)
    for b in range(r.shape[0]):
        idx = torch.nonzero(mask[b]).flatten().tolist()
        for j, i in enumerate(idx):
            if lam == 0:
                next_v = v[b, idx[j + 1]] if j + 1 < len(idx) else 0.0
                adv[b, i] = r[b, i] + gamma * next_v - v[b, i]
            else:
                adv[b, i] = sum(gamma ** k * r[b, i2] for k, i2 in enumerate(idx[j:])) - v[b, i]
    return adv


@pytest.mark.parametrize("lam", [0.0, 1.0])
@pytest.mark.parametrize("gamma", [1.0, 0.8])
def test_gae_lambda_limits_with_ragged_rows(lam, gamma):
    r, v, _, _ = random_batch(3)
    adv, ret = gae(r, v, MASK, gamma=gamma, lam=lam)
    expected = gae_limits_reference(r, v, MASK, gamma, lam)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, torch.where(MASK.bool(), expected + v, 0.0))


def test_gae_has_no_gradient():
    v = GAE_V.clone().requires_grad_(True)
    adv, ret = gae(GAE_R, v, GAE_M)
    assert not adv.requires_grad and not ret.requires_grad


# ----------------------------------------------------------------------------- PPO losses
def test_first_update_clipped_loss_is_the_policy_gradient_loss():
    logits, adv, _, _ = random_batch(4)
    logp = torch.log_softmax(logits, dim=-1).requires_grad_(True)  # any log-probs
    loss, stats = ppo_policy_loss(logp, logp.detach(), adv, MASK)
    torch.testing.assert_close(loss, manual_masked_mean(-adv, MASK))  # rho = 1
    (grad_ppo,) = torch.autograd.grad(loss, logp)
    pg = policy_gradient_loss(logp, adv, MASK)
    (grad_pg,) = torch.autograd.grad(pg, logp)
    torch.testing.assert_close(grad_ppo, grad_pg)
    torch.testing.assert_close(grad_pg, torch.where(MASK.bool(), -adv / MASK.sum(), 0.0))
    assert stats["clipfrac"].item() == 0 and stats["ratio_mean"].item() == 1 and stats["approx_kl"].item() == 0

    glo, gstats = grpo_loss(logp, logp.detach(), None, adv, MASK, loss_type="bnpo")
    torch.testing.assert_close(glo, loss)
    torch.testing.assert_close(torch.autograd.grad(glo, logp)[0], grad_pg)
    assert gstats["clip_ratio"].item() == 0 and "kl" not in gstats


# one token per case: (A, rho) with eps = 0.2
CLIP_CASES = [(1.0, 1.5), (-1.0, 0.5), (1.0, 0.5), (-1.0, 1.5), (2.0, 1.1), (-2.0, 0.9)]
BINDS = [True, True, False, False, False, False]


def clip_batch():
    adv = t(*[a for a, _ in CLIP_CASES]).unsqueeze(0)
    old = t(*[-1.0] * len(CLIP_CASES)).unsqueeze(0)
    logp = (old + t(*[math.log(r) for _, r in CLIP_CASES])).requires_grad_(True)
    return logp, old, adv, torch.ones_like(adv)


@pytest.mark.parametrize("which", ["ppo", "grpo"])
def test_clipped_loss_has_zero_gradient_exactly_where_the_clip_binds(which):
    logp, old, adv, mask = clip_batch()
    if which == "ppo":
        loss, stats = ppo_policy_loss(logp, old, adv, mask, cliprange=0.2)
        clipfrac = stats["clipfrac"]
    else:
        loss, stats = grpo_loss(logp, old, None, adv, mask, epsilon=0.2)
        clipfrac = stats["clip_ratio"]
    loss.backward()
    binds = torch.tensor(BINDS)
    assert torch.all(logp.grad[0, binds] == 0)
    assert torch.all(logp.grad[0, ~binds] != 0)
    # elsewhere the gradient is that of -A rho / n:  d/dlogp = -A rho / n
    rho = torch.exp(logp.detach() - old)
    torch.testing.assert_close(logp.grad[0, ~binds], (-adv * rho / 6)[0, ~binds])
    assert clipfrac.item() == pytest.approx(2 / 6)
    # by hand, max(-A rho, -A clip(rho)): -1.2 and 0.8 (clipped), then -A rho: -0.5, 1.5, -2.2, 1.8
    expected = (-1.2 + 0.8 - 0.5 + 1.5 - 2.2 + 1.8) / 6
    assert loss.item() == pytest.approx(expected)
    assert stats["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 0.5 + 1.5 + 1.1 + 0.9) / 6)


def test_ppo_policy_loss_stats_by_hand():
    logp, old, adv, mask = clip_batch()
    _, stats = ppo_policy_loss(logp, old, adv, mask)
    log_ratios = [math.log(r) for _, r in CLIP_CASES]
    assert stats["approx_kl"].item() == pytest.approx(0.5 * sum(x * x for x in log_ratios) / 6)
    assert not any(v.requires_grad for v in stats.values())


def test_grpo_asymmetric_clip():
    # rho = 1.25, A > 0: inside 1 + 0.28 (no clip) but outside 1 + 0.2
    logp = torch.tensor([[math.log(1.25)]], dtype=F64, requires_grad=True)
    old, adv, mask = t([0.0]), t(1.0), torch.ones(1, 1)
    loss, stats = grpo_loss(logp, old, None, adv, mask, epsilon=0.2, epsilon_high=0.28)
    assert loss.item() == pytest.approx(-1.25) and stats["clip_ratio"].item() == 0
    loss, stats = grpo_loss(logp, old, None, adv, mask, epsilon=0.2)
    assert loss.item() == pytest.approx(-1.2) and stats["clip_ratio_high"].item() == 1


def test_ppo_value_loss_by_hand():
    # c = 0.2; tokens: (V, V_old, R)
    #   (1.0, 0.9, 2.0): V inside the band, V_clip = V           -> 1/2 (1.0)^2 = 0.5
    #   (1.5, 1.0, 2.0): V_clip = 1.2, (1.2-2)^2 = 0.64 > 0.25     -> 1/2 0.64 = 0.32  (clip binds)
    #   (1.5, 1.0, 0.0): V_clip = 1.2, 1.44 < 2.25                 -> 1/2 2.25 = 1.125
    #   (padding)                                                   ignored
    values = torch.tensor([[1.0, 1.5, 1.5, 7.0]], dtype=F64, requires_grad=True)
    old, ret, mask = t([0.9, 1.0, 1.0, 0.0]), t([2.0, 2.0, 0.0, 0.0]), torch.tensor([[1, 1, 1, 0]])
    loss, stats = ppo_value_loss(values, old, ret, mask, cliprange_value=0.2)
    assert loss.item() == pytest.approx((0.5 + 0.32 + 1.125) / 3)
    assert stats["vf_clipfrac"].item() == pytest.approx(1 / 3)
    loss.backward()
    # d/dV: (V - R)/3 where unclipped wins, 0 where the clipped error wins (V_clip is flat outside the band)
    torch.testing.assert_close(values.grad, t([(1.0 - 2.0) / 3, 0.0, 1.5 / 3, 0.0]))


# ----------------------------------------------------------------------------- reductions
def losses_with_none(seed: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, mean-reduced loss, per-token 'none' loss) for every loss."""
    logp, old, ref, adv_bt = random_batch(seed)
    old = logp + 0.3 * old  # ratios away from 1 so some clip
    adv_b = adv_bt[:, 0]
    both = ("mean", "none")
    out = [
        ("ppo", *(ppo_policy_loss(logp, old, adv_bt, MASK, reduction=r)[0] for r in both)),
        ("value", *(ppo_value_loss(logp, old, ref, MASK, reduction=r)[0] for r in both)),
        ("pg", *(policy_gradient_loss(logp, adv_b, MASK, reduction=r) for r in both)),
    ]
    for lt in GRPO_LOSS_TYPES:
        out.append((f"grpo-{lt}", *(grpo_loss(logp, old, ref, adv_b, MASK, beta=0.04, loss_type=lt, reduction=r)[0]
                                    for r in both)))
    return out


def test_reduction_none_is_per_token_and_mean_is_its_masked_aggregate():
    for name, mean, none in losses_with_none(5):
        assert none.shape == MASK.shape, name
        assert mean.dim() == 0, name
        m = MASK.bool()
        if name == "grpo-grpo":
            expected = torch.stack([none[b][m[b]].mean() for b in range(3)]).mean()
        elif name == "grpo-dr_grpo":
            expected = none[m].sum() / (3 * 5)
        else:  # ppo, value, pg, bnpo, dapo: token mean over the batch
            expected = none[m].mean()
        torch.testing.assert_close(mean, expected, msg=name)


# ----------------------------------------------------------------------------- GRPO by hand
def test_grpo_loss_types_by_hand():
    # rho = 1 and beta = 0, so l = -A on every token; A = (1, 2)
    # row 0 has 2 response tokens (l = -1, -1), row 1 has 1 (l = -2); T = 3
    logp = t([-1.0, -2.0, -3.0], [-1.0, -2.0, -3.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = t(1.0, 2.0)
    expected = {
        "grpo": ((-1 - 1) / 2 + (-2) / 1) / 2,  # per-sequence means -1, -2 -> -1.5
        "bnpo": (-1 - 1 - 2) / 3,               # -4/3
        "dr_grpo": (-1 - 1 - 2) / (2 * 3),      # B * T = 6 -> -2/3
        "dapo": (-1 - 1 - 2) / 3,               # = bnpo on one process
    }
    for loss_type, value in expected.items():
        loss, _ = grpo_loss(logp, logp, None, adv, mask, loss_type=loss_type)
        assert loss.item() == pytest.approx(value), loss_type
    loss, _ = grpo_loss(logp, logp, None, adv, mask, loss_type="dr_grpo", max_completion_length=4)
    assert loss.item() == pytest.approx(-4 / (2 * 4))


def test_grpo_per_token_clip_and_kl_by_hand():
    # token 0: rho = 1.5, A = 1   -> -min(1.5, 1.2) = -1.2
    # token 1: rho = 0.5, A = -1  -> -min(-0.5, -0.8) = 0.8
    # KL: ref - logp = log 2 on token 0 -> 2 - log 2 - 1;  = 0 on token 1;  beta = 0.1
    logp = t([math.log(1.5) - 1.0, math.log(0.5) - 1.0])
    old = t([-1.0, -1.0])
    ref = torch.stack([logp[0, 0] + math.log(2.0), logp[0, 1]]).unsqueeze(0)
    adv = t([1.0, -1.0])  # (B, T) advantages are accepted as well
    kl0 = 2.0 - math.log(2.0) - 1.0
    none, stats = grpo_loss(logp, old, ref, adv, torch.ones(1, 2), beta=0.1, reduction="none")
    torch.testing.assert_close(none, t([-1.2 + 0.1 * kl0, 0.8]))
    assert stats["kl"].item() == pytest.approx(kl0 / 2)
    assert stats["clip_ratio"].item() == 1.0


def test_group_advantages_by_hand():
    r = t(1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0)
    # group 0: mean 0.5, Bessel std = sqrt(4 * 0.25 / 3) = sqrt(1/3); group 1: all equal -> A = 0
    s = math.sqrt(1 / 3)
    expected_group = t(*[x / (s + 1e-4) for x in (0.5, -0.5, -0.5, 0.5)], 0.0, 0.0, 0.0, 0.0)
    torch.testing.assert_close(group_advantages(r, 4), expected_group)
    # batch: same centring, divided by the batch std (mean 1.25, sum sq dev = 3*0.0625+ ... by hand)
    sq = sum((x - 1.25) ** 2 for x in (1, 0, 0, 1, 2, 2, 2, 2))  # = 5.5
    sb = math.sqrt(sq / 7)
    expected_batch = t(*[x / (sb + 1e-4) for x in (0.5, -0.5, -0.5, 0.5)], 0.0, 0.0, 0.0, 0.0)
    torch.testing.assert_close(group_advantages(r, 4, scale="batch"), expected_batch)
    torch.testing.assert_close(group_advantages(r, 4, scale="none"), t(0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0))
    # groups of 2: (1, 0) (0, 1) (2, 2) (2, 2); std of (1, 0) with Bessel = sqrt(0.5)
    s2 = math.sqrt(0.5)
    a = 0.5 / (s2 + 1e-4)
    torch.testing.assert_close(group_advantages(r, 2), t(a, -a, -a, a, 0, 0, 0, 0))


# ----------------------------------------------------------------------------- KL controllers
def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10_000)
    ctl.update(current_kl=6.6, n_steps=100)  # e = 0.1 (inside the clip)
    assert ctl.value == pytest.approx(0.2 * (1 + 0.1 * 100 / 10_000))
    v = ctl.value
    ctl.update(current_kl=60.0, n_steps=128)  # e = 9 -> clipped to 0.2
    assert ctl.value == pytest.approx(v * (1 + 0.2 * 128 / 10_000))
    v = ctl.value
    ctl.update(current_kl=0.0, n_steps=256)  # e = -1 -> clipped to -0.2
    assert ctl.value == pytest.approx(v * (1 - 0.2 * 256 / 10_000))
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 128)
    assert fixed.value == 0.05


# ----------------------------------------------------------------------------- gradcheck
def test_gradcheck_ppo_policy_value_and_grpo():
    # log-ratios chosen away from the clip boundaries log(0.8), log(1.2) and from each other's ties
    old = t([-1.0, -2.0, -0.5, -1.5], [-0.7, -1.2, -2.2, -0.3])
    shift = t([0.05, -0.1, 0.5, -0.6], [0.1, 0.4, -0.4, 0.0])
    logp = (old + shift).requires_grad_(True)
    adv = t([1.0, -0.5, 2.0, -1.5], [-1.0, 0.7, -0.3, 1.2])
    ref = old - 0.3
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert torch.autograd.gradcheck(lambda lp: ppo_policy_loss(lp, old, adv, mask)[0], (logp,))
    assert torch.autograd.gradcheck(lambda lp: ppo_policy_loss(lp, old, adv, mask, reduction="none")[0], (logp,))
    for loss_type in GRPO_LOSS_TYPES:
        assert torch.autograd.gradcheck(
            lambda lp, lt=loss_type: grpo_loss(lp, old, ref, adv[:, 0], mask, beta=0.04, loss_type=lt)[0], (logp,))
    values = t([1.0, 1.5, 1.5, 0.0], [0.3, -0.2, 0.9, 2.0]).requires_grad_(True)
    old_values = t([0.9, 1.0, 1.0, 0.0], [0.35, 0.3, 0.5, 2.1])
    returns = t([2.0, 2.0, 0.0, 0.0], [1.0, 1.0, -1.0, 0.5])
    assert torch.autograd.gradcheck(lambda v: ppo_value_loss(v, old_values, returns, mask)[0], (values,))


# ----------------------------------------------------------------------------- toy bandit
def test_a_few_ppo_steps_on_a_bandit_raise_the_expected_reward():
    arm_rewards = torch.tensor([0.0, 1.0, 0.2, 0.5])
    theta = torch.zeros(4, requires_grad=True)  # softmax policy over 4 arms, starts uniform
    opt = torch.optim.Adam([theta], lr=0.05)
    g = torch.Generator().manual_seed(0)

    def expected_reward() -> float:
        return (torch.softmax(theta, 0) @ arm_rewards).item()

    start = expected_reward()  # 0.425
    for _ in range(20):
        with torch.no_grad():
            arms = torch.multinomial(torch.softmax(theta, 0), 64, replacement=True, generator=g)
            old = torch.log_softmax(theta, 0)[arms]
        r = arm_rewards[arms]
        adv = (r - r.mean()).unsqueeze(1)
        for _ in range(4):  # PPO epochs on the same samples: the clip keeps them honest
            logp = torch.log_softmax(theta, 0)[arms].unsqueeze(1)
            loss, _ = ppo_policy_loss(logp, old.unsqueeze(1), adv, torch.ones_like(adv))
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert start == pytest.approx(0.425)
    assert expected_reward() > 0.8
    assert torch.argmax(theta).item() == 1


# ----------------------------------------------------------------------------- argument checks
LP = torch.zeros(2, 3, dtype=F64)
M = torch.ones(2, 3)
BAD = [
    (lambda: ppo_policy_loss(LP, LP, LP, M, cliprange=0.0), "cliprange"),
    (lambda: ppo_policy_loss(LP, LP, LP, M, cliprange=1.0), "cliprange"),
    (lambda: ppo_policy_loss(LP, LP, LP, M, reduction="sum"), "reduction"),
    (lambda: ppo_policy_loss(LP, LP[:, :2], LP, M), "shape"),
    (lambda: ppo_policy_loss(LP, LP, LP[:, :2], M), "advantages"),
    (lambda: ppo_policy_loss(LP, LP, LP, M[:, :2]), "mask"),
    (lambda: ppo_policy_loss(LP, LP, LP, 2 * M), "mask"),
    (lambda: ppo_policy_loss(LP, LP, LP, 0 * M), "mask"),
    (lambda: ppo_value_loss(LP, LP, LP, M, cliprange_value=0.0), "cliprange_value"),
    (lambda: ppo_value_loss(LP, LP, LP, M, reduction="batchmean"), "reduction"),
    (lambda: kl_per_token(LP, LP, "k4"), "estimator"),
    (lambda: per_token_rewards(torch.zeros(2), LP, LP, M, kl_coef=-0.1), "kl_coef"),
    (lambda: per_token_rewards(torch.zeros(2), LP, LP, torch.tensor([[1, 1, 0], [0, 0, 0]]), 0.1), "no response"),
    (lambda: per_token_rewards(torch.zeros(3), LP, LP, M, 0.1), "scores"),
    (lambda: gae(LP, LP, M, gamma=1.5), "gamma"),
    (lambda: gae(LP, LP, M, lam=-0.1), "lam"),
    (lambda: gae(LP, LP[:1], M), "shape"),
    (lambda: masked_whiten(LP, torch.tensor([[1, 0, 0], [0, 0, 0]])), "at least 2"),
    (lambda: masked_normalize(LP, M, 0.0), "normalize_constant"),
    (lambda: AdaptiveKLController(-0.1, 6.0, 10_000), "init_kl_coef"),
    (lambda: AdaptiveKLController(0.2, 0.0, 10_000), "target"),
    (lambda: AdaptiveKLController(0.2, 6.0, 0), "horizon"),
    (lambda: FixedKLController(-1.0), "kl_coef"),
    (lambda: group_advantages(torch.zeros(8), 1), "group_size"),
    (lambda: group_advantages(torch.zeros(8), 3), "group_size"),
    (lambda: group_advantages(torch.zeros(8), 4, scale="std"), "scale"),
    (lambda: group_advantages(torch.zeros(2, 4), 4), "1-D"),
    (lambda: policy_gradient_loss(LP, torch.zeros(2), M, kind="ppo"), "kind"),
    (lambda: policy_gradient_loss(LP, torch.zeros(2), M, reduction="sum"), "reduction"),
    (lambda: grpo_loss(LP, LP, None, torch.zeros(2), M, loss_type="ppo"), "loss_type"),
    (lambda: grpo_loss(LP, LP, LP, torch.zeros(2), M, beta=-0.1), "beta"),
    (lambda: grpo_loss(LP, LP, None, torch.zeros(2), M, beta=0.04), "ref_logprobs"),
    (lambda: grpo_loss(LP, LP, None, torch.zeros(2), M, epsilon=1.0), "epsilon"),
    (lambda: grpo_loss(LP, LP, None, torch.zeros(2), M, epsilon_high=0.0), "epsilon_high"),
    (lambda: grpo_loss(LP, LP, None, torch.zeros(2), M, loss_type="dr_grpo", max_completion_length=0),
     "max_completion_length"),
    (lambda: grpo_loss(LP, LP, None, torch.zeros(2), M, reduction="sum"), "reduction"),
    (lambda: grpo_loss(LP, LP, None, torch.zeros(3), M), "advantages"),
]


@pytest.mark.parametrize("call,match", BAD, ids=[f"{i}-{m}" for i, (_, m) in enumerate(BAD)])
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
