"""Byte-level BPE tokenizer (Radford et al., 2019, GPT-2) backed by tiktoken, plus the chat template.

Encoding a pre-token repeatedly merges the adjacent pair whose concatenation has the lowest rank,

    (x_i, x_{i+1}) = argmin_i rank(x_i + x_{i+1})   until no adjacent concatenation is in the vocabulary,

where rank = token id, so ranks follow the merge order of `minillm.bpe.train_bpe`. The merging itself
runs in tiktoken (`tiktoken.Encoding` built from our ranks and the GPT-2 pre-tokenization pattern).

Chat template (one rendering shared by SFT training and inference):

    <|system|> c_1 <|end|> <|user|> c_2 <|end|> <|assistant|> c_3 <|end|> ...   [+ <|assistant|>]

with loss mask m_t = 1 exactly on assistant content tokens and the <|end|> closing each assistant turn,
so the SFT loss is  -sum_t m_t log p(x_t | x_<t) / sum_t m_t.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence

import tiktoken

from minillm.bpe import GPT2_PAT_STR, gpt2_pretokenizer, train_bpe

EOT = "<|endoftext|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
SYSTEM = "<|system|>"
END = "<|end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOT, USER, ASSISTANT, SYSTEM, END, PAD]
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

TOKENIZER_FILE = "tokenizer.json"  # the file inside a directory given to save/load
_FORMAT = "minillm-bpe-tokenizer"


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte, used to write tokens as readable JSON strings.

    Bytes that are printable Latin-1 ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other 68
    bytes (controls, space, soft hyphen, ...) take the characters U+0100, U+0101, ... in byte order,
    so space (0x20) becomes 'Ġ' and newline (0x0A) becomes 'Ċ'.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


def token_to_str(token: bytes) -> str:
    """Printable form of a token's bytes (GPT-2 vocab.json style), e.g. b' the' -> 'Ġthe'."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def str_to_token(text: str) -> bytes:
    """Inverse of `token_to_str`; ValueError on a character that stands for no byte."""
    inverse = {c: b for b, c in bytes_to_unicode().items()}
    try:
        return bytes(inverse[c] for c in text)
    except KeyError as e:
        raise ValueError(f"{text!r} is not a byte-level token string (bad character {e.args[0]!r})") from None


