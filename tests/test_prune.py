"""Pruning (minillm.quant.prune): magnitude / Wanda / N:M masks, structured removal, hard-concrete L0 gates."""

import copy
import math

import pytest
import torch

from minillm.model import GPT, GPTConfig
from minillm.quant import prune as P
from minillm.sampling import generate

C, H, D, HIDDEN = 32, 4, 8, 128  # the tiny model: n_embd, n_head, head_dim, MLP width
PER_HEAD = 3 * D * (C + 1) + C * D  # q, k, v rows (+ bias) of c_attn and the c_proj columns: 1048
PER_NEURON = (C + 1) + C  # a c_fc row (+ bias) and a c_proj column: 65


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=H, n_embd=C)).eval()


def batches(n: int = 2, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (3, 12), generator=g) for _ in range(n)]


def zero_heads_hook(attn, heads):
    """Independent reference: zero the chosen heads' slice of c_proj's input."""
    def hook(module, inputs):
        y = inputs[0].clone()
        for h in heads:
            y[..., h * D:(h + 1) * D] = 0
        return (y,)
    return attn.c_proj.register_forward_pre_hook(hook)


def zero_neurons_hook(mlp, neurons):
    def hook(module, inputs):
        y = inputs[0].clone()
        y[..., neurons] = 0
        return (y,)
    return mlp.c_proj.register_forward_pre_hook(hook)


# ================================================================================================ unstructured


@pytest.mark.parametrize("shape", [(7, 13), (5,), (3, 4, 5), (1, 1)])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.37, 0.5, 0.9, 0.99])
def test_magnitude_mask_exact_count_and_keeps_largest(shape, sparsity):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    mask = P.magnitude_mask(w, sparsity)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert int((~mask).sum()) == round(sparsity * w.numel())
    if mask.any() and (~mask).any():
        assert w.abs()[mask].min() >= w.abs()[~mask].max()


def test_magnitude_mask_by_hand_and_ties():
    w = torch.tensor([[0.5, -0.1], [0.3, -2.0]])
    assert P.magnitude_mask(w, 0.5).tolist() == [[True, False], [False, True]]
    # equal |w|: the earlier (row-major) index goes first
    assert P.magnitude_mask(torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0]), 0.4).tolist() == [False, False, True, True, True]
    assert P.magnitude_mask(w, 0.0).all()


def test_global_magnitude_exact_over_total():
    g = torch.Generator().manual_seed(0)
    weights = {"small": 0.01 * torch.randn(4, 8, generator=g), "big": torch.randn(3, 11, generator=g)}
    masks = P.global_magnitude_masks(weights, 0.5)
    total = 4 * 8 + 3 * 11
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.5 * total) == 32  # 32.5: half to even
    # one threshold: the 32 pruned are exactly the 32 small weights, the big matrix stays whole
    assert not masks["small"].any() and masks["big"].all()
    kept = torch.cat([w.abs()[m] for w, m in zip(weights.values(), masks.values())])
    pruned = torch.cat([w.abs()[~m] for w, m in zip(weights.values(), masks.values())])
    assert kept.min() >= pruned.max()
    for s in (0.13, 0.77):
        masks = P.global_magnitude_masks(weights, s)
        assert sum(int((~m).sum()) for m in masks.values()) == round(s * total)


def test_wanda_scores_by_hand_and_per_row_choice():
    w = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]])
    norms = torch.tensor([3.0, 1.0, 0.5])
    assert P.wanda_scores(w, norms).tolist() == [[3.0, 2.0, 1.5], [12.0, 5.0, 3.0]]
    # each row loses round(3 / 3) = 1 weight: the last column in both rows (score 1.5 and 3)
    assert P.wanda_mask(w, norms, 1 / 3).tolist() == [[True, True, False], [True, True, False]]
    # magnitude over the whole matrix removes the two smallest |w| instead: 1 and -2, both in row 0
    assert P.magnitude_mask(w, 1 / 3).tolist() == [[False, False, True], [True, True, True]]


def test_wanda_mask_per_row_counts_and_equal_norms_give_rowwise_magnitude():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(16, 37, generator=g)
    mask = P.wanda_mask(w, torch.rand(37, generator=g) * 3, 0.3)
    assert ((~mask).sum(dim=1) == round(0.3 * 37)).all()  # 11 in every row
    same = P.wanda_mask(w, torch.full((37,), 2.0), 0.3)
    for row, m in zip(w, same):
        assert torch.equal(m, P.magnitude_mask(row, 0.3))


