"""Load Hugging Face GPT-2 checkpoints into `minillm.model.GPT`.

Hugging Face stores `c_attn`, `c_proj` and `c_fc` as `Conv1D` modules whose weight is (in, out), the
transpose of `nn.Linear`'s (out, in), so those four matrices per block are transposed on the way in.
Keys may carry a `transformer.` prefix; `lm_head.weight` is tied to `wte.weight` and may be absent;
old checkpoints also hold `attn.bias` / `attn.masked_bias` mask buffers, which are not parameters.
The head count cannot be read from the tensors, so it comes from `config.json` or the `config` argument.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from minillm.model import GPT, GPTConfig
from minillm.tokenizer import bytes_to_unicode
from minillm.utils import atomic_write_bytes, atomic_write_text, safe_torch_load

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MASK_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # the dot keeps c_attn.bias


# Hugging Face activation_function -> GPTConfig.activation ("gelu_new" and "gelu_pytorch_tanh" are the same tanh
# approximation; "gelu" is the exact erf form).
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
# Fields that change the attention in ways our model does not implement: (field, the value GPT-2 has).
HF_UNSUPPORTED = (("scale_attn_by_inverse_layer_idx", False), ("reorder_and_upcast_attn", False),
                  ("scale_attn_weights", True))


def config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """Map a Hugging Face GPT2Config dict (n_positions, n_ctx, layer_norm_epsilon, n_inner, activation_function)
    to a GPTConfig; fields that would change the computation in ways we do not implement are refused."""
    for field, gpt2 in HF_UNSUPPORTED:
        if field in hf and bool(hf[field]) != gpt2:
            raise ValueError(f"Hugging Face GPT-2 config: {field}={hf[field]!r} is not supported (the model computes "
                             f"attention as GPT-2 does, {field}={gpt2})")
    act = hf.get("activation_function", "gelu_new")
    if act not in HF_ACTIVATIONS:
        raise ValueError(f"Hugging Face GPT-2 config: activation_function={act!r} is not supported; "
                         f"supported: {sorted(HF_ACTIVATIONS)}")
    try:
        return GPTConfig(
            vocab_size=int(hf["vocab_size"]),
            block_size=int(hf.get("n_positions", hf.get("n_ctx", 1024))),
            n_layer=int(hf["n_layer"]),
            n_head=int(hf["n_head"]),
            n_embd=int(hf["n_embd"]),
            dropout=0.0,
            bias=True,
            layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            n_inner=None if hf.get("n_inner") is None else int(hf["n_inner"]),
            activation=HF_ACTIVATIONS[act],
        )
    except KeyError as e:
        raise ValueError(f"Hugging Face GPT-2 config is missing field {e.args[0]!r}") from e


def read_hf_directory(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, config dict) from a directory with config.json and model.safetensors or pytorch_model.bin."""
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} not found (a GPT-2 checkpoint directory needs config.json)")
    try:
        hf_config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: invalid JSON ({e})") from e
    st_file, bin_file = path / "model.safetensors", path / "pytorch_model.bin"
    if st_file.exists():
        try:
            return load_file(str(st_file)), hf_config
        except Exception as e:
            raise ValueError(f"{st_file}: not a readable safetensors file ({e})") from e
    if bin_file.exists():
        return safe_torch_load(bin_file), hf_config
    raise FileNotFoundError(f"{path}: neither model.safetensors nor pytorch_model.bin found")


def convert_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip `transformer.`, drop mask buffers and lm_head (tied), transpose Conv1D weights."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        name = key[len("transformer."):] if key.startswith("transformer.") else key
        if name.endswith(MASK_BUFFER_SUFFIXES) or name == "lm_head.weight":
            continue
        if name.endswith(CONV1D_SUFFIXES):
            value = value.t()  # Conv1D (in, out) -> Linear (out, in)
        out[name] = value.contiguous()
    return out


