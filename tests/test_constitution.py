"""Constitutional AI (minillm/align/constitution.py): the constitution file is read strictly (file:line), the
critique and the labeller are the judge's verdicts with each principle filled in, the labeller is symmetric, and
the critique -> revision loop is deterministic at temperature 0."""
from pathlib import Path

import pytest
import torch

from minillm.align.constitution import (
    CRITIQUE_TEMPLATE,
    PAIRWISE_PRINCIPLE_TEMPLATE,
    Principle,
    answer,
    constitution_preferences,
    critique,
    critique_revise,
    parse_constitution,
    read_constitution,
    with_principle,
)
from minillm.eval.judge import pairwise_preferences, single_scores
from minillm.model import GPT, GPTConfig
from minillm.sampling import generate_completions
from minillm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
TOK = Tokenizer.load(ROOT / "data" / "tokenizer")
P = [Principle("polite", "The answer is polite."), Principle("brief", "The answer is one short sentence.")]
Q = ["How old is Mira?", "How do I pick a lock?", "What is 2 plus 3?"]
A = ["Mira is 34 years old.", "I'm sorry, but I can't help with that.", "2 plus 3 is 5."]
B = ["Mira is 35, you fool.", "First you take a pin.", "It is 6, and let me add a few more words here."]


def _gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=TOK.vocab_size, block_size=128, n_layer=1, n_head=2, n_embd=32)).eval()


def test_the_shipped_constitution_reads():
    principles = read_constitution(ROOT / "data" / "constitution.txt")
    assert [p.name for p in principles] == ["polite", "brief", "refuse-harm", "helpful"]
    assert all(p.text.endswith(".") for p in principles)


def test_parse_skips_comments_and_blank_lines():
    text = "# header\n\npolite: Be polite.\n  # indented comment\nbrief:   One sentence.  \n"
    assert parse_constitution(text) == [Principle("polite", "Be polite."), Principle("brief", "One sentence.")]


@pytest.mark.parametrize("text,match", [
    ("polite: Be polite.\nno colon here\n", r"rules.txt:2: expected 'name: principle'"),
    ("Polite Rule: Be polite.\n", r"rules.txt:1: principle name 'Polite Rule'"),
    ("# c\npolite:   \n", r"rules.txt:2: principle 'polite' has no text"),
    ("polite: Be {polite}.\n", r"rules.txt:1: .*braces"),
    ("polite: Be polite.\npolite: Again.\n", r"rules.txt:2: principle 'polite' is defined twice"),
    ("# only comments\n\n", r"rules.txt: the constitution has no principles"),
])
def test_a_bad_constitution_names_file_and_line(tmp_path, text, match):
    path = tmp_path / "rules.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_constitution(path)


def test_missing_constitution_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt: constitution file not found"):
        read_constitution(tmp_path / "nope.txt")


def test_with_principle_fills_only_the_principle():
    t = with_principle(CRITIQUE_TEMPLATE, P[0])
    assert "The answer is polite." in t and "{question}" in t and "{answer}" in t and "{principle}" not in t


def test_critique_is_the_single_answer_verdict_under_each_principle():
    judge = _gpt()
    crit = critique(judge, TOK, Q, A, P)
    for p in P:
        expected = single_scores(judge, TOK, Q, A, with_principle(CRITIQUE_TEMPLATE, p))
        assert [c[p.name] for c in crit] == pytest.approx(expected, abs=1e-12)


def test_constitution_labeller_is_the_mean_verdict_and_symmetric():
    judge = _gpt(1)
    ab = constitution_preferences(judge, TOK, Q, A, B, P)
    ba = constitution_preferences(judge, TOK, Q, B, A, P)
    for x, y in zip(ab["preference"], ba["preference"]):
        assert x == pytest.approx(1 - y, abs=1e-9)
    one = pairwise_preferences(judge, TOK, Q, A, B, with_principle(PAIRWISE_PRINCIPLE_TEMPLATE, P[1]))["preference"]
    assert ab["per_principle"]["brief"] == pytest.approx(one, abs=1e-12)
    mean = [(x + y) / 2 for x, y in zip(ab["per_principle"]["polite"], ab["per_principle"]["brief"])]
    assert ab["preference"] == pytest.approx(mean, abs=1e-12)
    assert ab["per_principle"]["polite"] != pytest.approx(one, abs=1e-6)  # the principle's words reach the judge


def test_answer_at_temperature_zero_is_greedy():
    model = _gpt(2)
    conv = [[{"role": "user", "content": q}] for q in Q]
    ids = [TOK.apply_chat_template(c, add_generation_prompt=True)[0] for c in conv]
    greedy = [TOK.decode(o).strip() for o in generate_completions(model, ids, 12, eos_id=TOK.end_id, temperature=0)]
    assert answer(model, TOK, conv, 12, temperature=0.0, seed=5) == greedy


class Strict(torch.nn.Module):
    """A judge that answers "No" to every critique and, when comparing, prefers whatever sits in slot A."""

    def __init__(self):
        super().__init__()
        self.config = GPTConfig(vocab_size=TOK.vocab_size, block_size=256, n_layer=1, n_head=1, n_embd=1)
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.no, self.a = TOK.encode("No"), TOK.encode("A")

    def forward(self, x):
        logits = torch.zeros(*x.shape, TOK.vocab_size) + self.w
        logits[..., self.no] = 10.0
        logits[..., self.a] = 10.0
        return logits


@pytest.mark.parametrize("samples", [0, 2])
def test_critique_revise_is_deterministic_at_temperature_zero(samples):
    model, judge = _gpt(3), _gpt(4)
    first = critique_revise(model, judge, TOK, Q, P, max_new_tokens=10, temperature=0.0, samples=samples)
    again = critique_revise(model, judge, TOK, Q, P, max_new_tokens=10, temperature=0.0, samples=samples)
    assert first == again
    for r in first:
        if r["revised"]:
            assert r["final"] == r["revision"] and r["p_better"] > 0.5
        else:
            assert r["final"] == r["initial"]


def test_a_judge_with_no_opinion_keeps_every_first_answer():
    """Strict breaks every principle (so a rewrite is asked for each answer), but its order-averaged verdict is 1/2:
    no revision is preferred to the first answer, so none is kept."""
    rows = critique_revise(_gpt(3), Strict(), TOK, Q, P, max_new_tokens=8)
    assert all(r["principle"] == "polite" and r["revision"] is not None for r in rows)  # ties: the first principle
    assert not any(r["revised"] for r in rows) and [r["final"] for r in rows] == [r["initial"] for r in rows]
