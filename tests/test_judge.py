"""LLM-as-judge (minillm/eval/judge.py): the order-averaged verdict is symmetric, a constant judge has position
bias 1.0, agreement and kappa by hand, and bad templates are refused."""
from pathlib import Path

import pytest
import torch
from torch import nn

from minillm.eval.judge import (
    agreement,
    check_template,
    cohen_kappa,
    length_preference,
    pairwise_preferences,
    position_bias,
    single_scores,
)
from minillm.model import GPT, GPTConfig
from minillm.tokenizer import Tokenizer

TOK = Tokenizer.load(Path(__file__).resolve().parent.parent / "data" / "tokenizer")
Q = ["How old is Mira?", "What is 2 plus 3?", "Where does Tobin live?"]
A = ["Mira is 34 years old.", "2 plus 3 is 5.", "Tobin lives in Oakvale, a town I could talk about for hours."]
B = ["Mira is 35.", "It is 6.", "Tobin lives in Dunmoor."]


def _gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=TOK.vocab_size, block_size=128, n_layer=1, n_head=2, n_embd=32)).eval()


class AlwaysA(nn.Module):
    """A judge that puts a large logit on "A" whatever it reads."""

    def __init__(self, favourite: str = "A"):
        super().__init__()
        self.config = GPTConfig(vocab_size=TOK.vocab_size, block_size=256, n_layer=1, n_head=1, n_embd=1)
        self.w = nn.Parameter(torch.zeros(1))
        self.fav = TOK.encode(favourite)  # every token of the word ("Yes" is two)

    def forward(self, x):
        logits = torch.zeros(*x.shape, TOK.vocab_size) + self.w
        logits[..., self.fav] = 10.0
        return logits


@pytest.mark.parametrize("chat", [True, False])
def test_order_averaged_preference_is_symmetric(chat):
    judge = _gpt()
    ab = pairwise_preferences(judge, TOK, Q, A, B, chat=chat)
    ba = pairwise_preferences(judge, TOK, Q, B, A, chat=chat)
    for x, y in zip(ab["preference"], ba["preference"]):
        assert x == pytest.approx(1 - y, abs=1e-9)
    assert ab["a_first"] == ba["b_first"] and all(0 < p < 1 for p in ab["a_first"])


def test_a_constant_judge_has_position_bias_one_and_no_opinion():
    r = pairwise_preferences(AlwaysA(), TOK, Q, A, B)
    assert position_bias(r["a_first"], r["b_first"]) == 1.0
    assert all(p == pytest.approx(0.5, abs=1e-6) for p in r["preference"])  # averaging both orders cancels it
    assert all(s > 0.99 for s in single_scores(AlwaysA("Yes"), TOK, Q, A))


def test_position_bias_of_a_consistent_judge_is_zero():
    assert position_bias([0.9, 0.2, 0.6], [0.1, 0.7, 0.3]) == 0.0
    assert position_bias([0.9, 0.2, 0.6], [0.8, 0.7, 0.3]) == pytest.approx(1 / 3)


def test_agreement_and_kappa_by_hand():
    judge, gold = [0.9, 0.2, 0.7, 0.4], [1.0, 0.0, 0.0, 0.0]
    assert agreement(judge, gold) == 0.75
    # q_judge = 1/2, q_gold = 1/4: chance agreement 1/2 * 1/4 + 1/2 * 3/4 = 1/2, kappa = (0.75 - 0.5) / 0.5
    assert cohen_kappa(judge, gold) == pytest.approx(0.5)
    assert cohen_kappa([0.9, 0.1], [0.8, 0.3]) == 1.0 and cohen_kappa([0.9, 0.1], [0.2, 0.8]) == -1.0


def test_length_preference_by_hand():
    assert length_preference([0.9, 0.1, 0.6], A, B) == pytest.approx(2 / 3)  # pair 2: prefers the shorter b
    with pytest.raises(ValueError, match="same length"):
        length_preference([0.5], ["a b"], ["c d"])


@pytest.mark.parametrize("template,match", [
    ("Question: {question} A: {a}. Which is better?", r"\{b\}"),
    ("{question} {a} {b} {a}", r"\{a\}"),
])
def test_templates_without_both_slots_are_refused(template, match):
    with pytest.raises(ValueError, match=match):
        check_template(template, ("question", "a", "b"))
    with pytest.raises(ValueError, match="exactly once"):
        pairwise_preferences(_gpt(), TOK, Q, A, B, template=template)