def from_hf_gpt2(
    path_or_state_dict: str | os.PathLike | dict[str, torch.Tensor],
    config: GPTConfig | dict[str, Any] | None = None,
) -> GPT:
    """A GPT with the weights of a Hugging Face GPT-2 directory or state dict. See the module docstring."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = Path(path_or_state_dict)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: not a directory with config.json + model weights")
        sd, hf_config = read_hf_directory(path)
        if config is None:
            config = hf_config
    else:
        sd = path_or_state_dict
        if config is None:
            raise ValueError(
                "from_hf_gpt2: a state dict needs `config` (an HF config dict or a GPTConfig): "
                "the number of heads cannot be read from the tensors"
            )
    if isinstance(config, dict):
        config = config_from_hf(config)
    if not isinstance(config, GPTConfig):
        raise TypeError(f"from_hf_gpt2: config must be a GPTConfig or dict, got {type(config).__name__}")
    model = GPT(config)
    converted = convert_hf_state_dict(sd)
    expected = model.state_dict()
    expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    if missing or unexpected:
        raise ValueError(f"from_hf_gpt2: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
    for name, tensor in converted.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"from_hf_gpt2: {name} has shape {tuple(tensor.shape)}, the config expects "
                f"{tuple(expected[name].shape)}"
            )
    model.load_state_dict(converted, strict=False)  # lm_head is tied to wte
    return model


# ----------------------------------------------------------------------------- export (the other way)
HF_ACTIVATION_NAMES = {"gelu_tanh": "gelu_new", "gelu": "gelu"}


def config_to_hf(cfg: GPTConfig, eos_id: int | None = None) -> dict[str, Any]:
    """The Hugging Face GPT2Config dict of a GPTConfig (`config_from_hf` the other way)."""
    if not cfg.bias:
        raise ValueError("export: Hugging Face GPT-2 always has biases; a model with bias=False cannot be exported")
    hf: dict[str, Any] = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
        "n_head": cfg.n_head, "n_inner": cfg.n_inner, "activation_function": HF_ACTIVATION_NAMES[cfg.activation],
        "layer_norm_epsilon": cfg.layer_norm_eps, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout, "scale_attn_weights": True, "tie_word_embeddings": True,
    }
    if eos_id is not None:
        hf.update(bos_token_id=eos_id, eos_token_id=eos_id)
    return hf


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our state dict in Hugging Face's names: `transformer.` prefix, Conv1D weights transposed to (in, out);
    lm_head is left out (Hugging Face ties it to wte, as we do)."""
    out = {}
    for name, value in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        if name.endswith(CONV1D_SUFFIXES):
            value = value.t()  # Linear (out, in) -> Conv1D (in, out)
        out["transformer." + name] = value.detach().cpu().contiguous().clone()
    return out


def hf_tokenizer_files(tok) -> dict[str, str]:
    """vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json for `GPT2Tokenizer`: byte-level
    BPE in GPT-2's byte-to-unicode alphabet, merges in rank order, our special tokens as added tokens."""
    to_char = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(to_char[x] for x in b)

    special = tok.special_tokens
    name_of = {i: s for s, i in special.items()}
    vocab = {name_of.get(tid) or text(b): tid for tid, b in tok.vocab.items()}
    merges = "#version: 0.2\n" + "".join(f"{text(a)} {text(b)}\n" for a, b in tok.merges)
    eot = name_of[tok.eot_id]
    added = {str(i): {"content": s, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                      "single_word": False} for s, i in special.items()}
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": None, "add_prefix_space": False,
              "bos_token": eot, "eos_token": eot, "unk_token": eot, "pad_token": name_of[tok.pad_id],
              "added_tokens_decoder": added}
    specials_map = {"bos_token": eot, "eos_token": eot, "unk_token": eot,
                    "additional_special_tokens": [s for s in special if s != eot]}
    return {"vocab.json": json.dumps(vocab, ensure_ascii=False), "merges.txt": merges,
            "tokenizer_config.json": json.dumps(config, indent=2), "special_tokens_map.json": json.dumps(specials_map)}


def save_hf_gpt2(model: GPT, out: str | os.PathLike, tok=None) -> Path:
    """Write `out`/config.json and model.safetensors (and the tokenizer files with `tok`) that
    `transformers.GPT2LMHeadModel.from_pretrained(out)` loads with our logits. Every file is written atomically."""
    out = Path(out)
    cfg = config_to_hf(model.config, None if tok is None else tok.eot_id)
    atomic_write_bytes(out / "model.safetensors", safetensors_bytes(to_hf_state_dict(model), {"format": "pt"}))
    atomic_write_text(out / "config.json", json.dumps(cfg, indent=2) + "\n")
    if tok is not None:
        for name, text in hf_tokenizer_files(tok).items():
            atomic_write_text(out / name, text)
    return out
