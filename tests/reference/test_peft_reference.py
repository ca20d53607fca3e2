"""Conformance with Hugging Face PEFT: same weights in, same outputs out (skipped when peft is absent).

A tiny random Hugging Face GPT-2 is copied into minillm's GPT; each method is applied on both sides, the
trained tensors are copied from PEFT into ours, and the logits must agree.
"""
import copy

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from minillm.hf_gpt2 import from_hf_gpt2
from minillm.model import GPTConfig  # noqa: E402
from minillm.peft.apply import apply_peft, merge_peft  # noqa: E402
from minillm.peft.krona import KronALinear  # noqa: E402
from minillm.peft.vera import VeRALinear  # noqa: E402

CFG = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)
ATOL = 2e-5


@pytest.fixture()
def pair():
    """(Hugging Face GPT2LMHeadModel, our GPT) holding the same random weights."""
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(
        vocab_size=CFG.vocab_size, n_positions=CFG.block_size, n_embd=CFG.n_embd, n_layer=CFG.n_layer,
        n_head=CFG.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new",
    )
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # non-zero biases so that nothing matches by accident
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.02)
    ours = from_hf_gpt2({k: v.clone() for k, v in hf.state_dict().items()}, CFG).eval()
    return hf, ours


def ids() -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))


def randn_(p: torch.Tensor, seed: int, std: float = 0.3) -> None:
    with torch.no_grad():
        p.copy_(std * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))


def test_base_models_agree(pair):
    hf, ours = pair
    torch.testing.assert_close(ours(ids()), hf(ids()).logits, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_and_rslora_match_peft(pair, use_rslora):
    hf, ours = pair
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                             use_rslora=use_rslora)
    hf_peft = peft.get_peft_model(hf, config)
    ours = apply_peft(ours, "lora", r=4, lora_alpha=8, use_rslora=use_rslora)
    for i in range(CFG.n_layer):
        theirs = hf_peft.base_model.model.transformer.h[i].attn.c_attn
        mine = ours.h[i].attn.c_attn
        assert mine.scaling == theirs.scaling["default"]
        randn_(theirs.lora_B["default"].weight, seed=i)
        with torch.no_grad():
            mine.lora_A.copy_(theirs.lora_A["default"].weight)  # (r, in) on both sides
            mine.lora_B.copy_(theirs.lora_B["default"].weight)  # (out, r)
    x = ids()
    torch.testing.assert_close(ours(x), hf_peft(x).logits, atol=ATOL, rtol=1e-4)
    merged_hf = hf_peft.merge_and_unload()
    merged = merge_peft(ours)
    for i in range(CFG.n_layer):  # Conv1D stores (in, out)
        torch.testing.assert_close(merged.h[i].attn.c_attn.weight, merged_hf.transformer.h[i].attn.c_attn.weight.T,
                                   atol=1e-6, rtol=1e-5)


def test_lora_init_distribution_matches_peft_bound(pair):
    hf, ours = pair
    hf_peft = peft.get_peft_model(hf, peft.LoraConfig(r=8, target_modules=["c_attn"], fan_in_fan_out=True))
    ours = apply_peft(ours, "lora")
    theirs_A = hf_peft.base_model.model.transformer.h[0].attn.c_attn.lora_A["default"].weight
    mine_A = ours.h[0].attn.c_attn.lora_A
    assert mine_A.shape == theirs_A.shape
    assert abs(mine_A.abs().max() - theirs_A.abs().max()) < 0.1 * theirs_A.abs().max()


