"""Tests for minillm.bpe: GPT-2 pre-tokenization, BPE training rules, incremental counting."""

import random
import unicodedata
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.bpe import (
    GPT2_PAT_STR,
    bpe_merge_trace,
    iter_merges,
    pretoken_counts,
    pretokenize,
    train_bpe,
)

CS336 = "low low low low low lower lower widest widest widest newest newest newest newest newest newest"


# ----- pre-tokenization ---------------------------------------------------------------------------

VARIED = [
    "Hello, world! It's 3.14 o'clock; we'll see—you've been there, they're   done.\n\n  Next\tline\r\n",
    "Ünïcödé façade naïve café ½ ² Ⅻ ٣ 三 一 x² 10,000 $5.99 #tag @user snake_case CamelCase",
    "日本語のテキスト、中文字符。한국어 텍스트 Ελληνικά русский עברית العربية हिन्दी",
    "emoji 👋🏽 👨‍👩‍👧 🇫🇷 ok?!… «quoted» “smart” 'single' I'M YOU'LL don't",
    "   leading and trailing   \n\n\n   \u3000\u00a0nbsp\u2028sep\x1c\x1f\x0b\x0c",
    "'s 's's 'S 'LL ''' 'x '\n'",
]


def test_pretokenize_examples():
    assert pretokenize("Hello world") == ["Hello", " world"]
    # the space before a word goes with the word; a run of spaces keeps all but the last for itself
    assert pretokenize("a   b") == ["a", "  ", " b"]
    assert pretokenize("it's 42!") == ["it", "'s", " 42", "!"]
    # '½' and 'Ⅻ' are numbers (No/Nl), not letters, although str.isalnum() holds for them
    assert pretokenize("a½b Ⅻc") == ["a", "½", "b", " Ⅻ", "c"]
    # U+001C is not White_Space in Unicode (Python's str.isspace says it is)
    assert pretokenize("a\x1cb") == ["a", "\x1c", "b"]


@pytest.mark.parametrize("text", VARIED)
def test_pretokenize_matches_regex_package(text):
    regex = pytest.importorskip("regex")
    assert pretokenize(text) == regex.findall(GPT2_PAT_STR, text)


def test_pretokenize_matches_regex_on_every_assigned_code_point():
    """A misclassified letter/number/space would cut or glue a run in this shuffled string."""
    regex = pytest.importorskip("regex")
    chars = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
    random.Random(0).shuffle(chars)
    text = "".join(chars)
    assert pretokenize(text) == regex.findall(GPT2_PAT_STR, text)


# characters assigned in Python's Unicode version (newer ones are "Cn" to `re`; see gpt2_pretokenizer)
ASSIGNED_CHARS = st.characters(exclude_categories=["Cn", "Cs"])


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from("aZé1½ ' \n\t\u00a0\x1c.!👋sdtlvre3") | ASSIGNED_CHARS, max_size=40))
def test_pretokenize_matches_regex_property(text):
    regex = pytest.importorskip("regex")
    assert pretokenize(text) == regex.findall(GPT2_PAT_STR, text)


# ----- training rules -----------------------------------------------------------------------------


def test_cs336_example_by_hand():
    # Pre-tokens: "low" x1, " low" x4, " lower" x2, " widest" x3, " newest" x6.
    # 1. (s,t)=9 ties (e,s)=9 -> greater tuple (s,t)     2. (e,st)=9
    # 3. (o,w)=7 ties (l,o)=7 -> (o,w)                    4. (l,ow)=7
    # 5. six pairs at 6: (w,est) (n,e) (e,w)... (' ',n) (' ',low); greatest is (w,est)
    # 6. then (n,e) beats (' ',n), (' ',low), (e,west) at 6
    vocab, merges = train_bpe(CS336, 256 + 6, [])
    assert merges == [(b"s", b"t"), (b"e", b"st"), (b"o", b"w"), (b"l", b"ow"), (b"w", b"est"), (b"n", b"e")]
    assert [vocab[256 + i] for i in range(6)] == [b"st", b"est", b"ow", b"low", b"west", b"ne"]


def test_tie_break_is_greatest_pair():
    # every pair occurs once: ("a","b"), (" ","b"), ("b","a") -> ("b","a") is greatest
    assert train_bpe("ab ba", 257, [])[1] == [(b"b", b"a")]
    # same first byte: the second decides
    assert train_bpe("xa xb", 257, [])[1] == [(b"x", b"b")]


def test_tie_break_compares_tuples_not_concatenations():
    # (b'ab', b'a') > (b'a', b'z') as tuples although b'aba' < b'az' as strings
    vocab = {i: bytes([i]) for i in range(256)} | {256: b"ab"}
    words = [[256, ord("a")], [ord("a"), ord("z")]]
    pair, count = next(iter_merges(words, [1, 1], vocab))
    assert pair == (256, ord("a")) and count == 1
    assert words == [[257], [ord("a"), ord("z")]] and vocab[257] == b"aba"


