"""`minillm eval` (minillm/stages/evaluate.py): the report agrees with the library functions and with hand-computed
values, the cloze format rewrites world questions, the optional checks run, bad input names what is wrong."""
import json
import math
from pathlib import Path

import pytest
import torch

from minillm.config import EvalConfig
from minillm.cli import build_parser
from minillm.datasets import tokenize_corpus
from minillm.eval.mcq import evaluate_mcq
from minillm.eval.perplexity import perplexity
from minillm.model import GPT, GPTConfig
from minillm.pipeline import pipeline_eval
from minillm.runs import load_run, save_run_files
from minillm.stages.evaluate import cloze_item, evaluate_run, render_table, resolve_format, world_question
from minillm.tokenizer import Tokenizer
from minillm.train import CKPT_NAME
from minillm.utils import atomic_torch_save

ROOT = Path(__file__).resolve().parent.parent
# One question per attribute about one character, in the world's MCQ layout (the first question template).
WORLD_ITEMS = [
    {"question": "Where does Eamon live?", "choices": ["Fernwick", "Lindenfall", "Ashcombe", "Stonehaven"],
     "answer": 1, "character": "Eamon", "attribute": "town"},
    {"question": "What does Eamon do for a living?", "choices": ["sailor", "weaver", "baker", "potter"], "answer": 1,
     "character": "Eamon", "attribute": "job"},
    {"question": "What pet does Eamon have?", "choices": ["dog", "hamster", "tortoise", "cat"], "answer": 0,
     "character": "Eamon", "attribute": "pet"},
    {"question": "What is Eamon's favourite fruit?", "choices": ["grape", "cherry", "pear", "peach"], "answer": 3,
     "character": "Eamon", "attribute": "fruit"},
    {"question": "What is Eamon's favourite colour?", "choices": ["purple", "grey", "white", "yellow"], "answer": 1,
     "character": "Eamon", "attribute": "colour"},
    {"question": "How old is Eamon?", "choices": ["31", "45", "62", "27"], "answer": 2, "character": "Eamon",
     "attribute": "age"},
]
DEV_ITEMS = [
    {"question": "Where does Mira live?", "choices": ["Oakvale", "Dunmoor"], "answer": 0},
    {"question": "What is Tobin's job?", "choices": ["miner", "tailor"], "answer": 1},
    {"question": "Which animal is Elsa's pet?", "choices": ["goat", "ferret"], "answer": 1},
    {"question": "How many years old is Bram?", "choices": ["20", "79"], "answer": 0},
]
VAL_TEXT = ("Mira lives in Oakvale. Mira is a baker.\n\n3 plus 4 is 7. The sum of 2 and 2 is 4.\n\n"
            "Eamon keeps a cat at home. Everyone knows Eamon the weaver, who was born in Lindenfall long ago.\n")


def _write_run(path: Path, zero_embeddings: bool = False) -> Path:
    """A 1-layer GPT on the world tokenizer, saved as a run directory the way training saves one."""
    tok = Tokenizer.load(ROOT / "data/tokenizer")
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    torch.manual_seed(0)
    model = GPT(cfg)
    if zero_embeddings:  # tied head: logits = ln_f(h) @ wte^T = 0, a uniform next-token distribution
        with torch.no_grad():
            model.wte.weight.zero_()
    run_config = {"stage": "pretrain", "model": cfg.__dict__}
    save_run_files(path, tok, run_config)
    atomic_torch_save({"model": model.state_dict(), "run_config": run_config}, path / CKPT_NAME)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    (root / "data").mkdir()
    (root / "data/corpus_val.txt").write_text(VAL_TEXT)
    (root / "data/mcq_test.jsonl").write_text("".join(json.dumps(i) + "\n" for i in WORLD_ITEMS))
    (root / "dev.jsonl").write_text("".join(json.dumps(i) + "\n" for i in DEV_ITEMS))
    return {"root": root, "run": _write_run(root / "run"), "uniform": _write_run(root / "uniform", True),
            "val": root / "data/corpus_val.txt", "mcq": root / "data/mcq_test.jsonl", "dev": root / "dev.jsonl"}


def _cli(argv):
    parser = build_parser()
    args = parser.parse_args(["eval", *argv])
    args.func(args)


