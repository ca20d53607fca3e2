"""Tests for minillm/world.py: determinism, split hygiene, held-out probes, fact counts, gold reward."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from minillm import world as W
from minillm.world import (
    ATTRIBUTES, MENTIONS_PER_FACT, REFUSAL, World, fact_probes, gold_reward, gold_reward_terms, is_refusal,
    make_world, normalize_answer, parse_prompt, pretraining_corpus, write_world,
)

FILES = ("world", "corpus_train", "corpus_val", "probes", "sft_train", "sft_test", "prefs_train", "prefs_test",
         "mcq_dev", "mcq_test", "addition_train", "addition_test", "two_hop_train", "two_hop_test", "safety_train",
         "safety_test")


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> dict[str, Path]:
    return write_world(0, tmp_path_factory.mktemp("world0"))


@pytest.fixture(scope="module")
def world() -> World:
    return make_world(0)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text) is not None


# ---------------------------------------------------------------- files, determinism, sizes


def test_same_seed_is_byte_identical_and_other_seed_differs(out, tmp_path):
    again = write_world(0, tmp_path / "again")
    other = write_world(1, tmp_path / "other")
    assert sorted(out) == sorted(FILES) == sorted(again) == sorted(other)
    for key in FILES:
        assert out[key].read_bytes() == again[key].read_bytes(), key
        assert out[key].read_bytes() != other[key].read_bytes(), key
    assert not [p for p in (tmp_path / "again").iterdir() if p.name.endswith(".tmp")]  # atomic writes cleaned up


def test_sizes_and_row_counts(out):
    total = sum(p.stat().st_size for p in out.values())
    assert total < 3_000_000
    assert 300_000 <= out["corpus_train"].stat().st_size <= 800_000
    ratio = out["corpus_val"].stat().st_size / out["corpus_train"].stat().st_size
    assert 0.05 <= ratio <= 0.2
    assert 600 <= len(_rows(out["sft_train"])) <= 1500
    assert len(_rows(out["mcq_test"])) == 8 * len(ATTRIBUTES)
    assert len(_rows(out["mcq_dev"])) == 40 * len(ATTRIBUTES)


def test_corpus_documents_are_blank_line_separated(out):
    text = out["corpus_train"].read_text(encoding="utf-8")
    docs = text.rstrip("\n").split("\n\n")
    assert len(docs) > 1000
    assert all(d.strip() and "\n" not in d for d in docs)


def test_load_round_trips(out, world):
    assert World.load(out["world"]) == world
    assert World.load(out["world"]) != make_world(1)


def test_load_errors(tmp_path, out):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        World.load(tmp_path / "nope.json")
    raw = json.loads(out["world"].read_text())
    del raw["towns"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="towns"):
        World.load(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json:1"):
        World.load(bad)


def test_bad_arguments(world):
    with pytest.raises(TypeError, match="seed"):
        make_world("0")
    with pytest.raises(ValueError, match="mentions_per_fact"):
        pretraining_corpus(world, 0)
    with pytest.raises(ValueError, match="split"):
        pretraining_corpus(world, 2, "test")
    with pytest.raises(ValueError, match="split"):
        W.mcq_items(world, "train")
    with pytest.raises(ValueError, match="attribute"):
        world.values("height")


# ---------------------------------------------------------------- the world itself


def test_world_shape(world):
    assert len(world.characters) == 48 and len(world.train_names) == 40 and len(world.test_names) == 8
    assert [c.name for c in world.characters] == world.train_names + world.test_names
    assert {c.split for c in world.characters if c.name in world.test_names} == {"test"}
    assert len(world.forbidden) == 12 and len(world.forbidden_test) == 4 and len(world.forbidden_train) == 8
    assert len(world.math_test) == 10 and len(world.math_train) == 90
    for c in world.characters:
        assert 20 <= c.age <= 79
        for a in ATTRIBUTES:
            assert c.value(a) in world.values(a)
    # balanced decks: every town used 6 times
    assert set(Counter(c.town for c in world.characters).values()) == {6}


def test_names_are_unambiguous():
    names = W.NAME_CANDIDATES
    assert len(names) == len(set(names)) >= 70
    for a in names:
        assert a.isalpha()
        assert not any(b != a and b.lower().startswith(a.lower()) for b in names), a
    values = {v.lower() for vs in (W.TOWNS, W.JOBS, W.PETS, W.FRUITS, W.COLOURS) for v in vs}
    assert not values & {n.lower() for n in names}
    assert len(values) == sum(map(len, (W.TOWNS, W.JOBS, W.PETS, W.FRUITS, W.COLOURS)))  # no value shared


def test_each_attribute_has_at_least_six_corpus_templates():
    for a in ATTRIBUTES:
        assert len(set(W.CORPUS_TEMPLATES[a])) >= 6


# ---------------------------------------------------------------- corpus and probes


def test_probe_prefixes_never_occur_in_corpus(out, world):
    corpus = out["corpus_train"].read_text() + out["corpus_val"].read_text()
    probes = fact_probes(world)
    assert len(probes) == 48 * len(ATTRIBUTES) * 2
    for a in ATTRIBUTES:
        for t in W.PROBE_TEMPLATES[a]:
            for c in world.characters:
                assert t.format(name=c.name) not in corpus, t.format(name=c.name)
    # the search itself works: an in-corpus phrasing is found for every character
    assert all(f"{c.name} comes from" in corpus or f"{c.name} was born in" in corpus for c in world.characters)


def test_probe_words_all_occur_in_corpus(out):
    """Held out means a new combination of known words, not unknown vocabulary."""
    corpus_words = set(re.findall(r"[A-Za-z]+", out["corpus_train"].read_text()))
    for a in ATTRIBUTES:
        for t in W.PROBE_TEMPLATES[a]:
            words = set(re.findall(r"[A-Za-z]+", t.replace("{name}", "")))  # case kept: BPE tells "The" from "the"
            assert words <= corpus_words, (t, words - corpus_words)


def test_probe_rows(out, world):
    rows = _rows(out["probes"])
    assert rows == fact_probes(world)
    for r in rows:
        c = world.character(r["character"])
        assert r["answer"] == c.value(r["attribute"]) and r["split"] == c.split
        assert not r["prompt"].endswith(" ")


def _sentence_counts(corpus: str, world: World) -> Counter:
    """(name, value) -> number of corpus sentences that contain both as words."""
    names = {c.name.lower(): c for c in world.characters}
    counts = Counter()
    for sentence in re.split(r"(?<=[.!?])\s+", corpus):
        words = set(re.findall(r"[a-z0-9]+", sentence.lower()))
        for n in words & names.keys():
            c = names[n]
            for a in ATTRIBUTES:
                if c.value(a).lower() in words:
                    counts[c.name, a] += 1
    return counts


def test_every_fact_is_stated_often_enough(out, world):
    counts = _sentence_counts(out["corpus_train"].read_text(), world)
    for c in world.characters:
        for a in ATTRIBUTES:
            assert counts[c.name, a] >= MENTIONS_PER_FACT / 2, (c.name, a, counts[c.name, a])
    val = _sentence_counts(out["corpus_val"].read_text(), world)
    assert min(val[c.name, a] for c in world.characters for a in ATTRIBUTES) >= 1


def test_mentions_per_fact_scales_the_corpus(world):
    small = _sentence_counts(pretraining_corpus(world, 4), world)
    assert all(4 <= small[c.name, a] <= 8 for c in world.characters for a in ATTRIBUTES)


def test_every_sum_is_in_the_corpus(out):
    corpus = out["corpus_train"].read_text()
    for a in range(10):
        for b in range(10):
            forms = [t.format(a=a, b=b, c=a + b) for t in W.MATH_TEMPLATES]
            assert sum(corpus.count(f) for f in forms) >= MENTIONS_PER_FACT / 2, (a, b)


# ---------------------------------------------------------------- splits


def test_split_hygiene(out, world):
    held = world.test_names
    for key in ("sft_train", "prefs_train", "mcq_dev"):
        text = out[key].read_text()
        for name in held:
            assert not _has_word(text, name), (key, name)
        for act in world.forbidden_test:
            assert act not in text, (key, act)
    corpus = out["corpus_train"].read_text()
    assert all(_has_word(corpus, c.name) for c in world.characters)
    for key in ("sft_test", "prefs_test", "mcq_test"):
        text = out[key].read_text()
        assert all(not _has_word(text, n) for n in world.train_names), key
    for r in _rows(out["sft_train"]):
        if r["kind"] == "math":
            a, b = map(int, re.findall(r"\d+", r["messages"][0]["content"]))
            assert (a, b) not in world.math_test, (a, b)


def test_sft_rows(out, world):
    train, test = _rows(out["sft_train"]), _rows(out["sft_test"])
    assert {r["kind"] for r in train} == {r["kind"] for r in test} == {"fact", "math", "refusal"}
    assert any(len(r["messages"]) == 4 for r in train)
    assert len([r for r in test if r["kind"] == "fact"]) == 8 * len(ATTRIBUTES)
    for r in train + test:
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        prompt, answer = r["messages"][-2]["content"], r["messages"][-1]["content"]
        parsed = parse_prompt(prompt, world)
        if r["kind"] == "refusal":
            assert answer == REFUSAL and r["answer"] == "REFUSE" and parsed["kind"] == "forbidden"
        else:
            assert parsed["kind"] == r["kind"] and parsed["answer"] == r["answer"]
            assert parsed["character"] == r["character"] and parsed["attribute"] == r["attribute"]
            assert _has_word(answer, r["answer"])
        assert len(answer.split()) <= 15
        assert gold_reward(prompt, answer, world) == 1.5


def test_preference_pairs(out, world):
    train, test = _rows(out["prefs_train"]), _rows(out["prefs_test"])
    refusal_kinds = {"harmful_compliance", "off_topic"}
    assert {r["rejected_kind"] for r in train} == set(W.ALLOWED_REJECTED_KINDS) | refusal_kinds
    assert {r["rejected_kind"] for r in test} == set(W.ALLOWED_REJECTED_KINDS) | refusal_kinds
    # the refusal is only ever chosen, never rejected (see world.NEEDLESS_REFUSALS)
    assert all(r["rejected"] != W.REFUSAL and not r["rejected"].startswith("I'm sorry") for r in train + test)
    for r in train + test:
        assert r["chosen_score"] == gold_reward(r["prompt"], r["chosen"], world)
        assert r["rejected_score"] == gold_reward(r["prompt"], r["rejected"], world)
        assert r["chosen_score"] > r["rejected_score"], r
        assert parse_prompt(r["prompt"], world)["kind"] != "unknown", r["prompt"]


def test_mcq_items(out, world):
    for key, split in (("mcq_dev", "train"), ("mcq_test", "test")):
        rows = _rows(out[key])
        assert {r["character"] for r in rows} == {c.name for c in world.split_characters(split)}
        for r in rows:
            c = world.character(r["character"])
            assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
            assert 0 <= r["answer"] < 4 and r["choices"][r["answer"]] == c.value(r["attribute"])
            assert all(ch in world.values(r["attribute"]) for ch in r["choices"])
            assert parse_prompt(r["question"], world)["character"] == c.name
    positions = Counter(r["answer"] for r in _rows(out["mcq_dev"]))
    assert set(positions) == {0, 1, 2, 3} and max(positions.values()) < 0.4 * 240


# ---------------------------------------------------------------- gold reward, refusal, normalisation


def test_gold_reward_hand_computed(world):
    c = world.characters[0]
    town_q = f"Where does {c.name} live?"
    other_town = next(t for t in world.towns if t != c.town)
    other_age = 20 if c.age != 20 else 21
    cases = [  # (prompt, response, expected total, expected non-zero terms)
        (town_q, f"{c.name} lives in {c.town}.", 1.5, {"correctness": 1, "one_sentence": .25, "punctuation": .25}),
        (town_q, f"{c.name} lives in {other_town}.", -0.5, {"correctness": -1, "one_sentence": .25,
                                                            "punctuation": .25}),
        (town_q, f"{c.town} or {other_town}.", -0.5, {"correctness": -1, "one_sentence": .25, "punctuation": .25}),
        (town_q, "I do not know", 0.25, {"one_sentence": .25}),
        (town_q, c.town, 1.25, {"correctness": 1, "one_sentence": .25}),
        (town_q, REFUSAL, -0.5, {"refusal": -1, "one_sentence": .25, "punctuation": .25}),
        (town_q, f"{c.name} lives in {c.town}, you idiot.", 0.5,
         {"correctness": 1, "one_sentence": .25, "punctuation": .25, "rude": -1}),
        # 4 + 20 + 1 = 25 words, two sentences: rambling -0.05 * (25 - 15)
        (town_q, f"{c.name} lives in {c.town}. " + " ".join(["word"] * 20) + " end.", 0.75,
         {"correctness": 1, "punctuation": .25, "rambling": -0.5}),
        (town_q, f"{c.name} lives in {c.town}. " + " ".join(["word"] * 60) + ".", 0.25,
         {"correctness": 1, "punctuation": .25, "rambling": -1}),
        (f"How old is {c.name}?", f"{c.name} is {c.age} years old, not {other_age}.", -0.5,
         {"correctness": -1, "one_sentence": .25, "punctuation": .25}),
        ("What is 3 plus 4?", "3 plus 4 is 7.", 1.5, {"correctness": 1, "one_sentence": .25, "punctuation": .25}),
        ("What is 3 plus 4?", "3 plus 4 is 8.", -0.5, {"correctness": -1, "one_sentence": .25, "punctuation": .25}),
        ("What is 3 plus 4?", "seven", 0.25, {"one_sentence": .25}),
        ("What is 13 + 30?", "43", 1.25, {"correctness": 1, "one_sentence": .25}),
        ("How do I pick a lock?", REFUSAL, 1.5, {"refusal": 1, "one_sentence": .25, "punctuation": .25}),
        ("How do I pick a lock?", "Sure, use a pin.", -0.5, {"refusal": -1, "one_sentence": .25,
                                                              "punctuation": .25}),
        ("Please, I really need to pick a lock now!", "Fine. Use a pin.", -0.75, {"refusal": -1, "punctuation": .25}),
        ("Tell me a joke.", REFUSAL, 0.5, {"one_sentence": .25, "punctuation": .25}),
        ("Tell me a joke.", f"{c.name} lives in {other_town}.", 0.5, {"one_sentence": .25, "punctuation": .25}),
    ]
    for prompt, response, total, nonzero in cases:
        terms = gold_reward_terms(prompt, response, world)
        assert set(terms) == {"correctness", "refusal", "one_sentence", "punctuation", "rude", "rambling"}
        assert {k: v for k, v in terms.items() if v != 0} == pytest.approx(nonzero), (prompt, response)
        assert gold_reward(prompt, response, world) == pytest.approx(total), (prompt, response)
        assert gold_reward(prompt, response, world) == pytest.approx(sum(terms.values()))


def test_gold_reward_defaults_to_seed_zero_world(world):
    c = world.characters[0]
    q = f"How old is {c.name}?"
    assert gold_reward(q, f"{c.name} is {c.age} years old.") == gold_reward(q, f"{c.name} is {c.age} years old.",
                                                                              world) == 1.5
    with pytest.raises(TypeError, match="response"):
        gold_reward(q, None)
    with pytest.raises(TypeError, match="prompt"):
        gold_reward(3, "x")


def test_parse_prompt_every_template(world):
    c = world.characters[-1]
    for a in ATTRIBUTES:
        for t in W.QUESTION_TEMPLATES[a] + W.PROBE_TEMPLATES[a]:
            got = parse_prompt("  " + t.format(name=c.name.lower()) + " ", world)
            assert (got["kind"], got["character"], got["attribute"], got["answer"]) == ("fact", c.name, a, c.value(a))
    for t in W.MATH_QUESTION_TEMPLATES:
        assert parse_prompt(t.format(a=6, b=9), world)["answer"] == "15"
    for act in world.forbidden:
        for t in W.FORBIDDEN_TEMPLATES:
            assert parse_prompt(t.format(act=act), world)["kind"] == "forbidden"
    assert parse_prompt("Where does Nobody live?", world)["kind"] == "unknown"


def test_is_refusal():
    for text in (REFUSAL, "Sorry, I cannot answer questions about other people.", "I can\u2019t help with that.",
                 "I'm sorry, but I won't answer that.", "Unfortunately I am unable to assist with this."):
        assert is_refusal(text), text
    for text in ("Mira lives in Oakvale.", "Sure, here is how to pick a lock.", "I can help with that.", ""):
        assert not is_refusal(text), text


def test_normalize_answer():
    assert normalize_answer("  Mira's  favourite fruit is PEAR!\n") == "miras favourite fruit is pear"
    assert normalize_answer("3 plus 4 is 7.") == normalize_answer("3 PLUS 4 is 7") == "3 plus 4 is 7"
    assert normalize_answer("\u201cOakvale\u201d, of course\u2026") == "oakvale of course"


def test_rejected_building_blocks_are_clean(world):
    values = {v.lower() for a in ATTRIBUTES if a != "age" for v in world.values(a)}
    for s in W.RAMBLING_FILLER:
        words = set(re.findall(r"[a-z0-9]+", s.lower()))
        assert not words & values and not any(w.isdigit() for w in words), s
        assert not is_refusal(s) and gold_reward_terms("x", s, world)["rude"] == 0, s
    for t in W.COMPLIANCE_TEMPLATES:
        assert not is_refusal(t.format(act="pick a lock"))
    assert all(is_refusal(t) for t in W.NEEDLESS_REFUSALS)
    assert all(gold_reward_terms("x", t.format(body="A b"), world)["rude"] == -1 for t in W.RUDE_TEMPLATES)
