"""Log-likelihood requests, multiple-choice scoring (acc / acc_norm / acc_bytes), few-shot prompts, loaders,
and the answer-order / prompt-format robustness checks."""
import json
import math
import random
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from minillm.eval.loglik import encode_pair, loglikelihood
from minillm.eval.mcq import (
    build_context,
    choose,
    evaluate_mcq,
    hellaswag_preprocess,
    load_mcq,
    mmlu_text,
    save_mcq,
)
from minillm.eval.robustness import (
    answer_order_robustness,
    original_index,
    prompt_format_robustness,
    rotate_choices,
)

V = 257  # bytes + <|endoftext|>


class ByteTokenizer:
    """Stand-in tokenizer: one token per UTF-8 byte, <|endoftext|> = 256."""

    eot_id = 256
    vocab_size = V

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


class WordTokenizer:
    """Stand-in BPE-like tokenizer: a leading space belongs to the next word (" A" is one token)."""

    eot_id = 0

    def __init__(self):
        self.vocab = {"<eot>": 0}

    def encode(self, text):
        return [self.vocab.setdefault(piece, len(self.vocab)) for piece in re.findall(r" ?\S+|\s+", text)]


class BigramLM(nn.Module):
    """logits[b, t] = table[idx[b, t]], a table of log-probabilities: log p(next | prev) = table[prev, next]."""

    def __init__(self, table: torch.Tensor, block_size: int = 64) -> None:
        super().__init__()
        self.table = nn.Parameter(table)
        self.config = SimpleNamespace(vocab_size=table.shape[0], block_size=block_size)

    def forward(self, idx, attention_mask=None):
        return self.table[idx]


def bigram(probs: dict[tuple[str, str], float], block_size: int = 64) -> BigramLM:
    """Rows uniform except the given p(next | prev); characters stand for their byte."""
    P = torch.full((V, V), 1.0 / V, dtype=torch.float64)
    rows: dict[int, dict[int, float]] = {}
    for (a, b), p in probs.items():
        rows.setdefault(ord(a), {})[ord(b)] = p
    for a, row in rows.items():
        rest = (1.0 - sum(row.values())) / (V - len(row))
        assert rest > 0, "the given probabilities of one row must sum to less than 1"
        P[a] = rest
        for b, p in row.items():
            P[a, b] = p
    return BigramLM(P.log(), block_size)


def lp(model: BigramLM, a: str, b: str) -> float:
    return model.table[ord(a) if isinstance(a, str) else a, ord(b)].item()


# ----------------------------------------------------------------------------- log-likelihood
def test_encode_pair_moves_context_whitespace():
    tok = WordTokenizer()
    ctx, cont = encode_pair(tok, "Answer: ", "A")
    assert ctx == tok.encode("Answer:")
    assert cont == tok.encode(" A")  # one token " A", not " " + "A" or nothing
    ctx, cont = encode_pair(tok, "Answer:", " B")
    assert (ctx, cont) == (tok.encode("Answer:"), tok.encode(" B"))


def test_loglikelihood_bigram_by_hand():
    model = bigram({("b", "c"): 0.6, ("a", "b"): 0.2, ("q", " "): 0.5})
    tok = ByteTokenizer()
    res = loglikelihood(model, tok, [("ab", "c"), ("a", "bc"), ("q", "cb"), ("", "ab")], batch_size=2)
    assert res[0][0] == pytest.approx(math.log(0.6))
    assert res[0][1] is True  # c is the most likely byte after b
    assert res[1][0] == pytest.approx(math.log(0.2) + math.log(0.6))
    assert res[1][1] is True
    assert res[2][0] == pytest.approx(lp(model, "q", "c") + lp(model, "c", "b"))
    assert res[2][1] is False  # after q the greedy byte is " "
    # Empty context: the first token is predicted from <|endoftext|>.
    assert res[3][0] == pytest.approx(lp(model, 256, "a") + math.log(0.2))