def _bpe_parts(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """Byte-level BPE of `token` using only ranks below `max_rank` (lowest-rank adjacent pair first)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        candidates = [
            (ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if ranks.get(a + b, max_rank) < max_rank
        ]
        if not candidates:
            break
        _, i = min(candidates)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover the ordered merge list from mergeable ranks (tiktoken files store only ranks).

    The merge that created token t is the last step of BPE on t's bytes using only the ranks < rank(t):
    it must leave exactly two parts (a, b) with a + b = t.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = _bpe_parts(token, ranks, rank)
        if len(parts) != 2:
            raise ValueError(f"token id {rank} ({token!r}) cannot be built by merging two lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


class Tokenizer:
    """Byte-level BPE tokenizer: vocab id -> bytes, the merges in order, and special tokens.

    `vocab` must use every id 0..len(vocab)-1 exactly once and hold all 256 single bytes; each special
    token is the vocab entry whose bytes are its UTF-8 (the highest such id). `merges[i]` must produce
    the i-th multi-byte token in id order from two tokens with smaller ids (what `train_bpe` returns).
    `merges=None` derives the merges from the ranks (`merges_from_ranks`), for encodings such as GPT-2's
    that come as ranks only.
    """

    def __init__(
        self,
        vocab: Mapping[int, bytes],
        merges: Sequence[tuple[bytes, bytes]] | None,
        special_tokens: Sequence[str],
    ) -> None:
        self._vocab = _check_vocab(vocab)
        self._special = _find_special_ids(self._vocab, special_tokens)
        special_ids = set(self._special.values())
        self._ranks = _mergeable_ranks(self._vocab, special_ids)
        self._merges = None if merges is None else _check_merges(merges, self._ranks)
        self._encoding = tiktoken.Encoding(
            name=f"minillm-bpe-{len(self._vocab)}",
            pat_str=GPT2_PAT_STR,
            mergeable_ranks=self._ranks,
            special_tokens=self._special,
        )

    # ----- construction -------------------------------------------------------------------------

    @classmethod
    def train(
        cls, text_or_path: str | os.PathLike, vocab_size: int, special_tokens: Sequence[str] = tuple(SPECIAL_TOKENS)
    ) -> Tokenizer:
        """Train with `minillm.bpe.train_bpe` (see there for the rules) and wrap the result."""
        vocab, merges = train_bpe(text_or_path, vocab_size, list(special_tokens))
        return cls(vocab, merges, special_tokens)

    @classmethod
    def gpt2(cls) -> Tokenizer:
        """OpenAI's GPT-2 tokenizer (50257 tokens, <|endoftext|> = 50256) with our chat tokens appended
        as ids 50257.. in SPECIAL_TOKENS order. Needs tiktoken's cached "gpt2" files (no network use
        after the first download); RuntimeError explains how to get them when they are missing."""
        try:
            base = tiktoken.get_encoding("gpt2")
        except Exception as e:  # requests' ConnectionError, a hash mismatch, a missing plugin, ...
            raise RuntimeError(
                "The GPT-2 tokenizer files are not available (tiktoken.get_encoding('gpt2') failed: "
                f"{type(e).__name__}: {e}). Run `python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\"` "
                "once on a machine with internet access, with TIKTOKEN_CACHE_DIR set to a directory you keep, "
                "then set TIKTOKEN_CACHE_DIR to a copy of that directory here."
            ) from e
        vocab = {i: base.decode_single_token_bytes(i) for i in range(base.n_vocab)}
        for s in SPECIAL_TOKENS:
            if s not in base.special_tokens_set:
                vocab[len(vocab)] = s.encode("utf-8")
        return cls(vocab, None, SPECIAL_TOKENS)

    # ----- encoding -----------------------------------------------------------------------------

    def encode(self, text: str, allowed_special: Iterable[str] | str = frozenset()) -> list[int]:
        """Token ids of `text`. Special-token strings are encoded as plain text unless listed in
        `allowed_special` (or allowed_special="all"), so user text can never inject a control token."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._encoding.encode(text, allowed_special=self._allowed(allowed_special), disallowed_special=())

    def encode_batch(self, texts: Sequence[str], allowed_special: Iterable[str] | str = frozenset()) -> list[list[int]]:
        """`encode` for each text (tiktoken runs them in parallel threads)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a sequence of str")
        allowed = self._allowed(allowed_special)
        return self._encoding.encode_batch(list(texts), allowed_special=allowed, disallowed_special=())

    def encode_iterable(self, texts: Iterable[str]) -> Iterator[int]:
        """Token ids of "".join(texts), yielded as soon as they are final, so a file of any length can be
        encoded line by line in memory bounded by its longest line: `list(tok.encode_iterable(open(path)))`
        equals `tok.encode(open(path).read())`.

        BPE never merges across pre-tokens, and a pre-token is final once two more follow it (the last one may
        still grow, and a trailing whitespace run may give its last space to the next word), so everything
        before the second-to-last pre-token of the buffer is encoded and yielded.
        """
        pattern = gpt2_pretokenizer()
        buf = ""
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"encode_iterable: expected str items, got {type(text).__name__}")
            buf += text
            starts = [m.start() for m in pattern.finditer(buf)]
            if len(starts) > 2:
                yield from self.encode(buf[:starts[-2]])
                buf = buf[starts[-2]:]
        if buf:
            yield from self.encode(buf)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Concatenated bytes of the tokens (a token may end in the middle of a UTF-8 character)."""
        ids = self._check_ids(ids)
        return self._encoding.decode_bytes(ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the tokens; invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (a special token's UTF-8)."""
        if token_id not in self._vocab:
            raise ValueError(f"token_id {token_id!r} is not in the vocabulary (size {self.vocab_size})")
        return self._vocab[token_id]

    # ----- vocabulary facts ---------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, merges and special tokens included (ids are 0..vocab_size-1)."""
        return len(self._vocab)

    @property
    def vocab(self) -> dict[int, bytes]:
        """A copy of id -> bytes."""
        return dict(self._vocab)

    @property
    def merges(self) -> list[tuple[bytes, bytes]]:
        """The merges in the order they were learned (merges[i] made the i-th multi-byte token)."""
        if self._merges is None:
            self._merges = merges_from_ranks(self._ranks)
        return list(self._merges)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token string -> id."""
        return dict(self._special)

    def special_id(self, token: str) -> int:
        """Id of a special token; ValueError if this tokenizer lacks it."""
        if token not in self._special:
            raise ValueError(
                f"this tokenizer has no special token {token!r} (it has {list(self._special)}); "
                "train it with special_tokens=SPECIAL_TOKENS"
            )
        return self._special[token]

    @property
    def eot_id(self) -> int:
        """Id of <|endoftext|>."""
        return self.special_id(EOT)

    @property
    def pad_id(self) -> int:
        """Id of <|pad|>."""
        return self.special_id(PAD)

    @property
    def user_id(self) -> int:
        """Id of <|user|>."""
        return self.special_id(USER)

    @property
    def assistant_id(self) -> int:
        """Id of <|assistant|>."""
        return self.special_id(ASSISTANT)

    @property
    def system_id(self) -> int:
        """Id of <|system|>."""
        return self.special_id(SYSTEM)

    @property
    def end_id(self) -> int:
        """Id of <|end|>."""
        return self.special_id(END)


    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, special_tokens={list(self._special)})"

    # ----- chat template ------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) of a conversation: for each message <|role|> + encode(content) + <|end|>,
        then <|assistant|> if add_generation_prompt.

        loss_mask[t] = 1 exactly on assistant content tokens and the <|end|> closing each assistant
        turn (what SFT learns to produce), 0 on role tokens and system/user turns. Content is encoded
        with plain `encode`, so special-token strings inside it stay text.

        Raises TypeError/ValueError naming the message index for: a non-list, an empty list, a
        message that is not a dict or lacks role/content, an unknown role, empty content. Training
        (add_generation_prompt=False) needs at least one assistant turn; a generation prompt needs
        the last message not to be an assistant one.
        """
        _check_messages(messages, add_generation_prompt)
        ids: list[int] = []
        mask: list[int] = []
        for m in messages:
            content = self.encode(m["content"])
            learn = int(m["role"] == "assistant")
            ids += [self.special_id(ROLE_TOKENS[m["role"]]), *content, self.end_id]
            mask += [0] + [learn] * (len(content) + 1)
        if add_generation_prompt:
            ids.append(self.assistant_id)
            mask.append(0)
        return ids, mask

    def render_chat_text(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text, for display: decode(apply_chat_template(...)[0]) equals it."""
        _check_messages(messages, add_generation_prompt)
        text = "".join(f"{ROLE_TOKENS[m['role']]}{m['content']}{END}" for m in messages)
        return text + (ASSISTANT if add_generation_prompt else "")

    # ----- files --------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> str:
        """Write the tokenizer as human-readable JSON, atomically; returns the file written.

        `path` ending in ".json" is the file; any other path is a directory (created if missing) that
        gets TOKENIZER_FILE ("tokenizer.json").
        Tokens are written as GPT-2 printable strings (`token_to_str`: space -> 'Ġ'):
        {"format", "version", "pattern", "vocab": {token: id}, "merges": [[left, right], ...],
         "special_tokens": {string: id}}.
        """
        path = os.fspath(path)
        if not path.endswith(".json"):
            os.makedirs(path, exist_ok=True)
            path = os.path.join(path, TOKENIZER_FILE)
        special_ids = set(self._special.values())
        data = {
            "format": _FORMAT,
            "version": 1,
            "pattern": GPT2_PAT_STR,
            "vocab": {token_to_str(b): i for i, b in self._vocab.items() if i not in special_ids},
            "merges": [[token_to_str(a), token_to_str(b)] for a, b in self.merges],
            "special_tokens": self.special_tokens,
        }
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(_one_item_per_line(data))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Read a file written by `save` (or a directory holding TOKENIZER_FILE).

        FileNotFoundError for a missing file; ValueError naming the file for anything malformed.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a valid tokenizer JSON file ({e})") from e
        try:
            return cls(*_parse_saved(data))
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{path}: {e}") from e

    # ----- helpers ------------------------------------------------------------------------------

    def _allowed(self, allowed_special: Iterable[str] | str) -> set[str]:
        if allowed_special == "all":
            return set(self._special)
        if isinstance(allowed_special, str):
            raise TypeError(f"allowed_special must be a set of special tokens or 'all', got {allowed_special!r}")
        allowed = set(allowed_special)
        unknown = allowed - set(self._special)
        if unknown:
            raise ValueError(f"allowed_special has tokens this tokenizer lacks: {sorted(unknown)}")
        return allowed

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        if hasattr(ids, "tolist"):  # a torch tensor or numpy array
            ids = ids.tolist()
        ids = list(ids)
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self._vocab)]
        if bad:
            raise ValueError(
                f"ids contain {len(bad)} invalid token id(s), e.g. {bad[0]!r} (vocab_size {self.vocab_size})"
            )
        return ids


def _check_vocab(vocab: Mapping[int, bytes]) -> dict[int, bytes]:
    if not isinstance(vocab, Mapping):
        raise TypeError(f"vocab must be a dict id -> bytes, got {type(vocab).__name__}")
    if sorted(vocab) != list(range(len(vocab))):
        raise ValueError(f"vocab ids must be exactly 0..{len(vocab) - 1}")
    for i, b in vocab.items():
        if not isinstance(b, bytes) or not b:
            raise ValueError(f"vocab[{i}] must be non-empty bytes, got {b!r}")
    return dict(sorted(vocab.items()))


def _find_special_ids(vocab: dict[int, bytes], special_tokens: Sequence[str]) -> dict[str, int]:
    if isinstance(special_tokens, str) or not all(isinstance(s, str) and s for s in special_tokens):
        raise TypeError("special_tokens must be a list of non-empty str")
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"special_tokens has duplicates: {list(special_tokens)}")
    by_bytes: dict[bytes, int] = {}
    for i, b in vocab.items():
        by_bytes[b] = i  # ids ascend, so the highest id with these bytes wins
    missing = [s for s in special_tokens if s.encode("utf-8") not in by_bytes]
    if missing:
        raise ValueError(f"special tokens {missing} are not in the vocab")
    return {s: by_bytes[s.encode("utf-8")] for s in special_tokens}


def _mergeable_ranks(vocab: dict[int, bytes], special_ids: set[int]) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for i, b in vocab.items():
        if i in special_ids:
            continue
        if b in ranks:
            raise ValueError(f"vocab ids {ranks[b]} and {i} have the same bytes {b!r}")
        ranks[b] = i
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(
            f"vocab lacks {len(missing)} single bytes, e.g. {bytes([missing[0]])!r}: every byte needs a token"
        )
    return ranks


def _check_merges(merges: Sequence[tuple[bytes, bytes]], ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    merged = sorted((i, b) for b, i in ranks.items() if len(b) > 1)  # multi-byte tokens in id order
    if len(merges) != len(merged):
        raise ValueError(f"merges has {len(merges)} entries but the vocab has {len(merged)} multi-byte tokens")
    out = []
    for k, (pair, (i, token)) in enumerate(zip(merges, merged)):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(p, bytes) for p in pair)):
            raise TypeError(f"merges[{k}] must be a pair of bytes, got {pair!r}")
        a, b = pair
        if a + b != token or ranks.get(a, i) >= i or ranks.get(b, i) >= i:
            raise ValueError(f"merges[{k}] = {pair!r} does not make vocab id {i} ({token!r}) from two earlier tokens")
        out.append((a, b))
    return out


def _check_messages(messages: list[dict], add_generation_prompt: bool) -> None:
    if not isinstance(messages, list):
        raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty")
    for k, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(f"messages[{k}] must be a dict, got {type(m).__name__}")
        for field in ("role", "content"):
            if field not in m:
                raise ValueError(f"messages[{k}] has no '{field}'")
        if m["role"] not in ROLE_TOKENS:
            raise ValueError(f"messages[{k}] has unknown role {m['role']!r}; use one of {list(ROLE_TOKENS)}")
        if not isinstance(m["content"], str):
            raise TypeError(f"messages[{k}]['content'] must be a str, got {type(m['content']).__name__}")
        if not m["content"]:
            raise ValueError(f"messages[{k}] ({m['role']}) has empty content")
    roles = [m["role"] for m in messages]
    if add_generation_prompt and roles[-1] == "assistant":
        raise ValueError("add_generation_prompt=True but the last message is already an assistant turn")
    if not add_generation_prompt and "assistant" not in roles:
        raise ValueError(
            "messages has no assistant turn, so there is nothing to train on (add_generation_prompt=False)"
        )


def _one_item_per_line(data: dict) -> str:
    """JSON with one top-level field, vocab entry or merge per line (diff- and grep-friendly)."""

    def dump(x: object) -> str:
        return json.dumps(x, ensure_ascii=False)

    fields = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            items = ",\n  ".join(f"{dump(k)}: {dump(v)}" for k, v in value.items())
            fields.append(f"{dump(key)}: {{\n  {items}\n }}")
        elif isinstance(value, list) and value:
            items = ",\n  ".join(dump(v) for v in value)
            fields.append(f"{dump(key)}: [\n  {items}\n ]")
        else:
            fields.append(f"{dump(key)}: {dump(value)}")
    return "{\n " + ",\n ".join(fields) + "\n}\n"


def _parse_saved(data: object) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]], list[str]]:
    """(vocab, merges, special_tokens) from the JSON object written by `Tokenizer.save`."""
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise ValueError(f"not a minillm tokenizer file (expected \"format\": \"{_FORMAT}\")")
    for field in ("vocab", "merges", "special_tokens"):
        if field not in data:
            raise ValueError(f"missing field '{field}'")
    if data.get("version") != 1:
        raise ValueError(f"unsupported version {data.get('version')!r} (this code reads version 1)")
    if data.get("pattern", GPT2_PAT_STR) != GPT2_PAT_STR:
        raise ValueError("field 'pattern' differs from the GPT-2 pattern this code uses")
    vocab_json, merges_json, specials = data["vocab"], data["merges"], data["special_tokens"]
    if not isinstance(vocab_json, dict) or not all(type(i) is int for i in vocab_json.values()):
        raise ValueError("field 'vocab' must map token strings to int ids")
    if not isinstance(specials, dict) or not all(type(i) is int for i in specials.values()):
        raise ValueError("field 'special_tokens' must map strings to int ids")
    if not isinstance(merges_json, list):
        raise ValueError("field 'merges' must be a list of [left, right] pairs")
    vocab = {i: str_to_token(s) for s, i in vocab_json.items()}
    for s, i in specials.items():
        if i in vocab:
            raise ValueError(f"special token {s!r} reuses id {i}")
        vocab[i] = s.encode("utf-8")
    merges = []
    for k, pair in enumerate(merges_json):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise ValueError(f"merges[{k}] must be a pair of token strings, got {pair!r}")
        merges.append((str_to_token(pair[0]), str_to_token(pair[1])))
    return vocab, merges, sorted(specials, key=specials.get)
