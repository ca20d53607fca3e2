"""from_hf_gpt2 without transformers: Conv1D transposition by hand and clear errors."""
import pytest
import torch

from minillm.hf_gpt2 import from_hf_gpt2
from minillm.model import GPT, GPTConfig

CFG = GPTConfig(vocab_size=30, block_size=8, n_layer=1, n_head=2, n_embd=8)


def _hf_style_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights written the way Hugging Face stores them (Conv1D = transposed Linear, prefixed)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            v = v.t()
        out["transformer." + k] = v.clone()
    return out


def test_round_trip_through_hf_layout():
    torch.manual_seed(0)
    m = GPT(CFG).eval()
    loaded = from_hf_gpt2(_hf_style_state_dict(m), CFG).eval()
    x = torch.randint(0, 30, (1, 8))
    assert torch.allclose(m(x), loaded(x))


def test_state_dict_needs_config():
    with pytest.raises(ValueError, match="config"):
        from_hf_gpt2(_hf_style_state_dict(GPT(CFG)))


def test_wrong_shapes_named():
    sd = _hf_style_state_dict(GPT(CFG))
    with pytest.raises(ValueError, match="wte.weight"):
        from_hf_gpt2(sd, GPTConfig(vocab_size=31, block_size=8, n_layer=1, n_head=2, n_embd=8))


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        from_hf_gpt2(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_hf_gpt2(tmp_path)


def test_export_state_dict_and_config_round_trip():
    """to_hf_state_dict / config_to_hf are convert_hf_state_dict / config_from_hf the other way."""
    import torch

    from minillm.hf_gpt2 import config_from_hf, config_to_hf, convert_hf_state_dict, to_hf_state_dict
    from minillm.model import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=8, layer_norm_eps=1e-3, n_inner=12,
                    activation="gelu")
    torch.manual_seed(0)
    model = GPT(cfg)
    hf_sd = to_hf_state_dict(model)
    assert hf_sd["transformer.h.0.mlp.c_fc.weight"].shape == (8, 12)  # Conv1D: (in, out)
    back = convert_hf_state_dict(hf_sd)
    ours = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    assert config_from_hf(config_to_hf(cfg)) == cfg