def test_loglikelihood_crops_long_context_from_left(tiny_model, tiny_config):
    class ModTokenizer:
        eot_id = 96

        def encode(self, text):
            return [ord(c) % 96 for c in text]

    tok = ModTokenizer()
    context, continuation = "the quick brown fox jumps over the lazy dog" * 2, "xyz"
    ids = tok.encode(context + continuation)
    inp = torch.tensor(ids[-(tiny_config.block_size + 1):][:-1])
    with torch.no_grad():
        logp = torch.log_softmax(tiny_model(inp[None])[0], dim=-1)
    want = sum(logp[len(inp) - 3 + j, tok.encode("xyz")[j]].item() for j in range(3))
    (got, _), = loglikelihood(tiny_model, tok, [(context, continuation)])
    assert got == pytest.approx(want, rel=1e-5)


def test_loglikelihood_batching_and_padding_do_not_change_results(tiny_model):
    class ModTokenizer:
        eot_id = 96

        def encode(self, text):
            return [ord(c) % 96 for c in text]

    rnd = random.Random(0)
    letters = "abcdefghij "
    requests = [("".join(rnd.choice(letters) for _ in range(rnd.randint(1, 40))),
                 "".join(rnd.choice(letters) for _ in range(rnd.randint(1, 6)))) for _ in range(17)]
    one = loglikelihood(tiny_model, ModTokenizer(), requests, batch_size=1)
    many = loglikelihood(tiny_model, ModTokenizer(), requests, batch_size=32)
    for (a, ga), (b, gb) in zip(one, many):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5)
        assert ga == gb


def test_loglikelihood_bad_requests():
    model, tok = bigram({}), ByteTokenizer()
    with pytest.raises(ValueError, match="no tokens"):
        loglikelihood(model, tok, [("abc", "")])
    with pytest.raises(TypeError, match=r"requests\[0\]"):
        loglikelihood(model, tok, ["abc"])
    with pytest.raises(ValueError, match="does not fit"):
        loglikelihood(bigram({}, block_size=4), tok, [("a", "bcdefg")])


# ----------------------------------------------------------------------------- scoring
def test_acc_norm_differs_from_acc_when_lengths_matter():
    """ll(" a") = ln .5 + ln .3 = -1.90 beats ll(" bbbb") = ln .5 + ln .1 + 3 ln .9 = -3.31,
    but per character -3.31 / 4 = -0.83 beats -1.90 / 1."""
    model = bigram({("q", " "): 0.5, (" ", "a"): 0.3, (" ", "b"): 0.1, ("b", "b"): 0.9})
    items = [{"question": "q", "choices": ["a", "bbbb"], "answer": 1}]
    res = evaluate_mcq(model, ByteTokenizer(), items, fmt="hellaswag")
    row = res["per_item"][0]
    assert row["lls"][0] == pytest.approx(math.log(0.5) + math.log(0.3))
    assert row["lls"][1] == pytest.approx(math.log(0.5) + math.log(0.1) + 3 * math.log(0.9))
    assert (row["pred"], row["pred_norm"], row["pred_bytes"]) == (0, 1, 1)
    assert (res["acc"], res["acc_norm"], res["acc_bytes"], res["n"]) == (0.0, 1.0, 1.0, 1)
    assert row["context"] == "q"


def test_choose_normalises_by_characters_and_by_bytes():
    # -2.2 / 2 chars = -1.1 < -3 / 3 = -1.0, but -2.2 / 4 bytes = -0.55 > -1.0.
    assert choose([-2.2, -3.0], ["éé", "abc"]) == (0, 1, 0)
    assert choose([-1.0, -1.0], ["x", "y"]) == (0, 0, 0)  # ties go to the first, like numpy


