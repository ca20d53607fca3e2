"""from_hf_gpt2 reproduces a Hugging Face GPT-2's logits (random small config: no download)."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from minillm.hf_gpt2 import from_hf_gpt2
from minillm.model import GPT, GPTConfig  # noqa: E402


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=101, n_positions=40, n_embd=48, n_layer=3, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _check_logits(ours: GPT, hf) -> None:
    x = torch.randint(0, 101, (2, 17))
    with torch.no_grad():
        want = hf(x).logits
        got = ours(x)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_state_dict_with_prefix_and_config_dict(hf_model):
    sd = hf_model.state_dict()  # "transformer." prefix, lm_head.weight present
    ours = from_hf_gpt2(sd, hf_model.config.to_dict()).eval()
    _check_logits(ours, hf_model)


def test_state_dict_without_prefix_with_mask_buffers_and_gptconfig(hf_model):
    sd = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    sd["h.0.attn.bias"] = torch.tril(torch.ones(40, 40)).view(1, 1, 40, 40)  # old checkpoints' mask buffers
    sd["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    cfg = GPTConfig(vocab_size=101, block_size=40, n_layer=3, n_head=4, n_embd=48)
    _check_logits(from_hf_gpt2(sd, cfg).eval(), hf_model)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_directory(hf_model, tmp_path, fmt):
    hf_model.save_pretrained(tmp_path, safe_serialization=(fmt == "safetensors"))
    assert json.loads((tmp_path / "config.json").read_text())["n_head"] == 4
    _check_logits(from_hf_gpt2(tmp_path).eval(), hf_model)


def test_kv_cache_matches_hf_incremental(hf_model):
    ours = from_hf_gpt2(hf_model.state_dict(), hf_model.config.to_dict()).eval()
    x = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        logits, past = ours(x[:, :8], use_cache=True)
        step, _ = ours(x[:, 8:9], past_key_values=past, use_cache=True)
        want = hf_model(x[:, :9]).logits[:, -1]
    assert torch.allclose(step[:, -1], want, atol=1e-5)


def _variant(**kwargs):
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(vocab_size=101, n_positions=40, n_embd=48, n_layer=2, n_head=4, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, **kwargs)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # LayerNorm gains away from 1 so that epsilon matters
        for name, p in model.named_parameters():
            if "ln_" in name and name.endswith("weight"):
                p.mul_(3.0)
    return model


@pytest.mark.parametrize("kwargs", [
    {"layer_norm_epsilon": 1e-3},
    {"n_inner": 72},
    {"activation_function": "gelu"},
    {"activation_function": "gelu_pytorch_tanh"},
    {"layer_norm_epsilon": 0.05, "n_inner": 100, "activation_function": "gelu"},
])
def test_architecture_fields_are_read(kwargs):
    hf = _variant(**kwargs)
    ours = from_hf_gpt2(hf.state_dict(), hf.config.to_dict()).eval()
    _check_logits(ours, hf)


@pytest.mark.parametrize("kwargs,field", [
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
    ({"scale_attn_weights": False}, "scale_attn_weights"),
    ({"activation_function": "relu"}, "activation_function"),
])
def test_fields_we_do_not_implement_are_refused(kwargs, field):
    hf = _variant(**kwargs)
    with pytest.raises(ValueError, match=field):
        from_hf_gpt2(hf.state_dict(), hf.config.to_dict())


# ----- export: our run -> a Hugging Face folder --------------------------------------------------------------
@pytest.mark.parametrize("extra", [{}, {"layer_norm_eps": 1e-3, "n_inner": 40, "activation": "gelu"}])
def test_exported_folder_loads_in_transformers_with_our_logits_and_token_ids(tmp_path, extra):
    from pathlib import Path

    from minillm.hf_gpt2 import save_hf_gpt2
    from minillm.tokenizer import Tokenizer

    root = Path(__file__).resolve().parents[2]
    tok = Tokenizer.load(root / "data" / "tokenizer")
    torch.manual_seed(2)
    ours = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32, **extra)).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "ln_" in name and name.endswith("weight"):
                p.mul_(3.0)
    save_hf_gpt2(ours, tmp_path, tok)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    x = torch.randint(0, tok.vocab_size, (2, 40))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, ours(x), atol=1e-5)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = (root / "data" / "world" / "corpus_val.txt").read_text()[:4000] + " café ½ <|end|>"
    assert hf_tok.encode(text) == tok.encode(text, allowed_special="all")
    chat = tok.apply_chat_template([{"role": "user", "content": "How old is Mira?"}], add_generation_prompt=True)[0]
    assert hf_tok.encode(tok.decode(chat)) == chat
    assert hf_tok.eos_token_id == tok.eot_id == hf.config.eos_token_id


def test_export_command_refuses_a_non_empty_folder(tmp_path, capsys):
    from minillm.cli import main

    (tmp_path / "keep.txt").write_text("mine")
    assert main(["export", "--run", "runs/none", "--out", str(tmp_path)]) == 2
    assert "is not empty" in capsys.readouterr().err and (tmp_path / "keep.txt").read_text() == "mine"
