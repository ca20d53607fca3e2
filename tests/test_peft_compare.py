"""The PEFT comparison's bookkeeping: parameter shares, analytic (meta-device) counts against the
formulas, training bytes, timing helpers, and a tiny end-to-end run of two methods."""
import json
from pathlib import Path

import pytest
import torch

from minillm.cli import build_parser
from minillm.config import TrainConfig, get_preset
from minillm.model import GPT, GPTConfig
from minillm.peft.apply import apply_peft
from minillm.stages.compare import (
    DEFAULT_METHODS,
    analytic_parameter_table,
    build_meta_model,
    compare_methods,
    forward_seconds,
    is_mergeable,
    load_records,
    method_spec,
    method_train_config,
    parameter_share,
    parse_methods,
    slowdowns,
)

ROOT = Path(__file__).resolve().parent.parent
WORLD = ROOT / "data" / "world"


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)).eval()


# ----- parameter counts --------------------------------------------------------------------------------------
def gpt_total(V: int, B: int, L: int, d: int) -> int:
    """wte + wpe + L blocks (12 d^2 + 13 d: c_attn 3d^2+3d, c_proj d^2+d, c_fc 4d^2+4d, mlp.c_proj 4d^2+d,
    two LayerNorms 4d) + ln_f 2d; the head is tied to wte."""
    return V * d + B * d + L * (12 * d * d + 13 * d) + 2 * d