def test_wanda_differs_from_magnitude_when_norms_differ():
    g = torch.Generator().manual_seed(6)
    w = (torch.rand(8, 16, generator=g) + 0.5) * torch.randn(8, 16, generator=g).sign()  # 0.5 <= |w| < 1.5
    norms = torch.ones(16)
    norms[:8] = 100.0  # the first half of the inputs are big: Wanda keeps exactly their weights
    wanda = P.wanda_mask(w, norms, 0.5)
    rowwise_magnitude = P.wanda_mask(w, torch.ones(16), 0.5)
    assert not torch.equal(wanda, rowwise_magnitude)
    assert wanda[:, :8].all() and not wanda[:, 8:].any()


def test_nm_mask_two_of_four():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(8, 16, generator=g)  # no zeros, no ties
    mask = P.nm_mask(w)
    groups = mask.view(8, 4, 4)
    assert (groups.sum(dim=-1) == 2).all()
    a = w.abs().view(8, 4, 4)
    kept_min = torch.where(groups, a, torch.inf).amin(-1)
    pruned_max = torch.where(groups, -torch.inf, a).amax(-1)
    assert (kept_min > pruned_max).all()
    assert P.nm_mask(torch.tensor([[0.1, -0.4, 0.3, 0.2]])).tolist() == [[False, True, True, False]]
    assert (P.nm_mask(w, n=1, m=8).view(8, 2, 8).sum(-1) == 1).all()


def test_nm_mask_with_scores_picks_highest_scores():
    w = torch.tensor([[0.1, -0.4, 0.3, 0.2, 5.0, 6.0, 7.0, 8.0]])
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 2.0, 1.0]])
    # group 2 has a tie at 1.0: of equal scores the earlier one is kept
    assert P.nm_mask(w, 2, 4, scores=scores).tolist() == [[True, True, False, False, True, False, True, False]]
    norms = torch.tensor([1.0, 1.0, 100.0, 100.0, 1.0, 1.0, 1.0, 1.0])
    wanda_24 = P.nm_mask(w, 2, 4, scores=P.wanda_scores(w, norms))
    assert wanda_24.tolist()[0][:4] == [False, False, True, True]


