"""SFT data: chat template -> loss mask -> shifted targets, padding, packing, Alpaca/messages loading, errors.

The expected masks are computed here from the message layout (role token, content, <|end|> per message),
independently of `apply_chat_template`, so a dropped, shifted or widened mask fails these tests.
"""
import json
import re
from pathlib import Path

import pytest
import torch

from minillm.align.chat import (
    SFTExample, all_tokens_mask, alpaca_to_messages, collate, encode_chats, load_chats, pack, sample_batches,
)
from minillm.align.sft import IGNORE_INDEX, sft_loss
from minillm.model import GPT, GPTConfig
from minillm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent

SINGLE = [{"role": "user", "content": "Where does Mira live?"},
          {"role": "assistant", "content": "Mira lives in Oakvale."}]
MULTI = [{"role": "system", "content": "Answer in one sentence."},
         {"role": "user", "content": "What is 3 plus 4?"},
         {"role": "assistant", "content": "3 plus 4 is 7."},
         {"role": "user", "content": "And Tobin's pet?"},
         {"role": "assistant", "content": "Tobin's pet is a goat."}]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load(ROOT / "data" / "tokenizer")


def scored_positions(tok, messages):
    """Positions in the rendered ids that SFT must predict: assistant content and its closing <|end|>."""
    pos, out = 0, []
    for m in messages:
        n = len(tok.encode(m["content"]))
        if m["role"] == "assistant":
            out += range(pos + 1, pos + n + 2)  # after the role token: n content tokens + <|end|>
        pos += n + 2  # role token + content + <|end|>
    return out


def example(tok, messages):
    return SFTExample(*tok.apply_chat_template(messages))


# ----- the loss mask after collate -------------------------------------------------------------------


def test_single_turn_targets_by_hand(tok):
    ids, _ = tok.apply_chat_template(SINGLE)
    u, a = tok.encode(SINGLE[0]["content"]), tok.encode(SINGLE[1]["content"])
    batch = collate([example(tok, SINGLE)], tok.pad_id)
    # inputs drop the last token; the first scored input position holds <|assistant|> and predicts the
    # first answer token; the last one predicts the closing <|end|>
    assert batch["input_ids"][0].tolist() == ids[:-1]
    assert batch["targets"][0].tolist() == [IGNORE_INDEX] * (len(u) + 2) + [*a, tok.end_id]
    assert batch["input_ids"][0, len(u) + 2].item() == tok.assistant_id


@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi"])
def test_targets_are_exactly_the_assistant_spans(tok, messages):
    ids, _ = tok.apply_chat_template(messages)
    targets = collate([example(tok, messages)], tok.pad_id)["targets"][0]
    want = set(scored_positions(tok, messages))
    for t in range(len(ids) - 1):
        if t + 1 in want:
            assert targets[t].item() == ids[t + 1], t
        else:
            assert targets[t].item() == IGNORE_INDEX, t
    scored = targets[targets != IGNORE_INDEX].tolist()
    answers = "".join(m["content"] + "<|end|>" for m in messages if m["role"] == "assistant")
    assert tok.decode(scored) == answers


def test_a_shifted_or_dropped_mask_is_detected(tok):
    """The check above is not vacuous: masks shifted by one, or lost, give other targets."""
    ids, mask = tok.apply_chat_template(MULTI)
    want = collate([SFTExample(ids, mask)], tok.pad_id)["targets"]
    for wrong in ([0] + mask[:-1], mask[1:] + [0], [0] * len(mask), [1] * len(mask)):
        assert not torch.equal(collate([SFTExample(ids, wrong)], tok.pad_id)["targets"], want)


# ----- padding ------------------------------------------------------------------------------------------


def test_right_padding_targets_and_attention_mask(tok):
    chats = [SINGLE, MULTI, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]]
    examples = [example(tok, c) for c in chats]
    batch = collate(examples, tok.pad_id)
    T = max(len(e.ids) for e in examples)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (3, T - 1) for k in batch}
    for i, e in enumerate(examples):
        L = len(e.ids)
        real = min(L, T - 1)  # a shorter row keeps its last token (<|end|>) as an input, with a padded target
        assert batch["input_ids"][i, :real].tolist() == e.ids[:real]
        assert (batch["input_ids"][i, real:] == tok.pad_id).all()
        assert batch["attention_mask"][i].tolist() == [1] * real + [0] * (T - 1 - real)
        assert torch.equal(batch["targets"][i, : L - 1], collate([e], tok.pad_id)["targets"][0])
        assert (batch["targets"][i, L - 1:] == IGNORE_INDEX).all()
    assert int((batch["targets"] != IGNORE_INDEX).sum()) == sum(sum(e.loss_mask[1:]) for e in examples)