def expected_gpu_trainable(method: str, L: int, d: int, V: int, B: int) -> int:
    """Hand formulas at the gpu preset (d = 768): what each method trains."""
    P, r = 10, 8
    bottleneck = lambda m: 2 * m * d + d + m  # noqa: E731  W_down, W_up, b_down, b_up
    return {
        "full": gpt_total(V, B, L, d),
        "lora": L * r * (d + 3 * d),  # r (in + out) on c_attn (d -> 3d)
        "vera": L * (3 * d + 256),  # lambda_b (out) + lambda_d (r = 256)
        "krona": L * (48 * 24 + 48 * 32),  # 2304 = 48 * 48, 768 = 24 * 32: A (48, 24), B (48, 32)
        "houlsby": 2 * L * bottleneck(d // 16),
        "pfeiffer": L * bottleneck(d // 16),
        "parallel": L * bottleneck(d // 2),
        "prefix": 2 * L * P * d,
        "prompt": P * d,
        "last_k": 12 * d * d + 13 * d + 2 * d,  # the last block and ln_f
        "bitfit": L * 11 * d + d,  # per block: c_attn 3d, c_proj d, c_fc 4d, mlp.c_proj d, ln_1 d, ln_2 d; ln_f d
    }[method]


@pytest.fixture(scope="module")
def gpu_rows():
    """The analytic gpu table, built once (the first meta model in a process pays the meta device's warm-up)."""
    return {r["method"]: r for r in analytic_parameter_table("gpu")}


@pytest.mark.parametrize("method", DEFAULT_METHODS)
def test_analytic_gpu_counts_match_the_formulas(method, gpu_rows):
    p = get_preset("gpu")
    L, d, V, B = p.model.n_layer, p.model.n_embd, p.vocab_size, p.model.block_size
    row = gpu_rows[method]
    base = gpt_total(V, B, L, d)
    trainable = expected_gpu_trainable(method, L, d, V, B)
    added = 0 if method in ("full", "last_k", "bitfit") else trainable
    assert row["trainable"] == trainable
    assert row["total"] == base + added
    assert row["percent"] == pytest.approx(100 * trainable / (base + added))


def test_lora_on_c_attn_trains_under_one_percent_at_the_gpu_preset():
    for vocab in (None, 50257):  # our tokenizer's size, and GPT-2's
        (row,) = analytic_parameter_table("gpu", vocab, ["lora"], token_ids=[1, 2, 3, 4])
        assert row["percent"] < 1.0


def test_chat_token_rows_add_n_d_to_every_peft_method():
    d = get_preset("tiny").model.n_embd
    plain = {r["method"]: r for r in analytic_parameter_table("tiny")}
    rows = {r["method"]: r for r in analytic_parameter_table("tiny", token_ids=[7, 8, 9])}
    for m in DEFAULT_METHODS:
        extra = 0 if m == "full" else 3 * d
        assert rows[m]["trainable"] == plain[m]["trainable"] + extra, m


def test_analytic_training_bytes_fp32_adamw(gpu_rows):
    """params + buffers + grads + AdamW moments = 4 |theta| + 4 |phi| + 8 |phi| (+ VeRA's frozen projections)."""
    rows = gpu_rows
    lora = rows["lora"]
    assert lora["train_bytes"] == 4 * lora["total"] + 12 * lora["trainable"]
    vera, d = rows["vera"], get_preset("gpu").model.n_embd
    projections = 256 * d + 3 * d * 256  # A (r, max_in), B (max_out, r), buffers
    assert vera["train_bytes"] == 4 * vera["total"] + 12 * vera["trainable"] + 4 * projections


def test_meta_model_has_shapes_but_no_storage():
    cfg = get_preset("gpu").model
    cfg.vocab_size = 1024
    model = build_meta_model(cfg, method_spec("lora", [1, 2]))
    assert all(p.is_meta for p in model.parameters())
    assert model.h[0].attn.c_attn.lora_A.shape == (8, 768)


def test_parameter_share_of_a_live_model():
    model = apply_peft(tiny_gpt(), "lora", r=4)
    share = parameter_share(model)
    lora = 2 * 4 * (32 + 96)  # L r (in + out) on c_attn
    assert share["trainable"] == lora
    assert share["total"] == tiny_gpt().num_parameters() + lora
    assert share["percent"] == pytest.approx(100 * lora / share["total"])


# ----- specs, configs, timing ----------------------------------------------------------------------------------
def test_parse_methods_and_specs():
    assert parse_methods(None) == list(DEFAULT_METHODS)
    assert parse_methods("lora, full") == ["lora", "full"]
    for bad in ("lora,dora", "", "lora,lora"):
        with pytest.raises(ValueError, match="--methods"):
            parse_methods(bad)
    assert method_spec("full", [1]) is None
    spec = method_spec("lora", [1, 2])
    assert spec["trainable_token_indices"] == [1, 2] and spec["r"] == 8 and spec["target_modules"] == ["c_attn"]
    # explicitly None, so run_sft does not add the chat rows back (the --no-chat-tokens ablation)
    assert method_spec("lora")["trainable_token_indices"] is None
    spec["r"] = 99  # a copy: the table of defaults is not changed
    assert method_spec("lora")["r"] == 8


def test_peft_learning_rate():
    full = TrainConfig(lr=5e-4, min_lr=5e-5)
    assert method_train_config("full", full, None) is full
    lora = method_train_config("lora", full, None)
    assert lora.lr == pytest.approx(1e-2) and lora.min_lr == pytest.approx(1e-3) and lora.max_steps == full.max_steps
    assert method_train_config("prefix", full, 1e-2).lr == 1e-2


def test_mergeable_and_slowdowns():
    x = torch.randint(0, 64, (2, 8))
    base = tiny_gpt()
    lora = apply_peft(tiny_gpt(), "lora", trainable_token_indices=[1, 2])
    assert is_mergeable(lora) and not is_mergeable(base)
    assert not is_mergeable(apply_peft(tiny_gpt(), "houlsby", reduction_factor=8, trainable_token_indices=[1]))
    assert not is_mergeable(apply_peft(tiny_gpt(), "prefix", num_virtual_tokens=2, trainable_token_indices=[1]))
    s = slowdowns(base, lora, x, repeats=2, budget_seconds=0.01)
    assert s["unmerged"] > 0 and s["merged"] > 0
    assert isinstance(lora.wte, torch.nn.Module) and not lora.wte.merged  # timing merged a copy only
    assert slowdowns(base, apply_peft(tiny_gpt(), "bitfit"), x, 1, 0.01)["merged"] is None
    t = forward_seconds({"a": base}, x, repeats=3, budget_seconds=0.0)
    assert t["a"] > 0
    with pytest.raises(ValueError, match="repeats"):
        forward_seconds({"a": base}, x, repeats=0)


def test_load_records_names_the_bad_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    with pytest.raises(ValueError, match=r"t.jsonl:1: .*assistant"):
        load_records(path)
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "missing.jsonl")


# ----- end to end -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny pretrained run (2 steps on a slice of the world corpus)."""
    from minillm.stages.pretrain import pretrain
    from minillm.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("base")
    text = (WORLD / "corpus_train.txt").read_text()[:20_000]
    (d / "train.txt").write_text(text)
    tok = Tokenizer.load(ROOT / "data" / "tokenizer")
    cfg = TrainConfig(max_steps=2, batch_size=4, warmup_steps=0, eval_interval=0, eval_iters=1, device="cpu")
    model_cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    pretrain(tok, d / "train.txt", d / "train.txt", model_cfg, cfg, d / "run", progress=False)
    return d / "run"


def test_two_methods_end_to_end(base_run, tmp_path):
    from minillm.peft.apply import load_adapter
    from minillm.peft.tokens import chat_token_ids
    from minillm.runs import load_run

    lines = (WORLD / "sft_test.jsonl").read_text().splitlines()
    test = tmp_path / "test.jsonl"
    test.write_text("\n".join(lines[:4]) + "\n")
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join((WORLD / "sft_train.jsonl").read_text().splitlines()[:40]) + "\n")
    cfg = TrainConfig(max_steps=2, batch_size=4, lr=1e-3, min_lr=1e-4, warmup_steps=0, eval_interval=0,
                      eval_iters=1, log_interval=1, device="cpu")
    out = tmp_path / "cmp"
    summary = compare_methods(base_run, train, test, out, cfg, methods=["full", "lora"], analytic_preset="tiny",
                              timing_repeats=1, timing_seconds=0.02, progress=False)
    full, lora = summary["rows"]
    assert (full["method"], lora["method"]) == ("full", "lora")
    base, tok, _ = load_run(base_run)
    d, L, n_tok = 32, 2, len(chat_token_ids(tok))
    assert lora["trainable"] == L * 8 * (d + 3 * d) + n_tok * d  # LoRA r=8 on c_attn + the chat token rows
    assert lora["total"] == base.num_parameters() + lora["trainable"]
    assert full["trainable"] == full["total"] == base.num_parameters()
    assert lora["lr"] == pytest.approx(2e-2) and full["lr"] == pytest.approx(1e-3)
    # adapter.pt is the stored result; PEFT runs drop ckpt.pt (it repeats the frozen base)
    assert lora["adapter_bytes"] == (out / "lora" / "adapter.pt").stat().st_size < full["adapter_bytes"]
    assert not (out / "lora" / "ckpt.pt").exists() and (out / "full" / "ckpt.pt").exists()
    # bytes from the real AdamW state: 2 fp32 moments + a 4-byte step per trained tensor
    tensors = 2 * L + 1  # lora_A, lora_B per block + the token rows
    index = 8 * n_tok  # the rows' int64 token ids, a buffer
    assert lora["train_bytes"] == 4 * lora["total"] + 12 * lora["trainable"] + 4 * tensors + index
    n_full = len(list(base.parameters()))
    assert full["train_bytes"] == 16 * full["total"] + 4 * n_full
    assert 0.0 <= lora["exact_match"] <= 1.0 and full["slowdown_merged"] is None and lora["slowdown_merged"] > 0
    again = load_adapter(base, out / "lora" / "adapter.pt")
    assert again.peft_config["trainable_token_indices"] == chat_token_ids(tok)
    saved = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["full", "lora"]
    table = (out / "table.md").read_text()
    assert f"| lora | {lora['trainable']:,} | {lora['percent']:.3f} |" in table and "`tiny` preset" in table
    assert (out / "comparison.png").stat().st_size > 1000


def test_command_line(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["peft-compare", "--methods", "lora,full", "--max-steps", "3",
                              "--init", str(tmp_path / "missing")])
    assert args.methods == "lora,full" and args.peft_lr is None and args.out == "runs/peft_compare"
    with pytest.raises(FileNotFoundError, match="--init"):
        args.func(args)
    args = parser.parse_args(["peft-compare", "--init", str(tmp_path), "--peft-lr", "-1"])
    with pytest.raises(ValueError, match="--peft-lr"):
        args.func(args)
