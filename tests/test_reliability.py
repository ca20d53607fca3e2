"""Bad input answered clearly (issue 9/9's reliability list): non-finite numbers, non-UTF-8 bytes and a BOM in
JSONL files, a corpus path that does not exist, --out equal to --init, and run files that keep the user's umask."""
import json
import os
import stat

import pytest

from minillm.cli import main
from minillm.config import TrainConfig
from minillm.datasets import read_jsonl
from minillm.train import lr_at
from minillm.utils import atomic_torch_save, atomic_write_text


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_in_jsonl_are_refused_with_file_and_line(tmp_path, value):
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "x", "margin": 1.0}\n' + '{"prompt": "y", "margin": %s}\n' % value)
    with pytest.raises(ValueError, match=rf"prefs.jsonl:2: a non-finite number \({value}\)"):
        list(read_jsonl(path))


def test_non_utf8_bytes_name_file_line_and_byte(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_bytes(b'{"a": "ok"}\n{"a": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"sft.jsonl:2: not UTF-8 text \(byte 0xe9 at column 11\)"):
        list(read_jsonl(path))


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes("\ufeff".encode("utf-8") + b'{"a": 1}\n{"a": 2}\n')
    assert [r for _, r in read_jsonl(path)] == [{"a": 1}, {"a": 2}]


def test_tokenizer_refuses_a_corpus_path_that_does_not_exist(tmp_path, capsys):
    assert main(["tokenizer", "--corpus", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "tok")]) == 2
    assert "nope.txt: file not found" in capsys.readouterr().err
    assert not (tmp_path / "tok").exists()


def test_training_into_the_init_run_is_refused(tmp_path, capsys):
    run = tmp_path / "base"
    run.mkdir()
    assert main(["sft", "--init", str(run), "--out", str(run) + "/"]) == 2
    assert "is the --init run" in capsys.readouterr().err


def test_run_files_keep_the_umask(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    atomic_write_text(tmp_path / "a.json", json.dumps({}))
    atomic_torch_save({"x": 1}, tmp_path / "ckpt.pt")
    for name in ("a.json", "ckpt.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask


def test_warmup_as_documented():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=10)
    assert [lr_at(s, cfg) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


def _tiny_run_pieces():
    import torch

    from minillm.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=1, n_embd=8))

    def get_batch(split, gen):
        x = torch.randint(0, 32, (2, 8), generator=gen)
        return {"input_ids": x, "targets": x}

    return model, get_batch


def test_a_non_finite_loss_stops_the_run_before_a_checkpoint(tmp_path):
    import torch

    from minillm.align.sft import sft_loss
    from minillm.train import train

    model, get_batch = _tiny_run_pieces()
    calls = {"n": 0}

    def loss_fn(m, batch):
        calls["n"] += 1
        loss_sum, n = sft_loss(m, batch)
        return (loss_sum * float("nan"), n) if calls["n"] == 5 else (loss_sum, n)

    cfg = TrainConfig(max_steps=4, batch_size=2, grad_accum=2, eval_interval=0, log_interval=1, ckpt_interval=1,
                      warmup_steps=0, device="cpu")
    with pytest.raises(FloatingPointError, match=r"the loss is nan at step 3, micro-batch 1 of 2"):
        train(model, cfg, get_batch, loss_fn, tmp_path, has_val=False, progress=False)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["step"] == 2  # the checkpoint of the last good step, not a NaN one
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_resume_skips_a_torn_last_metrics_line_and_removes_stray_temporaries(tmp_path, capsys):
    from minillm.align.sft import sft_loss
    from minillm.train import train

    model, get_batch = _tiny_run_pieces()
    cfg = TrainConfig(max_steps=2, batch_size=2, eval_interval=0, log_interval=1, warmup_steps=0, device="cpu")
    train(model, cfg, get_batch, sft_loss, tmp_path, has_val=False, progress=False)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # a kill in the middle of a write
    stray = tmp_path / ".ckpt.pt.abc123.tmp"
    stray.write_bytes(b"x" * 100)
    from dataclasses import replace
    train(model, replace(cfg, max_steps=3), get_batch, sft_loss, tmp_path, resume=True, has_val=False,
          progress=False)
    out = capsys.readouterr().out
    assert "metrics.jsonl:3: skipped a torn last line" in out and "removed" in out and not stray.exists()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


@pytest.mark.parametrize("device,match", [("tpu", "not a device torch knows"), ("cuda", "CUDA is not available")])
def test_devices_this_machine_lacks_are_refused(device, match):
    import torch

    from minillm.utils import pick_device

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match=match):
        pick_device(device)