def test_bad_inputs_name_the_argument():
    w = torch.randn(4, 6)
    for s in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="sparsity"):
            P.magnitude_mask(w, s)
    with pytest.raises(TypeError, match="sparsity"):
        P.magnitude_mask(w, True)
    with pytest.raises(TypeError, match="weight"):
        P.magnitude_mask(torch.ones(3, dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match=r"input dimension 6 .* m=4"):
        P.nm_mask(w, 2, 4)
    with pytest.raises(ValueError, match="n must"):
        P.nm_mask(torch.randn(4, 8), 5, 4)
    with pytest.raises(ValueError, match="scores"):
        P.nm_mask(torch.randn(4, 8), 2, 4, scores=torch.randn(4, 4))
    with pytest.raises(ValueError, match="input_norms"):
        P.wanda_scores(w, torch.ones(5))
    with pytest.raises(ValueError, match="input_norms"):
        P.wanda_mask(w, -torch.ones(6), 0.5)
    with pytest.raises(ValueError, match="weights"):
        P.global_magnitude_masks({}, 0.5)
    model = tiny_gpt()
    with pytest.raises(ValueError, match="method"):
        P.prune_model(model, 0.5, method="random")
    with pytest.raises(ValueError, match="calibration"):
        P.prune_model(model, 0.5, method="wanda")
    with pytest.raises(ValueError, match="nm"):
        P.prune_model(model, 0.5, method="magnitude_global", nm=(2, 4))
    with pytest.raises(ValueError, match="heads: cannot remove all 4 heads of layer 1"):
        P.remove_heads(model, 1, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="neurons"):
        P.remove_neurons(model, 0, list(range(HIDDEN)))
    with pytest.raises(ValueError, match="heads"):
        P.remove_heads(model, 0, [4])
    with pytest.raises(ValueError, match="layer"):
        P.remove_heads(model, 2, [0])
    with pytest.raises(ValueError, match="head_fraction"):
        P.prune_structured(model, 1.0, 0.0, batches())
    with pytest.raises(ValueError, match="target_fraction"):
        P.l0_prune(model, lambda s: batches()[0], 0.0, steps=1)
    with pytest.raises(ValueError, match="batches"):
        P.input_norms_from_calibration(model, [])


# ================================================================================================ on the model


def test_input_norms_match_a_hand_computed_layer_input():
    model = tiny_gpt()
    bs = batches(2)
    norms = P.input_norms_from_calibration(model, bs)
    assert set(norms) == {f"h.{i}.{n}" for i in range(2) for n in P.BLOCK_LINEARS}
    with torch.no_grad():
        xs = [model.h[0].ln_1(model.wte(b) + model.wpe(torch.arange(b.shape[1]))) for b in bs]  # c_attn's input
    by_hand = torch.cat([x.reshape(-1, C) for x in xs]).pow(2).sum(0).sqrt()  # (n_tokens, C) -> (C,)
    torch.testing.assert_close(norms["h.0.attn.c_attn"], by_hand)
    assert norms["h.1.mlp.c_proj"].shape == (4 * C,)


@pytest.mark.parametrize("method", ["magnitude", "magnitude_global", "wanda"])
def test_prune_model_zeroes_the_expected_count_and_nothing_else(method):
    model = tiny_gpt()
    original = copy.deepcopy(model)
    stats = P.prune_model(model, 0.5, method=method, calibration=batches() if method == "wanda" else None)
    linears = P.block_linears(model)
    total = sum(lin.weight.numel() for lin in linears.values())
    zeros = sum(int((lin.weight == 0).sum()) for lin in linears.values())
    assert zeros == stats["pruned"] == round(0.5 * total) and stats["total"] == total
    assert stats["overall"] == pytest.approx(0.5)
    if method != "magnitude_global":
        for name, lin in linears.items():
            assert int((lin.weight == 0).sum()) == round(0.5 * lin.weight.numel())
            assert stats["layers"][name] == pytest.approx(0.5)
    if method == "wanda":
        for lin in linears.values():
            assert ((lin.weight == 0).sum(dim=1) == lin.in_features // 2).all()
    for (name, p), (_, q) in zip(model.named_parameters(), original.named_parameters()):
        if not any(name.endswith(f"{n}.weight") for n in P.BLOCK_LINEARS):
            assert torch.equal(p, q), name  # embeddings, LayerNorms, biases untouched


def test_prune_model_wanda_two_of_four():
    model = tiny_gpt()
    stats = P.prune_model(model, None, method="wanda", nm=(2, 4), calibration=batches())
    for lin in P.block_linears(model).values():
        assert ((lin.weight != 0).view(lin.out_features, -1, 4).sum(-1) == 2).all()
    assert stats["overall"] == 0.5
    with pytest.raises(ValueError, match="contradicts"):
        P.prune_model(tiny_gpt(), 0.3, nm=(2, 4))


def test_masks_survive_fine_tuning():
    model = tiny_gpt().train()
    masks = P.prune_model(model, 0.6)["masks"]
    handles = P.apply_masks(model, masks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for b in batches(3):
        opt.zero_grad()
        P.next_token_loss(model, b).backward()
        for name, mask in masks.items():
            assert (model.get_submodule(name).weight.grad[~mask] == 0).all()
        opt.step()
        P.reapply_masks(model, masks)
    for name, mask in masks.items():
        w = model.get_submodule(name).weight
        assert (w[~mask] == 0).all() and (w[mask] != 0).all()
    for h in handles:
        h.remove()


# ================================================================================================ structured


def test_remove_heads_equals_zeroing_their_outputs():
    model = tiny_gpt()
    idx = batches(1)[0]
    handles = [zero_heads_hook(model.h[0].attn, [1, 3]), zero_heads_hook(model.h[1].attn, [0])]
    with torch.no_grad():
        masked = model(idx)
    for h in handles:
        h.remove()
    before = model.num_parameters()
    P.remove_heads(model, 0, [1, 3])
    P.remove_heads(model, 1, [0])
    assert before - model.num_parameters() == 3 * PER_HEAD == 3144
    assert [b.attn.n_head for b in model.h] == [2, 3]
    assert model.h[0].attn.c_attn.weight.shape == (3 * 2 * D, C) and model.h[0].attn.c_proj.weight.shape == (C, 2 * D)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), masked, atol=1e-6, rtol=1e-5)


def test_remove_neurons_equals_zeroing_them():
    model = tiny_gpt()
    idx = batches(1)[0]
    drop = [0, 5, 17, 127]
    handle = zero_neurons_hook(model.h[1].mlp, drop)
    with torch.no_grad():
        masked = model(idx)
    handle.remove()
    before = model.num_parameters()
    P.remove_neurons(model, 1, drop)
    assert before - model.num_parameters() == 4 * PER_NEURON == 260
    assert model.h[1].mlp.c_fc.out_features == HIDDEN - 4
    with torch.no_grad():
        torch.testing.assert_close(model(idx), masked, atol=1e-6, rtol=1e-5)


def test_head_importance_is_the_gate_gradient():
    model = tiny_gpt().double()  # float64, so that a finite difference is accurate
    b = batches(1)[0]
    importance = P.head_importance(model, [b])
    assert [t.shape for t in importance] == [(H,), (H,)]
    eps = 1e-4  # central difference of L in the scale of head 2 of layer 1

    def loss_with_scale(scale):
        def hook(module, inputs):
            y = inputs[0].clone()
            y[..., 2 * D:3 * D] *= scale
            return (y,)
        handle = model.h[1].attn.c_proj.register_forward_pre_hook(hook)
        with torch.no_grad():
            loss = P.next_token_loss(model, b).double()
        handle.remove()
        return loss

    fd = (loss_with_scale(1 + eps) - loss_with_scale(1 - eps)) / (2 * eps)
    assert importance[1][2].item() == pytest.approx(abs(fd.item()), rel=1e-4)
    assert all(p.grad is None for p in model.parameters())


def test_prune_structured_counts_and_generation_with_kv_cache():
    model = tiny_gpt()
    stats = P.prune_structured(model, 0.5, 0.25, batches(2))
    assert stats["n_head"] == [2, 2] and stats["d_hidden"] == [96, 96]
    assert stats["params_before"] == 28032
    assert stats["params_before"] - stats["params_after"] == 2 * (2 * PER_HEAD + 32 * PER_NEURON) == 8352
    assert stats["params_after"] == model.num_parameters() == 19680
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    cached = generate(model, prompt, 20, temperature=0.0, use_cache=True)  # runs past block_size (16)
    assert cached.shape == (2, 23)
    assert torch.equal(cached, generate(model, prompt, 20, temperature=0.0, use_cache=False))
    # at least one head stays even when the fraction asks for all of them
    stats = P.prune_structured(tiny_gpt(), 0.99, 0.0, batches(1))
    assert stats["n_head"] == [1, 1]


def test_neuron_importance_by_hand():
    model = tiny_gpt()
    b = batches(1)[0]
    acts = []
    handle = model.h[0].mlp.c_proj.register_forward_pre_hook(lambda m, i: acts.append(i[0].detach()))
    with torch.no_grad():
        model(b)
    handle.remove()
    by_hand = acts[0].abs().reshape(-1, HIDDEN).mean(0) * model.h[0].mlp.c_proj.weight.norm(dim=0)
    torch.testing.assert_close(P.neuron_importance(model, [b])[0], by_hand)


# ================================================================================================ L0 gates

LOG_ALPHAS = [-3.0, -1.0, 0.0, 1.5, 3.0, 10.0]


def test_expected_l0_and_eval_z_by_hand():
    gate = P.HardConcreteGate(len(LOG_ALPHAS))
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor(LOG_ALPHAS))

    def sigmoid(x):
        return 1.0 / (1.0 + math.exp(-x))

    p = [sigmoid(a - (2 / 3) * math.log(0.1 / 1.1)) for a in LOG_ALPHAS]
    assert gate.expected_l0().item() == pytest.approx(sum(p), rel=1e-6)
    torch.testing.assert_close(gate.prob_nonzero().double(), torch.tensor(p, dtype=torch.float64))
    z = [min(1.0, max(0.0, sigmoid(a) * 1.2 - 0.1)) for a in LOG_ALPHAS]
    gate.eval()
    torch.testing.assert_close(gate().double(), torch.tensor(z, dtype=torch.float64))
    assert gate()[0].item() == 0.0 and gate()[2].item() == pytest.approx(0.5)
    assert gate()[-1].item() == 1.0  # large log alpha: exactly one


