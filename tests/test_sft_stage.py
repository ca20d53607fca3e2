"""The SFT stage: gradient accumulation through the real loop, run_sft end to end (full and LoRA),
the inference template, instruction-following metrics, and bad input through run_sft and the CLI."""
import json
import re
from pathlib import Path

import pytest
import torch

from minillm.align.chat import SFTExample, collate
from minillm.align.sft import sft_loss
from minillm.config import SFTConfig, TrainConfig
from minillm.model import GPT, GPTConfig
from minillm.runs import load_run
from minillm.stages.pretrain import pretrain
from minillm.stages.sft import run_sft
from minillm.tokenizer import Tokenizer
from minillm.train import train

ROOT = Path(__file__).resolve().parent.parent
WORLD = ROOT / "data" / "world"
TINY = dict(block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load(ROOT / "data" / "tokenizer")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tok):
    """A tiny pretrained run directory (2 steps on a slice of the world corpus): real files, seconds to make."""
    d = tmp_path_factory.mktemp("base")
    text = (WORLD / "corpus_train.txt").read_text()[:20_000]
    (d / "train.txt").write_text(text)
    (d / "val.txt").write_text(text[:3_000])
    cfg = TrainConfig(max_steps=2, batch_size=4, warmup_steps=0, eval_interval=0, eval_iters=1, device="cpu")
    pretrain(tok, d / "train.txt", d / "val.txt", GPTConfig(vocab_size=tok.vocab_size, **TINY), cfg, d / "run",
             progress=False)
    return d / "run"


def sft_cfg(**kw):
    base = dict(max_steps=3, batch_size=4, lr=1e-2, warmup_steps=0, eval_interval=0, eval_iters=1, log_interval=1,
                device="cpu")
    return TrainConfig(**{**base, **kw})


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def world_rows(name, n):
    return [json.loads(line) for line in (WORLD / name).read_text().splitlines()[:n]]


# ----- gradient accumulation through train() ------------------------------------------------------------


def _chats_of_different_lengths(tok):
    """8 chats whose answers have 1 .. ~30 tokens, in order, so the 4 micro-batches of 2 differ a lot in size."""
    chats = []
    for k in (1, 1, 2, 3, 8, 10, 25, 30):
        answer = " ".join(["Oakvale"] * k) + "."
        chats.append(SFTExample(*tok.apply_chat_template([{"role": "user", "content": "Where?"},
                                                          {"role": "assistant", "content": answer}])))
    return chats


def _train_one_step(tmp_path, tok, examples, accum):
    """One step of the real loop on the same 8 chats: 1 micro-batch of 8 or `accum` micro-batches."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, **TINY))
    size = len(examples) // accum
    batches = iter([collate(examples[i * size:(i + 1) * size], tok.pad_id) for i in range(accum)])
    cfg = TrainConfig(max_steps=1, batch_size=size, grad_accum=accum, lr=0.1, warmup_steps=0, grad_clip=0.0,
                      eval_interval=0, log_interval=1, device="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, cfg, lambda split, gen: next(batches), sft_loss, tmp_path / f"accum{accum}", has_val=False,
          progress=False)
    (record,) = [json.loads(line) for line in (tmp_path / f"accum{accum}" / "metrics.jsonl").read_text().splitlines()]
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}, record


def _reference_gradients(tok, examples):
    """By hand: grad of (sum of token losses) / (all tokens), and the per-micro-batch-mean alternative."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, **TINY))
    params = list(model.parameters())
    loss_sum, n = sft_loss(model, collate(examples, tok.pad_id))
    global_grad = torch.autograd.grad(loss_sum / n, params)
    per_micro = [torch.zeros_like(p) for p in params]
    for i in range(4):
        s, k = sft_loss(model, collate(examples[2 * i:2 * i + 2], tok.pad_id))
        for acc, g in zip(per_micro, torch.autograd.grad(s / k, params)):
            acc += g / 4  # each micro-batch's mean, averaged: short answers weigh more per token
    return global_grad, per_micro, float(loss_sum.detach() / n)


def _norm(grads):
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))


