"""The compression stage on tiny random models: every table is filled, the outlier demonstration separates the
int8 schemes, recovery keeps pruned weights at zero, structured pruning really shrinks the chat model, and `--with`
is checked."""
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from minillm.config import DistillConfig, TrainConfig
from minillm.model import GPT, GPTConfig
from minillm.pipeline import run_pipeline
from minillm.runs import save_run_files
from minillm.stages.compress import outlier_demo, run_compress, stored_bytes
from minillm.tokenizer import Tokenizer
from minillm.utils import atomic_torch_save

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "world"
TOK = Tokenizer.load(ROOT / "data" / "tokenizer")
CFG = GPTConfig(vocab_size=TOK.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32, dropout=0.0)
STUDENT = GPTConfig(vocab_size=TOK.vocab_size, block_size=64, n_layer=1, n_head=1, n_embd=16, dropout=0.0)


def make_run(path: Path, cfg: GPTConfig, seed: int, **config) -> Path:
    torch.manual_seed(seed)
    run_config = {"model": asdict(cfg), **config}
    save_run_files(path, TOK, run_config)
    atomic_torch_save({"model": GPT(cfg).state_dict(), "run_config": run_config}, path / "ckpt.pt")
    return path


def test_outlier_demo_plain_int8_loses_the_other_features_llm_int8_does_not():
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    calibration = [torch.randint(0, CFG.vocab_size, (4, 32)) for _ in range(2)]
    rows = outlier_demo(model, calibration, feature=3, magnitudes=(0, 30, 100))
    assert [r["magnitude"] for r in rows] == [0, 30, 100] and [r["outlier columns"] for r in rows] == [0, 1, 1]
    none, _, big = rows
    assert none["LLM.int8()"] == none["vector-wise int8"]  # no outlier: the same vector-wise path
    assert big["per-tensor int8"] > 10 * big["LLM.int8()"] and big["vector-wise int8"] > 10 * big["LLM.int8()"]
    assert big["LLM.int8()"] < 2 * none["LLM.int8()"]  # the outlier's own term is exact, the rest as before
    assert rows[1]["vector-wise int8"] < big["vector-wise int8"]  # the damage grows with the outlier


def test_stored_bytes_counts_block_weights_at_their_bits():
    model = GPT(CFG)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    n_block = sum(m.weight.numel() for b in model.h for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj))
    assert stored_bytes(model) == 4 * n_params
    assert stored_bytes(model, 4.0) == 4 * (n_params - n_block) + n_block // 2


def small_world(path: Path) -> Path:
    """A slice of the shipped world: every sixth held-out question and probe, 96 chats, 40k characters of text."""
    path.mkdir()
    for name, keep in (("probes.jsonl", 6), ("sft_test.jsonl", 6)):
        lines = (DATA / name).read_text().splitlines(keepends=True)
        (path / name).write_text("".join(lines[::keep]))
    (path / "sft_train.jsonl").write_text("".join((DATA / "sft_train.jsonl").read_text().splitlines(True)[:96]))
    (path / "corpus_train.txt").write_text((DATA / "corpus_train.txt").read_text()[:40000])
    (path / "corpus_val.txt").write_text((DATA / "corpus_val.txt").read_text()[:10000])
    return path


def test_run_compress_fills_every_table(tmp_path):
    data = small_world(tmp_path / "world")
    base = make_run(tmp_path / "base", CFG, 0, stage="pretrain",
                    data={"train": str(data / "corpus_train.txt"), "val": str(data / "corpus_val.txt")})
    sft = make_run(tmp_path / "sft", CFG, 1, stage="sft", init=str(base), data=str(data / "sft_train.jsonl"))
    student = make_run(tmp_path / "student", STUDENT, 2, stage="pretrain")
    fast = TrainConfig(max_steps=2, batch_size=4, lr=1e-3, min_lr=1e-4, warmup_steps=0, weight_decay=0.0,
                       eval_interval=0, eval_iters=1, log_interval=1, device="cpu")
    summary = run_compress(base, sft, data, tmp_path / "out", student=student, distill_cfg=fast, recovery_steps=2,
                           device="cpu", sparsities=(0.5,), distill_method=DistillConfig(max_new_tokens=8),
                           timing_seconds=0.1)
    methods = {(r["method"], r["recovered"]) for r in summary["pruning"]}
    assert {("dense", False), ("magnitude", False), ("wanda", False), ("structured", False), ("2:4", False),
            ("l0", False), ("magnitude", True), ("wanda", True), ("2:4", True), ("structured", True),
            ("l0", True)} <= methods
    for r in summary["pruning"]:
        if r["method"] in ("magnitude", "wanda", "2:4"):
            assert r["removed"] == pytest.approx(0.5, abs=1e-6)
    ptq = {r["method"].split(",")[0].split(" (")[0]: r for r in summary["ptq"]}
    assert ptq["fp32"]["layer_error"] == 0.0
    assert ptq["GPTQ 4-bit"]["layer_error"] < ptq["round-to-nearest 4-bit"]["layer_error"]
    assert ptq["GPTQ 3-bit"]["layer_error"] < ptq["round-to-nearest 3-bit"]["layer_error"]
    assert 4.12 < ptq["NF4 + double quantisation"]["bits_per_weight"] < 4.2  # 4.127 + partial blocks of tiny layers
    rows = {r["model"]: r for r in summary["combined"]}
    chat = rows["chat model (fp32)"]
    structured = next(r for name, r in rows.items() if name.startswith("structured"))
    wanda = next(r for name, r in rows.items() if name.startswith("wanda"))
    assert structured["parameters"] < chat["parameters"] and structured["bytes"] < chat["bytes"]
    assert wanda["parameters"] == chat["parameters"] and wanda["block_weights_kept"] == chat["block_weights_kept"] // 2
    assert rows["NF4 + DQ"]["bytes"] < rows["LLM.int8()"]["bytes"] < chat["bytes"]
    assert rows["LLM.int8()"]["parameters"] == rows["NF4 + DQ"]["parameters"] == chat["parameters"]
    assert {"student (SFT, no teacher)", "student (word-level KD in SFT)"} <= set(rows)
    assert [r["model"] for r in summary["distill"]] == ["teacher", "student: sft", "student: word", "student: seq",
                                                        "student: on_policy"]
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["combined"][0]["model"] == "chat model (fp32)"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Cost and effect on the chat model" in report and (tmp_path / "out" / "pruning.png").exists()


def test_pipeline_with_checks_the_optional_stage_names(tmp_path):
    with pytest.raises(ValueError, match="--with: unknown stage"):
        run_pipeline(tmp_path, preset="tiny", with_stages=["compres"])


def test_calibration_text_shorter_than_one_block_is_named(tmp_path):
    base = make_run(tmp_path / "base", CFG, 0, stage="pretrain")
    data = tmp_path / "world"
    data.mkdir()
    for name in ("corpus_val.txt", "probes.jsonl", "sft_test.jsonl", "sft_train.jsonl"):
        (data / name).write_text((DATA / name).read_text())
    (data / "corpus_train.txt").write_text("Mira lives in Oakvale.\n")
    with pytest.raises(ValueError, match="corpus_train.txt: the calibration text has .* shorter than one block"):
        run_compress(base, base, data, tmp_path / "out", device="cpu", distill=False)