def test_mmlu_prompt_and_letter_scoring():
    item = {"question": "  What is 2+2? ", "choices": ["3", "4", "5", "22"], "answer": 1}
    assert mmlu_text(item) == "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:"
    # The model only likes " C" after ":" -> every item is answered C.
    model = bigram({(":", " "): 0.9, (" ", "C"): 0.5})
    items = [dict(item, answer=a) for a in (0, 2, 2, 3)]
    res = evaluate_mcq(model, ByteTokenizer(), items, fmt="mmlu")
    assert [r["pred"] for r in res["per_item"]] == [2, 2, 2, 2]
    assert res["acc"] == 0.5 and res["acc_norm"] == 0.5  # letters all have length 1
    assert res["per_item"][0]["choices"] == ["A", "B", "C", "D"]
    sub = build_context(dict(item, subject="high_school_math"), [], "mmlu")
    assert sub.startswith("The following are multiple choice questions (with answers) about high school math.\n\n")


def make_items(n, prefix):
    return [{"question": f"{prefix} question {i}?", "choices": [f"x{i}", f"y{i}", f"z{i}"], "answer": i % 3}
            for i in range(n)]


def test_fewshot_context_structure_and_seed():
    model, tok = bigram({}), ByteTokenizer()
    items, dev = make_items(3, "test"), make_items(10, "dev")
    res = evaluate_mcq(model, tok, items, num_fewshot=3, fewshot_items=dev, fmt="mmlu", seed=1234)
    shots_of = {mmlu_text(d) + " " + "ABC"[d["answer"]]: d for d in dev}
    for item, row in zip(items, res["per_item"]):
        parts = row["context"].split("\n\n")
        assert len(parts) == 4 and parts[-1] == mmlu_text(item)
        assert all(p in shots_of for p in parts[:3]) and len(set(parts[:3])) == 3
    # lm-eval's default sampler: one random.Random(seed) drawing k examples per item, in order.
    rnd = random.Random(1234)
    for row in res["per_item"]:
        want = "".join(mmlu_text(d) + " " + "ABC"[d["answer"]] + "\n\n" for d in rnd.sample(dev, 3))
        assert row["context"].startswith(want)
    again = evaluate_mcq(model, tok, items, num_fewshot=3, fewshot_items=dev, fmt="mmlu", seed=1234)
    other = evaluate_mcq(model, tok, items, num_fewshot=3, fewshot_items=dev, fmt="mmlu", seed=7)
    assert [r["context"] for r in again["per_item"]] == [r["context"] for r in res["per_item"]]
    assert [r["context"] for r in other["per_item"]] != [r["context"] for r in res["per_item"]]
    first = evaluate_mcq(model, tok, items, num_fewshot=2, fewshot_items=dev, fmt="hellaswag", sampler="first_n")
    for item, row in zip(items, first["per_item"]):
        assert row["context"] == "dev question 0? x0\n\ndev question 1? y1\n\n" + item["question"]


def test_fewshot_from_eval_items_drops_the_evaluated_item():
    model, tok = bigram({}), ByteTokenizer()
    items = make_items(5, "q")
    for sampler in ("random", "first_n"):
        res = evaluate_mcq(model, tok, items, num_fewshot=4, fmt="hellaswag", sampler=sampler)
        for item, row in zip(items, res["per_item"]):
            shots = row["context"].split("\n\n")[:-1]
            own = item["question"] + " " + item["choices"][item["answer"]]
            assert len(shots) == 4 and own not in shots
    with pytest.raises(ValueError, match="num_fewshot"):
        evaluate_mcq(model, tok, items, num_fewshot=5, fmt="hellaswag")  # needs 6 draws from 5 items


@pytest.mark.parametrize("item,match", [
    ({"question": "q", "choices": ["only"], "answer": 0}, "at least 2 choices"),
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "out of range"),
    ({"question": "q", "choices": ["a", "b"], "answer": -1}, "out of range"),
    ({"question": "q", "choices": ["a", "b"]}, "answer"),
    ({"question": "q", "choices": "ab", "answer": 0}, "list of strings"),
])
def test_bad_items(item, match):
    with pytest.raises(ValueError, match=match):
        evaluate_mcq(bigram({}), ByteTokenizer(), [item])


