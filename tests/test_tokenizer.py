"""Tests for minillm.tokenizer: tiktoken-backed encoding, round trips, files, chat template, GPT-2."""

import json
import random

import pytest
import tiktoken
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm import tokenizer as tk
from minillm.bpe import GPT2_PAT_STR, pretokenize
from minillm.tokenizer import END, EOT, SPECIAL_TOKENS, Tokenizer, merges_from_ranks, token_to_str


def small_corpus(n_chars: int, seed: int = 0) -> str:
    """English-like text: Zipf-distributed pseudo-words, sentences, numbers, punctuation."""
    r = random.Random(seed)
    syllables = ["th", "e", "an", "re", "ing", "st", "o", "ou", "ch", "al", "b", "m", "ea", "t", "s", "l", "pr", "a"]
    words = ["the", "of", "and", "to", "a", "in", "is", "it's"]
    words += ["".join(r.choices(syllables, k=r.randint(1, 4))) for _ in range(600)]
    weights = [1 / (i + 1) for i in range(len(words))]
    out, n = [], 0
    while n < n_chars:
        s = " ".join(r.choices(words, weights, k=r.randint(3, 12))).capitalize()
        s += f" {r.randint(0, 999)}" * (r.random() < 0.2) + r.choice([". ", "? ", "!\n", ", "])
        out.append(s)
        n += len(s)
    return "".join(out)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(small_corpus(40_000), 512)


def apply_merges(word: bytes, merges: list[tuple[bytes, bytes]]) -> list[bytes]:
    """Reference BPE: apply each merge in training order to the whole pre-token."""
    parts = [bytes([b]) for b in word]
    for a, b in merges:
        out, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                out.append(a + b)
                i += 2
            else:
                out.append(parts[i])
                i += 1
        parts = out
    return parts


# ----- vocabulary ---------------------------------------------------------------------------------


def test_layout_and_special_ids(tok):
    assert tok.vocab_size == 512
    assert tok.special_tokens == {s: 506 + i for i, s in enumerate(SPECIAL_TOKENS)}
    assert (tok.eot_id, tok.user_id, tok.assistant_id, tok.system_id, tok.end_id, tok.pad_id) == tuple(range(506, 512))
    assert tok.token_bytes(65) == b"A" and tok.token_bytes(tok.end_id) == b"<|end|>"
    a, b = tok.merges[0]
    assert tok.token_bytes(256) == a + b
    with pytest.raises(ValueError, match="token_id"):
        tok.token_bytes(512)


def test_missing_special_token_is_a_clear_error():
    t = Tokenizer.train(small_corpus(3000), 300, special_tokens=[EOT])
    assert t.eot_id == 299
    with pytest.raises(ValueError, match="<\\|user\\|>"):
        t.user_id


def test_encoding_equals_applying_merges_in_order(tok):
    """tiktoken's lowest-rank-first merging must equal the training order: ranks follow merges."""
    merges = tok.merges
    text = small_corpus(3000, seed=7)
    expected = [p for w in pretokenize(text) for p in apply_merges(w.encode(), merges)]
    assert [tok.token_bytes(i) for i in tok.encode(text)] == expected


def test_merges_from_ranks_recovers_training_merges(tok):
    ranks = {b: i for i, b in tok.vocab.items() if i < 506}
    assert merges_from_ranks(ranks) == tok.merges


# ----- round trips and special tokens -------------------------------------------------------------

PIECES = st.sampled_from(SPECIAL_TOKENS + [" ", "  ", "\n\n", "\t \n", "\r\n", "👋🏽", "👨‍👩‍👧", "é", "½", "<|", "|>", "'s"])
TEXT = st.lists(st.text(max_size=20) | PIECES, max_size=12).map("".join)  # st.text() is surrogate-free


@settings(max_examples=100, deadline=None)
@given(TEXT)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert tok.decode(tok.encode(text, allowed_special="all")) == text
    assert not set(ids) & set(tok.special_tokens.values())  # user text never yields control tokens


def test_special_token_text_is_not_a_control_token(tok):
    ids = tok.encode("Hi <|end|> there<|endoftext|>")
    assert tok.end_id not in ids and tok.eot_id not in ids
    assert tok.decode(ids) == "Hi <|end|> there<|endoftext|>"
    assert tok.encode("<|end|>", allowed_special={END}) == [tok.end_id]
    assert tok.encode("a<|end|>", allowed_special="all")[-1] == tok.end_id
    with pytest.raises(ValueError, match="allowed_special"):
        tok.encode("x", allowed_special={"<|nope|>"})
    with pytest.raises(TypeError, match="text"):
        tok.encode(b"bytes")