def test_padded_batch_loss_is_the_sum_of_single_losses(tok):
    """Right padding changes nothing: the batch's summed loss and count equal those of the rows alone."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    examples = [example(tok, c) for c in (SINGLE, MULTI)]
    loss, n = sft_loss(model, collate(examples, tok.pad_id))
    parts = [sft_loss(model, collate([e], tok.pad_id)) for e in examples]
    assert int(n) == sum(int(p[1]) for p in parts)
    torch.testing.assert_close(loss, sum(p[0] for p in parts), atol=1e-4, rtol=1e-5)


def test_collate_empty_is_an_error(tok):
    with pytest.raises(ValueError, match="no examples"):
        collate([], tok.pad_id)


# ----- packing ------------------------------------------------------------------------------------------


def _world_examples(tok, n):
    chats = load_chats(ROOT / "data" / "world" / "sft_train.jsonl")[:n]
    return encode_chats(tok, chats, block_size=64)[0]


def test_pack_keeps_every_example_and_mask_within_block(tok):
    examples = _world_examples(tok, 40)
    block = 48
    rows = pack(examples, block)
    assert 1 < len(rows) < len(examples)
    assert all(len(r.ids) <= block + 1 and len(r.ids) == len(r.loss_mask) for r in rows)
    assert sum((r.ids for r in rows), []) == sum((e.ids for e in examples), [])
    assert sum((r.loss_mask for r in rows), []) == sum((e.loss_mask for e in examples), [])
    # rows break only between examples, and only when the next example would not fit (greedy)
    k = 0
    for r in rows:
        start = k
        while k < len(examples) and sum(len(e.ids) for e in examples[start:k + 1]) <= block + 1:
            k += 1
        assert r.ids == sum((e.ids for e in examples[start:k]), [])
    assert k == len(examples)


def test_pack_by_hand():
    def ex(n, first):
        return SFTExample(list(range(first, first + n)), [0] + [1] * (n - 1))

    a, b, c, d = ex(5, 0), ex(4, 10), ex(5, 20), ex(9, 30)
    rows = pack([a, b, c, d], block_size=8)  # rows of at most 9 tokens: 5 + 4 fits, + 5 does not
    assert [r.ids for r in rows] == [a.ids + b.ids, c.ids, d.ids]
    assert [r.loss_mask for r in rows] == [a.loss_mask + b.loss_mask, c.loss_mask, d.loss_mask]
    assert [r.ids for r in pack([a, c], block_size=9)] == [a.ids + c.ids]  # exactly block_size + 1
    assert [r.ids for r in pack([a, c], block_size=8)] == [a.ids, c.ids]  # one token too many


def test_packed_batch_scores_the_same_tokens(tok):
    examples = _world_examples(tok, 12)
    separate = collate(examples, tok.pad_id)["targets"]
    packed = collate(pack(examples, 64), tok.pad_id)["targets"]
    assert int((packed != IGNORE_INDEX).sum()) == int((separate != IGNORE_INDEX).sum())
    assert sorted(packed[packed != IGNORE_INDEX].tolist()) == sorted(separate[separate != IGNORE_INDEX].tolist())


def test_packing_has_no_document_mask(tok):
    """The second example in a packed row attends to the first: its logits change, the first's do not."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    a, b = example(tok, SINGLE), example(tok, [{"role": "user", "content": "Hi"},
                                                {"role": "assistant", "content": "Hello."}])
    (row,) = pack([a, b], 64)
    with torch.no_grad():
        packed = model(torch.tensor([row.ids]))[0]
        alone_a = model(torch.tensor([a.ids]))[0]
        alone_b = model(torch.tensor([b.ids]))[0]
    torch.testing.assert_close(packed[: len(a.ids)], alone_a, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(packed[len(a.ids):], alone_b, atol=1e-3)


def test_pack_refuses_an_over_long_example(tok):
    with pytest.raises(ValueError, match="example 1 has 10 tokens > block_size"):
        pack([SFTExample([1, 2], [0, 1]), SFTExample(list(range(10)), [1] * 10)], block_size=8)


# ----- encoding, dropping, the ablation mask, batches -----------------------------------------------------


def test_encode_drops_and_counts_over_long_chats(tok):
    short = SINGLE
    ids, _ = tok.apply_chat_template(short)
    long = [{"role": "user", "content": "Tell me."}, {"role": "assistant", "content": " ".join(["Oakvale"] * 80)}]
    examples, dropped = encode_chats(tok, [short, long, short], block_size=len(ids) - 1)
    assert dropped == 1 and [e.ids for e in examples] == [ids, ids]
    # the boundary: block_size + 1 tokens fit, block_size + 2 do not
    assert encode_chats(tok, [short], block_size=len(ids) - 2) == ([], 1)


def test_all_tokens_mask_scores_every_real_token(tok):
    examples = all_tokens_mask([example(tok, c) for c in (SINGLE, MULTI)])
    batch = collate(examples, tok.pad_id)
    scored = batch["targets"] != IGNORE_INDEX
    lengths = torch.tensor([len(e.ids) for e in examples])
    assert torch.equal(scored, torch.arange(scored.shape[1])[None, :] < lengths[:, None] - 1)
    assert int(scored.sum()) == sum(len(e.ids) - 1 for e in examples)


def test_sample_batches(tok):
    examples = [example(tok, c) for c in (SINGLE, MULTI)]
    get = sample_batches(examples, 5, tok.pad_id)
    one, two = get("train", torch.Generator().manual_seed(3)), get("train", torch.Generator().manual_seed(3))
    assert one["input_ids"].shape[0] == 5 and all(torch.equal(one[k], two[k]) for k in one)
    with pytest.raises(ValueError, match="no training examples"):
        sample_batches([], 4, tok.pad_id)


def test_inference_prompt_is_the_training_prefix(tok):
    """What the model sees at inference (generation prompt) is exactly where training scored the answer."""
    for messages in load_chats(ROOT / "data" / "world" / "sft_train.jsonl")[:30] + [MULTI]:
        ids, mask = tok.apply_chat_template(messages)
        prompt, _ = tok.apply_chat_template(messages[:-1], add_generation_prompt=True)
        assert ids[: len(prompt)] == prompt
        # everything after the prompt is the scored answer; the prompt ends with the unscored role token
        assert mask[len(prompt) - 1] == 0 and set(mask[len(prompt):]) == {1}


# ----- loading: Alpaca and messages, JSON and JSONL -----------------------------------------------------

ALPACA = [{"instruction": "Name Mira's town.", "input": "", "output": "Oakvale."},
          {"instruction": "Add the numbers.", "input": "3 and 4", "output": "7"},
          {"instruction": "Say hi.", "input": "   ", "output": "Hi!"}]
ALPACA_CHATS = [[{"role": "user", "content": "Name Mira's town."}, {"role": "assistant", "content": "Oakvale."}],
                [{"role": "user", "content": "Add the numbers.\n\n3 and 4"}, {"role": "assistant", "content": "7"}],
                [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]]


def test_alpaca_to_messages():
    assert [alpaca_to_messages(r) for r in ALPACA] == ALPACA_CHATS
    assert alpaca_to_messages({"instruction": "Go.", "output": "Done."})[0]["content"] == "Go."  # no input field


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_load_chats_alpaca_and_messages(tmp_path, suffix):
    records = ALPACA + [{"messages": MULTI, "kind": "extra fields are ignored"}]
    path = tmp_path / f"data{suffix}"
    path.write_text(json.dumps(records) if suffix == ".json" else "\n".join(map(json.dumps, records)) + "\n\n")
    assert load_chats(path) == ALPACA_CHATS + [MULTI]


def test_load_chats_world_file():
    chats = load_chats(ROOT / "data" / "world" / "sft_train.jsonl")
    assert len(chats) == 1204 and all(c[-1]["role"] == "assistant" for c in chats)


def chat(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


BAD_RECORDS = {  # id: (record, what the error says)
    "no_assistant": (chat(("user", "Hi")), "no assistant turn"),
    "unknown_role": (chat(("user", "Hi"), ("bot", "Yo")), "message 1 has unknown role 'bot'"),
    "empty_content": (chat(("user", " "), ("assistant", "Yo")), r"message 0 \(user\) has empty content"),
    "content_not_str": (chat(("user", 3), ("assistant", "Yo")), "content must be a string"),
    "no_content": ({"messages": [{"role": "user"}]}, "message 0 needs 'role' and 'content'"),
    "no_messages": ({"messages": []}, "non-empty list"),
    "alpaca_empty": ({"instruction": "Do it.", "input": "", "output": ""}, "'output' must be a non-empty string"),
    "alpaca_input": ({"instruction": "Do it.", "input": 5, "output": "Done."}, "'input' must be a string"),
    "unknown_format": ({"prompt": "Hi", "response": "Yo"}, "expected 'messages' or Alpaca fields"),
}


@pytest.mark.parametrize("record,match", BAD_RECORDS.values(), ids=BAD_RECORDS.keys())
def test_bad_record_names_file_and_line(tmp_path, record, match):
    path = tmp_path / "chats.jsonl"
    good = json.dumps({"messages": SINGLE})
    path.write_text(f"{good}\n\n{json.dumps(record)}\n{good}\n")  # the bad record is on line 3
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: ") + ".*" + match):
        load_chats(path)


def test_bad_files(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": SINGLE}) + '\n{"messages": [\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: invalid JSON")):
        load_chats(path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_chats(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no conversations"):
        load_chats(tmp_path / "empty.jsonl")
    (tmp_path / "obj.json").write_text(json.dumps({"messages": SINGLE}))
    with pytest.raises(ValueError, match="must hold a list"):
        load_chats(tmp_path / "obj.json")
    (tmp_path / "bad.json").write_text('[\n{"messages": }\n]')
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'bad.json'}:2: invalid JSON")):
        load_chats(tmp_path / "bad.json")
    (tmp_path / "rec.json").write_text(json.dumps([{"messages": SINGLE}, ["not", "a", "record"]]))
    with pytest.raises(ValueError, match="record 1: expected a JSON object"):
        load_chats(tmp_path / "rec.json")
