"""The distillation stage on tiny models: every mode trains and writes a loadable run, the loss mixes kd and CE as
documented, sequence-level KD trains on the teacher's greedy answers, on-policy batches are the student's samples,
and bad input (another tokenizer, no pretraining corpus) is named."""
import copy
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from minillm.align.chat import collate, encode_chats, load_chats
from minillm.align.sft import masked_cross_entropy_sum
from minillm.cli import main
from minillm.config import DistillConfig, TrainConfig
from minillm.model import GPT, GPTConfig
from minillm.runs import load_run, save_run_files
from minillm.sampling import generate_completions
from minillm.stages.distill import (
    OnPolicyDistillSource,
    distill_loss,
    pretraining_corpus,
    pretraining_run,
    run_distill,
    teacher_answers,
)
from minillm.tokenizer import Tokenizer
from minillm.utils import atomic_torch_save

ROOT = Path(__file__).resolve().parent.parent
TOK = Tokenizer.load(ROOT / "data" / "tokenizer")
TEACHER = GPTConfig(vocab_size=TOK.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32, dropout=0.0)
STUDENT = GPTConfig(vocab_size=TOK.vocab_size, block_size=64, n_layer=1, n_head=1, n_embd=16, dropout=0.0)
CHATS = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in [
    ("What is 2 plus 3?", "2 plus 3 is 5."), ("Where does Mira live?", "Mira lives in Oakvale."),
    ("How old is Cora?", "Cora is 40 years old."), ("What colour does Sive prefer?", "Sive likes green."),
] * 6]


def make_run(path: Path, cfg: GPTConfig, seed: int, tok: Tokenizer = TOK, **extra) -> Path:
    torch.manual_seed(seed)
    run_config = {"stage": "sft", "model": asdict(cfg), **extra}
    save_run_files(path, tok, run_config)
    atomic_torch_save({"model": GPT(cfg).state_dict(), "run_config": run_config}, path / "ckpt.pt")
    return path


def write_chats(path: Path) -> Path:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    return path


def cfg(**kw) -> TrainConfig:
    base = {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "min_lr": 1e-3, "warmup_steps": 0, "weight_decay": 0.0,
            "eval_interval": 2, "eval_iters": 1, "log_interval": 2, "device": "cpu", "dtype": "float32"}
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def runs(tmp_path):
    return make_run(tmp_path / "teacher", TEACHER, 0), make_run(tmp_path / "student", STUDENT, 1), \
        write_chats(tmp_path / "chats.jsonl")


def a_batch() -> dict[str, torch.Tensor]:
    examples, _ = encode_chats(TOK, CHATS[:4], 64)
    return collate(examples, TOK.pad_id)


@pytest.mark.parametrize("mode", ["sft", "word", "seq", "on_policy"])
def test_every_mode_writes_a_loadable_run(runs, tmp_path, mode):
    teacher, student, chats = runs
    method = DistillConfig(mode=mode, lmbda=1.0 if mode == "on_policy" else 0.5, max_new_tokens=8)
    run = run_distill(teacher, student, chats, tmp_path / mode, cfg(), method, progress=False)
    model, _tok, config = load_run(tmp_path / mode)
    assert config["stage"] == "distill" and config["distill"]["mode"] == mode
    assert config["teacher"] == str(teacher) and config["init"] == str(student)
    assert model.config.n_embd == 16 and run.stats["student_parameters"] < run.stats["teacher_parameters"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), run.model.state_dict().values()))
    assert torch.isfinite(torch.tensor(run.result.train_loss))
    start = load_run(student)[0]
    assert not torch.equal(start.h[0].mlp.c_fc.weight, model.h[0].mlp.c_fc.weight)  # it trained
    if mode == "on_policy":
        assert run.stats["sampled_batches"] == 4  # lmbda = 1: every batch is the student's own samples


