"""apply_peft and friends: targeting, freezing, counts, merging, disabling, adapter save/load, errors."""
import pytest
import torch

from minillm.model import GPT, GPTConfig
from minillm.peft.adapters import ParallelAdapter, SeriesAdapter
from minillm.peft.apply import (
    PEFT_METHODS, adapter_parameters, adapter_state_dict, add_lora_adapter, apply_peft, count_parameters,
    disable_adapters, find_target_modules, load_adapter, load_adapter_state_dict, merge_adapters, merge_peft,
    save_adapter, set_adapter, unmerge_adapters,
)
from minillm.peft.krona import KronALinear
from minillm.peft.lora import LoRALinear
from minillm.peft.vera import VeRALinear

CFG = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)
L, d = CFG.n_layer, CFG.n_embd

METHODS = {  # method -> hyperparameters for a tiny GPT
    "lora": {"r": 4, "lora_alpha": 8},
    "vera": {"projection_seed": 5},
    "krona": {"scale": 2.0},
    "houlsby": {"init_weights": "mam_adapter"},
    "pfeiffer": {"init_weights": "mam_adapter", "bottleneck_dim": 4},  # m=1 relu could be a dead unit
    "parallel": {},
    "prefix": {"num_virtual_tokens": 3},
    "prompt": {"num_virtual_tokens": 3},
    "last_k": {"k": 1},
    "bitfit": {},
    "qlora": {"r": 4},
}
UNCHANGED_AT_INIT = ["lora", "vera", "krona", "houlsby", "pfeiffer", "parallel", "last_k", "bitfit"]
MERGEABLE = ["lora", "vera", "krona"]


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG).eval()


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(seed))