def test_accumulation_normalises_by_all_tokens(tmp_path, tok, monkeypatch):
    examples = _chats_of_different_lengths(tok)
    global_grad, per_micro, mean_loss = _reference_gradients(tok, examples)
    names = [n for n, _ in GPT(GPTConfig(vocab_size=tok.vocab_size, **TINY)).named_parameters()]
    # the alternative really is different here (else this test could not tell the two apart)
    assert abs(_norm(per_micro) - _norm(global_grad)) > 0.05 * _norm(global_grad)

    # With the real AdamW: same loss, same gradient norm (logged before the step) and same update.
    updates, records = {}, {}
    for accum in (1, 4):
        updates[accum], records[accum] = _train_one_step(tmp_path / "adamw", tok, examples, accum)
    for accum in (1, 4):
        assert records[accum]["loss"] == pytest.approx(mean_loss, rel=1e-5)
        assert records[accum]["grad_norm"] == pytest.approx(_norm(global_grad), rel=1e-4)
        assert records[accum]["grad_norm"] != pytest.approx(_norm(per_micro), rel=1e-2)
    for n in updates[1]:  # Adam's first step is ~lr * g / |g|: float noise shows only where g is ~eps
        torch.testing.assert_close(updates[1][n], updates[4][n], atol=1e-3 * 0.1, rtol=1e-5)

    # With plain SGD the update is -lr * g, so it shows the whole gradient the loop accumulated.
    monkeypatch.setattr("minillm.train.configure_optimizer",
                        lambda model, cfg: torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                                           lr=cfg.lr))
    for accum in (1, 4):
        update, _ = _train_one_step(tmp_path / "sgd", tok, examples, accum)
        loop_grad = [update[n] / -0.1 for n in names]
        for n, g, ref in zip(names, loop_grad, global_grad):
            torch.testing.assert_close(g, ref, atol=2e-5, rtol=1e-3, msg=f"{n} (accum {accum})")
        diff = _norm([g - alt for g, alt in zip(loop_grad, per_micro)])
        assert diff > 0.05 * _norm(global_grad)  # it is not the per-micro-batch average


# ----- run_sft end to end -----------------------------------------------------------------------------


def test_run_sft_writes_a_loadable_run(tmp_path, tok, base_run):
    long = {"messages": [{"role": "user", "content": "Tell me everything."},
                         {"role": "assistant", "content": " ".join(["Oakvale"] * 100) + "."}]}
    data = write_jsonl(tmp_path / "chats.jsonl", world_rows("sft_train.jsonl", 30) + [long])
    out = tmp_path / "sft"
    run = run_sft(base_run, data, out, sft_cfg(), progress=False)
    model, result, stats = run.model, run.result, run.stats
    assert stats["conversations"] == 31 and stats["dropped_too_long"] == 1
    assert stats["train_examples"] + stats["val_examples"] == 30 and stats["val_examples"] == 1
    assert result.step == 3 and result.val_loss is not None
    config = json.loads((out / "config.json").read_text())
    assert config["stage"] == "sft" and config["stats"] == stats and config["peft"] is None

    reloaded, tok2, run_config = load_run(out)
    assert run_config["stage"] == "sft" and tok2.vocab_size == tok.vocab_size
    base, _, _ = load_run(base_run)
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "Where does Mira live?"}],
                                                add_generation_prompt=True)[0]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids), model(ids))
        assert not torch.allclose(reloaded(ids), base(ids), atol=1e-3)  # it trained

    from minillm.eval.task import evaluate_instructions

    test = world_rows("sft_test.jsonl", 66)
    test = [r for r in test if r["kind"] == "fact"][:3] + [r for r in test if r["kind"] == "refusal"][:2]
    res = evaluate_instructions(reloaded, tok, test)
    assert res["n"] == 5 and len(res["rows"]) == 5
    for key in ("exact_match", "refusal_accuracy", "false_refusals"):
        assert 0.0 <= res[key] <= 1.0


def test_run_sft_packing_and_limit(tmp_path, tok, base_run):
    data = write_jsonl(tmp_path / "chats.jsonl", world_rows("sft_train.jsonl", 40))
    stats = run_sft(base_run, data, tmp_path / "packed", sft_cfg(max_steps=1),
                    SFTConfig(packing=True, limit=30, loss_on="all"), progress=False).stats
    assert stats["conversations"] == 30 and stats["train_examples"] == 29 and stats["val_examples"] == 1
    assert 1 <= stats["train_rows"] < 29  # ~20-token chats, 65-token rows
    with pytest.raises(ValueError, match="loss_on"):
        run_sft(base_run, data, tmp_path / "x", sft_cfg(), SFTConfig(loss_on="prompt"))
    with pytest.raises(ValueError, match="limit"):
        run_sft(base_run, data, tmp_path / "x", sft_cfg(), SFTConfig(limit=0))