def test_loss_mixes_kd_and_ce():
    torch.manual_seed(0)
    teacher, student = GPT(TEACHER).eval(), GPT(STUDENT)
    batch = a_batch()
    logits = student(batch["input_ids"], attention_mask=batch["attention_mask"])
    ce, n = masked_cross_entropy_sum(logits, batch["targets"])
    sft_sum, n_sft = distill_loss(teacher, DistillConfig(mode="sft"))(student, batch)
    assert torch.allclose(sft_sum, ce) and int(n_sft) == int(n)
    from minillm.align.distill import kd_loss
    with torch.no_grad():
        t_logits = teacher(batch["input_ids"], attention_mask=batch["attention_mask"])
    kd = kd_loss(logits, t_logits, batch["targets"] != -100, 2.0, "forward_kl")
    word_sum, _ = distill_loss(teacher, DistillConfig(mode="word", alpha=0.3))(student, batch)
    assert torch.allclose(word_sum, 0.3 * kd * n + 0.7 * ce, rtol=1e-5)
    sampled_sum, _ = distill_loss(teacher, DistillConfig(mode="on_policy", alpha=0.3))(
        student, {**batch, "sampled": torch.tensor(True)})
    assert torch.allclose(sampled_sum, kd * n, rtol=1e-5)  # the student's own samples: kd alone (GKD)


def test_student_equal_to_teacher_has_zero_kd():
    torch.manual_seed(0)
    teacher = GPT(TEACHER).eval()
    student = copy.deepcopy(teacher)
    loss, _ = distill_loss(teacher, DistillConfig(mode="word", alpha=1.0))(student, a_batch())
    assert abs(float(loss)) < 1e-4


def test_seq_kd_trains_on_the_teachers_greedy_answers(runs):
    teacher_dir, _, chats = runs
    teacher = load_run(teacher_dir)[0]
    rewritten = teacher_answers(teacher, TOK, load_chats(chats)[:3], max_new_tokens=6)
    for chat, new in zip(CHATS[:3], rewritten):
        assert new[:-1] == chat[:-1]
        prompt = TOK.apply_chat_template(chat[:-1], add_generation_prompt=True)[0]
        out = generate_completions(teacher, [prompt], 6, eos_id=TOK.end_id, temperature=0)[0]
        assert new[-1]["content"] == (TOK.decode(out) if TOK.decode(out).strip() else chat[-1]["content"])


def test_on_policy_batch_is_the_students_sample():
    torch.manual_seed(0)
    student = GPT(STUDENT)
    examples, _ = encode_chats(TOK, CHATS, 64)
    prompts = [TOK.apply_chat_template(c[:-1], add_generation_prompt=True)[0] for c in CHATS]
    source = OnPolicyDistillSource(examples, prompts, TOK, 3, DistillConfig(mode="on_policy", lmbda=1.0,
                                                                            max_new_tokens=5))
    batch = source("train", torch.Generator().manual_seed(0), student, 0)
    assert bool(batch["sampled"]) and batch["input_ids"].shape[0] == 3
    for row_ids, row_targets, row_mask in zip(batch["input_ids"], batch["targets"], batch["attention_mask"]):
        scored = (row_targets != -100).nonzero().flatten()
        assert 1 <= len(scored) <= 6  # up to 5 sampled tokens and the closing <|end|>
        n = int(row_mask.sum())
        ids = row_ids[:n].tolist()
        assert any(ids[: len(p)] == p for p in prompts)  # a prompt of the data, then the student's answer
    source.method = DistillConfig(mode="on_policy", lmbda=0.0)
    assert "sampled" not in source("train", torch.Generator().manual_seed(0), student, 1)


def test_other_tokenizer_is_refused(tmp_path, runs):
    teacher, _, chats = runs
    other_tok = Tokenizer.train(" ".join(["a b c d e f g"] * 50), 300)
    other = make_run(tmp_path / "other", GPTConfig(vocab_size=other_tok.vocab_size, block_size=64, n_layer=1,
                                                   n_head=1, n_embd=16), 2, tok=other_tok)
    with pytest.raises(ValueError, match="different tokenizers"):
        run_distill(teacher, other, chats, tmp_path / "out", cfg(), DistillConfig(), progress=False)