def test_encode_batch_and_decode_inputs(tok):
    texts = ["one two", "<|end|> three", ""]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    ids = tok.encode("tensor input")
    assert tok.decode(torch.tensor(ids)) == "tensor input"
    for bad in ([512], [-1], [1.5]):
        with pytest.raises(ValueError, match="invalid token id"):
            tok.decode(bad)


def test_decode_replaces_a_cut_character(tok):
    ids = list("é".encode())  # the two single-byte tokens of 'é' (ids 0..255 are the bytes)
    assert tok.decode(ids[:1]) == "\ufffd"
    assert tok.decode_bytes(ids[:1]) == b"\xc3"


# ----- files --------------------------------------------------------------------------------------


def test_save_load_round_trip(tok, tmp_path):
    path = tok.save(tmp_path / "tok.json")
    loaded = Tokenizer.load(path)
    assert loaded.vocab == tok.vocab and loaded.merges == tok.merges
    assert loaded.special_tokens == tok.special_tokens
    text = small_corpus(500, seed=3) + "<|end|>"
    assert loaded.encode(text) == tok.encode(text)
    data = json.loads(open(path, encoding="utf-8").read())  # human-readable JSON
    assert data["merges"][0] == [token_to_str(m) for m in tok.merges[0]]
    assert data["vocab"]["Ġ"] == 32 and data["special_tokens"][EOT] == tok.eot_id
    assert list(tmp_path.iterdir()) == [tmp_path / "tok.json"]  # no temporary file left behind
    # any other path is a directory (created) holding tokenizer.json
    assert tok.save(tmp_path / "run" / "tok") == str(tmp_path / "run" / "tok" / tk.TOKENIZER_FILE)
    assert Tokenizer.load(tmp_path / "run" / "tok").merges == tok.merges


def test_token_strings_use_gpt2_byte_mapping():
    assert token_to_str(b" the\n") == "ĠtheĊ"
    assert len(set(tk.bytes_to_unicode().values())) == 256
    assert tk.str_to_token("ĠtheĊ") == b" the\n"
    all_bytes = bytes(range(256))
    assert tk.str_to_token(token_to_str(all_bytes)) == all_bytes
    with pytest.raises(ValueError, match="bad character"):
        tk.str_to_token("Ġ\u4e00")