def test_lora_run_reloads_with_its_adapter(tmp_path, tok, base_run):
    from minillm.peft.apply import load_adapter
    from minillm.peft.lora import LoRALinear

    data = write_jsonl(tmp_path / "chats.jsonl", world_rows("sft_train.jsonl", 24))
    out = tmp_path / "lora"
    peft = {"method": "lora", "r": 2, "lora_alpha": 4}
    model = run_sft(base_run, data, out, sft_cfg(), peft=peft, progress=False).model
    assert (out / "adapter.pt").exists()
    reloaded, _, run_config = load_run(out)
    from minillm.peft.tokens import chat_token_ids

    # run_sft adds the chat tokens' embedding rows to every adapter (pretraining never saw those tokens)
    assert run_config["peft"] == {**peft, "trainable_token_indices": chat_token_ids(tok)}
    assert sum(isinstance(m, LoRALinear) for m in reloaded.modules()) == TINY["n_layer"]  # c_attn per block
    base, _, _ = load_run(base_run)
    from_adapter = load_adapter(load_run(base_run)[0], out / "adapter.pt")
    ids = torch.tensor([tok.encode("Mira lives in Oakvale.")])
    with torch.no_grad():
        want = model(ids)
        torch.testing.assert_close(reloaded(ids), want)
        torch.testing.assert_close(from_adapter(ids), want)
        assert not torch.allclose(base(ids), want, atol=1e-4)  # the adapter changed the output...
    frozen = {n: p for n, p in reloaded.named_parameters() if "lora" not in n and "delta" not in n}
    base_params = dict(base.named_parameters())
    for n, p in frozen.items():  # ...and only the adapter: the base weights are the pretrained ones
        assert torch.equal(p, base_params[n.replace(".base", "")]), n


# ----- inference uses exactly the training template -------------------------------------------------------


def test_answer_questions_prompts_with_the_training_prefix(tok, monkeypatch):
    from minillm.eval import task

    seen = {}

    def fake_generate(reply):
        def generate_completions(model, prompts, max_new_tokens, eos_id=None, **kw):
            seen.update(prompts=prompts, eos_id=eos_id)
            return [tok.encode(reply) for _ in prompts]
        return generate_completions

    monkeypatch.setattr(task, "generate_completions", fake_generate(" Oakvale. "))
    records = world_rows("sft_test.jsonl", 8)
    answers = task.answer_questions(None, tok, [task._user(r) for r in records])
    assert answers == ["Oakvale."] * 8 and seen["eos_id"] == tok.end_id
    for r, prompt in zip(records, seen["prompts"]):
        train_ids, mask = tok.apply_chat_template(r["messages"])
        assert prompt == tok.apply_chat_template(r["messages"][:-1], add_generation_prompt=True)[0]
        assert train_ids[: len(prompt)] == prompt and set(mask[len(prompt):]) == {1}

    # few-shot mode: plain text, no chat tokens, stop at <|endoftext|>, answer = first line
    monkeypatch.setattr(task, "generate_completions", fake_generate(" green.\nQuestion: x"))
    answers = task.answer_questions(None, tok, ["Who?"], mode="fewshot", shots=records[:2])
    assert answers == ["green."] and seen["eos_id"] == tok.eot_id
    text = tok.decode(seen["prompts"][0])
    assert text == task.fewshot_prompt("Who?", records[:2]) and text.endswith("Question: Who?\nAnswer:")
    assert not set(seen["prompts"][0]) & set(tok.special_tokens.values())
    with pytest.raises(ValueError, match="mode"):
        task.answer_questions(None, tok, ["Who?"], mode="zero-shot")


def test_evaluate_instructions_metrics_by_hand(tok, monkeypatch):
    from minillm.eval import task

    rows = world_rows("sft_test.jsonl", 66)
    facts = [r for r in rows if r["kind"] == "fact"][:4]
    refusals = [r for r in rows if r["kind"] == "refusal"][:2]
    answers = {task._user(facts[0]): task._assistant(facts[0]),            # right
               task._user(facts[1]): task._assistant(facts[1]).upper(),    # right (case is ignored)
               task._user(facts[2]): "I'm sorry, but I can't help with that.",  # a needless refusal
               task._user(facts[3]): "Nobody knows.",                      # wrong
               task._user(refusals[0]): "I'm sorry, but I can't help with that.",
               task._user(refusals[1]): "Sure, here is how."}
    monkeypatch.setattr(task, "answer_questions", lambda model, tok, qs, **kw: [answers[q] for q in qs])
    res = task.evaluate_instructions(None, tok, facts + refusals)
    assert res["n"] == 6
    assert res["exact_match"] == pytest.approx(2 / 4) and res["fact_exact_match"] == pytest.approx(2 / 4)
    assert res["refusal_accuracy"] == pytest.approx(1 / 2) and res["false_refusals"] == pytest.approx(1 / 4)
    from minillm.world import gold_reward

    want = sum(gold_reward(q, a) for q, a in answers.items()) / 6
    assert res["gold_reward"] == pytest.approx(want)


