"""The world's reasoning tasks: addition with a scratchpad, two-hop questions, and their verifier."""
import random
import re

import pytest

from minillm.world import (
    N_ADDITION,
    N_HELD_OUT_OPERANDS,
    addition_examples,
    addition_scratchpad,
    check_answer,
    gold_reward,
    gold_reward_terms,
    held_out_operands,
    make_world,
    parse_prompt,
    reasoning_chat,
    two_hop_bridges,
    two_hop_examples,
)

WORLD = make_world(0)


def test_scratchpad_by_hand():
    assert addition_scratchpad(946, 279) == (
        "9 4 6 plus 2 7 9. 6 + 9 + 0 = 15, write 5, carry 1. 4 + 7 + 1 = 12, write 2, carry 1. "
        "9 + 2 + 1 = 12, write 2, carry 1. So 946 plus 279 is 1225.")
    assert addition_scratchpad(5, 17) == "5 plus 1 7. 5 + 7 + 0 = 12, write 2, carry 1. 0 + 1 + 1 = 2, write 2, carry 0. So 5 plus 17 is 22."


def test_scratchpad_columns_are_right_for_random_sums():
    rng = random.Random(0)
    for _ in range(200):
        a, b = rng.randint(0, 9999), rng.randint(0, 9999)
        text = addition_scratchpad(a, b)
        written = [int(d) for d in re.findall(r"write (\d)", text)]
        carries = [int(c) for c in re.findall(r"carry (\d)", text)]
        digits = "".join(map(str, reversed(written)))
        assert int(str(carries[-1]) + digits) == a + b
        for x, y, c, total in re.findall(r"(\d) \+ (\d) \+ (\d) = (\d+)", text):
            assert int(x) + int(y) + int(c) == int(total)


def test_addition_splits_hold_out_operand_values():
    held = set(held_out_operands(WORLD))
    train, test = addition_examples(WORLD, "train"), addition_examples(WORLD, "test")
    assert len(held) == N_HELD_OUT_OPERANDS and len(train) == N_ADDITION["train"] and len(test) == N_ADDITION["test"]
    assert all(r["a"] not in held and r["b"] not in held for r in train)
    assert all(r["a"] in held and r["b"] in held for r in test)
    pairs = [(r["a"], r["b"]) for r in train + test]
    assert len(set(pairs)) == len(pairs)
    assert all(100 <= r["a"] <= 999 and 100 <= r["b"] <= 999 and r["answer"] == str(r["a"] + r["b"]) for r in train + test)
    assert any(r["a"] + r["b"] >= 1000 for r in test)  # a carry out of the last column occurs
    # every digit occurs at every position of a training operand
    for pos in range(3):
        assert {str(r["a"])[pos] for r in train} >= set("123456789")


def test_two_hop_bridges_are_unique_and_splits_hold_out_characters():
    bridges = two_hop_bridges(WORLD)
    for (job, town), c in bridges.items():
        assert [x.name for x in WORLD.characters if x.job == job and x.town == town] == [c.name]
    train, test = two_hop_examples(WORLD, "train"), two_hop_examples(WORLD, "test")
    assert {r["character"] for r in train} <= set(WORLD.train_names)
    assert {r["character"] for r in test} <= set(WORLD.test_names) and test
    for r in test:
        assert r["character"] not in r["direct"] and r["character"] in r["cot"].split(".")[0]
        assert r["answer"] in r["direct"].split() or r["answer"] + "." in r["direct"].split()


def test_same_seed_same_rows_and_other_seed_differs():
    assert addition_examples(make_world(0), "test") == addition_examples(make_world(0), "test")
    assert two_hop_examples(make_world(0), "train") == two_hop_examples(make_world(0), "train")
    assert addition_examples(make_world(1), "test") != addition_examples(make_world(0), "test")


def test_gold_checker_by_hand():
    r = next(r for r in two_hop_examples(WORLD, "test") if r["attribute"] == "fruit")
    q, c = r["question"], WORLD.character(r["character"])
    wrong = next(v for v in WORLD.fruits if v != c.fruit)
    assert parse_prompt(q, WORLD)["kind"] == "two_hop"
    assert check_answer(q, r["cot"], WORLD) and check_answer(q, r["direct"], WORLD)
    assert not check_answer(q, f"It is not {c.fruit}, it is {wrong}.", WORLD)  # the last value named counts
    assert check_answer(q, f"Maybe {wrong}? No: {c.fruit}.", WORLD)  # the reasoning is free
    assert not check_answer(q, "I do not know.", WORLD)
    assert gold_reward_terms(q, f"Maybe {wrong}? No: {c.fruit}.", WORLD)["correctness"] == 1.0
    assert gold_reward_terms(q, "I do not know.", WORLD)["correctness"] == 0.0
    assert gold_reward(q, r["direct"], WORLD) == 1.5
    s = "What is 946 plus 279?"
    assert check_answer(s, addition_scratchpad(946, 279), WORLD)
    assert check_answer(s, "It is 1,225.", WORLD)
    assert not check_answer(s, "It is 1,215.", WORLD)
    assert gold_reward_terms(s, "946 plus 279 is 1215.", WORLD)["correctness"] == -1.0
    assert check_answer("How old is Mira?", "20.", WORLD) is None  # not a verifiable task


def test_a_description_that_fits_nobody_is_not_a_two_hop_question():
    taken = set(two_hop_bridges(WORLD))
    job, town = next((j, t) for j in WORLD.jobs for t in WORLD.towns if (j, t) not in taken)
    assert parse_prompt(f"How old is the {job} from {town}?", WORLD)["kind"] == "unknown"


def test_reasoning_chat_formats():
    r = addition_examples(WORLD, "test")[0]
    assert reasoning_chat(r, "direct")[1]["content"] == r["direct"]
    assert reasoning_chat(r, "cot")[1]["content"].startswith(" ".join(str(r["a"])))
    with pytest.raises(ValueError, match="fmt must be"):
        reasoning_chat(r, "scratch")
