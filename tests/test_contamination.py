"""n-gram contamination of eval items by a training corpus, on hand-made strings."""
import pytest

from minillm.eval.contamination import contamination_report, item_text, ngrams, overlap, words


def test_words_and_ngrams():
    assert words("The  Cat\nsat.") == ["the", "cat", "sat"]
    assert words("Where does Mira's cat live? (Oakvale, 3 + 4 = 7)") == [
        "where", "does", "mira's", "cat", "live", "oakvale", "3", "4", "7"]
    assert ngrams(["a", "b", "c", "d"], 3) == [("a", "b", "c"), ("b", "c", "d")]
    assert ngrams(["a", "b"], 3) == []


def test_overlap_by_hand():
    """3-grams of "the cat sat on a hat": (the cat sat) and (cat sat on) are in the corpus, the other two not;
    the hits cover the, cat, sat, on = 4 of 6 words."""
    corpus = "Yesterday the CAT sat on the mat."
    rep = contamination_report(["The cat sat on a hat"], corpus, n=3, threshold=0.6)
    row = rep["per_item"][0]
    assert row["ngram_fraction"] == pytest.approx(2 / 4)
    assert row["score"] == pytest.approx(4 / 6)
    assert row["contaminated"] and rep["contaminated_fraction"] == 1.0
    assert not contamination_report(["The cat sat on a hat"], corpus, n=3, threshold=0.7)["per_item"][0]["contaminated"]
    hits = {("the", "cat", "sat")}
    assert overlap(words("x the cat sat y"), hits, 3) == (pytest.approx(3 / 5), pytest.approx(1 / 3))


def test_ngrams_do_not_cross_documents():
    item = ["the cat sat"]
    assert contamination_report(item, "the cat sat", n=3)["n_contaminated"] == 1
    assert contamination_report(item, ["the cat", "sat"], n=3)["n_contaminated"] == 0
    assert contamination_report(item, "the cat\n\nsat", n=3)["n_contaminated"] == 1  # one string is one document


def test_item_text_uses_question_and_gold_choice():
    item = {"question": "Where does Mira live?", "choices": ["Elm", "Oakvale"], "answer": 1}
    assert item_text(item) == "Where does Mira live? Oakvale"
    rep = contamination_report([item], "people ask where does mira live? oakvale of course", n=4)
    assert rep["per_item"][0]["score"] == 1.0
    rep = contamination_report([dict(item, answer=0)], "people ask where does mira live? oakvale of course", n=4)
    assert rep["per_item"][0]["score"] == pytest.approx(4 / 5)  # "elm" is not covered


def test_punctuation_does_not_hide_a_leak():
    """The leaked copy ends the answer with a full stop and drops the question mark; the item does not."""
    item = {"question": "Where does Mira live?", "choices": ["Elm", "Oakvale"], "answer": 1}
    rep = contamination_report([item], "Q: Where does Mira live, Oakvale.", n=5)
    assert rep["per_item"][0]["score"] == 1.0


def test_accuracy_on_clean_and_contaminated_subsets():
    corpus = "alpha beta gamma delta epsilon"
    items = ["alpha beta gamma", "beta gamma delta", "zeta eta theta", "iota kappa lambda", "mu"]
    rep = contamination_report(items, corpus, per_item_correct=[True, True, True, False, False], n=3)
    assert [r["contaminated"] for r in rep["per_item"]] == [True, True, False, False, False]
    assert rep["n_contaminated"] == 2 and rep["contaminated_fraction"] == pytest.approx(0.4)
    assert rep["n_too_short"] == 1  # "mu" has no 3-gram: counted clean
    assert rep["acc_all"] == pytest.approx(0.6)
    assert rep["acc_contaminated"] == 1.0 and rep["acc_clean"] == pytest.approx(1 / 3)
    assert rep["acc_gap"] == pytest.approx(2 / 3)
    none = contamination_report(items[2:], corpus, per_item_correct=[1, 0, 0], n=3)
    assert none["acc_contaminated"] is None and none["acc_gap"] is None and none["acc_clean"] == pytest.approx(1 / 3)


def test_default_n_is_8():
    long_item = "one two three four five six seven eight nine"
    assert contamination_report([long_item], "zero " + long_item)["per_item"][0]["score"] == 1.0
    assert contamination_report([long_item], "one two three four five six seven")["n_contaminated"] == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(per_item_correct=[True]), "per_item_correct"),
    (dict(n=0), "n must"),
    (dict(threshold=0.0), "threshold"),
    (dict(threshold=1.5), "threshold"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        contamination_report(["a b c", "d e f"], "a b c", **kwargs)
    with pytest.raises(ValueError, match="empty"):
        contamination_report([], "a b c")
