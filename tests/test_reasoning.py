"""Answer extraction, votes and best-of-N (minillm/reasoning.py) on hand cases."""
import math

import pytest
import torch

from minillm.reasoning import (
    ZERO_SHOT_COT,
    best_of_n,
    extract_answer,
    few_shot_messages,
    few_shot_text,
    majority_vote,
    pick_best,
    softmax_weights,
    weighted_vote,
)


@pytest.mark.parametrize("text,expected", [
    ("So 346 plus 279 is 625.", "625"),
    ("The answer is 1,225!", "1225"),
    ("6 + 9 + 0 = 15, write 5, carry 1. So it is 1225", "1225"),
    ("3, 4 and 6", "6"),  # a list is not one number with thousands separators
    ("12,34 is odd", "34"),
    ("no number here.", None),
    ("", None),
])
def test_extract_answer_numbers(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_values_takes_the_last_one_named():
    values = ["pear", "plum", "cherry"]
    assert extract_answer("Mira likes the Plum. No, the pear!", values) == "pear"
    assert extract_answer("Mira likes grapes.", values) is None


def test_majority_vote_counts_and_breaks_ties_by_first_appearance():
    assert majority_vote(["5", "7", "7", None, "5", "7"]) == ("7", 3)
    assert majority_vote(["9", "4", "4", "9"]) == ("9", 2)  # tie: 9 was seen first
    assert majority_vote(["4", "9", "9", "4"]) == ("4", 2)
    assert majority_vote([None, None]) == (None, 0)
    assert majority_vote([]) == (None, 0)


def test_weighted_vote_can_overturn_the_majority():
    answers = ["1", "2", "2"]
    assert weighted_vote(answers, [0.8, 0.1, 0.1]) == ("1", 0.8)
    assert weighted_vote(answers, [1.0, 1.0, 1.0])[0] == "2"
    assert weighted_vote(["a", "b"], [0.5, 0.5]) == ("a", 0.5)


@pytest.mark.parametrize("weights,match", [([1.0, float("nan")], "non-finite"), ([1.0, -0.5], ">= 0"),
                                           ([1.0], "2 answers but 1 weights")])
def test_weighted_vote_refuses_bad_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        weighted_vote(["a", "b"], weights)


def test_softmax_weights():
    w = softmax_weights([0.0, math.log(3.0)])
    assert w == pytest.approx([0.25, 0.75])
    assert softmax_weights([1000.0, 1000.0]) == pytest.approx([0.5, 0.5])  # no overflow
    with pytest.raises(ValueError, match="non-finite"):
        softmax_weights([1.0, float("inf")])


def test_pick_best_first_on_ties_and_refuses_nan():
    assert pick_best([0.1, 0.7, 0.7]) == 1
    with pytest.raises(ValueError, match="non-finite value nan at position 1"):
        pick_best([0.1, float("nan"), 0.3])
    with pytest.raises(ValueError, match="no candidates"):
        pick_best([])


def _sampler(seed: int):
    """A stand-in policy: response i of a prompt is a random number drawn with a seeded generator."""
    def sample(prompts, n):
        g = torch.Generator().manual_seed(seed)
        return [[f"{p} {int(torch.randint(0, 100, (1,), generator=g))}" for _ in range(n)] for p in prompts]
    return sample


def _score(prompts, responses):
    return [float(r.split()[-1]) for r in responses]


def test_best_of_n_picks_the_highest_score_and_n1_is_plain_sampling():
    prompts = ["a", "b", "c"]
    one = best_of_n(prompts, 1, _score, sample=_sampler(0))
    assert [y for y, _ in one] == [c[0] for c in _sampler(0)(prompts, 1)]
    eight = best_of_n(prompts, 8, _score, sample=_sampler(0))
    pool = _sampler(0)(prompts, 8)
    for (y, s), cands in zip(eight, pool):
        assert s == max(_score(None, cands)) and y == cands[_score(None, cands).index(s)]


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_best_of_n_refuses_bad_n(n):
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        best_of_n(["a"], n, _score, sample=_sampler(0))


def test_best_of_n_refuses_a_scorer_that_returns_nan():
    def nan_scorer(prompts, responses):
        return [float("nan") if "b" in r else 1.0 for r in responses]
    with pytest.raises(ValueError, match="prompt 1: pick_best: non-finite"):
        best_of_n(["a", "b"], 2, nan_scorer, sample=_sampler(0))


def test_prompt_builders():
    shots = [("What is 1 plus 2?", "1 plus 2 is 3.")]
    m = few_shot_messages(shots, "What is 4 plus 4?", ZERO_SHOT_COT)
    assert [x["role"] for x in m] == ["user", "assistant", "user"]
    assert m[-1]["content"] == "What is 4 plus 4? Let us think step by step."
    assert few_shot_text(shots, "What is 4 plus 4?") == (
        "Question: What is 1 plus 2?\nAnswer: 1 plus 2 is 3.\n\nQuestion: What is 4 plus 4?\nAnswer:")
    assert few_shot_text([], "Q?", ZERO_SHOT_COT) == "Question: Q?\nAnswer: Let us think step by step."


def test_best_of_one_equals_plain_sampling_from_a_model_with_the_same_generator():
    from pathlib import Path

    from minillm.model import GPT, GPTConfig
    from minillm.stages.pairs import gold_scorer, sample_responses
    from minillm.tokenizer import Tokenizer

    tok = Tokenizer.load(Path(__file__).resolve().parent.parent / "data" / "tokenizer")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
    prompts = [[{"role": "user", "content": q}] for q in ("What is 946 plus 279?", "How old is Mira?")]
    sample = lambda ps, n: sample_responses(model, tok, ps, n, max_new_tokens=6, seed=3)
    plain = sample(prompts, 1)
    assert [y for y, _ in best_of_n(prompts, 1, gold_scorer(), sample=sample)] == [c[0] for c in plain]
    four = sample(prompts, 4)
    best = best_of_n(prompts, 4, gold_scorer(), sample=sample)
    scores = gold_scorer()([p for p in prompts for _ in range(4)], [y for c in four for y in c])
    assert [s for _, s in best] == [max(scores[:4]), max(scores[4:])]


def test_review_cases_numbers_votes_and_scorer_length():
    from minillm.world import gold_reward_terms
    # digits inside a word are no answer, as the gold reward always read them
    assert extract_answer("It is the 7th.") is None and extract_answer("2b or not 2b") is None
    assert gold_reward_terms("Add 0 and 4.", "3 plus 4 is 7th.")["correctness"] == 1.0  # the last number is 4
    assert weighted_vote(["a", "b", "a"], [1.0, 1.0, 1.0]) == ("a", 2.0)  # a float total, like any weights
    with pytest.raises(ValueError, match="temperature"):
        softmax_weights([0.0, 1.0], temperature=float("nan"))
    with pytest.raises(ValueError, match="returned 3 scores for 4 responses"):
        best_of_n(["a", "b"], 2, lambda p, r: [1.0, 2.0, 3.0], sample=_sampler(0))
