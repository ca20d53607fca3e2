"""The PPO stage: RLHF's third step (Ouyang et al., 2022), clipped PPO (Schulman et al., 2017) with a KL penalty.

    maximise  E_{x, y ~ pi_theta} [ r_phi(x, y) ] - beta KL( pi_theta(.|x) || pi_ref(.|x) )

Each rollout (`minillm.stages.rollout.sample_rollout`) samples responses to training prompts and scores them
with the reward model; then, with the math of `minillm.align.ppo`:

    r_t      = -beta KL_t (+ score at the last response token)        per_token_rewards
    A_t, R_t = GAE(r, V), advantages whitened over response tokens     gae, masked_whiten
    loss     = clipped policy loss + vf_coef * clipped value loss     ppo_policy_loss, ppo_value_loss

for num_ppo_epochs passes over num_minibatches minibatches, each one optimiser step of `minillm.train` (the
rollout is the loop's on-policy batch source). beta is fixed (TRL's default, `FixedKLController`) or steered
toward --target-kl (`AdaptiveKLController`, Ziegler et al. 2019). The value V(s_t) comes from a scalar head on
the policy's final hidden state (one trunk), or from a separate critic initialised from the reward model.

The run directory is a normal run (config.json, ckpt.pt with the policy, tokenizer/, adapter.pt with PEFT) that
`minillm.runs.load_run` reads, plus value_head.pt and metrics.jsonl with TRL's metric names per rollout
(objective/kl, objective/entropy, objective/scores, objective/rlhf_reward, policy/clipfrac, policy/approxkl,
val/clipfrac, val/explained_variance) and the gold reward of the same samples (objective/gold).
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn

from minillm.align.logprobs import token_logprobs
from minillm.align.ppo import (
    AdaptiveKLController, FixedKLController, gae, masked_mean, masked_sum, masked_whiten, per_token_rewards,
    ppo_policy_loss, ppo_value_loss, token_entropy,
)
from minillm.align.preferences import BatchMetricLog, disable_dropout
from minillm.config import PPOConfig, TrainConfig
from minillm.model import GPT
from minillm.runs import Run, load_reward_model
from minillm.stages.rollout import (
    RolloutEnv, RolloutSource, load_rollout_env, reference_policy, rl_policy, sample_rollout, train_rl,
)
from minillm.utils import atomic_torch_save

__all__ = ["ActorCritic", "PPOSource", "ppo_loss_fn", "run_ppo"]


class ActorCritic(nn.Module):
    """pi_theta(a_t | s_t) and V(s_t) from one forward pass.

    critic=None: the value head reads the policy's own final hidden state (a shared trunk, one model in memory);
    otherwise the head reads `critic`'s hidden state (a second GPT, e.g. the reward model's backbone).
    """

    def __init__(self, policy: GPT, critic: GPT | None = None, value_head: nn.Linear | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.critic = critic
        self.value_head = value_head if value_head is not None else nn.Linear(policy.config.n_embd, 1)
        if value_head is None:
            nn.init.zeros_(self.value_head.weight)  # V = 0 at the start: no baseline yet, no noise either
            nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, T, V), values (B, T)); right-padded rows need no attention mask."""
        h, _ = self.policy.hidden_states(input_ids)  # (B, T, C)
        logits = self.policy.lm_head(h)
        if self.critic is not None:
            h, _ = self.critic.hidden_states(input_ids)
        return logits, self.value_head(h).squeeze(-1)