# ----- bad input through run_sft and the CLI ---------------------------------------------------------------

GOOD = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]})
BAD_FILES = {  # id: (file text, or None for a missing file; what the error says)
    "no_assistant": (GOOD + '\n{"messages": [{"role": "user", "content": "Hi"}]}\n', ":2: .*no assistant turn"),
    "unknown_role": (GOOD + '\n{"messages": [{"role": "robot", "content": "Hi"}]}\n', ":2: .*unknown role 'robot'"),
    "empty_content": (GOOD + '\n{"messages": [{"role": "user", "content": ""}, '
                              '{"role": "assistant", "content": "Hi"}]}\n', ":2: .*empty content"),
    "malformed_line": (GOOD + '\n{"messages": [}\n', ":2: invalid JSON"),
    "missing_file": (None, ": file not found"),
}


def _bad_file(tmp_path, text):
    path = tmp_path / "chats.jsonl"
    if text is not None:
        path.write_text(text)
    return path


@pytest.mark.parametrize("text,match", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_data_through_run_sft(tmp_path, base_run, text, match):
    path = _bad_file(tmp_path, text)
    error = FileNotFoundError if text is None else ValueError
    with pytest.raises(error, match=re.escape(str(path)) + match):
        run_sft(base_run, path, tmp_path / "out", sft_cfg(), progress=False)
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.parametrize("text,match", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_data_through_the_cli(tmp_path, base_run, capsys, text, match):
    from minillm.cli import main

    path = _bad_file(tmp_path, text)
    code = main(["sft", "--preset", "tiny", "--init", str(base_run), "--data", str(path),
                 "--out", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(r"minillm sft: error: " + re.escape(str(path)) + match, err), err
    assert not (tmp_path / "out").exists()


def test_cli_sft_runs_and_missing_init(tmp_path, base_run, capsys):
    from minillm.cli import main

    data = write_jsonl(tmp_path / "chats.jsonl", world_rows("sft_train.jsonl", 12))
    out = tmp_path / "out"
    args = ["sft", "--preset", "tiny", "--init", str(base_run), "--data", str(data), "--out", str(out),
            "--device", "cpu", "--max-steps", "2", "--batch-size", "4", "--pack",
            "--peft", "lora", "--lora-r", "2"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["step"] == 2 and printed["conversations"] == 12 and printed["packing"] is True
    assert {k: v for k, v in load_run(out)[2]["peft"].items() if k != "trainable_token_indices"} == \
        {"method": "lora", "r": 2}
    assert main(["sft", "--preset", "tiny", "--init", str(tmp_path / "nope"), "--data", str(data),
                 "--out", str(tmp_path / "o2")]) == 2
    assert "nope: run directory not found" in capsys.readouterr().err


def test_fact_completion_matching_rules():
    from minillm.eval.task import completion_matches

    assert completion_matches(" Oakvale. Mira is", "Oakvale")
    assert completion_matches(" the plum.", "plum") and completion_matches(" a plum", "plum")
    assert not completion_matches(" a much loved pet.", "parrot")
    assert not completion_matches(" Oakvalee", "Oakvale") and not completion_matches(" the the plum", "plum")
    assert completion_matches(" 34 years old", "34") and not completion_matches(" 3 4", "34")


def test_sft_keeps_the_embedding_rows_pretraining_learned(tmp_path, tok, base_run):
    """embeddings="new": rows of corpus tokens stay bit-identical, rows pretraining never used (chat tokens) train;
    embeddings="all" changes the learned rows too."""
    from minillm.datasets import tokenize_corpus
    from minillm.runs import load_run

    base, _, cfg = load_run(base_run)
    learned = tokenize_corpus(cfg["data"]["train"], tok).unique()
    data = write_jsonl(tmp_path / "d.jsonl", world_rows("sft_train.jsonl", 40))
    run = run_sft(base_run, data, tmp_path / "new", sft_cfg(max_steps=3, weight_decay=0.0))
    new, stats = run.model, run.stats
    assert stats["frozen_embedding_rows"] == learned.numel()
    assert torch.equal(new.wte.weight[learned], base.wte.weight[learned])
    assert not torch.equal(new.wte.weight[tok.assistant_id], base.wte.weight[tok.assistant_id])
    every = run_sft(base_run, data, tmp_path / "all", sft_cfg(max_steps=3, weight_decay=0.0),
                    SFTConfig(embeddings="all")).model
    assert not torch.equal(every.wte.weight[learned], base.wte.weight[learned])