def test_vera_projections_and_outputs_match_peft(pair):
    hf, ours = pair
    config = peft.VeraConfig(r=8, target_modules=["c_attn", "c_fc"], projection_prng_key=3, fan_in_fan_out=True)
    hf_peft = peft.get_peft_model(hf, config)
    ours = apply_peft(ours, "vera", target_modules=["c_attn", "c_fc"], r=8, projection_seed=3)
    layers = [m for m in ours.modules() if isinstance(m, VeRALinear)]
    shared = layers[0].projections
    vera_A = hf_peft.base_model.vera_A["default"]
    vera_B = hf_peft.base_model.vera_B["default"]
    assert torch.equal(shared.vera_A, vera_A) and torch.equal(shared.vera_B, vera_B)  # the seed reproduces them
    for i in range(CFG.n_layer):
        for j, (mine, theirs) in enumerate([
            (ours.h[i].attn.c_attn, hf_peft.base_model.model.transformer.h[i].attn.c_attn),
            (ours.h[i].mlp.c_fc, hf_peft.base_model.model.transformer.h[i].mlp.c_fc),
        ]):
            assert torch.equal(mine.lambda_d, theirs.vera_lambda_d["default"])
            assert torch.equal(mine.lambda_b, theirs.vera_lambda_b["default"])
            randn_(theirs.vera_lambda_b["default"], seed=10 * i + j)
            randn_(theirs.vera_lambda_d["default"], seed=100 + 10 * i + j)
            with torch.no_grad():
                mine.lambda_b.copy_(theirs.vera_lambda_b["default"])
                mine.lambda_d.copy_(theirs.vera_lambda_d["default"])
    x = ids()
    torch.testing.assert_close(ours(x), hf_peft(x).logits, atol=ATOL, rtol=1e-4)


class OneLinear(nn.Module):
    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.c_attn = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_attn(x)


def test_krona_matches_peft_lokr_kronecker():
    """LoKr with a full (not low-rank) second factor and scale alpha / r = 1 is W + w1 kron w2."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 48)
    lokr = peft.get_peft_model(OneLinear(copy.deepcopy(layer)),
                               peft.LoKrConfig(r=8, alpha=8, target_modules=["c_attn"]))
    theirs = lokr.base_model.model.c_attn
    w1, w2 = theirs.lokr_w1["default"], theirs.lokr_w2["default"]
    mine = KronALinear(layer, scale=1.0)
    assert mine.krona_A.shape == w1.shape and mine.krona_B.shape == w2.shape  # same factor choice
    assert torch.count_nonzero(w1) == 0 == torch.count_nonzero(mine.krona_A)  # same zero factor
    randn_(w1, seed=1)
    randn_(w2, seed=2)
    with torch.no_grad():
        mine.krona_A.copy_(w1)
        mine.krona_B.copy_(w2)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(mine(x), lokr(x), atol=1e-5, rtol=1e-5)


def test_prefix_tuning_matches_peft(pair):
    hf, ours = pair
    P = 3
    hf_peft = peft.get_peft_model(hf, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    wrapped = apply_peft(ours, "prefix", num_virtual_tokens=P)
    table = hf_peft.prompt_encoder["default"].embedding.weight
    assert table.shape == wrapped.prefix.shape  # (P, 2 L d)
    with torch.no_grad():
        wrapped.prefix.copy_(table)
    x = ids()
    mask = torch.ones_like(x)
    mask[0, :2] = 0  # left padding in the first row
    expected = hf_peft(input_ids=x, attention_mask=mask).logits
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    got = wrapped(x, attention_mask=mask, position_ids=pos)
    # the unpadded row (Hugging Face GPT-2 does not shift a padded row's positions, generate does)
    torch.testing.assert_close(got[1], expected[1], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(wrapped(x), hf_peft(input_ids=x).logits, atol=ATOL, rtol=1e-4)


def test_prompt_tuning_matches_peft(pair):
    hf, ours = pair
    P = 4
    hf_peft = peft.get_peft_model(hf, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    wrapped = apply_peft(ours, "prompt", num_virtual_tokens=P)
    with torch.no_grad():
        wrapped.prompt.copy_(hf_peft.prompt_encoder["default"].embedding.weight)
    x = ids()
    expected = hf_peft(input_ids=x).logits  # (B, P + T, V): PEFT returns the virtual positions too
    torch.testing.assert_close(wrapped(x), expected[:, P:], atol=ATOL, rtol=1e-4)