@pytest.mark.parametrize("text", [
    "Mira lives in Oakvale.\n\nShe keeps a cat.  \n  Tobin   is 34 years old.\n",
    "a  \n b\n\n\n c<|end|>d  ",
    "numbers 1234567 and ½ Ⅻ, unicode café — done\n",
])
def test_encode_iterable_equals_encoding_the_whole_text(text):
    from pathlib import Path

    from minillm.tokenizer import Tokenizer

    tok = Tokenizer.load(Path(__file__).resolve().parent.parent / "data" / "tokenizer")
    lines = text.splitlines(keepends=True)
    assert list(tok.encode_iterable(lines)) == tok.encode(text)
    assert list(tok.encode_iterable(list(text))) == tok.encode(text)  # one character at a time


def test_encode_iterable_streams_the_world_corpus():
    from pathlib import Path

    from minillm.tokenizer import Tokenizer

    root = Path(__file__).resolve().parent.parent
    tok = Tokenizer.load(root / "data" / "tokenizer")
    path = root / "data" / "world" / "corpus_val.txt"
    with open(path, encoding="utf-8") as f:
        assert list(tok.encode_iterable(f)) == tok.encode(path.read_text(encoding="utf-8"))


# ----- streaming decode and the chat REPL -------------------------------------------------------------------
def _chat_model():
    from pathlib import Path

    import torch

    from minillm.model import GPT, GPTConfig
    from minillm.tokenizer import Tokenizer

    tok = Tokenizer.load(Path(__file__).resolve().parent.parent / "data" / "tokenizer")
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=1, n_head=2, n_embd=16)).eval(), tok


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_stream_tokens_equals_generate(temperature):
    import torch

    from minillm.sampling import generate, stream_tokens

    model, tok = _chat_model()
    prompt = tok.encode("Mira lives in")
    streamed = list(stream_tokens(model, prompt, 12, temperature, eos_id=None,
                                  generator=torch.Generator().manual_seed(3)))
    full = generate(model, torch.tensor([prompt]), 12, temperature, generator=torch.Generator().manual_seed(3))
    assert streamed == full[0, len(prompt):].tolist()
    with pytest.raises(ValueError, match="exceed the context of 48"):
        list(stream_tokens(model, prompt, 48))