class PPOSource(RolloutSource):
    """The loop's on-policy batch source: a rollout, then num_ppo_epochs x num_minibatches minibatches of it."""

    def __init__(self, env: RolloutEnv, model: ActorCritic, reference: nn.Module | None, method: PPOConfig,
                 batch_size: int) -> None:
        if batch_size % method.num_minibatches:
            raise ValueError(f"batch_size {batch_size} must be divisible by num_minibatches {method.num_minibatches}")
        super().__init__()
        self.env, self.model, self.reference, self.method, self.batch_size = env, model, reference, method, batch_size
        self.kl_ctl = (AdaptiveKLController(method.kl_coef, method.target_kl, method.kl_horizon)
                       if method.target_kl is not None else FixedKLController(method.kl_coef))

    @torch.no_grad()
    def rollout(self, gen: torch.Generator, step: int) -> list[dict[str, torch.Tensor]]:
        m, model = self.method, self.model
        indices = torch.randint(len(self.env.prompts), (self.batch_size,), generator=gen).tolist()
        device = next(model.parameters()).device
        sample_gen = self.sample_generator(gen, device)
        ro = sample_rollout(self.env, model.policy, self.reference, indices, m.temperature, m.max_new_tokens,
                            sample_gen, m.missing_eos_penalty)
        was_training = model.training
        model.eval()
        logits, values = model(ro.input_ids)
        model.train(was_training)
        mask = ro.action_mask
        values = values[:, :-1]  # (B, T-1): V(s_t) before action a_t = token t+1
        rewards, kl = per_token_rewards(ro.scores, ro.logprobs, ro.ref_logprobs, mask, self.kl_ctl.value,
                                        m.kl_estimator)
        advantages, returns = gae(rewards, values, mask, m.gamma, m.lam)
        advantages = masked_whiten(advantages, mask) * mask
        entropy = masked_sum(token_entropy(logits[:, :-1] / m.temperature), mask, dim=1)  # (B,) per response
        kl_sum = masked_sum(kl, mask, dim=1)  # (B,) per-response KL
        non_score = masked_sum(-self.kl_ctl.value * kl, mask, dim=1)
        var_r = masked_var(returns, mask)
        explained = 1.0 - masked_var(returns - values, mask) / var_r if var_r > 0 else float("nan")
        self.rollouts.append({
            "step": step, "rollout": len(self.rollouts) + 1, "objective/kl": float(kl_sum.mean()),
            "objective/entropy": float(entropy.mean()), "objective/scores": float(ro.scores.mean()),
            "objective/non_score_reward": float(non_score.mean()),
            "objective/rlhf_reward": float(ro.scores.mean() + non_score.mean()),
            "objective/gold": float(ro.gold.mean()), "objective/kl_coef": float(self.kl_ctl.value),
            "val/explained_variance": float(explained), "response/length": float(mask.sum(1).float().mean()),
            "response/eos_rate": float(ro.eos.float().mean()),
        })
        self.kl_ctl.update(float(kl_sum.mean()), self.batch_size)
        batch = {"input_ids": ro.input_ids, "mask": mask, "old_logprobs": ro.logprobs, "old_values": values,
                 "advantages": advantages, "returns": returns}
        size = self.batch_size // m.num_minibatches
        out = []
        for _ in range(m.num_ppo_epochs):
            order = torch.randperm(self.batch_size, generator=gen).to(device)
            for idx in order.split(size):
                out.append({k: v[idx] for k, v in batch.items()})
        return out


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Variance of x over the masked entries (the population variance, for explained variance)."""
    mu = masked_mean(x, mask)
    return float(masked_mean((x - mu) ** 2, mask))


def ppo_loss_fn(method: PPOConfig, log: BatchMetricLog):
    """loss_fn(model, minibatch) -> (pg_loss + vf_coef * vf_loss, 1) for `minillm.train` (one unit per minibatch)."""

    def loss_fn(model: ActorCritic, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        ids, mask = batch["input_ids"], batch["mask"]
        logits, values = model(ids)
        logprobs = token_logprobs(logits / method.temperature, ids)  # (B, T-1)
        pg, pg_stats = ppo_policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], mask, method.cliprange)
        vf, vf_stats = ppo_value_loss(values[:, :-1], batch["old_values"], batch["returns"], mask,
                                      method.cliprange_value)
        log.record(model.training, {
            "policy/clipfrac": float(pg_stats["clipfrac"]), "policy/approxkl": float(pg_stats["approx_kl"]),
            "policy/ratio_mean": float(pg_stats["ratio_mean"]), "val/clipfrac": float(vf_stats["vf_clipfrac"]),
            "loss/policy": float(pg.detach()), "loss/value": float(vf.detach()),
        })
        return pg + method.vf_coef * vf, 1

    return loss_fn


def run_ppo(
    init: str | os.PathLike,
    reward: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    train_cfg: TrainConfig,
    method: PPOConfig | None = None,
    peft: dict[str, Any] | None = None,
    progress: bool = True,
) -> Run:
    """PPO of the chat policy in `init` against the reward model in `reward` on the prompts of `data`.

    TrainConfig.batch_size prompts per rollout; max_steps optimiser steps in all. Returns the Run (the policy) with
    stats: the last rollout's figures and the mean gold reward of the first and last rollouts.
    """
    method = method or PPOConfig()
    env = load_rollout_env(init, reward, data, method.max_new_tokens, method.prompt_limit, method.temperature,
                           method.normalize_scores)
    policy = rl_policy(env, peft, "ppo")
    critic, head = None, None
    if method.critic == "separate":
        if env.reward_model is None:
            raise ValueError("ppo: --critic separate starts the critic from the reward model; with --reward verifier "
                             "there is none (use --critic shared)")
        rm, _, _ = load_reward_model(reward)
        critic = disable_dropout(rm.backbone)
        head = nn.Linear(critic.config.n_embd, 1)
        with torch.no_grad():  # V starts as the reward model's score head: a critic that already knows r
            head.weight.copy_(rm.score.weight)
            head.bias.zero_()
    model = ActorCritic(policy, critic, head)
    reference = reference_policy(policy, peft)
    source = PPOSource(env, model, reference, method, train_cfg.batch_size)
    log = BatchMetricLog()
    run = train_rl("ppo", env, model, policy, reference, source, ppo_loss_fn(method, log), log, train_cfg, method,
                   peft, out, {"init": init, "reward": reward, "data": data}, progress)
    atomic_torch_save({"value_head": model.value_head.state_dict(), "critic": method.critic},
                      run.out / "value_head.pt")
    return run
