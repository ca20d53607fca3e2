"""Was the evaluation set in the training data? n-gram overlap, after the Llama 3 contamination analysis.

Following Singh et al. (2024) as used in the Llama 3 report (Dubey et al., 2024, contamination table),
an eval item's text is split into lowercased words w_1..w_m (punctuation dropped, so "live?" and
"Oakvale." match "live" and "Oakvale"; the report counts tokens, where punctuation is a token of its own)
and compared with the training corpus through word n-grams (n = 8 by default, as in the report):

    G(item)    = { (w_j, ..., w_{j+n-1}) : j = 1..m-n+1 }                 the item's n-grams
    hit(g)     = [ g occurs at least once in the corpus ]
    covered(j) = [ w_j lies inside some n-gram g of the item with hit(g) ]
    score      = (1/m) sum_j covered(j)                                      fraction of tokens covered
    contaminated  <=>  score >= threshold                                    (default threshold 0.5)

The report also gives ngram_fraction = |{g in G : hit(g)}| / |G|. An item shorter than n words has no
n-grams, cannot be judged, and counts as clean. Accuracy is then compared on the clean and the
contaminated subsets; a large gap suggests the model scores by memory rather than skill.

An item's text is its question followed by its correct choice (the string the model could have
memorised); plain strings are taken as they are.

n and the threshold suit the length of the items. Llama 3 fixes n = 8 and picks the threshold per benchmark;
the world's MCQ items are only 5-8 words ("Where does Mira live? Oakvale"), so with n = 8 most of them have
no n-gram at all and always count as clean. For them n = 4 with threshold 0.7 flags every leaked item,
whatever form the leak takes, and no clean one (measured in lessons/09_evaluation.md); at threshold 0.5 an
item sharing only a question template with a leaked one ("... do for a living", 4 of 8 words) is flagged too.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

_WORD = re.compile(r"\w+(?:['\u2019]\w+)*")  # a word keeps its inner apostrophes: "mira's", "can't"


def words(text: str) -> list[str]:
    """Lowercased words with the punctuation around them dropped: "Where does Mira live?" -> where does mira live."""
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """Every run of n consecutive tokens, in order (none when there are fewer than n)."""
    return [tuple(tokens[j:j + n]) for j in range(len(tokens) - n + 1)]


def item_text(item: dict | str) -> str:
    """The text checked for overlap: question + " " + the correct choice, or the string itself."""
    if isinstance(item, str):
        return item
    if not isinstance(item, dict) or "question" not in item:
        raise TypeError(f"an item must be a string or a dict with 'question', got {type(item).__name__}")
    choices, answer = item.get("choices"), item.get("answer")
    if isinstance(choices, list) and isinstance(answer, int) and 0 <= answer < len(choices):
        return f"{item['question']} {choices[answer]}"
    return str(item["question"])


def corpus_hits(
    item_ngrams: set[tuple[str, ...]], corpus: str | Iterable[str], n: int
) -> set[tuple[str, ...]]:
    """The subset of `item_ngrams` that occurs in the corpus (n-grams never cross document boundaries).

    Only the items' n-grams are kept in memory; the corpus is streamed once, so a large corpus costs time,
    not a set of all its n-grams.
    """
    docs = [corpus] if isinstance(corpus, str) else corpus
    found: set[tuple[str, ...]] = set()
    for doc in docs:
        if not isinstance(doc, str):
            raise TypeError(f"corpus must be a string or an iterable of strings, got an item {type(doc).__name__}")
        toks = words(doc)
        for j in range(len(toks) - n + 1):
            gram = tuple(toks[j:j + n])
            if gram in item_ngrams:
                found.add(gram)
    return found


def overlap(tokens: Sequence[str], hits: set[tuple[str, ...]], n: int) -> tuple[float, float]:
    """(score, ngram_fraction): fraction of tokens inside a corpus n-gram, fraction of n-grams in the corpus."""
    grams = ngrams(tokens, n)
    if not grams:
        return 0.0, 0.0
    covered = [False] * len(tokens)
    n_hit = 0
    for j, gram in enumerate(grams):
        if gram in hits:
            n_hit += 1
            covered[j:j + n] = [True] * n
    return sum(covered) / len(tokens), n_hit / len(grams)


def _accuracy(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def contamination_report(
    items: Sequence[dict | str],
    corpus_text: str | Iterable[str],
    per_item_correct: Sequence[bool] | None = None,
    n: int = 8,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Contaminated fraction and accuracy on clean vs contaminated items (rule in the module docstring).

    per_item_correct: whether the model got each item right (e.g. from `evaluate_mcq`'s per_item), or
    None to report overlap only. Accuracies of an empty subset are None.
    Returns {n_items, n_contaminated, contaminated_fraction, n_too_short, acc_all, acc_clean,
    acc_contaminated, acc_gap (contaminated - clean), per_item: [{score, ngram_fraction, contaminated}]}.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    if len(items) == 0:
        raise ValueError("items must not be empty")
    if per_item_correct is not None and len(per_item_correct) != len(items):
        raise ValueError(f"per_item_correct has {len(per_item_correct)} entries for {len(items)} items")
    item_tokens = [words(item_text(item)) for item in items]
    wanted = {gram for toks in item_tokens for gram in ngrams(toks, n)}
    hits = corpus_hits(wanted, corpus_text, n)
    per_item = []
    for toks in item_tokens:
        score, fraction = overlap(toks, hits, n)
        per_item.append({"score": score, "ngram_fraction": fraction, "contaminated": score >= threshold,
                         "too_short": len(toks) < n})
    n_cont = sum(r["contaminated"] for r in per_item)
    report: dict[str, Any] = {
        "n_items": len(items),
        "n_contaminated": n_cont,
        "contaminated_fraction": n_cont / len(items),
        "n_too_short": sum(r["too_short"] for r in per_item),
        "n": n,
        "threshold": threshold,
        "acc_all": None, "acc_clean": None, "acc_contaminated": None, "acc_gap": None,
        "per_item": per_item,
    }
    if per_item_correct is not None:
        correct = [bool(c) for c in per_item_correct]
        for r, c in zip(per_item, correct):
            r["correct"] = c
        clean = [c for r, c in zip(per_item, correct) if not r["contaminated"]]
        dirty = [c for r, c in zip(per_item, correct) if r["contaminated"]]
        report["acc_all"] = _accuracy(correct)
        report["acc_clean"], report["acc_contaminated"] = _accuracy(clean), _accuracy(dirty)
        if clean and dirty:
            report["acc_gap"] = report["acc_contaminated"] - report["acc_clean"]
    return report
