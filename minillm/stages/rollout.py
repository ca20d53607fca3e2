"""Rollouts: what PPO and GRPO share. Sample responses from the policy, score them, and lay them out as tensors.

RL vocabulary for a language model (lesson 5):

    state s_t   = the prompt and the response tokens so far      action a_t = the next token
    policy      = the model, pi_theta(a_t | s_t)                  episode    = one response, ending at <|end|>
    reward      = the reward model's score of the finished response (+ the KL penalty on every token, PPO)

A rollout batch holds B prompt+response sequences, right-padded to one length T:

    input_ids       (B, T)    prompt tokens, response tokens (incl. <|end|> when it stopped), padding
    action_mask     (B, T-1)  1 where token t+1 is a response token: the actions (aligned with logprobs)
    logprobs        (B, T-1)  log pi_old(a_t | s_t) at sampling time, from logits / temperature (TRL)
    ref_logprobs    (B, T-1)  log pi_ref(a_t | s_t), the same way (None when nobody needs them)
    scores          (B,)      (r_phi(x, y) - b) / s [- missing_eos_penalty], the proxy reward (`score_normalisation`);
                              with reward "verifier" instead 1 if the final answer is right, else 0 (RLVR)
    gold            (B,)      the world's gold reward of the same responses: what the proxy stands for

Rollouts are sampled with the KV cache (`minillm.sampling.generate`); the log-probs are recomputed with one
full forward pass, which is what the loss sees during the update.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from minillm.align.logprobs import token_logprobs
from minillm.align.preferences import BatchMetricLog, disable_dropout
from minillm.align.reward import RewardModel, score_sequences
from minillm.config import TrainConfig
from minillm.model import GPT
from minillm.peft.apply import disable_adapters, save_adapter
from minillm.plots import plot_series
from minillm.runs import Run, apply_peft_spec, load_plain_run, load_reward_model, save_run_files
from minillm.sampling import generate_completions
from minillm.stages.pairs import read_prompts
from minillm.tokenizer import Tokenizer
from minillm.train import CKPT_NAME, LossFn, run_config_dict, train
from minillm.utils import atomic_torch_save, atomic_write_text, pick_device
from minillm.world import check_answer, gold_reward, make_world, parse_prompt

__all__ = ["CHAT_STAGES", "VERIFIER", "verifier_scores", "Rollout", "RolloutEnv", "RolloutSource", "load_rollout_env",
           "policy_logprobs",
           "sample_rollout", "merge_rollout_metrics", "score_normalisation", "rl_policy", "reference_policy",
           "train_rl", "rollout_stats", "save_policy_run", "plot_rollouts"]

# Runs whose model answers in the chat template: a policy for PPO/GRPO must be one of them.
CHAT_STAGES = ("sft", "dpo", "ppo", "grpo")
# --reward verifier: no reward model; the world's answer checker is the reward (verifiable tasks only).
VERIFIER = "verifier"
VERIFIABLE_KINDS = ("math", "two_hop")


def verifier_scores(prompts: list[str], responses: list[str], world: Any) -> torch.Tensor:
    """r(x, y) = 1 if the final answer of y is right (`minillm.world.check_answer`), else 0: the rule-based
    accuracy reward of DeepSeekMath / DeepSeek-R1, which no policy can over-optimise."""
    return torch.tensor([1.0 if check_answer(x, y, world) else 0.0 for x, y in zip(prompts, responses)])


@dataclass
class Rollout:
    """One batch of sampled episodes (shapes in the module docstring)."""

    input_ids: torch.Tensor
    action_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor | None
    scores: torch.Tensor
    gold: torch.Tensor
    eos: torch.Tensor  # (B,) bool: the response ended with <|end|>
    prompts: list[str]
    responses: list[str]


@dataclass
class RolloutEnv:
    """Everything a rollout needs that does not change during training."""

    policy: GPT
    tokenizer: Tokenizer
    reward_model: RewardModel | None  # None: the verifier is the reward
    reward_offset: float
    reward_scale: float
    prompts: list[str]  # the user turn of each training prompt
    prompt_ids: list[list[int]]  # chat-templated, ending with the assistant header
    base_config: dict[str, Any]
    world: Any


def load_rollout_env(init: str | os.PathLike, reward: str | os.PathLike, data: str | os.PathLike,
                     max_new_tokens: int, prompt_limit: int | None = None, temperature: float = 1.0,
                     normalize_scores: bool = False) -> RolloutEnv:
    """The SFT policy of `init`, the reward model of `reward` and the prompts of `data`, checked against each other.

    Scores are shifted (and with normalize_scores scaled) by `score_normalisation` on the starting policy.
    reward "verifier" uses the world's answer checker instead of a reward model (every prompt must be a sum or
    a two-hop question); its 0/1 scores are used as they are.
    """
    policy, tok, base_cfg = load_plain_run(init)
    if base_cfg.get("stage") not in CHAT_STAGES:
        raise ValueError(f"{init}: a {base_cfg.get('stage')!r} run is not a chat model; PPO and GRPO start from one of "
                         f"{list(CHAT_STAGES)} (run `python -m minillm sft` first)")
    if str(reward) == VERIFIER:
        return _verifier_env(policy, tok, base_cfg, data, max_new_tokens, prompt_limit)
    rm, rm_tok, _ = load_reward_model(reward)
    if rm_tok.vocab != tok.vocab or rm_tok.special_tokens != tok.special_tokens:
        raise ValueError(f"{reward}: the reward model's tokenizer ({rm_tok.vocab_size} tokens) differs from the "
                         f"policy's in {init} ({tok.vocab_size} tokens); it would score different text")
    if rm.backbone.config.block_size < policy.config.block_size:
        raise ValueError(f"{reward}: the reward model's context ({rm.backbone.config.block_size}) is shorter than "
                         f"the policy's ({policy.config.block_size})")
    prompts, prompt_ids = _read_rollout_prompts(tok, data, policy.config.block_size, max_new_tokens, prompt_limit)
    env = RolloutEnv(policy, tok, rm.requires_grad_(False), 0.0, 1.0, prompts, prompt_ids, base_cfg, make_world(0))
    env.reward_offset, scale = score_normalisation(env, max_new_tokens, temperature)
    env.reward_scale = scale if normalize_scores else 1.0
    return env


def _read_rollout_prompts(tok: Tokenizer, data: str | os.PathLike, block: int, max_new_tokens: int,
                          prompt_limit: int | None) -> tuple[list[str], list[list[int]]]:
    """The user turn and the chat-templated ids of each prompt, refusing one that leaves no room to answer."""
    prompts, prompt_ids = [], []
    for i, (messages, _) in enumerate(read_prompts(data)[:prompt_limit]):
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)[0]
        if len(ids) + max_new_tokens > block:
            raise ValueError(f"{data}: prompt {i + 1} has {len(ids)} tokens; with max_new_tokens {max_new_tokens} it "
                             f"exceeds the context of {block} tokens (shorten it or lower --max-new-tokens)")
        prompts.append(next(m["content"] for m in reversed(messages) if m["role"] == "user"))
        prompt_ids.append(ids)
    if not prompts:
        raise ValueError(f"{data}: no prompt to train on")
    return prompts, prompt_ids


def _verifier_env(policy: GPT, tok: Tokenizer, base_cfg: dict[str, Any], data: str | os.PathLike,
                  max_new_tokens: int, prompt_limit: int | None) -> RolloutEnv:
    prompts, prompt_ids = _read_rollout_prompts(tok, data, policy.config.block_size, max_new_tokens, prompt_limit)
    world = make_world(0)
    for i, x in enumerate(prompts):
        if parse_prompt(x, world)["kind"] not in VERIFIABLE_KINDS:
            raise ValueError(f"{data}: prompt {i + 1} ({x!r}) has no answer the verifier can check; --reward "
                             f"verifier needs sums or two-hop questions (data/world/addition_train.jsonl)")
    return RolloutEnv(policy, tok, None, 0.0, 1.0, prompts, prompt_ids, base_cfg, world)


@torch.no_grad()
def score_normalisation(env: RolloutEnv, max_new_tokens: int, temperature: float, n: int = 128, seed: int = 0
                        ) -> tuple[float, float]:
    """(b, s): mean and std of r(x, y) over samples of the starting policy on the first n prompts, scored as
    rollouts are (response-only log-likelihood). (r - b) / s is about 0 +- 1 for the SFT model's own samples.

    The reward stage's stored offset counts the prompt's log-likelihood too, so PPO cannot reuse it; the scale
    matters for a log-likelihood reward model, whose scores spread over several nats.
    """
    ids = env.prompt_ids[:n]
    outs = generate_completions(env.policy, ids, max_new_tokens, eos_id=env.tokenizer.end_id,
                                temperature=temperature, generator=torch.Generator().manual_seed(seed))
    seqs = [p + y + [env.tokenizer.end_id] for p, y in zip(ids, outs)]
    r = score_sequences(env.reward_model, seqs, env.tokenizer.pad_id, prompt_lengths=[len(p) for p in ids])
    return float(r.mean()), max(float(r.std()), 1e-6) if len(r) > 1 else 1.0


def policy_logprobs(policy: nn.Module, input_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(a_t | s_t) of every next token under logits / temperature, (B, T-1).

    Rows are right-padded, so causal attention keeps padding out of every real position: no mask needed.
    """
    return token_logprobs(policy(input_ids) / temperature, input_ids)


