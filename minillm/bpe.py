"""Byte-level BPE training (Sennrich et al., 2016; byte-level variant of Radford et al., 2019, GPT-2).

The corpus is cut at special tokens, each piece is split into pre-tokens by the GPT-2 regex, and every
pre-token starts as a sequence of its UTF-8 bytes. Training then repeats

    (a*, b*) = argmax_{(a, b)}  count(a, b),    count(a, b) = sum_w freq(w) * #{i : w_i = a, w_{i+1} = b}

and replaces every adjacent (a*, b*) in every pre-token w by the new token a*b*. Equal counts are broken
by the lexicographically greatest pair (bytes(a), bytes(b)), the deterministic convention of Stanford
CS336. Pairs never cross a pre-token or a special token.

Vocabulary ids: 0..255 are the single bytes (id = byte value), then one id per merge in merge order,
then the special tokens. Because a merged token's id grows with its merge step, the id doubles as the
merge rank that tiktoken needs (``minillm.tokenizer``).
"""

from __future__ import annotations

import functools
import heapq
import os
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import NamedTuple

# The GPT-2 pre-tokenization pattern in `regex`/Rust syntax; tiktoken compiles this one.
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Unicode White_Space, which is what `\s` means in the `regex` package and in tiktoken's Rust engine.
# Python's `re` `\s` is str.isspace(), which also accepts U+001C..U+001F (bidi separators, not
# White_Space), so we spell the class out instead of using `\s`.
_WHITESPACE = r"\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


def _char_class(major_category: str) -> str:
    """Ranges (re syntax, no brackets) of every code point whose Unicode category starts with
    `major_category` ("L" = letters Lu Ll Lt Lm Lo, "N" = numbers Nd Nl No)."""
    ranges: list[tuple[int, int]] = []
    for cp in range(0x110000):
        if unicodedata.category(chr(cp))[0] != major_category:
            continue
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1] = (ranges[-1][0], cp)
        else:
            ranges.append((cp, cp))
    return "".join(rf"\U{a:08x}-\U{b:08x}" if a != b else rf"\U{a:08x}" for a, b in ranges)


@functools.cache
def gpt2_pretokenizer() -> re.Pattern[str]:
    """The GPT-2 pattern (`GPT2_PAT_STR`) compiled with Python's `re`.

    `re` has no \\p{L}/\\p{N}. The usual shortcut `[^\\W\\d_]` for letters is not exact: `\\w` is
    str.isalnum(), which also holds for numbers outside Nd such as '½', '²' or 'Ⅻ' (No/Nl), so those would
    be glued to letters. We therefore build the letter and number classes from `unicodedata` categories
    (once, about 0.1 s), which is exactly what \\p{L} and \\p{N} mean; the tests compare the split with the
    `regex` package on varied text and on every assigned code point. Characters assigned after Python's
    Unicode version (unicodedata.unidata_version) count as unassigned here and may split differently.
    """
    L, N, S = _char_class("L"), _char_class("N"), _WHITESPACE
    pattern = (
        r"'(?:[sdmt]|ll|ve|re)"
        rf"| ?[{L}]+"
        rf"| ?[{N}]+"
        rf"| ?[^{S}{L}{N}]+"
        rf"|[{S}]+(?![^{S}])"  # a whitespace run not followed by text: leaves one space for the next word
        rf"|[{S}]+"
    )
    return re.compile(pattern)


def pretokenize(text: str) -> list[str]:
    """Split `text` into GPT-2 pre-tokens; "".join(pretokenize(t)) == t."""
    return gpt2_pretokenizer().findall(text)


def split_special(text: str, special_tokens: list[str]) -> list[str]:
    """Cut `text` at every occurrence of a special token, dropping the tokens themselves.

    Longer special tokens are tried first so that one which contains another wins.
    """
    if not special_tokens:
        return [text]
    alternatives = "|".join(re.escape(s) for s in sorted(special_tokens, key=len, reverse=True))
    return re.split(alternatives, text)


def _read_corpus(text_or_path: str | os.PathLike) -> str:
    """A path-like is always a file; a str is a file when it names an existing one (no newline, short),
    otherwise it is the corpus text itself."""
    if isinstance(text_or_path, os.PathLike):
        path = os.fspath(text_or_path)
    elif isinstance(text_or_path, str):
        is_path = len(text_or_path) < 4096 and "\n" not in text_or_path and os.path.isfile(text_or_path)
        if not is_path:
            return text_or_path
        path = text_or_path
    else:
        raise TypeError(f"text_or_path must be a str or os.PathLike, got {type(text_or_path).__name__}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text_or_path: no such file: {path}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 at byte {e.start}") from e


def _check_special_tokens(special_tokens: list[str]) -> None:
    if not isinstance(special_tokens, (list, tuple)):
        raise TypeError(f"special_tokens must be a list of str, got {type(special_tokens).__name__}")
    for i, s in enumerate(special_tokens):
        if not isinstance(s, str) or not s:
            raise ValueError(f"special_tokens[{i}] must be a non-empty str, got {s!r}")
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"special_tokens has duplicates: {special_tokens}")


def pretoken_counts(text: str, special_tokens: list[str]) -> Counter[bytes]:
    """freq(w) for every pre-token w (as UTF-8 bytes) of the text with special tokens cut out."""
    counts: Counter[bytes] = Counter()
    for chunk in split_special(text, special_tokens):
        counts.update(pretokenize(chunk))
    return Counter({word.encode("utf-8"): n for word, n in counts.items()})


class _Desc:
    """Wraps a pair of byte strings so that heapq (a min-heap) pops the lexicographically greatest first."""

    __slots__ = ("key",)

    def __init__(self, key: tuple[bytes, bytes]) -> None:
        self.key = key

    def __lt__(self, other: _Desc) -> bool:
        return self.key > other.key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Desc) and self.key == other.key


