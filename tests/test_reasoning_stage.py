"""The reasoning stage (lesson 11) on tiny random models: the verifier as GRPO's reward, the scaling curve on a
hand-made pool, every experiment filled in end to end, and bad input named."""
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from minillm.config import ReasoningConfig, TrainConfig
from minillm.model import GPT, GPTConfig
from minillm.pipeline import run_pipeline
from minillm.runs import save_run_files
from minillm.stages.reasoning import run_reasoning, scaling_curve, task_rows, write_format_chats
from minillm.stages.rollout import load_rollout_env, sample_rollout, verifier_scores
from minillm.tokenizer import Tokenizer
from minillm.utils import atomic_torch_save
from minillm.world import make_world

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "world"
TOK = Tokenizer.load(ROOT / "data" / "tokenizer")
CFG = GPTConfig(vocab_size=TOK.vocab_size, block_size=128, n_layer=1, n_head=2, n_embd=32, dropout=0.0)
FAST = TrainConfig(max_steps=2, batch_size=4, lr=1e-3, min_lr=1e-4, warmup_steps=0, weight_decay=0.0,
                   eval_interval=0, eval_iters=1, log_interval=1, device="cpu")


def make_run(path: Path, seed: int, **config) -> Path:
    torch.manual_seed(seed)
    run_config = {"model": asdict(CFG), **config}
    save_run_files(path, TOK, run_config)
    atomic_torch_save({"model": GPT(CFG).state_dict(), "run_config": run_config}, path / "ckpt.pt")
    return path


def small_tasks(path: Path) -> Path:
    path.mkdir()
    for name, n in (("addition_train", 24), ("addition_test", 4), ("two_hop_train", 16), ("two_hop_test", 4)):
        lines = (DATA / f"{name}.jsonl").read_text().splitlines(keepends=True)[:n]
        (path / f"{name}.jsonl").write_text("".join(lines))
    return path


def test_verifier_scores_are_the_answer_check():
    world = make_world(0)
    prompts = ["What is 946 plus 279?"] * 3
    assert verifier_scores(prompts, ["So 946 plus 279 is 1225.", "It is 1215.", "no idea"], world).tolist() == \
        [1.0, 0.0, 0.0]


def test_grpo_env_with_the_verifier_scores_rollouts_zero_or_one(tmp_path):
    rows = task_rows(DATA, "addition", "train", 4)
    prompts = write_format_chats(rows, "cot", tmp_path / "p.jsonl")
    env = load_rollout_env(make_run(tmp_path / "sft", 0, stage="sft"), "verifier", prompts, max_new_tokens=8)
    assert env.reward_model is None and (env.reward_offset, env.reward_scale) == (0.0, 1.0)
    ro = sample_rollout(env, env.policy, None, [0, 1, 2, 3], 1.0, 8, torch.Generator().manual_seed(0), need_ref=False)
    assert ro.scores.tolist() == verifier_scores(ro.prompts, ro.responses, env.world).tolist()


def test_the_verifier_refuses_prompts_it_cannot_check(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "What is 2 plus 3?"}) + "\n" + json.dumps({"prompt": "How old is Mira?"}) + "\n")
    with pytest.raises(ValueError, match=r"prompt 2 \('How old is Mira\?'\) has no answer the verifier can check"):
        load_rollout_env(make_run(tmp_path / "sft", 0, stage="sft"), "verifier", p, max_new_tokens=8)


def test_scaling_curve_on_a_hand_made_pool():
    rows = [{"question": "What is 100 plus 200?", "answer": "300", "kind": "addition"},
            {"question": "What is 101 plus 200?", "answer": "301", "kind": "addition"}]
    pool = [["It is 300.", "It is 299.", "It is 299.", "It is 300."],
            ["It is 5.", "It is 301.", "It is 7.", "It is 8."]]
    rm = [[0.1, 0.9, 0.0, 0.2], [0.0, 3.0, 0.5, 0.1]]
    curve = scaling_curve(rows, pool, [1, 2, 4], rm)
    assert curve[1] == {"sample": 0.5, "majority": 0.5, "verifier": 0.5, "rm": 0.5, "rm_weighted": 0.5}
    # N=2: row 1 votes 300/299 (tie: 300, seen first), row 2 votes 5/301 (tie: 5); the reward model prefers the
    # wrong 299 in row 1 and the right 301 in row 2
    assert curve[2] == {"sample": 0.5, "majority": 0.5, "verifier": 1.0, "rm": 0.5, "rm_weighted": 0.5}
    # N=4: row 1 ties 2-2 (300 first); the weights e^.1 + e^.2 < e^.9 + e^0 pick 299 in row 1
    assert curve[4] == {"sample": 0.5, "majority": 0.5, "verifier": 1.0, "rm": 0.5, "rm_weighted": 0.5}
    assert scaling_curve(rows, pool, [4], [[0.1, 0.0, 0.0, 2.0], [0.0, 3.0, 0.5, 0.1]])[4]["rm_weighted"] == 1.0
    with pytest.raises(ValueError, match="N=8 but the pool has only 4"):
        scaling_curve(rows, pool, [8])


