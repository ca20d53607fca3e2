"""The command line: help, end-to-end tiny runs, and clear errors for bad flags, configs and inputs."""
import json
import subprocess
import sys

import pytest

from minillm.cli import main

COMMANDS = ["world", "tokenizer", "pretrain", "generate", "sft", "reward", "dpo", "ppo", "grpo", "pairs", "eval",
            "peft-compare", "qlora-compare", "memory", "pipeline", "assignments", "grade", "distill", "compress"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: minillm " + command in capsys.readouterr().out


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "minillm", "--help"], capture_output=True, text=True, check=True)
    assert "pipeline" in out.stdout


def test_unknown_preset_and_flag_are_rejected(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--preset", "huge"])
    assert e.value.code == 2 and "invalid choice: 'huge'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--n-layers", "3"])  # the flag is --n-layer
    assert e.value.code == 2 and "unrecognized arguments: --n-layers" in capsys.readouterr().err


def test_invalid_model_config_is_reported(tmp_path, capsys):
    code = main(["pretrain", "--preset", "tiny", "--n-embd", "30", "--n-head", "4", "--out", str(tmp_path / "r")])
    assert code == 2
    assert "n_embd (30) must be divisible by n_head (4)" in capsys.readouterr().err
    assert not (tmp_path / "r" / "ckpt.pt").exists()


def test_empty_corpus_is_reported(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "corpus_train.txt").write_text("\n\n  \n")
    (data / "corpus_val.txt").write_text("text")
    code = main(["pretrain", "--preset", "tiny", "--data", str(data), "--out", str(tmp_path / "r")])
    assert code == 2 and "corpus_train.txt: the corpus is empty" in capsys.readouterr().err


def test_tokenizer_vocab_too_small_is_reported(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world " * 10)
    code = main(["tokenizer", "--corpus", str(corpus), "--vocab-size", "100", "--out", str(tmp_path / "tok")])
    assert code == 2 and "vocab_size" in capsys.readouterr().err


def test_tiny_pretrain_resume_generate(tmp_path, capsys):
    out = tmp_path / "base"
    args = ["pretrain", "--preset", "tiny", "--max-steps", "6", "--eval-interval", "3", "--log-interval", "3",
            "--ckpt-interval", "3", "--out", str(out)]
    assert main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["n_layer"] == 2 and config["train"]["max_steps"] == 6  # resolved config written
    assert (out / "loss_curve.png").exists() and (out / "tokenizer" / "tokenizer.json").exists()
    assert main(args[:3] + ["--max-steps", "9"] + args[5:] + ["--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 9
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(out), "--prompt", "Mira lives in", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("Mira lives in")


def test_generate_from_missing_run_is_reported(tmp_path, capsys):
    assert main(["generate", "--ckpt", str(tmp_path / "nothing")]) == 2
    assert "run directory not found" in capsys.readouterr().err


def test_world_command_writes_the_data(tmp_path, capsys):
    assert main(["world", "--seed", "3", "--out", str(tmp_path / "w")]) == 0
    assert (tmp_path / "w" / "corpus_train.txt").stat().st_size > 100_000


def test_memory_command(capsys):
    assert main(["memory", "--preset", "7b-shaped"]) == 0
    out = capsys.readouterr().out
    assert "full FT fp32" in out and "QLoRA" in out


def test_stage_knobs_are_flags_with_the_presets_values(capsys):
    """A method knob is spelled once (a field of config.DPOConfig): the flag, its help and its default follow."""
    from minillm.cli import build_parser, stage_method, stage_train_config

    with pytest.raises(SystemExit):
        main(["dpo", "--help"])
    out = capsys.readouterr().out
    assert "--rpo-alpha FLOAT" in out and "presets: cpu 1.0, gpu 1.0, tiny 1.0" not in out  # one value: "default"
    assert "KL strength (tau for IPO); default 0.1" in out and "--lr FLOAT            presets: cpu 5e-06" in out
    args = build_parser().parse_args(["dpo", "--preset", "tiny", "--beta", "0.2", "--rpo-alpha", "none", "--lr", "0.5"])
    method, cfg = stage_method(args, "dpo"), stage_train_config(args, "dpo")
    assert (method.beta, method.rpo_alpha, method.loss_type) == (0.2, None, "sigmoid")
    assert cfg.lr == 0.5 and cfg.max_steps == 30  # the rest from the tiny preset
    assert stage_method(build_parser().parse_args(["dpo"]), "dpo").rpo_alpha == 1.0  # the preset's
    args = build_parser().parse_args(["sft", "--packing", "--limit", "16", "--loss-on", "all"])
    assert (stage_method(args, "sft").packing, stage_method(args, "sft").limit) == (True, 16)
