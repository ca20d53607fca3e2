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
