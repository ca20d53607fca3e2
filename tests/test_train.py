"""The training loop: schedule, weight-decay groups, accumulation, resume continuity, checkpoint errors."""
import json

import pytest
import torch

from minillm.config import TrainConfig
from minillm.datasets import random_windows
from minillm.model import GPT, GPTConfig
from minillm.stages.pretrain import lm_loss
from minillm.train import configure_optimizer, lr_at, train

CFG = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.1)
DATA = torch.randint(0, 50, (2000,), generator=torch.Generator().manual_seed(0))


def get_batch(split, gen, batch_size=4):
    return random_windows(DATA, batch_size, CFG.block_size, gen)


def test_lr_schedule_warmup_and_cosine():
    cfg = TrainConfig(max_steps=110, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(1 / 11)
    assert lr_at(9, cfg) == pytest.approx(10 / 11)
    assert lr_at(10, cfg) == pytest.approx(1.0)  # the peak, then cosine
    assert lr_at(60, cfg) == pytest.approx(0.55)  # halfway: min + (max - min) / 2
    assert lr_at(110, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_weight_decay_only_on_matrices():
    model = GPT(CFG)
    opt = configure_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def _run(tmp_path, steps, resume=False, max_steps=8):
    torch.manual_seed(0)
    model = GPT(CFG)
    cfg = TrainConfig(max_steps=max_steps, batch_size=4, lr=1e-2, warmup_steps=2, eval_interval=0, log_interval=1,
                      ckpt_interval=steps, device="cpu")
    if steps < max_steps:  # stop early by training to `steps` with the same schedule length
        cfg_stop = cfg
        # train() runs to cfg.max_steps; emulate an interruption by a loss_fn that raises after `steps` steps
        calls = {"n": 0}

        def loss_fn(m, b):
            if calls["n"] == steps:
                raise KeyboardInterrupt
            calls["n"] += 1
            return lm_loss(m, b)

        with pytest.raises(KeyboardInterrupt):
            train(model, cfg_stop, get_batch, loss_fn, tmp_path, run_config={"model": CFG.__dict__}, progress=False)
        return None
    train(model, cfg, get_batch, lm_loss, tmp_path, resume=resume, run_config={"model": CFG.__dict__},
          progress=False)
    return [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_resume_gives_the_same_losses(tmp_path):
    """N steps in one go == N/2, interruption, resume, N/2 (dropout on: RNG state must be restored too)."""
    straight = _run(tmp_path / "a", 8)
    _run(tmp_path / "b", 4)  # interrupted after the step-4 checkpoint
    resumed = _run(tmp_path / "b", 8, resume=True)
    assert len(resumed) == 8
    assert resumed == pytest.approx(straight, abs=1e-6)


def test_accumulation_matches_one_big_batch(tmp_path):
    """4 micro-batches of 2 == 1 batch of 8 (same windows), because the loop normalises by all units."""
    windows = random_windows(DATA, 8, CFG.block_size, torch.Generator().manual_seed(5))

    def grads(accum):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**{**CFG.__dict__, "dropout": 0.0}))
        it = iter(range(accum))

        def gb(split, gen):
            i = next(it)
            size = 8 // accum
            return {k: v[i * size:(i + 1) * size] for k, v in windows.items()}

        cfg = TrainConfig(max_steps=1, batch_size=8 // accum, grad_accum=accum, lr=1e-3, warmup_steps=0,
                          grad_clip=0.0, eval_interval=0, device="cpu")
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        train(model, cfg, gb, lm_loss, tmp_path / f"acc{accum}", has_val=False, progress=False)
        return {n: p.detach() - before[n] for n, p in model.named_parameters()}

    one, four = grads(1), grads(4)
    for n in one:
        assert torch.allclose(one[n], four[n], atol=1e-6), n


def test_checkpoint_errors(tmp_path):
    from minillm.runs import load_run

    with pytest.raises(FileNotFoundError):
        load_run(tmp_path / "nope")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="ckpt.pt"):
        load_run(tmp_path / "run")


def test_resume_with_another_config_is_refused(tmp_path):
    _run(tmp_path, 8)
    model = GPT(GPTConfig(**{**CFG.__dict__, "n_embd": 32}))
    cfg = TrainConfig(max_steps=10, batch_size=4, eval_interval=0, device="cpu")
    with pytest.raises(ValueError, match="n_embd"):
        train(model, cfg, get_batch, lm_loss, tmp_path, resume=True,
              run_config={"model": GPTConfig(**{**CFG.__dict__, "n_embd": 32}).__dict__}, progress=False)


@pytest.mark.parametrize("kwargs", [dict(max_steps=0), dict(lr=-1.0), dict(min_lr=1.0, lr=0.1), dict(dtype="fp8")])
def test_invalid_train_config(kwargs):
    with pytest.raises(ValueError):
        TrainConfig(**kwargs)


def test_on_policy_source_sees_the_live_model_and_the_step(tmp_path):
    """An on-policy batch source is called with the model being trained, as it is at that step: its samples
    (here: greedy continuations of a fixed prompt, trained on as targets — self-distillation in small) change
    as the weights change, and the source is never handed a stale copy."""
    torch.manual_seed(0)
    model = GPT(CFG)
    seen: list[tuple[int, int, torch.Tensor]] = []

    def rollout(split, gen, policy, step):
        was_training = policy.training
        policy.eval()
        with torch.no_grad():
            idx = torch.randint(0, 50, (4, 4), generator=gen)  # (B, 4) prompts
            for _ in range(CFG.block_size - 4):
                nxt = policy(idx)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
                idx = torch.cat([idx, nxt], dim=1)
        policy.train(was_training)
        seen.append((step, id(policy), policy.lm_head.weight.detach().clone()))
        return {"input_ids": idx[:, :-1], "targets": idx[:, 1:]}

    cfg = TrainConfig(max_steps=4, batch_size=4, lr=1e-2, warmup_steps=0, eval_interval=2, eval_iters=1,
                      log_interval=1, device="cpu")
    train(model, cfg, rollout, lm_loss, tmp_path, progress=False, on_policy=True)
    train_draws = [s for s in seen if s[0] in range(4)]
    assert [s[0] for s in seen] == [0, 1, 2, 2, 3, 4]  # train steps 0-3; validation after steps 2 and 4
    assert {s[1] for s in seen} == {id(model)}
    assert not torch.equal(train_draws[0][2], train_draws[1][2])  # the weights it sampled from moved
    assert torch.equal(seen[-1][2], model.lm_head.weight.detach())  # the last validation saw the final weights
    with pytest.raises(TypeError):  # an on-policy source is not an offline one
        train(GPT(CFG), cfg, rollout, lm_loss, tmp_path / "offline", progress=False)