def perturb_adapters(model, seed: int = 1) -> None:
    """Move every adapter parameter away from its (often zero) init, so updates are visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def test_methods_dict_is_complete():
    assert set(PEFT_METHODS) == set(METHODS)


@pytest.mark.parametrize("method", UNCHANGED_AT_INIT)
def test_outputs_unchanged_at_init(method):
    gpt = tiny_gpt()
    x = ids()
    before = gpt(x)
    model = apply_peft(gpt, method, **METHODS[method])
    torch.testing.assert_close(model(x), before, atol=0, rtol=0)


def test_houlsby_default_init_is_near_but_not_exactly_identity():
    gpt = tiny_gpt()
    x = ids()
    before = gpt(x)
    after = apply_peft(gpt, "houlsby")(x)
    diff = (after - before).abs().max()
    assert 0 < diff < 1e-3


@pytest.mark.parametrize("method", list(METHODS))
def test_only_adapter_parameters_train_and_receive_gradients(method):
    gpt = tiny_gpt()
    base_ids = {id(p) for p in gpt.parameters()}
    model = apply_peft(gpt, method, **METHODS[method])
    perturb_adapters(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_parameters(model)) and trainable
    model(ids()).logsumexp(-1).square().sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    if method not in ("last_k", "bitfit"):
        assert not any(id(p) in base_ids for n, p in model.named_parameters() if p.requires_grad)


def test_trainable_sets_by_method():
    names = lambda m: {n for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    assert names(apply_peft(tiny_gpt(), "lora")) == {
        f"h.{i}.attn.c_attn.adapters.default.lora_{ab}" for i in range(L) for ab in "AB"}
    bitfit = names(apply_peft(tiny_gpt(), "bitfit"))
    assert "h.0.ln_1.bias" in bitfit and "h.1.mlp.c_fc.bias" in bitfit and all(n.endswith("bias") for n in bitfit)
    last = names(apply_peft(tiny_gpt(), "last_k", k=1))
    assert all(n.startswith(("h.1.", "ln_f.")) for n in last) and "h.1.attn.c_attn.weight" in last
    assert any(n.startswith("ln_f.") for n in last)
    without_ln_f = names(apply_peft(tiny_gpt(), "last_k", k=1, train_ln_f=False))
    assert without_ln_f == {n for n in last if n.startswith("h.1.")}
    assert names(apply_peft(tiny_gpt(), "last_k", k=2)) == {n for n, _ in tiny_gpt().named_parameters()} - {
        "wte.weight", "wpe.weight"}


def test_parameter_counts_against_formulas():
    trainable, total = count_parameters(apply_peft(tiny_gpt(), "lora", r=4))  # c_attn: d -> 3d
    assert trainable == L * 4 * (d + 3 * d)
    assert total == tiny_gpt().num_parameters() + trainable
    r = 8  # VeRA on the c_proj layers, whose outputs are all d wide: L_tuned (d + r)
    assert count_parameters(apply_peft(tiny_gpt(), "vera", target_modules=["c_proj"], r=r))[0] == 2 * L * (d + r)
    assert count_parameters(apply_peft(tiny_gpt(), "krona"))[0] == L * (6 * 4 + 8 * 4)  # 48 = 6*8, 16 = 4*4
    m = d // 16
    assert count_parameters(apply_peft(tiny_gpt(), "houlsby"))[0] == 2 * L * (2 * m * d + d + m)
    assert count_parameters(apply_peft(tiny_gpt(), "pfeiffer"))[0] == L * (2 * m * d + d + m)
    m = d // 2
    assert count_parameters(apply_peft(tiny_gpt(), "parallel"))[0] == L * (2 * m * d + d + m)
    assert count_parameters(apply_peft(tiny_gpt(), "prefix", num_virtual_tokens=4))[0] == 2 * L * 4 * d
    assert count_parameters(apply_peft(tiny_gpt(), "bitfit"))[0] == sum(
        p.numel() for n, p in tiny_gpt().named_parameters() if n.endswith("bias"))


def test_vera_default_rank_clipped_and_shared():
    model = apply_peft(tiny_gpt(), "vera", target_modules=["c_attn", "c_fc"])
    layers = [m for m in model.modules() if isinstance(m, VeRALinear)]
    assert len(layers) == 2 * L
    assert all(layer.projections is layers[0].projections for layer in layers)
    assert layers[0].projections.r == d  # 256 clipped to min(in, out) = 16
    assert layers[0].projections.vera_A.shape == (d, d) and layers[0].projections.vera_B.shape == (4 * d, d)
    again = apply_peft(tiny_gpt(1), "vera", target_modules=["c_attn", "c_fc"])
    assert torch.equal(next(m for m in again.modules() if isinstance(m, VeRALinear)).projections.vera_B,
                       layers[0].projections.vera_B)
    with pytest.raises(ValueError, match="r=17"):
        apply_peft(tiny_gpt(), "vera", r=17)


def test_target_matching_rules():
    gpt = tiny_gpt()
    assert find_target_modules(gpt, ["c_proj"]) == ["h.0.attn.c_proj", "h.0.mlp.c_proj", "h.1.attn.c_proj",
                                                    "h.1.mlp.c_proj"]
    assert find_target_modules(gpt, ["attn.c_proj"]) == ["h.0.attn.c_proj", "h.1.attn.c_proj"]
    assert find_target_modules(gpt, ["h.1.mlp.c_fc"]) == ["h.1.mlp.c_fc"]
    assert find_target_modules(gpt, r"h\.0\..*c_.*") == ["h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc",
                                                       "h.0.mlp.c_proj"]
    with pytest.raises(ValueError, match="'proj' matches no module"):  # a suffix must follow a dot
        find_target_modules(gpt, ["proj"])
    with pytest.raises(ValueError, match=r"'q_proj' matches no module; available names: .*'attn.c_attn'"):
        find_target_modules(gpt, ["c_attn", "q_proj"])
    model = apply_peft(tiny_gpt(), "lora", target_modules=["c_proj", "c_fc"])
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 3 * L
    houlsby = apply_peft(tiny_gpt(), "houlsby")
    assert isinstance(houlsby.h[0].attn.c_proj, SeriesAdapter) and isinstance(houlsby.h[0].mlp.c_proj, SeriesAdapter)
    assert isinstance(apply_peft(tiny_gpt(), "parallel").h[1].mlp, ParallelAdapter)


def test_bad_input_errors_and_model_left_untouched():
    gpt = tiny_gpt()
    with pytest.raises(ValueError, match="r must be a positive integer"):
        apply_peft(gpt, "lora", r=0)
    with pytest.raises(ValueError, match="exceeds min"):
        apply_peft(gpt, "lora", r=17)
    assert all(p.requires_grad for p in gpt.parameters())  # nothing frozen by a failed call
    assert not any(isinstance(m, LoRALinear) for m in gpt.modules())
    with pytest.raises(ValueError, match="matches no module"):
        apply_peft(gpt, "lora", target_modules=["query"])
    with pytest.raises(ValueError, match="not a linear layer"):
        apply_peft(gpt, "lora", target_modules=["ln_1"])
    with pytest.raises(ValueError, match="tied"):
        apply_peft(gpt, "lora", target_modules=["lm_head"])
    with pytest.raises(ValueError, match="does not divide"):
        apply_peft(gpt, "krona", a_shape=(5, 4))
    with pytest.raises(ValueError, match="unknown method 'loraa'"):
        apply_peft(gpt, "loraa")
    with pytest.raises(TypeError, match="apply_peft\\('lora'\\).*lora_alpah"):
        apply_peft(gpt, "lora", lora_alpah=16)
    with pytest.raises(ValueError, match="does not apply"):
        apply_peft(gpt, "bitfit", target_modules=["c_attn"])
    with pytest.raises(ValueError, match="k must be"):
        apply_peft(gpt, "last_k", k=3)
    model = apply_peft(gpt, "lora")
    with pytest.raises(ValueError, match="already has a PEFT method"):
        apply_peft(model, "vera")


@pytest.mark.parametrize("method", MERGEABLE)
def test_merge_equals_unmerged_and_unmerge_is_exact(method):
    model = apply_peft(tiny_gpt(), method, **METHODS[method])
    perturb_adapters(model)
    x = ids()
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    y = model(x)
    merge_adapters(model)
    merge_adapters(model)  # idempotent
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)
    assert any(not torch.equal(model.state_dict()[n], t) for n, t in before.items())
    unmerge_adapters(model)
    assert all(torch.equal(model.state_dict()[n], t) for n, t in before.items())
    plain = merge_peft(model)
    assert type(plain) is GPT and not any(isinstance(m, (LoRALinear, VeRALinear, KronALinear)) for m in plain.modules())
    assert set(plain.state_dict()) == set(tiny_gpt().state_dict())
    assert all(p.requires_grad for p in plain.parameters()) and not hasattr(plain, "peft_config")
    torch.testing.assert_close(plain(x), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["houlsby", "pfeiffer", "parallel", "prefix", "prompt"])
def test_merge_refused_for_non_mergeable(method):
    model = apply_peft(tiny_gpt(), method, **METHODS[method])
    with pytest.raises(ValueError, match="cannot be merged"):
        merge_peft(model)


def test_merge_peft_of_partial_is_the_model():
    gpt = tiny_gpt()
    model = apply_peft(gpt, "bitfit")
    assert merge_peft(model) is gpt and all(p.requires_grad for p in gpt.parameters())


# qlora: disabling its adapters gives the 4-bit base, not the original one (tests/test_qlora_stage.py checks that).
@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("last_k", "bitfit", "qlora")])
def test_disable_adapters_gives_the_base_output(method):
    gpt = tiny_gpt()
    x = ids()
    base = gpt(x)
    model = apply_peft(gpt, method, **METHODS[method])
    perturb_adapters(model)
    adapted = model(x)
    assert not torch.allclose(adapted, base, atol=1e-4)
    with disable_adapters(model):
        torch.testing.assert_close(model(x), base)
    torch.testing.assert_close(model(x), adapted)


def test_disable_adapters_with_merged_lora_and_errors():
    gpt = tiny_gpt()
    x = ids()
    base = gpt(x)
    model = apply_peft(gpt, "lora")
    perturb_adapters(model)
    adapted = model(x)
    merge_adapters(model)
    with disable_adapters(model):
        torch.testing.assert_close(model(x), base)
    assert model.h[0].attn.c_attn.merged
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no adapter to disable"):
        with disable_adapters(apply_peft(tiny_gpt(), "bitfit")):
            pass


def test_several_lora_adapters_swap():
    model = apply_peft(tiny_gpt(), "lora", r=2)
    x = ids()
    perturb_adapters(model, seed=1)
    y_default = model(x)
    add_lora_adapter(model, "other", r=4, lora_alpha=4)
    torch.testing.assert_close(model(x), y_default)  # adding does not activate
    set_adapter(model, "other")
    assert model.h[0].attn.c_attn.lora_A.shape == (4, d)
    with disable_adapters(model):
        base = model(x)
    torch.testing.assert_close(model(x), base)  # "other" starts with B = 0
    with torch.no_grad():  # move only the new adapter
        for n, p in model.named_parameters():
            if ".other." in n:
                p.add_(0.3 * torch.randn_like(p))
    y_other = model(x)
    assert not torch.allclose(y_other, y_default, atol=1e-4)
    set_adapter(model, "default")
    torch.testing.assert_close(model(x), y_default)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    assert sum(".other." in n for n in adapter_state_dict(model)) == 2 * L  # every adapter is saved


@pytest.mark.parametrize("method", list(METHODS))
def test_adapter_save_load_round_trip(method, tmp_path):
    model = apply_peft(tiny_gpt(), method, **METHODS[method])
    perturb_adapters(model)
    x = ids()
    y = model(x)
    sd = adapter_state_dict(model)
    if method not in ("last_k", "bitfit"):
        assert sum(t.numel() for k, t in sd.items() if k != "vera.projection_seed") == count_parameters(model)[0]
    path = tmp_path / "adapter.pt"
    save_adapter(model, path)
    fresh = load_adapter(tiny_gpt(), path)  # a plain GPT gets the saved method applied first
    torch.testing.assert_close(fresh(x), y)
    again = apply_peft(tiny_gpt(), method, **METHODS[method])
    load_adapter_state_dict(again, sd)
    torch.testing.assert_close(again(x), y)


def test_vera_saves_seed_not_projections():
    model = apply_peft(tiny_gpt(), "vera", projection_seed=7)
    sd = adapter_state_dict(model)
    assert int(sd["vera.projection_seed"]) == 7 and not any("vera_A" in k or "vera_B" in k for k in sd)
    other = apply_peft(tiny_gpt(), "vera", projection_seed=8)
    with pytest.raises(ValueError, match="seed 8"):
        load_adapter_state_dict(other, sd)


def test_loading_adapter_for_another_shape_names_key_and_shapes(tmp_path):
    model = apply_peft(tiny_gpt(), "lora", r=4)
    wider = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32))
    with pytest.raises(ValueError, match=r"h.0.attn.c_attn.adapters.default.lora_A' has shape \(4, 16\).*\(4, 32\)"):
        load_adapter_state_dict(apply_peft(wider, "lora", r=4), adapter_state_dict(model))
    deeper = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=3, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match="h.2.attn.c_attn.adapters.default.lora_A' is missing"):
        load_adapter_state_dict(apply_peft(deeper, "lora", r=4), adapter_state_dict(model))
    with pytest.raises(ValueError, match="not an adapter parameter"):
        load_adapter_state_dict(apply_peft(tiny_gpt(), "vera"), adapter_state_dict(model))
    path = tmp_path / "a.pt"
    save_adapter(model, path)
    with pytest.raises(ValueError, match="a.pt: .*has shape"):
        load_adapter(wider.__class__(wider.config), path)
    with pytest.raises(FileNotFoundError):
        load_adapter(tiny_gpt(), tmp_path / "missing.pt")


# qlora stores uint8 codes and keeps fp32 quantization scales by design.
@pytest.mark.parametrize("method", [m for m in METHODS if m != "qlora"])
def test_adapters_follow_the_model_dtype(method):
    model = apply_peft(tiny_gpt().double(), method, **METHODS[method])
    assert all(p.dtype == torch.float64 for p in adapter_parameters(model).values())
    assert all(b.dtype == torch.float64 for b in model.buffers())
    assert model(ids()).dtype == torch.float64


def test_folded_prefix_saves_and_loads_as_a_plain_table(tmp_path):
    wrapped = apply_peft(tiny_gpt(), "prefix", num_virtual_tokens=3, prefix_projection=True)
    perturb_adapters(wrapped)
    wrapped.fold_reparameterization()
    x = ids()
    save_adapter(wrapped, tmp_path / "prefix.pt")
    fresh = load_adapter(tiny_gpt(), tmp_path / "prefix.pt")
    assert not fresh.prefix_projection and set(adapter_state_dict(fresh)) == {"prefix"}
    torch.testing.assert_close(fresh(x), wrapped(x))