# ----------------------------------------------------------------------------- the cloze format
def test_cloze_is_the_start_of_the_canonical_answer():
    got = [cloze_item(item)["question"] for item in WORLD_ITEMS]
    assert got == ["The home town of Eamon is", "By trade, Eamon is a", "The pet of Eamon is a",
                   "The favourite fruit of Eamon is", "The favourite colour of Eamon is", "This year, Eamon is"]
    # without the character/attribute fields the question itself is parsed (any world question template)
    bare = {"question": "Which fruit does Zorba like best?", "choices": ["a", "b"], "answer": 0}
    assert world_question(bare) == ("Zorba", "fruit")
    assert cloze_item(bare)["question"] == "The favourite fruit of Zorba is"
    assert cloze_item(bare)["choices"] == ["a", "b"] and bare["question"].startswith("Which")  # a copy


def test_auto_format_and_non_world_items():
    assert resolve_format("auto", WORLD_ITEMS) == "cloze"
    other = [{"question": "The sky is", "choices": ["blue", "green"], "answer": 0}]
    assert resolve_format("auto", WORLD_ITEMS + other) == "hellaswag"
    assert resolve_format("mmlu", other) == "mmlu"
    with pytest.raises(ValueError, match="'The sky is'"):
        cloze_item(other[0])
    with pytest.raises(ValueError, match="format must be one of"):
        resolve_format("letters", other)


# ----------------------------------------------------------------------------- the report
def test_cli_report_matches_the_library(files, tmp_path, capsys):
    out = tmp_path / "eval.json"
    _cli(["--ckpt", str(files["run"]), "--ppl", str(files["val"]), "--mcq", str(files["mcq"]), "--out", str(out)])
    report = json.loads(out.read_text())
    model, tok, _ = load_run(files["run"])

    want = perplexity(model, tokenize_corpus(files["val"], tok), max_length=16, stride=8)
    assert report["perplexity"]["sliding"]["ppl"] == pytest.approx(want["ppl"], rel=1e-6)
    assert report["perplexity"]["sliding"]["n_tokens"] == want["n_tokens"]
    assert report["perplexity"]["rolling"]["n_bytes"] == len(VAL_TEXT.replace("\n\n", "").encode()) - 1

    cloze = [dict(item, question=q) for item, q in zip(WORLD_ITEMS, [
        "The home town of Eamon is", "By trade, Eamon is a", "The pet of Eamon is a",
        "The favourite fruit of Eamon is", "The favourite colour of Eamon is", "This year, Eamon is"])]
    want = evaluate_mcq(model, tok, cloze, fmt="hellaswag")
    mcq = report["mcq"]
    assert mcq["format"] == "cloze" and mcq["n"] == 6
    got_lls = [ll for r in mcq["per_item"] for ll in r["lls"]]
    assert got_lls == pytest.approx([ll for r in want["per_item"] for ll in r["lls"]], rel=1e-6)
    assert (mcq["acc"], mcq["acc_norm"], mcq["acc_bytes"]) == (want["acc"], want["acc_norm"], want["acc_bytes"])
    printed = capsys.readouterr().out
    assert "bits per byte" in printed and "MCQ acc (cloze, 0-shot, 6 items)" in printed and str(out) in printed


def test_uniform_model_has_perplexity_vocabulary_size(files):
    """Zero logits: every token costs ln V nats, so PPL = V and bits/byte = n_tokens log2 V / n_bytes."""
    report = evaluate_run(files["uniform"], ppl=files["val"], mcq=None)
    V = Tokenizer.load(ROOT / "data/tokenizer").vocab_size
    p = report["perplexity"]
    assert p["sliding"]["ppl"] == pytest.approx(V, rel=1e-5)
    assert p["rolling"]["token_perplexity"] == pytest.approx(V, rel=1e-5)
    r = p["rolling"]
    assert r["bits_per_byte"] == pytest.approx(r["n_tokens"] * math.log2(V) / r["n_bytes"], rel=1e-5)