def _pairs(word: list[int]) -> Iterator[tuple[int, int]]:
    return zip(word, word[1:])


def _merge_word(word: list[int], a: int, b: int, new_id: int) -> list[int]:
    """Replace every adjacent (a, b) in `word`, scanning left to right, by `new_id`."""
    # BEGIN ASSIGNMENT bpe-merge
    out: list[int] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out
    # END ASSIGNMENT


def iter_merges(
    words: list[list[int]], freqs: list[int], vocab: dict[int, bytes]
) -> Iterator[tuple[tuple[int, int], int]]:
    """Run BPE on `words` (token-id lists, each with frequency `freqs[i]`), one merge per step.

    Each step picks argmax_{(a, b)} (count(a, b), vocab[a], vocab[b]), adds vocab[new] = vocab[a] + vocab[b]
    with new = len(vocab), rewrites `words` in place and yields ((a, b), count). Stops when no pair is left.

    Counting is incremental: count(a, b) and the index pair -> {words containing it} are built once;
    a merge only re-counts the words that contained the merged pair. The argmax uses a heap whose
    stale entries (count changed since push) are skipped when popped.
    """
    counts: defaultdict[tuple[int, int], int] = defaultdict(int)
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for w, word in enumerate(words):
        for pair in _pairs(word):
            counts[pair] += freqs[w]
            where[pair].add(w)
    heap = [(-n, _Desc((vocab[p[0]], vocab[p[1]])), p) for p, n in counts.items()]
    heapq.heapify(heap)

    while heap:
        neg_n, _, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -neg_n:
            continue  # stale entry: this pair's count changed after it was pushed
        a, b = pair
        new_id = len(vocab)
        vocab[new_id] = vocab[a] + vocab[b]
        changed: set[tuple[int, int]] = set()
        for w in list(where[pair]):
            old, f = words[w], freqs[w]
            for p in _pairs(old):  # take the word's old pairs out ...
                counts[p] -= f
                where[p].discard(w)
                changed.add(p)
            words[w] = _merge_word(old, a, b, new_id)
            for p in _pairs(words[w]):  # ... and its new pairs in
                counts[p] += f
                where[p].add(w)
                changed.add(p)
        for p in changed:
            if counts[p] > 0:
                heapq.heappush(heap, (-counts[p], _Desc((vocab[p[0]], vocab[p[1]])), p))
            else:
                del counts[p], where[p]
        yield pair, -neg_n


def train_bpe(
    text_or_path: str | os.PathLike, vocab_size: int, special_tokens: list[str]
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Train a byte-level BPE tokenizer; returns (vocab id -> bytes, merges in order).

    vocab_size counts everything: 256 bytes + merges + special tokens, so there are
    vocab_size - 256 - len(special_tokens) merges. If the corpus runs out of pairs first (every
    pre-token is already one token), training stops early and the vocab is smaller than vocab_size.

    `text_or_path`: the corpus text, or a UTF-8 file (an os.PathLike, or a str naming an existing file).
    """
    _check_special_tokens(special_tokens)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: it must be at least 256 bytes + "
            f"{len(special_tokens)} special tokens = {256 + len(special_tokens)}"
        )
    text = _read_corpus(text_or_path)
    word_counts = pretoken_counts(text, special_tokens)
    if not word_counts:
        raise ValueError("text_or_path: the corpus is empty (no text outside special tokens)")

    vocab = {i: bytes([i]) for i in range(256)}
    words = [list(w) for w in word_counts]  # bytes -> list of byte ids
    freqs = list(word_counts.values())
    merges: list[tuple[bytes, bytes]] = []
    num_merges = vocab_size - 256 - len(special_tokens)
    if num_merges > 0:
        for (a, b), _ in iter_merges(words, freqs, vocab):
            merges.append((vocab[a], vocab[b]))
            if len(merges) == num_merges:
                break
    for s in special_tokens:
        vocab[len(vocab)] = s.encode("utf-8")
    return vocab, merges


class MergeStep(NamedTuple):
    """One BPE step for the lesson: the merged pair, its count, and the corpus segmentation after it."""

    pair: tuple[bytes, bytes]
    count: int
    segmentation: list[list[bytes]]  # one list of token bytes per pre-token, in text order


def bpe_merge_trace(text: str, num_merges: int, special_tokens: list[str] | None = None) -> list[MergeStep]:
    """Step through BPE training on a small `text`: after each of up to `num_merges` merges, the
    segmentation of every pre-token of the text (same algorithm as `train_bpe`).

    >>> [s.pair for s in bpe_merge_trace("low lower lowest", 2)]
    [(b'o', b'w'), (b'l', b'ow')]
    """
    special_tokens = list(special_tokens or [])
    _check_special_tokens(special_tokens)
    if num_merges < 0:
        raise ValueError(f"num_merges must be >= 0, got {num_merges}")
    pieces = [p.encode("utf-8") for chunk in split_special(text, special_tokens) for p in pretokenize(chunk)]
    if not pieces:
        raise ValueError("text: the corpus is empty (no text outside special tokens)")
    word_counts = Counter(pieces)
    index = {w: i for i, w in enumerate(word_counts)}
    vocab = {i: bytes([i]) for i in range(256)}
    words = [list(w) for w in word_counts]
    trace: list[MergeStep] = []
    if num_merges == 0:
        return trace
    for (a, b), count in iter_merges(words, list(word_counts.values()), vocab):
        segmentation = [[vocab[t] for t in words[index[p]]] for p in pieces]
        trace.append(MergeStep((vocab[a], vocab[b]), count, segmentation))
        if len(trace) == num_merges:
            break
    return trace