@torch.no_grad()
def sample_rollout(env: RolloutEnv, policy: nn.Module, reference: nn.Module | None, indices: list[int],
                   temperature: float, max_new_tokens: int, generator: torch.Generator,
                   missing_eos_penalty: float | None = None, need_ref: bool = True, use_cache: bool = True
                   ) -> Rollout:
    """Sample one response per prompt index, score it, and compute the log-probs of policy and reference.

    reference None means the policy with its adapters disabled (PEFT: one model in memory). temperature 0 decodes
    greedily (log-probs then at temperature 1); use_cache=False samples without the KV cache (same tokens, slower).
    """
    tok = env.tokenizer
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    prompt_ids = [env.prompt_ids[i] for i in indices]
    outs = generate_completions(policy, prompt_ids, max_new_tokens, eos_id=tok.end_id, temperature=temperature,
                                generator=generator, use_cache=use_cache)
    temperature = temperature or 1.0
    # A response shorter than max_new_tokens stopped at <|end|>, which is part of the episode (its last action).
    eos = torch.tensor([len(y) < max_new_tokens for y in outs])
    seqs = [p + y + ([tok.end_id] if stopped else []) for p, y, stopped in zip(prompt_ids, outs, eos.tolist())]
    T = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), T), tok.pad_id, dtype=torch.long)  # (B, T), right-padded
    resp = torch.zeros((len(seqs), T), dtype=torch.bool)
    for b, (p, s) in enumerate(zip(prompt_ids, seqs)):
        input_ids[b, :len(s)] = torch.tensor(s)
        resp[b, len(p):len(s)] = True
    input_ids = input_ids.to(device)
    action_mask = resp[:, 1:].to(device)  # (B, T-1): token t+1 is an action
    logprobs = policy_logprobs(policy, input_ids, temperature)
    ref_logprobs = None
    if need_ref:
        if reference is None:
            with disable_adapters(policy):
                ref_logprobs = policy_logprobs(policy, input_ids, temperature)
        else:
            ref_logprobs = policy_logprobs(reference, input_ids, temperature)
    # The prompt's own log-likelihood is left out of a loglik reward model's score: a constant per prompt that
    # Bradley-Terry cannot see, and the largest source of score variance between prompts.
    prompts = [env.prompts[i] for i in indices]
    responses = [tok.decode(y) for y in outs]
    if env.reward_model is None:
        scores = verifier_scores(prompts, responses, env.world)
    else:
        scores = score_sequences(env.reward_model, seqs, tok.pad_id, prompt_lengths=[len(p) for p in prompt_ids])
        scores = (scores - env.reward_offset) / env.reward_scale  # (B,) on CPU
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * (~eos).float()
    gold = torch.tensor([gold_reward(x, y, env.world) for x, y in zip(prompts, responses)])
    policy.train(was_training)
    return Rollout(input_ids, action_mask, logprobs, ref_logprobs, scores.to(device), gold, eos, prompts, responses)