def test_task_rows_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m minillm world"):
        task_rows(tmp_path, "addition", "train")
    with pytest.raises(ValueError, match="task must be one of"):
        task_rows(DATA, "subtraction", "train")


def test_direct_and_cot_files_ask_the_same_questions(tmp_path):
    rows = task_rows(DATA, "two_hop", "train", 10)
    d = [json.loads(x) for x in write_format_chats(rows, "direct", tmp_path / "d.jsonl").read_text().splitlines()]
    c = [json.loads(x) for x in write_format_chats(rows, "cot", tmp_path / "c.jsonl").read_text().splitlines()]
    assert [x["messages"][0] for x in d] == [x["messages"][0] for x in c]
    assert all(x["messages"][1]["content"] != y["messages"][1]["content"] for x, y in zip(d, c))


def test_run_reasoning_fills_every_experiment(tmp_path):
    data = small_tasks(tmp_path / "world")
    base = make_run(tmp_path / "base", 0, stage="pretrain")
    chat = make_run(tmp_path / "chat", 1, stage="sft")
    method = ReasoningConfig(eval_limit=3, max_new_tokens=12, shots=1, beam_width=2, n_max=2, pool_limit=2,
                             rl_group_size=2, rl_start_steps=1)
    s = run_reasoning(base, data, tmp_path / "out", FAST, FAST, method, chat=chat)
    assert set(s["sft"]) == {"direct", "cot"} and set(s["sft"]["cot"]) >= {"addition", "two_hop", "seconds"}
    assert {r["model"] for r in s["prompting"]} == {"base (text prompt)", "chat SFT model"}
    assert {r["prompt"] for r in s["prompting"]} >= {"zero-shot", "zero-shot CoT", "1-shot (direct examples)"}
    assert set(s["decoding"]["addition"]) == {"greedy", "beam search (W=2)", "one sample (T=0.7)"}
    assert list(s["scaling"]["two_hop"]) == ["1", "2"] and "rm" not in s["scaling"]["two_hop"]["1"]
    assert len(s["rlvr"]["rollout_reward"]) == FAST.max_steps and s["rlvr"]["rollout_length"][0] > 0
    assert s["rlvr"]["start_steps"] == 1
    for f in ("summary.json", "report.md", "scaling.png", "sft_cot/ckpt.pt", "sft_cot_early/ckpt.pt", "rlvr/ckpt.pt"):
        assert (tmp_path / "out" / f).exists(), f
    assert "## 5. RLVR" in (tmp_path / "out" / "report.md").read_text()
    # one part again: the SFT runs are reused, the other sections kept
    again = run_reasoning(base, data, tmp_path / "out", FAST, FAST, method, parts=("decoding",))
    assert again["sft"] == s["sft"] and again["rlvr"] == s["rlvr"] and again["prompting"] == s["prompting"]
    with pytest.raises(ValueError, match="parts: unknown"):
        run_reasoning(base, data, tmp_path / "out", FAST, FAST, method, parts=("beam",))
    with pytest.raises(FileNotFoundError, match="run the 'sft' part first"):
        run_reasoning(base, data, tmp_path / "empty", FAST, FAST, method, parts=("scaling",))


def test_pipeline_knows_the_optional_stage(tmp_path):
    with pytest.raises(ValueError, match=r"optional stages are \['compress', 'reasoning', 'feedback'\]"):
        run_pipeline(tmp_path, preset="tiny", with_stages=["reason"])