def test_chat_repl_commands_history_and_truncation():
    from minillm.cli import chat_prompt, run_chat

    model, tok = _chat_model()
    lines = iter(["/temp 0", "/top_p none", "/temp hot", "/nope", "How old is Mira?",
                  "Where does Mira live, what is her favourite colour and which fruit does she like best of all?", "/reset", "Hi"])
    out = []

    def write(*parts, end="\n", flush=False):
        out.append("".join(str(p) for p in parts) + end)

    def read(_prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None  # what input() raises at the end of stdin

    history = run_chat(model, tok, max_new_tokens=8, temperature=1.0, read=read, write=write)
    text = "".join(out)
    assert "temperature 0.0, top_p 0.9" in text and "temperature 0.0, top_p None" in text
    assert "/temp needs a number" in text and "unknown command /nope" in text
    assert "the conversation is cleared" in text
    assert [m["role"] for m in history] == ["user", "assistant"] and history[0]["content"] == "Hi"
    # the context is 48 tokens with 8 for the answer: a long history loses its oldest turns, with a notice
    long = [{"role": "user", "content": "one two three four five six"},
            {"role": "assistant", "content": "seven eight nine ten"},
            {"role": "user", "content": "How old is Mira?"}]
    ids, dropped = chat_prompt(tok, long, 20)
    assert dropped == 2 and ids == tok.apply_chat_template(long[2:], add_generation_prompt=True)[0]
    assert "no longer fit the context" in text


def test_training_into_a_finished_run_needs_resume_or_overwrite(tmp_path, capsys):
    run = tmp_path / "sft"
    run.mkdir()
    (run / "ckpt.pt").write_bytes(b"a finished run")
    for cmd in (["sft", "--init", str(tmp_path / "base")], ["pretrain"], ["ppo", "--init", str(tmp_path / "x")]):
        assert main(cmd + ["--out", str(run)]) == 2
        assert "already holds a run (ckpt.pt)" in capsys.readouterr().err
    assert (run / "ckpt.pt").read_bytes() == b"a finished run"
    # --overwrite passes this check (and then fails on the missing base run, not on the guard)
    assert main(["sft", "--init", str(tmp_path / "base"), "--out", str(run), "--overwrite"]) == 2
    assert "already holds" not in capsys.readouterr().err


def test_sampling_refuses_nan_temperature_and_empty_prompts():
    import torch

    from minillm.sampling import generate, sample_next

    model, _ = _chat_model()
    with pytest.raises(ValueError, match="temperature must be >= 0, got nan"):
        sample_next(torch.zeros(1, 5), temperature=float("nan"))
    with pytest.raises(ValueError, match=r"T >= 1 prompt tokens, got shape \(1, 0\)"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], 3)


def test_eval_refuses_an_unwritable_out_before_scoring(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["eval", "--ckpt", str(tmp_path / "nope"), "--out", str(blocker / "eval.json")]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "run directory not found" not in err


def test_a_refused_resume_leaves_the_run_as_it_was(tmp_path):
    from minillm.model import GPTConfig
    from minillm.stages.pretrain import pretrain
    from minillm.tokenizer import Tokenizer

    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    tok = Tokenizer.load(root / "data" / "tokenizer")
    (tmp_path / "train.txt").write_text((root / "data" / "world" / "corpus_train.txt").read_text()[:5000])
    cfg = TrainConfig(max_steps=1, batch_size=2, eval_interval=0, eval_iters=1, warmup_steps=0, device="cpu")
    small = GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=1, n_embd=8)
    out = tmp_path / "run"
    pretrain(tok, tmp_path / "train.txt", tmp_path / "train.txt", small, cfg, out, progress=False)
    before = {p.name: p.read_bytes() for p in (out / "config.json", out / "ckpt.pt")}
    other = GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=1, n_embd=8)
    with pytest.raises(ValueError, match="n_layer: checkpoint 1 vs requested 2"):
        pretrain(tok, tmp_path / "train.txt", tmp_path / "train.txt", other, cfg, out, resume=True, progress=False)
    assert {p.name: p.read_bytes() for p in (out / "config.json", out / "ckpt.pt")} == before
    with pytest.raises(FileNotFoundError, match="nothing to continue"):
        pretrain(tok, tmp_path / "train.txt", tmp_path / "train.txt", small, cfg, tmp_path / "new", resume=True,
                 progress=False)


def test_a_run_folder_is_locked_while_it_trains(tmp_path, capsys):
    import subprocess
    import sys

    from minillm.align.sft import sft_loss
    from minillm.train import LOCK_NAME, train

    model, get_batch = _tiny_run_pieces()
    cfg = TrainConfig(max_steps=1, batch_size=2, eval_interval=0, log_interval=1, warmup_steps=0, device="cpu")
    (tmp_path / LOCK_NAME).write_text(str(os.getppid()))  # a live process holds the folder
    with pytest.raises(FileExistsError, match=rf"being written by another run \(pid {os.getppid()}"):
        train(model, cfg, get_batch, sft_loss, tmp_path, has_val=False, progress=False)
    assert not (tmp_path / "ckpt.pt").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(str(dead.pid))  # a crashed run's lock
    train(model, cfg, get_batch, sft_loss, tmp_path, has_val=False, progress=False)
    assert "taking over a stale lock" in capsys.readouterr().out
    assert (tmp_path / "ckpt.pt").exists() and not (tmp_path / LOCK_NAME).exists()