def merge_rollout_metrics(metrics_path: str | os.PathLike, rollouts: list[dict[str, float]]) -> None:
    """Add one line per rollout (at the optimiser step it was sampled before) to the loop's metrics.jsonl."""
    path = Path(metrics_path)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    rows = sorted(rows + rollouts, key=lambda r: r.get("step", 0))  # stable: a rollout line before its step's loss
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


# ----------------------------------------------------------------------------- what PPO and GRPO stages share
class RolloutSource:
    """The loop's on-policy batch source: when its queue is empty, `rollout` samples a batch with the model as it
    is now and returns the minibatches cut from it; each call hands out the next one. `rollouts` keeps one dict of
    statistics per rollout (TRL's metric names)."""

    def __init__(self) -> None:
        self.queue: list[dict[str, torch.Tensor]] = []
        self.rollouts: list[dict[str, float]] = []

    def __call__(self, split: str, gen: torch.Generator, model: nn.Module, step: int) -> dict[str, torch.Tensor]:
        if not self.queue:
            self.queue = self.rollout(gen, step)
        return self.queue.pop(0)

    def rollout(self, gen: torch.Generator, step: int) -> list[dict[str, torch.Tensor]]:
        raise NotImplementedError  # each algorithm's source says how a rollout becomes minibatches

    @staticmethod
    def sample_generator(gen: torch.Generator, device: torch.device) -> torch.Generator:
        """A generator on the model's device for sampling, seeded from the loop's (so runs are reproducible)."""
        return torch.Generator(device=device).manual_seed(int(torch.randint(2**31, (1,), generator=gen)))