def test_bad_format_and_sampler():
    items = make_items(2, "q")
    with pytest.raises(ValueError, match="fmt"):
        evaluate_mcq(bigram({}), ByteTokenizer(), items, fmt="nope")
    with pytest.raises(ValueError, match="sampler"):
        evaluate_mcq(bigram({}), ByteTokenizer(), items, sampler="nope")


# ----------------------------------------------------------------------------- loaders
def test_load_our_jsonl(tmp_path):
    path = tmp_path / "mcq.jsonl"
    items = [{"question": "2+2?", "choices": ["3", "4"], "answer": 1, "id": "a"},
             {"question": "Capital?", "choices": ["Oakvale", "Elm"], "answer": "Elm"}]
    path.write_text("\n".join(json.dumps(i) for i in items) + "\n\n")
    got = load_mcq(path)
    assert got[0] == items[0]
    assert got[1]["answer"] == 1  # a string answer is looked up in the choices
    out = tmp_path / "round.jsonl"
    save_mcq(got, out)
    assert load_mcq(out) == got


@pytest.mark.parametrize("record,match", [
    ({"question": "q", "choices": ["a"], "answer": 0}, "at least 2 choices"),
    ({"question": "q", "choices": ["a", "b"], "answer": 5}, "out of range"),
    ({"question": "q", "choices": ["a", "b"], "answer": "c"}, "neither"),
    ({"question": "q", "answer": 0}, "missing field 'choices'"),
])
def test_load_our_jsonl_errors(tmp_path, record, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "ok", "choices": ["a", "b"], "answer": 0}) + "\n" + json.dumps(record))
    with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{match}"):
        load_mcq(path)


def test_load_mmlu_csv(tmp_path):
    path = tmp_path / "abstract_algebra_test.csv"
    path.write_text('"Find x, if 2x = 4.",1,2,3,4,B\nWhich is prime?,4,6,7,8,2\n')
    got = load_mcq(path)
    assert got[0] == {"question": "Find x, if 2x = 4.", "choices": ["1", "2", "3", "4"], "answer": 1,
                      "subject": "abstract_algebra"}
    assert got[1]["answer"] == 2
    header = tmp_path / "mmlu.csv"
    header.write_text("question,A,B,C,D,answer\nq1,a,b,c,d,D\n")
    assert load_mcq(header) == [{"question": "q1", "choices": ["a", "b", "c", "d"], "answer": 3}]


@pytest.mark.parametrize("text,match", [
    ("question,A,B,C,answer\nq,a,b,c,A\n", r"mmlu\.csv:1: missing column\(s\) \['D'\]"),
    ("q1,a,b,c,d,A\nq2,a,b,c,A\n", r"mmlu\.csv:2: expected 6 columns"),
    ("q1,a,b,c,d,E\n", r"mmlu\.csv:1: answer 'E'"),
    ("question,A,B,C,D,answer\nq,a,b,c,d\n", r"mmlu\.csv:2: expected 6 columns"),
    ("", "no items"),
])
def test_load_mmlu_csv_errors(tmp_path, text, match):
    path = tmp_path / "mmlu.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_mcq(path)