def test_pretraining_corpus_follows_the_lineage(tmp_path):
    base = make_run(tmp_path / "base", TEACHER, 0)
    cfg_path = base / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "stage": "pretrain",
                                    "data": {"train": "w/corpus_train.txt", "val": "w/corpus_val.txt"}}))
    sft = make_run(tmp_path / "sft", TEACHER, 0, init=str(base))
    dpo = make_run(tmp_path / "dpo", TEACHER, 0, init=str(sft))
    assert pretraining_corpus(dpo) == (Path("w/corpus_train.txt"), Path("w/corpus_val.txt"))
    orphan = make_run(tmp_path / "orphan", TEACHER, 0)
    with pytest.raises(ValueError, match="pretraining corpus"):
        pretraining_corpus(orphan)


def test_cli_distill_with_a_given_student(runs, tmp_path, capsys):
    teacher, student, chats = runs
    main(["distill", "--teacher", str(teacher), "--student", str(student), "--data", str(chats), "--out",
          str(tmp_path / "cli"), "--student-preset", "tiny", "--max-steps", "2", "--batch-size", "2", "--device",
          "cpu", "--mode", "word", "--kind", "jsd", "--temperature", "1.5"])
    config = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert config["distill"]["kind"] == "jsd" and config["distill"]["temperature"] == 1.5
    assert config["train"]["max_steps"] == 2


def test_student_base_with_kd_pretrains_against_the_teachers_base(tmp_path):
    data = tmp_path / "world"
    data.mkdir()
    text = (ROOT / "data" / "world" / "corpus_train.txt").read_text()[:20000]
    (data / "corpus_train.txt").write_text(text)
    (data / "corpus_val.txt").write_text(text[:5000])
    base = make_run(tmp_path / "base", TEACHER, 0, stage="pretrain",
                    data={"train": str(data / "corpus_train.txt"), "val": str(data / "corpus_val.txt")})
    sft = make_run(tmp_path / "sft", TEACHER, 0, init=str(base))
    from minillm.stages.distill import PRETRAIN_KD, student_base
    fast = cfg(max_steps=2, eval_interval=0)
    run = student_base(sft, "tiny", tmp_path / "kd_base", train_cfg=fast, progress=False, kd=PRETRAIN_KD)
    config = json.loads((tmp_path / "kd_base" / "config.json").read_text())
    assert config["stage"] == "pretrain" and config["teacher"] == str(base)
    assert config["distill"]["alpha"] == 1.0 and config["data"]["train"] == str(data / "corpus_train.txt")
    assert run.model.config.n_embd == 64  # the tiny preset's network, the teacher's tokenizer
    plain = student_base(sft, "tiny", tmp_path / "ce_base", train_cfg=fast, progress=False)
    assert "distill" not in json.loads((tmp_path / "ce_base" / "config.json").read_text())
    assert not torch.equal(plain.model.h[0].mlp.c_fc.weight, run.model.h[0].mlp.c_fc.weight)


def test_chats_longer_than_the_students_context_are_named(runs, tmp_path):
    teacher, student, _ = runs
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"messages": [{"role": "user", "content": "word " * 80},
                                             {"role": "assistant", "content": "yes"}]}) + "\n")
    with pytest.raises(ValueError, match="no chat of .*long.jsonl fits the student's context of block_size"):
        run_distill(teacher, student, long, tmp_path / "out", cfg(), DistillConfig(), progress=False)


def test_lineage_found_from_another_folder(tmp_path, monkeypatch):
    runs = tmp_path / "pipeline"
    base = make_run(runs / "base", TEACHER, 0, stage="pretrain", data={"train": "t.txt", "val": "v.txt"})
    make_run(runs / "sft", TEACHER, 0, init="somewhere/else/base")  # recorded relative to another working folder
    monkeypatch.chdir(tmp_path)
    assert pretraining_run(runs / "sft") == base