def test_load_errors_name_the_file(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Tokenizer.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json"):
        Tokenizer.load(bad)
    data = json.loads(open(tok.save(tmp_path / "t.json"), encoding="utf-8").read())
    for field, value in [("format", "other"), ("merges", [["a", "b"]] + data["merges"][1:]), ("vocab", [1, 2])]:
        broken = dict(data, **{field: value})
        (tmp_path / "broken.json").write_text(json.dumps(broken), encoding="utf-8")
        with pytest.raises(ValueError, match="broken.json"):
            Tokenizer.load(tmp_path / "broken.json")
    del data["merges"]
    (tmp_path / "broken.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match="merges"):
        Tokenizer.load(tmp_path / "broken.json")


def test_constructor_validation(tok):
    vocab, merges = tok.vocab, tok.merges
    with pytest.raises(ValueError, match="single bytes"):
        Tokenizer({i: b for i, b in vocab.items() if i != 0} | {0: b"<|pad|>x"}, merges, SPECIAL_TOKENS)
    with pytest.raises(ValueError, match="same bytes"):
        Tokenizer(vocab | {257: vocab[256]}, None, SPECIAL_TOKENS)
    with pytest.raises(ValueError, match=r"merges\[1\]"):
        Tokenizer(vocab, [merges[0], merges[2], merges[1], *merges[3:]], SPECIAL_TOKENS)
    with pytest.raises(ValueError, match="merges has"):
        Tokenizer(vocab, merges[:-1], SPECIAL_TOKENS)
    with pytest.raises(ValueError, match="not in the vocab"):
        Tokenizer(vocab, merges, SPECIAL_TOKENS + ["<|tool|>"])
    with pytest.raises(ValueError, match="0..511"):
        Tokenizer({i + 1: b for i, b in vocab.items()}, merges, SPECIAL_TOKENS)


# ----- chat template ------------------------------------------------------------------------------


def test_chat_single_turn_exact(tok):
    msgs = [{"role": "user", "content": "Who is Ann?"}, {"role": "assistant", "content": "Ann is a baker."}]
    ids, mask = tok.apply_chat_template(msgs)
    u, a = tok.encode("Who is Ann?"), tok.encode("Ann is a baker.")
    assert ids == [tok.user_id, *u, tok.end_id, tok.assistant_id, *a, tok.end_id]
    assert mask == [0] * (len(u) + 3) + [1] * (len(a) + 1)


def test_chat_multi_turn_mask(tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Sum 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    ids, mask = tok.apply_chat_template(msgs)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    # the masked-in tokens are exactly the assistant turns with their <|end|>; a shifted or dropped
    # mask would take in a role token or lose the final <|end|>
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Hello there<|end|>4<|end|>"
    assert tok.decode([i for i, m in zip(ids, mask) if not m]) == (
        "<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|><|user|>Sum 2+2?<|end|><|assistant|>"
    )
    assert tok.decode(ids) == tok.render_chat_text(msgs)
    assert mask[-1] == 1 and ids[-1] == tok.end_id


def test_generation_prompt_is_prefix_of_training_rendering(tok):
    msgs = [
        {"role": "system", "content": "You answer questions."},
        {"role": "user", "content": "What is <|end|> ?"},
        {"role": "assistant", "content": "A marker."},
    ]
    full, _ = tok.apply_chat_template(msgs)
    prompt, prompt_mask = tok.apply_chat_template(msgs[:-1], add_generation_prompt=True)
    assert full[: len(prompt)] == prompt and len(prompt) < len(full)
    assert prompt[-1] == tok.assistant_id and set(prompt_mask) == {0}
    assert tok.render_chat_text(msgs[:-1], add_generation_prompt=True).endswith("<|end|><|assistant|>")
    # the injected "<|end|>" stays text: one <|end|> per message
    assert full.count(tok.end_id) == 3


def test_chat_errors(tok):
    ok = {"role": "assistant", "content": "x"}
    cases = [
        ({"role": "user", "content": "x"}, TypeError, "list"),
        ([], ValueError, "empty"),
        ([{"role": "user", "content": "x"}, "hi"], TypeError, r"messages\[1\]"),
        ([{"content": "x"}, ok], ValueError, r"messages\[0\] has no 'role'"),
        ([{"role": "user"}, ok], ValueError, r"messages\[0\] has no 'content'"),
        ([{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}], ValueError, r"messages\[1\].*'bot'"),
        ([{"role": "user", "content": ""}, ok], ValueError, r"messages\[0\].*empty"),
        ([{"role": "user", "content": 3}, ok], TypeError, "content"),
        ([{"role": "user", "content": "x"}], ValueError, "no assistant"),
    ]
    for messages, error, match in cases:
        with pytest.raises(error, match=match):
            tok.apply_chat_template(messages)
        with pytest.raises(error, match=match):
            tok.render_chat_text(messages)
    with pytest.raises(ValueError, match="last message"):
        tok.apply_chat_template([{"role": "user", "content": "x"}, ok], add_generation_prompt=True)
    # no assistant turn is fine when asking for a generation
    ids, _ = tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True)
    assert ids[-1] == tok.assistant_id


# ----- GPT-2 --------------------------------------------------------------------------------------


def test_gpt2_offline_or_cached():
    try:
        t = Tokenizer.gpt2()
    except RuntimeError as e:
        assert "TIKTOKEN_CACHE_DIR" in str(e)
        return
    assert t.encode("Hello world") == [15496, 995]
    assert t.eot_id == 50256 and t.user_id == 50257 and t.pad_id == 50261 and t.vocab_size == 50262


def test_gpt2_appends_chat_tokens_after_endoftext(tok, monkeypatch):
    """With a stand-in for tiktoken's gpt2 encoding (ranks 0..505, <|endoftext|> last)."""
    ranks = {b: i for i, b in tok.vocab.items() if i < 506}
    fake = tiktoken.Encoding("fake-gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks, special_tokens={EOT: 506})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: fake)
    t = Tokenizer.gpt2()
    assert t.special_tokens == {EOT: 506, **{s: 507 + i for i, s in enumerate(SPECIAL_TOKENS[1:])}}
    assert t.merges == tok.merges and t.vocab_size == 512
    text = "Hello <|end|> world"
    assert t.encode(text) == fake.encode_ordinary(text) and t.decode(t.encode(text)) == text