def test_overlapping_pair_merges_left_to_right():
    vocab, merges = train_bpe("aaa", 257, [])
    assert merges == [(b"a", b"a")]  # count 2: "aaa" has the pair at 0 and 1
    trace = bpe_merge_trace("aaa", 2)
    assert trace[0].count == 2 and trace[0].segmentation == [[b"aa", b"a"]]
    assert trace[1].pair == (b"aa", b"a") and trace[1].segmentation == [[b"aaa"]]


def naive_bpe(text: str, num_merges: int, special_tokens: list[str]) -> list[tuple[bytes, bytes]]:
    """Recount every pair from scratch at every step."""
    words = {w: [bytes([b]) for b in w] for w in pretoken_counts(text, special_tokens)}
    freq = pretoken_counts(text, special_tokens)
    merges = []
    for _ in range(num_merges):
        counts: Counter[tuple[bytes, bytes]] = Counter()
        for w, toks in words.items():
            for pair in zip(toks, toks[1:]):
                counts[pair] += freq[w]
        if not counts:
            break
        best = max(counts, key=lambda p: (counts[p], p))
        merges.append(best)
        for w, toks in words.items():
            out, i = [], 0
            while i < len(toks):
                if i + 1 < len(toks) and (toks[i], toks[i + 1]) == best:
                    out.append(toks[i] + toks[i + 1])
                    i += 2
                else:
                    out.append(toks[i])
                    i += 1
            words[w] = out
    return merges


@pytest.mark.parametrize("seed", range(6))
def test_incremental_counts_equal_naive_recount(seed):
    r = random.Random(seed)
    alphabet = ["a", "b", "aa", "ab", "é", " ", "  ", "1", ".", "<|eot|>", "\n"]
    text = "".join(r.choice(alphabet) for _ in range(r.randint(200, 600)))
    n = 60
    vocab, merges = train_bpe(text, 256 + n + 1, ["<|eot|>"])
    assert merges == naive_bpe(text, n, ["<|eot|>"])


@settings(max_examples=25, deadline=None)
@given(st.text(alphabet="abc ,x1", max_size=120), st.integers(1, 30))
def test_incremental_counts_equal_naive_recount_property(text, n):
    if not text:
        return
    assert train_bpe(text, 256 + n, [])[1] == naive_bpe(text, n, [])


def test_vocab_layout_and_size():
    specials = ["<|endoftext|>", "<|pad|>"]
    vocab, merges = train_bpe(CS336 + "<|endoftext|>" + CS336, 256 + 10 + 2, specials)
    assert len(vocab) == 268 and len(merges) == 10
    assert [vocab[i] for i in range(256)] == [bytes([i]) for i in range(256)]
    assert [vocab[256 + i] for i in range(10)] == [a + b for a, b in merges]
    assert vocab[266] == b"<|endoftext|>" and vocab[267] == b"<|pad|>"


def test_special_tokens_are_never_merged_across_and_training_stops_early():
    # outside "<|endoftext|>" every pre-token is one byte: there is no pair to merge
    text = "x<|endoftext|>y<|endoftext|>" * 50
    vocab, merges = train_bpe(text, 1000, ["<|endoftext|>"])
    assert merges == [] and len(vocab) == 257 and vocab[256] == b"<|endoftext|>"
    # without splitting it out, its pieces would be merged
    assert train_bpe(text, 260, [])[1] != []


def test_longer_special_token_wins():
    vocab, merges = train_bpe("a<|x|>|>b<|x|>c", 300, ["<|x|>", "<|x|>|>"])
    assert merges == []  # had "<|x|>" been cut first, the left-over "|>" would give the pair ("|", ">")


def test_path_input(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(CS336, encoding="utf-8")
    assert train_bpe(p, 262, []) == train_bpe(CS336, 262, [])
    assert train_bpe(str(p), 262, []) == train_bpe(CS336, 262, [])
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_bpe(tmp_path / "missing.txt", 262, [])
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe")
    with pytest.raises(ValueError, match="bad.txt"):
        train_bpe(bad, 262, [])


def test_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(CS336, 256, ["<|endoftext|>"])
    with pytest.raises(ValueError, match="empty"):
        train_bpe("", 300, [])
    with pytest.raises(ValueError, match="empty"):
        train_bpe("<|endoftext|><|endoftext|>", 300, ["<|endoftext|>"])
    with pytest.raises(ValueError, match="special_tokens"):
        train_bpe(CS336, 300, ["<|a|>", "<|a|>"])
    with pytest.raises(TypeError, match="vocab_size"):
        train_bpe(CS336, 300.0, [])


def test_merge_trace_matches_training():
    trace = bpe_merge_trace(CS336, 6)
    assert [s.pair for s in trace] == train_bpe(CS336, 262, [])[1]
    assert [s.count for s in trace] == [9, 9, 7, 7, 6, 6]
    # after merge 1 ("st"), " newest" is [' ', n, e, w, e, st]; order and multiplicity follow the text
    assert trace[0].segmentation[-1] == [b" ", b"n", b"e", b"w", b"e", b"st"]
    assert len(trace[0].segmentation) == len(pretokenize(CS336))
    assert trace[-1].segmentation[0] == [b"low"]
    assert all(b"".join(t) == w.encode() for t, w in zip(trace[-1].segmentation, pretokenize(CS336)))
