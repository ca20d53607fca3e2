"""QLoRA as a PEFT method ("qlora" in apply_peft) and as a stage: structure, exactness at init, gradients,
LoftQ, merging, adapter files, run_sft -> load_run end to end, the CLI, and qlora-compare (`compare_qlora`
and its error table, `minillm.quant.error`)."""
import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from minillm.cli import main
from minillm.config import SFTConfig, TrainConfig
from minillm.model import GPT, GPTConfig
from minillm.peft.apply import (
    PEFT_METHODS, adapter_parameters, adapter_state_dict, apply_peft, dequantize_model, linear_weights, load_adapter,
    merge_peft, save_adapter,
)
from minillm.peft.loftq import loftq_init
from minillm.peft.lora import LoRALinear
from minillm.peft.qlora import Linear4bit, quantized_layers
from minillm.quant.error import error_row, excess_kurtosis, gaussian_weights, quantization_error_table
from minillm.quant.nf4 import dequantize_4bit, quantization_error, quantize_4bit
from minillm.stages.compare import (
    PEFT_LR_MULTIPLIER,
    QLORA_METHODS,
    QLORA_SPECS,
    compare_qlora,
    method_spec,
    parse_methods,
)

ROOT = Path(__file__).resolve().parent.parent
WORLD = ROOT / "data" / "world"
CFG = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
LINEARS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG).eval()


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out[0] if isinstance(out, tuple) else out