def test_load_hellaswag_jsonl(tmp_path):
    path = tmp_path / "hellaswag.jsonl"
    records = [
        {"ctx": "A man is [title] sitting on a roof.", "endings": [" he is  tired.", "b", "c", "d"], "label": "2"},
        {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
         "ctx": "unused", "endings": ["starts pulling up roofing.", "x", "y", "z"], "label": 0},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records))
    got = load_mcq(path)
    assert got[0] == {"question": "A man is. sitting on a roof.", "choices": ["he is tired.", "b", "c", "d"],
                      "answer": 2}
    assert got[1]["question"] == "Roof shingle removal: A man is sitting on a roof. He"
    assert hellaswag_preprocess(" x [header] y ") == "x y"
    bad = tmp_path / "hs_bad.jsonl"
    bad.write_text(json.dumps(records[0]) + "\n" + json.dumps(dict(records[0], label="")))
    with pytest.raises(ValueError, match=r"hs_bad\.jsonl:2: label"):
        load_mcq(bad)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_mcq(tmp_path / "missing.jsonl")
    other = tmp_path / "items.txt"
    other.write_text("x")
    with pytest.raises(ValueError, match="items.txt: unknown"):
        load_mcq(other)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "q", \n')
    with pytest.raises(ValueError, match="broken.jsonl:1: invalid JSON"):
        load_mcq(broken)


# ----------------------------------------------------------------------------- robustness
def test_rotation_bookkeeping():
    item = {"question": "q", "choices": ["a", "b", "c", "d"], "answer": 1}
    assert rotate_choices(item, 1) == {"question": "q", "choices": ["b", "c", "d", "a"], "answer": 0}
    for k in range(4):
        rot = rotate_choices(item, k)
        assert rot["choices"][rot["answer"]] == "b"
        for j in range(4):
            assert rot["choices"][j] == item["choices"][original_index(j, k, 4)]
    assert item["choices"] == ["a", "b", "c", "d"]  # not modified in place


def test_letter_biased_model_is_never_consistent():
    """Always answering "A": accuracy under rotation k is the share of items whose gold sits at k."""
    model = bigram({(":", " "): 0.9, (" ", "A"): 0.5})
    items = [{"question": f"q{i}", "choices": ["w", "x", "y", "z"], "answer": a} for i, a in enumerate([0, 0, 1, 3])]
    res = answer_order_robustness(model, ByteTokenizer(), items, fmt="mmlu")
    assert res["acc_per_rotation"] == [0.5, 0.25, 0.0, 0.25]
    assert res["spread"] == 0.5 and res["mean"] == 0.25
    assert res["consistent_fraction"] == 0.0
    assert all(r["answers"] == [0, 1, 2, 3] for r in res["per_item"])


def test_content_model_is_consistent():
    """A model that likes the text "yes" picks it wherever it is listed."""
    model = bigram({("?", " "): 0.9, (" ", "y"): 0.6})
    items = [{"question": f"q{i}?", "choices": ["no", "yes", "maybe"], "answer": a} for i, a in enumerate([1, 1, 0])]
    res = answer_order_robustness(model, ByteTokenizer(), items, fmt="hellaswag")
    assert res["acc_per_rotation"] == [pytest.approx(2 / 3)] * 3
    assert res["spread"] == 0.0 and res["consistent_fraction"] == 1.0
    assert all(r["answers"] == [1, 1, 1] for r in res["per_item"])


def test_prompt_format_robustness():
    model = bigram({(":", " "): 0.9, (" ", "A"): 0.3, ("?", " "): 0.9, (" ", "y"): 0.6})
    items = [{"question": f"q{i}?", "choices": ["no", "yes"], "answer": a} for i, a in enumerate([0, 0, 1, 1])]
    res = prompt_format_robustness(model, ByteTokenizer(), items)
    assert res["acc_per_format"] == {"mmlu": 0.5, "paren": 0.5, "qa": 0.5, "hellaswag": 0.5}
    items[0]["answer"] = 1  # now "yes" (the hellaswag pick) is right 3 times, "A" (the letter pick) once
    res = prompt_format_robustness(model, ByteTokenizer(), items, formats=("mmlu", "hellaswag"))
    assert res["acc_per_format"] == {"mmlu": 0.25, "hellaswag": 0.75}
    assert res["spread"] == 0.5 and res["mean"] == 0.5