def test_training_z_by_hand_and_nonzero_frequency():
    u, a = 0.25, 1.0
    s = 1.0 / (1.0 + math.exp(-(math.log(u) - math.log(1 - u) + a) / (2 / 3)))
    expected = min(1.0, max(0.0, s * 1.2 - 0.1))
    assert P.hard_concrete_z(torch.tensor([a]), torch.tensor([u])).item() == pytest.approx(expected, rel=1e-6)
    gate = P.HardConcreteGate(4000).train()
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-2.0, -0.5, 0.5, 2.0]).repeat(1000))
    g = torch.Generator().manual_seed(0)
    samples = torch.stack([gate(generator=g) for _ in range(25)])  # (25, 4000)
    assert ((samples >= 0) & (samples <= 1)).all()
    freq = (samples != 0).view(25, 1000, 4).float().mean(dim=(0, 1))
    # 25000 draws per log alpha: the standard error is at most 0.0032
    torch.testing.assert_close(freq, P.prob_nonzero(torch.tensor([-2.0, -0.5, 0.5, 2.0])), atol=0.013, rtol=0)
    z = gate(generator=g)
    z.sum().backward()
    assert gate.log_alpha.grad is not None and gate.log_alpha.grad.abs().sum() > 0


def test_lagrangian_penalty_by_hand_and_ascent_signs():
    s_hat = torch.tensor(5.0, requires_grad=True)
    lam = torch.tensor([0.5, 0.25], requires_grad=True)
    pen = P.lagrangian_penalty(s_hat, 3.0, lam[0], lam[1])
    assert pen.item() == pytest.approx(0.5 * 2 + 0.25 * 4)
    pen.backward()
    assert s_hat.grad.item() == pytest.approx(0.5 + 2 * 0.25 * 2)  # descent shrinks S_hat toward S_t
    assert lam.grad.tolist() == [2.0, 4.0]
    for size, sign in ((5.0, 1), (1.0, -1)):  # maximize=True raises lambda_1 above the target, lowers it below
        lam = torch.zeros(2, requires_grad=True)
        opt = torch.optim.SGD([lam], lr=0.1, maximize=True)
        P.lagrangian_penalty(torch.tensor(size), 3.0, lam[0], lam[1]).backward()
        opt.step()
        assert math.copysign(1, lam[0].item()) == sign and lam[1].item() > 0