def perturb(model: nn.Module, seed: int = 1) -> None:
    """Move every adapter parameter away from its init (B = 0), so the update is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def float_twin(gpt: GPT) -> GPT:
    """A copy of `gpt` whose linear weights are replaced by deq(quant(W)): what QLoRA computes with at init."""
    twin = copy.deepcopy(gpt)
    with torch.no_grad():
        for m in linear_weights(twin).values():
            m.copy_(dequantize_4bit(quantize_4bit(m.clone())))
    return twin


# ---------------------------------------------------------------------- the "qlora" PEFT method
def test_qlora_is_registered_and_quantizes_every_block_linear():
    assert "qlora" in PEFT_METHODS
    model = apply_peft(tiny_gpt(), "qlora")
    for i in range(CFG.n_layer):
        for name in LINEARS:  # default targets: every linear layer, each a LoRA around a 4-bit base
            layer = model.get_submodule(f"h.{i}.{name}")
            assert isinstance(layer, LoRALinear) and isinstance(layer.base, Linear4bit)
            assert layer.base.quant_type == "nf4" and layer.base.double_quant and layer.base.blocksize == 64
            assert layer.r == 8 and layer.scaling == 16 / 8
    assert len(quantized_layers(model)) == 4 * CFG.n_layer
    # embeddings and the tied head stay in full precision
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.wte.weight
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default.lora_" in n for n in trainable)


def test_subset_of_targets_still_quantizes_the_other_linears():
    model = apply_peft(tiny_gpt(), "qlora", target_modules=["c_attn"], r=4)
    assert isinstance(model.h[0].attn.c_attn, LoRALinear)
    for name in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        assert isinstance(model.get_submodule(f"h.1.{name}"), Linear4bit)  # frozen 4-bit, no adapter
    assert len(adapter_state_dict(model)) == 2 * CFG.n_layer


def test_at_init_output_equals_the_dequantized_float_model():
    gpt = tiny_gpt()
    twin = float_twin(gpt)
    model = apply_peft(gpt, "qlora")
    x = ids()
    assert torch.equal(logits(model, x), logits(twin, x))  # B = 0 and Linear4bit = F.linear(x, deq(W))
    assert not torch.equal(logits(model, x), logits(tiny_gpt(), x))  # 4 bits do change the model


def test_gradients_match_lora_on_the_dequantized_weights():
    """The custom backward through the 4-bit base gives the same LoRA gradients as autograd through
    nn.Linear(deq(W)) with the same A and B."""
    gpt = tiny_gpt()
    reference = apply_peft(float_twin(gpt), "lora", target_modules=["c_attn", "c_proj", "c_fc"], r=8,
                           lora_alpha=16)
    model = apply_peft(gpt, "qlora")
    perturb(model)
    reference.load_state_dict(adapter_state_dict(model), strict=False)
    x, y = ids(0), ids(1)
    grads = []
    for m in (model, reference):
        loss = nn.functional.cross_entropy(logits(m, x).flatten(0, 1), y.flatten())
        loss.backward()
        grads.append({n: p.grad for n, p in adapter_parameters(m).items()})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 16
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4), name
    assert all(p.grad is None for _, p in model.named_parameters() if not p.requires_grad)


def test_loftq_init_moves_the_model_closer_to_the_float_one():
    x = ids()
    full = logits(tiny_gpt(), x)
    plain = apply_peft(tiny_gpt(), "qlora")
    loftq = apply_peft(tiny_gpt(), "qlora", loftq_iters=2)
    assert loftq.peft_config["loftq_iters"] == 2
    for name in LINEARS:
        w = tiny_gpt().get_submodule(f"h.0.{name}").weight.detach()
        q_layer, l_layer = plain.get_submodule(f"h.0.{name}"), loftq.get_submodule(f"h.0.{name}")
        plain_err = (w - q_layer.base.dequantize()).norm()
        loftq_err = (w - l_layer.base.dequantize() - l_layer.adapters["default"].delta_weight()).norm()
        assert loftq_err < plain_err, name
        assert l_layer.lora_B.abs().sum() > 0  # B starts non-zero: it carries the top-r quantisation error
    assert (logits(loftq, x) - full).abs().mean() < (logits(plain, x) - full).abs().mean()


@pytest.mark.parametrize("kwargs, match", [
    ({"loftq_iters": -1}, "loftq_iters"),
    ({"loftq_iters": 1.5}, "loftq_iters"),
    ({"loftq_iters": True}, "loftq_iters"),
    ({"r": 0}, "r must be a positive integer"),
    ({"r": 100}, "exceeds min"),
    ({"quant_type": "int8"}, "quant_type"),
    ({"blocksize": 48}, "blocksize"),
    ({"target_modules": ["nope"]}, "matches no module"),
])
def test_bad_input_raises_and_leaves_the_model_untouched(kwargs, match):
    gpt = tiny_gpt()
    before = {k: v.clone() for k, v in gpt.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        apply_peft(gpt, "qlora", **kwargs)
    assert not quantized_layers(gpt) and not any(isinstance(m, LoRALinear) for m in gpt.modules())
    assert all(p.requires_grad for p in gpt.parameters())
    assert all(torch.equal(before[k], v) for k, v in gpt.state_dict().items())


def test_merge_refuses_a_4bit_base_and_dequantize_then_merge_works():
    model = apply_peft(tiny_gpt(), "qlora")
    perturb(model)
    x = ids()
    expected = logits(model, x)
    with pytest.raises(TypeError, match="quantized base cannot absorb"):
        merge_peft(copy.deepcopy(model))
    merged = merge_peft(dequantize_model(model))
    assert not quantized_layers(merged) and not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert type(merged.h[0].attn.c_attn) is nn.Linear
    assert torch.allclose(logits(merged, x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no Linear4bit"):
        dequantize_model(tiny_gpt())


def test_adapter_file_holds_only_lora_tensors_and_reloads_onto_the_base(tmp_path):
    model = apply_peft(tiny_gpt(), "qlora", loftq_iters=1)
    perturb(model)
    save_adapter(model, tmp_path / "adapter.pt")
    blob = torch.load(tmp_path / "adapter.pt", weights_only=True)
    assert blob["peft_config"]["method"] == "qlora"
    assert len(blob["adapter"]) == 2 * 4 * CFG.n_layer  # A and B per linear layer, no 4-bit buffers
    assert all(k.endswith(("lora_A", "lora_B")) and v.is_floating_point() for k, v in blob["adapter"].items())
    fresh = load_adapter(tiny_gpt(), tmp_path / "adapter.pt")  # quantizes the same base again, then loads A, B
    x = ids()
    assert torch.equal(logits(fresh, x), logits(model, x))


def test_state_dict_round_trip_restores_the_4bit_buffers():
    model = apply_peft(tiny_gpt(0), "qlora")
    perturb(model)
    other = apply_peft(tiny_gpt(5), "qlora")  # another base: different codes and scales
    other.load_state_dict(model.state_dict())
    x = ids()
    assert torch.equal(logits(other, x), logits(model, x))
    assert model.state_dict()["h.0.attn.c_attn.base.weight"].dtype == torch.uint8


# ---------------------------------------------------------------------- the SFT stage end to end
@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny pretrained run directory (2 steps on a slice of the world corpus)."""
    from minillm.stages.pretrain import pretrain
    from minillm.tokenizer import Tokenizer

    tok = Tokenizer.load(ROOT / "data" / "tokenizer")
    d = tmp_path_factory.mktemp("qbase")
    text = (WORLD / "corpus_train.txt").read_text()[:20_000]
    (d / "train.txt").write_text(text)
    (d / "val.txt").write_text(text[:3_000])
    cfg = TrainConfig(max_steps=2, batch_size=4, warmup_steps=0, eval_interval=0, eval_iters=1, device="cpu")
    model_cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    pretrain(tok, d / "train.txt", d / "val.txt", model_cfg, cfg, d / "run", progress=False)
    return d / "run"


