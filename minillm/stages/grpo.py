"""The GRPO stage: PPO without a critic (Shao et al., 2024, DeepSeekMath).

For each prompt, sample a group of G responses and score them; the baseline is the group's own mean reward:

    A_i  = (r_i - mean_group r) / (std_group r + eps)                    `minillm.align.grpo.group_advantages`
    loss = -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps_high) A_i) + beta KL3_t, aggregated per loss_type
                                                                         `minillm.align.grpo.grpo_loss`

Every token of response i shares A_i (no value model, no GAE); the KL to the reference, if any (beta > 0), is
a term of the loss rather than of the reward. The rollouts are PPO's (`minillm.stages.rollout`), so the run
directory and metrics.jsonl have the same layout as a PPO run's.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn

from minillm.align.grpo import group_advantages, grpo_loss
from minillm.align.logprobs import token_logprobs
from minillm.align.ppo import kl_per_token, masked_sum, token_entropy
from minillm.align.preferences import BatchMetricLog
from minillm.config import GRPOConfig, TrainConfig
from minillm.model import GPT
from minillm.runs import Run
from minillm.stages.rollout import (
    RolloutEnv, RolloutSource, load_rollout_env, reference_policy, rl_policy, sample_rollout, train_rl,
)

__all__ = ["GRPOSource", "grpo_loss_fn", "run_grpo"]


class GRPOSource(RolloutSource):
    """The loop's on-policy batch source: batch_size / group_size prompts x group_size samples per rollout, then
    num_iterations x num_minibatches minibatches of it."""

    def __init__(self, env: RolloutEnv, policy: GPT, reference: nn.Module | None, method: GRPOConfig,
                 batch_size: int) -> None:
        if batch_size % method.group_size:
            raise ValueError(f"GRPO: group_size {method.group_size} must divide batch_size {batch_size} "
                             "(each rollout holds whole groups)")
        if batch_size % method.num_minibatches or (batch_size // method.num_minibatches) % method.group_size:
            raise ValueError(f"GRPO: batch_size {batch_size} must split into {method.num_minibatches} minibatches "
                             f"of whole groups of {method.group_size}")
        super().__init__()
        self.env, self.policy, self.reference, self.method, self.batch_size = env, policy, reference, method, batch_size

    @torch.no_grad()
    def rollout(self, gen: torch.Generator, step: int) -> list[dict[str, torch.Tensor]]:
        m, G = self.method, self.method.group_size
        n_prompts = self.batch_size // G
        prompts = torch.randint(len(self.env.prompts), (n_prompts,), generator=gen)
        indices = prompts.repeat_interleave(G).tolist()  # [p0 x G, p1 x G, ...]: consecutive groups
        device = next(self.policy.parameters()).device
        sample_gen = self.sample_generator(gen, device)
        ro = sample_rollout(self.env, self.policy, self.reference, indices, m.temperature, m.max_new_tokens,
                            sample_gen, m.missing_eos_penalty)
        advantages = group_advantages(ro.scores.float(), G, m.scale_rewards)  # (B,)
        mask = ro.action_mask
        was_training = self.policy.training
        self.policy.eval()
        entropy = masked_sum(token_entropy(self.policy(ro.input_ids)[:, :-1] / m.temperature), mask, dim=1)
        self.policy.train(was_training)
        kl_sum = masked_sum(kl_per_token(ro.logprobs, ro.ref_logprobs, "k1"), mask, dim=1)
        groups = ro.scores.view(-1, G)
        self.rollouts.append({
            "step": step, "rollout": len(self.rollouts) + 1, "objective/kl": float(kl_sum.mean()),
            "objective/entropy": float(entropy.mean()), "objective/scores": float(ro.scores.mean()),
            "objective/gold": float(ro.gold.mean()), "reward_std": float(groups.std(dim=1).mean()),
            "frac_reward_zero_std": float((groups.std(dim=1) == 0).float().mean()),
            "response/length": float(mask.sum(1).float().mean()), "response/eos_rate": float(ro.eos.float().mean()),
        })
        batch = {"input_ids": ro.input_ids, "mask": mask, "old_logprobs": ro.logprobs, "ref_logprobs": ro.ref_logprobs,
                 "advantages": advantages.to(device)}
        group_ids = torch.arange(n_prompts)
        per_mb = n_prompts // m.num_minibatches
        out = []
        for _ in range(m.num_iterations):
            order = group_ids[torch.randperm(n_prompts, generator=gen)]  # shuffle whole groups
            for chunk in order.split(per_mb):
                idx = (chunk[:, None] * G + torch.arange(G)).flatten().to(device)
                out.append({k: v[idx] for k, v in batch.items()})
        return out


def grpo_loss_fn(method: GRPOConfig, log: BatchMetricLog):
    """loss_fn(policy, minibatch) -> (GRPO loss, 1) for `minillm.train`."""

    def loss_fn(policy: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        ids = batch["input_ids"]
        logprobs = token_logprobs(policy(ids) / method.temperature, ids)  # (B, T-1)
        loss, stats = grpo_loss(logprobs, batch["old_logprobs"], batch["ref_logprobs"], batch["advantages"],
                                batch["mask"], method.epsilon, method.epsilon_high, method.beta, method.loss_type,
                                max_completion_length=method.max_new_tokens)
        log.record(policy.training, {f"policy/{k}": float(v) for k, v in stats.items()})
        return loss, 1

    return loss_fn


def run_grpo(
    init: str | os.PathLike,
    reward: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    train_cfg: TrainConfig,
    method: GRPOConfig | None = None,
    peft: dict[str, Any] | None = None,
    progress: bool = True,
) -> Run:
    """GRPO of the chat policy in `init` against the reward model in `reward` on the prompts of `data`.

    TrainConfig.batch_size responses per rollout (batch_size / group_size prompts); max_steps optimiser steps.
    """
    method = method or GRPOConfig()
    env = load_rollout_env(init, reward, data, method.max_new_tokens, method.prompt_limit, method.temperature,
                           method.normalize_scores)
    policy = rl_policy(env, peft, "grpo")
    reference = reference_policy(policy, peft)
    source = GRPOSource(env, policy, reference, method, train_cfg.batch_size)
    log = BatchMetricLog()
    return train_rl("grpo", env, policy, policy, reference, source, grpo_loss_fn(method, log), log, train_cfg, method,
                    peft, out, {"init": init, "reward": reward, "data": data}, progress)