def test_expected_model_size_by_hand():
    model = tiny_gpt()
    heads, neurons = P.attach_head_gates(model, 50.0), P.attach_neuron_gates(model, 50.0)
    total = model.num_parameters()
    assert P.expected_model_size(model, heads, neurons).item() == pytest.approx(total)
    with torch.no_grad():
        heads.gates[0].log_alpha[:2] = float("-inf")  # two heads certainly gone
        neurons.gates[1].log_alpha.fill_(0.0)  # every neuron of layer 1 open with probability p
    p = 1.0 / (1.0 + math.exp((2 / 3) * math.log(0.1 / 1.1)))
    by_hand = total - 2 * PER_HEAD - HIDDEN * PER_NEURON * (1 - p)
    assert P.expected_model_size(model, heads, neurons).item() == pytest.approx(by_hand, rel=1e-6)
    heads.detach()
    neurons.detach()


def test_remove_gated_equals_gated_eval_model():
    model = tiny_gpt()
    idx = batches(1)[0]
    heads, neurons = P.attach_head_gates(model), P.attach_neuron_gates(model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        heads.gates[0].log_alpha.copy_(torch.tensor([-5.0, 0.5, 10.0, -3.0]))  # z = 0, in (0, 1), 1, 0
        heads.gates[1].log_alpha.fill_(-5.0)  # every head closed: one stays, scaled by 0
        for gate in neurons.gates:
            gate.log_alpha.copy_(torch.empty(HIDDEN).uniform_(-5, 5, generator=g))
    heads.eval()
    neurons.eval()
    z_neurons = [gate().detach() for gate in neurons.gates]
    with torch.no_grad():
        gated = model(idx)
    before = model.num_parameters()
    removed = P.remove_gated(model, heads, neurons)
    assert removed["heads"] == {0: [0, 3], 1: [1, 2, 3]}  # layer 1 keeps head 0 (ties: the lowest index)
    assert [b.attn.n_head for b in model.h] == [2, 1]
    n_closed = sum(int((z == 0).sum()) for z in z_neurons)
    assert before - model.num_parameters() == 5 * PER_HEAD + n_closed * PER_NEURON
    with torch.no_grad():
        torch.testing.assert_close(model(idx), gated, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(model(idx), model(idx))  # the hooks are gone: nothing gated twice


def test_l0_prune_reaches_the_target_size():
    model = tiny_gpt()
    g = torch.Generator().manual_seed(0)
    stats = P.l0_prune(model, lambda step: torch.randint(0, 64, (4, 16), generator=g), 0.5, steps=60)
    assert stats["prunable_before"] == 2 * (H * PER_HEAD + HIDDEN * PER_NEURON) == 25024
    assert abs(stats["expected_fraction"] - 0.5) < 0.03
    assert abs(stats["kept_fraction"] - 0.5) < 0.03
    assert stats["params_after"] == model.num_parameters() < stats["params_before"]
    assert generate(model, torch.tensor([[1, 2]]), 5, temperature=0.0).shape == (1, 7)
    assert all(p.requires_grad for p in model.parameters())  # frozen only during the gate training