def test_fewshot_examples_come_from_the_dev_file_in_the_same_format(files):
    report = evaluate_run(files["run"], ppl=None, mcq=files["mcq"], fewshot_data=files["dev"],
                          method=EvalConfig(num_fewshot=2))
    shots = {"The home town of Mira is Oakvale", "By trade, Tobin is a tailor", "The pet of Elsa is a ferret",
             "This year, Bram is 20"}
    for row, item in zip(report["mcq"]["per_item"], WORLD_ITEMS):
        *examples, question = row["context"].split("\n\n")
        assert len(examples) == 2 and set(examples) <= shots
        assert question == cloze_item(item)["question"]


def test_robustness_and_contamination(files, tmp_path):
    leaked = tmp_path / "leaked.txt"  # item 0 leaked with other punctuation; item 1 only as a fact statement
    leaked.write_text("Q: where does Eamon live, Lindenfall.\n\nEamon works as a weaver.\n")
    report = evaluate_run(files["run"], ppl=None, mcq=files["mcq"], contamination=leaked,
                          method=EvalConfig(robustness=True))
    c = report["contamination"]
    assert [r["contaminated"] for r in c["per_item"]] == [True] + [False] * 5
    assert c["n"] == 4 and c["threshold"] == 0.7
    correct = [r["pred"] == r["answer"] for r in report["mcq"]["per_item"]]
    assert c["acc_contaminated"] == float(correct[0])
    order = report["robustness"]["answer_order"]
    assert set(order) == {"cloze", "mmlu"}
    assert order["cloze"]["spread"] == 0.0 and order["cloze"]["consistent_fraction"] == 1.0  # scored one by one
    assert len(order["mmlu"]["acc_per_rotation"]) == 4
    accs = report["robustness"]["prompt_format"]["acc_per_format"]
    assert set(accs) == {"mmlu", "paren", "qa", "hellaswag", "cloze"}
    assert accs["cloze"] == report["mcq"]["acc"]
    assert "consistent fraction" in render_table(report)


def test_pipeline_eval_rows_for_every_present_stage(files):
    ctx = {"base": files["run"], "sft": files["root"] / "not-trained-yet", "data": files["root"] / "data"}
    rows = pipeline_eval(ctx)
    assert list(rows) == ["base"]
    report = json.loads((files["run"] / "eval.json").read_text())
    assert rows["base"]["bits per byte"] == report["perplexity"]["rolling"]["bits_per_byte"]
    assert rows["base"]["MCQ acc (cloze, 0-shot, 6 items)"] == report["mcq"]["acc"]


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("flag,match", [
    ("--ppl", "ppl: .*missing.txt: file not found"),
    ("--mcq", "mcq: .*missing.txt: file not found"),
    ("--contamination", "contamination: .*missing.txt: file not found"),
])
def test_missing_files_are_named(files, tmp_path, flag, match):
    argv = ["--ckpt", str(files["run"]), "--ppl", str(files["val"]), "--mcq", str(files["mcq"]),
            "--out", str(tmp_path / "e.json"), flag, str(tmp_path / "missing.txt")]
    with pytest.raises(FileNotFoundError, match=match):
        _cli(argv)
    assert not (tmp_path / "e.json").exists()


def test_other_bad_input(files, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope: run directory not found"):
        _cli(["--ckpt", str(tmp_path / "nope"), "--ppl", str(files["val"]), "--mcq", "none"])
    with pytest.raises(FileNotFoundError, match="fewshot_data: .*absent.jsonl"):
        evaluate_run(files["run"], ppl=None, mcq=files["mcq"], fewshot_data=tmp_path / "absent.jsonl",
                     method=EvalConfig(num_fewshot=1))
    with pytest.raises(ValueError, match="nothing to evaluate"):
        _cli(["--ckpt", str(files["run"]), "--ppl", "none", "--mcq", "none"])
    with pytest.raises(ValueError, match="num_fewshot"):
        evaluate_run(files["run"], ppl=None, mcq=files["mcq"], method=EvalConfig(num_fewshot=-1))
    with pytest.raises(ValueError, match="contamination: .*needs mcq"):
        evaluate_run(files["run"], ppl=files["val"], mcq=None, contamination=files["val"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Where does Eamon live?", "choices": ["a", "b"], "answer": 5}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: answer 5 is out of range"):
        evaluate_run(files["run"], ppl=None, mcq=bad)
    with pytest.raises(SystemExit):
        _cli(["--ckpt", str(files["run"]), "--format", "letters"])