def rl_policy(env: RolloutEnv, peft: dict[str, Any] | None, stage: str) -> GPT:
    """The policy to train: the starting model (dropout off, as for the reference) with the PEFT method applied."""
    policy = disable_dropout(apply_peft_spec(disable_dropout(env.policy), peft))
    if not isinstance(policy, GPT):
        raise ValueError(f"{stage.upper()} needs a GPT policy; the {peft['method']} method wraps it "
                         "(use lora, vera, krona, ...)")
    return policy


def reference_policy(policy: nn.Module, peft: dict[str, Any] | None) -> nn.Module | None:
    """A frozen copy of the starting policy; None (= adapters disabled) when a PEFT method keeps the base frozen."""
    if peft and peft["method"] not in ("last_k", "bitfit"):
        return None
    ref = copy.deepcopy(policy).eval()
    return ref.requires_grad_(False)


def train_rl(stage: str, env: RolloutEnv, model: nn.Module, policy: GPT, reference: nn.Module | None,
             source: RolloutSource, loss_fn: LossFn, log: BatchMetricLog, train_cfg: TrainConfig, method: Any,
             peft: dict[str, Any] | None, out: str | os.PathLike, paths: dict[str, str], progress: bool) -> Run:
    """Train `model` (the policy, or PPO's actor-critic) with `source` and `loss_fn` in `minillm.train`, then write
    the run: config.json with stats, the policy's ckpt.pt (and adapter.pt), metrics.jsonl with one line per
    rollout, rollouts.png. `paths` (init, reward, data) go into the run config."""
    device = pick_device(train_cfg.device)
    model.to(device)
    if env.reward_model is not None:
        env.reward_model.to(device)
    if reference is not None:
        reference.to(device)
    run_config = run_config_dict(stage=stage, model=env.base_config["model"], train=train_cfg, **{stage: method},
                                 peft=peft, **{k: str(v) for k, v in paths.items()})
    out = Path(out)
    save_run_files(out, env.tokenizer, run_config)
    result = train(model, train_cfg, source, loss_fn, out, run_config=run_config,
                   desc=stage if not peft else f"{stage}[{peft['method']}]", has_val=False, progress=progress,
                   on_policy=True)
    log.merge_into(out / "metrics.jsonl", train_cfg.grad_accum, train_cfg.eval_iters)
    merge_rollout_metrics(out / "metrics.jsonl", source.rollouts)
    stats = rollout_stats(source.rollouts)
    run_config["stats"] = stats
    save_run_files(out, env.tokenizer, run_config)
    save_policy_run(out, policy, run_config, result.step, peft)
    plot_rollouts(source.rollouts, out / "rollouts.png", f"{stage.upper()} rollouts")
    return Run(out, policy.eval(), env.tokenizer, result, stats)


def rollout_stats(rollouts: list[dict[str, float]]) -> dict[str, Any]:
    """The last rollout's figures, and the gold reward of the first and last rollouts."""
    last = rollouts[-1]
    return {"rollouts": len(rollouts), **{k: v for k, v in last.items() if k not in ("step", "rollout")},
            "first_rollout_gold": rollouts[0]["objective/gold"],
            "first_rollout_scores": rollouts[0]["objective/scores"]}


def save_policy_run(out: Path, policy: nn.Module, run_config: dict[str, Any], step: int,
                    peft: dict[str, Any] | None) -> None:
    """ckpt.pt with the policy alone (what `load_run` reads) and, with PEFT, adapter.pt.

    The loop's checkpoint holds what was trained (PPO: policy + value head, and the critic); an RL run is not
    resumed, so it is replaced by the policy's weights: the run directory then loads like an SFT or DPO run.
    """
    atomic_torch_save({"model": policy.state_dict(), "run_config": run_config, "step": step}, out / CKPT_NAME)
    if peft:
        save_adapter(policy, out / "adapter.pt")


def plot_rollouts(rollouts: list[dict[str, float]], png: Path, title: str) -> None:
    """Proxy score, gold reward and KL per rollout: reward over-optimisation shows as proxy up, gold down."""
    x = [r["rollout"] for r in rollouts]
    plot_series(x, {"proxy score (reward model)": [r["objective/scores"] for r in rollouts],
                    "gold reward": [r["objective/gold"] for r in rollouts],
                    "KL(pi || pi_ref) per response": [r["objective/kl"] for r in rollouts]},
                png, xlabel="rollout", title=title)