def sft_cfg(**kw) -> TrainConfig:
    base = dict(max_steps=3, batch_size=4, lr=1e-2, warmup_steps=0, eval_interval=0, eval_iters=1, log_interval=1,
                device="cpu")
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("loftq_iters", [0, 1])
def test_run_sft_with_qlora_then_load_run_gives_the_same_logits(base_run, tmp_path, loftq_iters):
    from minillm.runs import load_run
    from minillm.stages.sft import run_sft

    base, _, _ = load_run(base_run)
    peft = {"method": "qlora", "loftq_iters": loftq_iters}
    run = run_sft(base_run, WORLD / "sft_train.jsonl", tmp_path / "q", sft_cfg(), SFTConfig(limit=40), peft=peft,
                  progress=False)
    model, result = run.model, run.result
    assert result.step == 3
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["peft"]
    assert {k: v for k, v in saved.items() if k != "trainable_token_indices"} == peft  # + chat-token rows
    # training moved only the adapters: the 4-bit codes are those of the base weights
    for name, w in linear_weights(base).items():
        layer = model.get_submodule(name)
        codes = loftq_init(w, 8, loftq_iters, scaling=16 / 8)[0] if loftq_iters else quantize_4bit(w)
        assert torch.equal(layer.base.weight, codes.packed)
        assert layer.lora_B.abs().sum() > 0
    reloaded, _, _ = load_run(tmp_path / "q")
    x = torch.randint(0, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    assert len(quantized_layers(reloaded)) == 8
    assert torch.equal(logits(reloaded, x), logits(model.cpu().eval(), x))
    adapter = torch.load(tmp_path / "q" / "adapter.pt", weights_only=True)["adapter"]
    lora = [k for k in adapter if k.endswith(("lora_A", "lora_B"))]
    assert len(lora) == 16 and set(adapter) - set(lora) == {"wte.tokens.delta"}  # + the chat-token rows


def test_cli_offers_qlora_and_passes_loftq_iters():
    from minillm.cli import build_parser, peft_spec

    args = build_parser().parse_args(["sft", "--peft", "qlora", "--lora-r", "4", "--peft-arg", "loftq_iters=1"])
    assert peft_spec(args) == {"method": "qlora", "r": 4, "loftq_iters": 1}


# ---------------------------------------------------------------------- the comparison module
def test_method_specs_share_rank_alpha_and_targets():
    lora, qlora = method_spec("lora", [1, 2], QLORA_SPECS), method_spec("qlora", [1, 2], QLORA_SPECS)
    assert method_spec("full", [1, 2], QLORA_SPECS) is None
    assert (lora["r"], lora["lora_alpha"]) == (qlora["r"], qlora["lora_alpha"]) == (8, 16)
    model_l = apply_peft(tiny_gpt(), "lora", **{k: v for k, v in lora.items() if k != "method"})
    model_q = apply_peft(tiny_gpt(), "qlora", **{k: v for k, v in qlora.items() if k != "method"})
    assert adapter_state_dict(model_l).keys() == adapter_state_dict(model_q).keys()  # same adapted layers
    assert method_spec("loftq", specs=QLORA_SPECS)["loftq_iters"] == 1
    assert method_spec("qlora", specs=QLORA_SPECS, r=4)["r"] == 4  # --lora-r
    assert parse_methods(None, QLORA_SPECS, QLORA_METHODS) == ["full", "lora", "qlora"]
    assert parse_methods("qlora, full", QLORA_SPECS) == ["qlora", "full"]
    for bad in ("qlora,qlora", "nf4", ""):
        with pytest.raises(ValueError, match="--methods"):
            parse_methods(bad, QLORA_SPECS)


def test_excess_kurtosis_hand_cases():
    assert excess_kurtosis(torch.tensor([-1.0, 1.0])) == pytest.approx(-2.0)  # two points: E z^4 = 1
    assert abs(excess_kurtosis(gaussian_weights(2**18, seed=3))) < 0.05
    spiky = torch.zeros(1000)
    spiky[0] = 1.0  # one outlier: E z^4 / sigma^4 ~ n
    assert excess_kurtosis(spiky) > 900


def test_error_row_weights_matrices_by_their_size():
    torch.manual_seed(0)
    a, b = torch.randn(8, 64), 3 * torch.randn(4, 64)
    row = error_row("ab", [a, b])
    sq = [quantization_error(w, "nf4")["mse"] * w.numel() for w in (a, b)]
    assert row["nf4"] == pytest.approx(sum(sq) / float(a.square().sum() + b.square().sum()), rel=1e-6)
    assert row["numel"] == 8 * 64 + 4 * 64
    with pytest.raises(ValueError, match="no weights"):
        error_row("none", [])


def test_error_table_ranks_nf4_best_on_gaussian_and_real_weights():
    rows = quantization_error_table(linear_weights(tiny_gpt()), gaussian_numel=2**16)
    assert [r["name"] for r in rows][:2] == ["Gaussian N(0, 1)", "trained model: every linear weight"]
    assert {r["name"].split(": ")[-1] for r in rows[2:]} == set(LINEARS)
    for r in rows:
        assert r["nf4"] < r["int4"] and r["nf4"] < r["fp4"], r["name"]
        assert r["nf4+dq"] == pytest.approx(r["nf4"], rel=0.01)  # DQ: 0.37 fewer bits for ~no error
    assert rows[1]["numel"] == sum(w.numel() for w in linear_weights(tiny_gpt()).values())
    with pytest.raises(ValueError, match="multiple of 1024"):
        gaussian_weights(1000)


@pytest.fixture
def small_world(tmp_path):
    """A data directory with 100 training chats and 6 test questions (2 of each kind): fast generation."""
    d = tmp_path / "world"
    d.mkdir()
    (d / "sft_train.jsonl").write_text("".join(open(WORLD / "sft_train.jsonl").readlines()[:100]))
    test = [json.loads(line) for line in open(WORLD / "sft_test.jsonl")]
    picked = [r for kind in ("fact", "math", "refusal") for r in [x for x in test if x["kind"] == kind][:2]]
    (d / "sft_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in picked))
    return d


def test_compare_qlora_writes_the_table(base_run, small_world, tmp_path):
    import re

    summary = compare_qlora(base_run, small_world / "sft_train.jsonl", small_world / "sft_test.jsonl",
                            tmp_path / "cmp", sft_cfg(max_steps=2), gaussian_numel=2**14, progress=False)
    rows = {r["method"]: r for r in summary["rows"]}
    assert list(rows) == ["full", "lora", "qlora"]
    assert rows["lora"]["trainable"] == rows["qlora"]["trainable"] < rows["full"]["trainable"]
    assert rows["qlora"]["lr"] == rows["lora"]["lr"] == PEFT_LR_MULTIPLIER * rows["full"]["lr"] > rows["full"]["lr"]
    mem = {m: r["memory"] for m, r in rows.items()}
    assert mem["qlora"]["quantized_weights"] > 0 == mem["lora"]["quantized_weights"]
    assert mem["qlora"]["total"] < mem["lora"]["total"] < mem["full"]["total"]
    assert mem["lora"]["grads"] == mem["qlora"]["grads"] == 4 * rows["lora"]["trainable"]
    assert mem["full"]["optimizer"] >= 8 * rows["full"]["trainable"]  # two fp32 moments each (+ step counters)
    table = (tmp_path / "cmp" / "table.md").read_text()
    assert re.search(r"QLoRA - LoRA exact match: [+-]\d+\.\d points", table)
    assert "| Gaussian N(0, 1) |" in table and "gpt2-xl" in table
    assert json.loads((tmp_path / "cmp" / "results.json").read_text())["rows"][2]["spec"]["method"] == "qlora"


def test_command_line_errors(tmp_path, capsys):
    assert main(["qlora-compare", "--init", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "base run not found" in capsys.readouterr().err
    assert main(["qlora-compare", "--init", str(tmp_path), "--methods", "nf4"]) == 2
    assert "--methods" in capsys.readouterr().err
    assert main(["qlora-compare", "--init", str(tmp_path), "--peft-lr", "0"]) == 2
    assert "--peft-lr" in capsys.readouterr().err


def test_pipeline_stage_returns_report_rows(base_run, small_world, tmp_path, monkeypatch):
    from dataclasses import replace

    from minillm.config import PRESETS, get_preset
    from minillm.pipeline import pipeline_qlora

    tiny = get_preset("tiny")
    monkeypatch.setitem(PRESETS, "tiny", replace(tiny, sft=replace(tiny.sft, max_steps=2, eval_interval=0,
                                                                  device="cpu")))
    rows = pipeline_qlora({"preset": "tiny", "data": small_world, "out": tmp_path, "base": base_run,
                          "progress": False})
    assert (tmp_path / "qlora_compare" / "table.md").exists()
    for method in ("full", "lora", "qlora"):
        assert 0 <= rows[f"{method}: held-out exact match"] <= 1
        assert rows[f"{method}: train seconds"] > 0
    assert rows["qlora: params+buffers+grads+AdamW (MB)"] < rows["lora: params+buffers+grads+AdamW (MB)"]
    assert 0.5 < rows["NF4 / int4 quantisation error (trained weights)"] < 1
