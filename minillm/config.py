"""Run configuration: dataclasses and the named presets (`tiny` for tests, `cpu` default, `gpu`).

A preset fills `GPTConfig` (the network), one `TrainConfig` (the optimisation) per stage, and one method
dataclass per stage (`SFTConfig`, `RewardConfig`, `DPOConfig`, `PairsConfig`, `PPOConfig`, `GRPOConfig`): the
knobs of an algorithm are spelled once, as fields here (and `EvalConfig` for the `eval` command, which no
preset changes). The command line turns every field into a flag (`--n-layer 6 --lr 1e-3 --beta 0.2`) whose
default is the preset's value, and every run writes the resolved configs next to its outputs.
The vocabulary size is not a preset field: it always comes from the tokenizer.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from minillm.align.dpo import DPO_LOSS_TYPES, check_dpo_hyperparameters
from minillm.eval.mcq import FORMATS
from minillm.model import GPTConfig


@dataclass
class TrainConfig:
    """Optimisation settings shared by every stage (pretraining, SFT, reward model, DPO, PPO, GRPO)."""

    max_steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_iters: int = 10
    log_interval: int = 10
    ckpt_interval: int = 0  # 0: only at the end
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16/fp16 autocast on CUDA, fp32 elsewhere; or "float32"

    def __post_init__(self) -> None:
        positive = ("max_steps", "batch_size", "grad_accum", "eval_iters", "log_interval")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_interval", "ckpt_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"TrainConfig: need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if self.grad_clip < 0:
            raise ValueError(f"TrainConfig.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        if self.dtype not in ("auto", "float32"):
            raise ValueError(f"TrainConfig.dtype must be 'auto' or 'float32', got {self.dtype!r}")


def knob(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A method field with its --help text (and the values a str field may take), so the flag is documented
    where the knob is defined."""
    return field(default=default, metadata={"help": help, "choices": choices})


def _check_choices(obj: Any) -> None:
    """Every str field declared with `knob(..., choices)` holds one of its choices."""
    for f in fields(obj):
        choices = f.metadata.get("choices")
        if choices and getattr(obj, f.name) not in choices:
            raise ValueError(f"{type(obj).__name__}.{f.name} must be one of {list(choices)}, "
                             f"got {getattr(obj, f.name)!r}")


def _check_fraction(owner: str, name: str, value: float, low: float = 0.0, high: float = 1.0) -> None:
    if not (isinstance(value, (int, float)) and low <= value < high):
        raise ValueError(f"{owner}.{name} must be in [{low}, {high}), got {value!r}")


@dataclass
class SFTConfig:
    """Supervised fine-tuning knobs (`minillm.stages.sft.run_sft`)."""

    packing: bool = knob(False, "several short chats in one row of block_size tokens")
    loss_on: str = knob("response", "response: assistant tokens only; all: every token (the masking ablation)",
                         ("response", "all"))
    limit: int | None = knob(None, "use only N conversations (data-size experiments)")
    val_fraction: float = knob(0.05, "held out of the training file for the validation loss")
    embeddings: str = knob("new", "full FT: new trains only the rows pretraining never saw; all: the whole table",
                            ("new", "all"))

    def __post_init__(self) -> None:
        _check_choices(self)
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"SFTConfig.limit must be >= 1, got {self.limit}")
        _check_fraction("SFTConfig", "val_fraction", self.val_fraction)


@dataclass
class RewardConfig:
    """Bradley-Terry reward-model knobs (`minillm.stages.reward.run_reward`)."""

    center_coef: float | None = knob(None, "loss += c * mean((r_w + r_l)^2) (Eisenstein et al. 2023; TRL: 0.01)")
    val_fraction: float = knob(0.05, "held out of the pairs for the validation loss")
    norm_prompts: int = knob(256, "training prompts sampled from the SFT policy for the reward offset")
    loglik: bool = knob(False, "reward += learned scale * the backbone's log-likelihood of the sequence "
                               "(lets the head see what the LM knows; see align.reward.RewardModel)")

    def __post_init__(self) -> None:
        if self.center_coef is not None and (isinstance(self.center_coef, bool)
                                             or not isinstance(self.center_coef, (int, float))
                                             or self.center_coef < 0):
            raise ValueError(f"RewardConfig.center_coef must be None or a number >= 0, got {self.center_coef!r}")
        if self.norm_prompts < 1:
            raise ValueError(f"RewardConfig.norm_prompts must be >= 1, got {self.norm_prompts}")
        _check_fraction("RewardConfig", "val_fraction", self.val_fraction)


@dataclass
class DPOConfig:
    """Direct Preference Optimization knobs (`minillm.stages.dpo.run_dpo`; TRL's names and defaults)."""

    beta: float = knob(0.1, "KL strength (tau for IPO)")
    loss_type: str = knob("sigmoid", "the per-pair loss (sigmoid = DPO)", DPO_LOSS_TYPES)
    label_smoothing: float = knob(0.0, "assumed label-flip rate eps in [0, 0.5) (cDPO, robust)")
    average_logps: bool | None = knob(None, "per-token average log-probs; None: average for ipo only, as TRL")
    rpo_alpha: float | None = knob(None, "adds alpha * per-token NLL of the chosen answer (RPO, Pang et al. 2024)")
    precompute_ref: bool = knob(True, "reference log-probs computed once before training (pi_ref never changes)")
    val_fraction: float = knob(0.05, "held out of the pairs for the validation loss")

    def __post_init__(self) -> None:
        check_dpo_hyperparameters(self.beta, self.loss_type, self.label_smoothing)
        a = self.rpo_alpha
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a < 0):
            raise ValueError(f"DPOConfig.rpo_alpha must be None or a finite number >= 0, got {a!r}")
        _check_fraction("DPOConfig", "val_fraction", self.val_fraction)


@dataclass
class PairsConfig:
    """On-policy preference pairs (`minillm.stages.pairs.run_pairs`): N samples per prompt, best vs worst."""

    n: int = knob(4, "samples per prompt (a pair needs two)")
    temperature: float = knob(1.0, "sampling temperature (1 samples the policy exactly)")
    max_new_tokens: int = knob(48, "longest sampled response, in tokens")
    limit: int | None = knob(None, "use only the first N prompts")
    seed: int = knob(0, "sampling seed")

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 2:
            raise ValueError(f"PairsConfig.n must be an int >= 2 (a pair needs two samples), got {self.n!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"PairsConfig.limit must be >= 1, got {self.limit}")
        if not self.temperature >= 0 or self.max_new_tokens < 1:
            raise ValueError(f"PairsConfig: need temperature >= 0 and max_new_tokens >= 1, "
                             f"got {self.temperature}, {self.max_new_tokens}")


KL_ESTIMATORS = ("k1", "k2", "k3")


def _check_ints(obj: Any, names: tuple[str, ...], low: int = 1) -> None:
    """Each named field of `obj` must be an int >= low (None passes: an optional knob left at its default)."""
    for name in names:
        v = getattr(obj, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            raise ValueError(f"{type(obj).__name__}.{name} must be an int >= {low}, got {v!r}")


def _check_range(owner: str, name: str, value: Any, low: float, high: float | None = None,
                 open_low: bool = False) -> None:
    """value is a finite number in [low, high] ((low, high] with open_low); high None: no upper bound."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and (high is None or value <= high)
    if not ok:
        bounds = f"{'(' if open_low else '['}{low}, {'inf)' if high is None else f'{high}]'}"
        raise ValueError(f"{owner}.{name} must be a number in {bounds}, got {value!r}")


DISTILL_MODES = ("sft", "word", "seq", "on_policy")
DISTILL_KINDS = ("forward_kl", "reverse_kl", "jsd")


@dataclass
class DistillConfig:
    """Knowledge distillation into a smaller student (`minillm.stages.distill.run_distill`; GKD's names)."""

    mode: str = knob("word", "sft: hard labels only (no teacher, the baseline); word: alpha * kd + (1 - alpha) * CE "
                             "on the chats (Hinton 2015); seq: CE on the teacher's greedy answers (Kim & Rush 2016); "
                             "on_policy: kd on the student's own samples in a share lmbda of batches (GKD)",
                     DISTILL_MODES)
    kind: str = knob("forward_kl", "the divergence of align.distill.kd_loss", DISTILL_KINDS)
    temperature: float = knob(2.0, "softmax temperature T of both distributions (kd is scaled by T^2)")
    alpha: float = knob(0.5, "weight of kd against the hard-label cross-entropy")
    beta: float = knob(0.5, "JSD mixture weight; 0 and 1 are defined as the forward and reverse KL, as in TRL "
                            "(JSD itself tends to 0 there); TRL GKD default 0.5")
    lmbda: float = knob(0.5, "on_policy: share of batches sampled from the student (TRL GKD default 0.5)")
    sample_temperature: float = knob(0.9, "on_policy: the student's sampling temperature (TRL GKD default 0.9)")
    max_new_tokens: int = knob(32, "seq / on_policy: longest generated answer, in tokens")

    def __post_init__(self) -> None:
        _check_choices(self)
        _check_range("DistillConfig", "temperature", self.temperature, 0.0, open_low=True)
        _check_range("DistillConfig", "alpha", self.alpha, 0.0, 1.0)
        _check_range("DistillConfig", "beta", self.beta, 0.0, 1.0)
        _check_range("DistillConfig", "lmbda", self.lmbda, 0.0, 1.0)
        _check_range("DistillConfig", "sample_temperature", self.sample_temperature, 0.0, open_low=True)
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ValueError(f"DistillConfig.max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")


@dataclass
class FeedbackConfig:
    """AI feedback knobs (`minillm.stages.feedback.run_feedback`, lesson 12)."""

    judge_labels: int = knob(100, "gold-labelled pairs the trained judge learns from (the human labelling budget)")
    cai_prompts: int = knob(300, "training prompts the constitution critiques and revises (plus the safety ones)")
    max_new_tokens: int = knob(32, "answer and revision length")
    cai_samples: int = knob(4, "fresh answers (T=1) the critique compares with the rewrite; 0: the rewrite only")
    cai_steps: int = knob(100, "SFT steps on the revisions (SL-CAI)")
    dpo_steps: int | None = knob(None, "DPO steps on each labeller's pairs (None: the preset's DPO)")
    dpo_lr: float | None = knob(None, "DPO learning rate on each labeller's pairs (None: the preset's DPO)")
    eval_samples: int = knob(4, "T=1 samples per held-out prompt for the sampled gold reward")

    def __post_init__(self) -> None:
        _check_ints(self, ("judge_labels", "cai_prompts", "max_new_tokens", "cai_steps", "dpo_steps", "eval_samples"))
        _check_ints(self, ("cai_samples",), low=0)
        if self.dpo_lr is not None and not self.dpo_lr > 0:
            raise ValueError(f"FeedbackConfig.dpo_lr must be > 0, got {self.dpo_lr!r}")


@dataclass
class ReasoningConfig:
    """Lesson 11's experiments (`minillm.stages.reasoning.run_reasoning`)."""

    eval_limit: int = knob(100, "held-out sums evaluated (every held-out two-hop question is)")
    max_new_tokens: int = knob(84, "longest answer in tokens (a three-digit scratchpad takes 72-80 with <|end|>)")
    shots: int = knob(2, "in-context examples in the few-shot prompts (as many as fit the context)")
    beam_width: int = knob(4, "beams of the beam-search row")
    length_penalty: float = knob(1.0, "beam search: score = sum log p / length ** length_penalty")
    temperature: float = knob(0.7, "sampling temperature of the test-time-compute pool")
    n_max: int = knob(32, "samples per question in the pool: N = 1, 2, 4, ... n_max")
    pool_limit: int = knob(48, "questions per task in the test-time-compute pool")
    rl_group_size: int = knob(8, "RLVR: GRPO responses per prompt")
    rl_start_steps: int = knob(400, "RLVR starts from a CoT model after this many SFT steps (the fully trained one "
                                    "gets almost every training sum right: all-right groups carry no gradient)")

    def __post_init__(self) -> None:
        _check_ints(self, ("eval_limit", "max_new_tokens", "beam_width", "n_max", "pool_limit", "rl_group_size",
                           "rl_start_steps"))
        _check_ints(self, ("shots",), low=0)
        _check_range("ReasoningConfig", "temperature", self.temperature, 0.0, open_low=True)
        _check_range("ReasoningConfig", "length_penalty", self.length_penalty, -10.0, 10.0)


@dataclass
class RolloutConfig:
    """What PPO and GRPO share: how responses are sampled from the policy and scored by the reward model."""

    temperature: float = knob(0.7, "sampling temperature of the rollouts (log-probs use logits / temperature)")
    max_new_tokens: int = knob(53, "longest response, in tokens (TRL: response_length)")
    missing_eos_penalty: float | None = knob(None, "subtracted from the score of a response that never emits <|end|>")
    prompt_limit: int | None = knob(None, "use only the first N prompts of the data file")
    normalize_scores: bool = knob(False, "divide scores by their std on the starting policy's samples (TRL v0.11 "
                                         "use_score_scaling); they are always shifted to mean 0 there")

    def _check_rollout(self, owner: str) -> None:
        _check_range(owner, "temperature", self.temperature, 0.0, open_low=True)
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"{owner}.max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if self.missing_eos_penalty is not None:
            _check_range(owner, "missing_eos_penalty", self.missing_eos_penalty, 0.0)
        if self.prompt_limit is not None and self.prompt_limit < 1:
            raise ValueError(f"{owner}.prompt_limit must be >= 1, got {self.prompt_limit}")


@dataclass
class PPOConfig(RolloutConfig):
    """Clipped PPO with a KL penalty (`minillm.stages.ppo.run_ppo`; TRL's PPO names and defaults).

    One rollout samples TrainConfig.batch_size prompts; each rollout then gives num_ppo_epochs x num_minibatches
    optimiser steps, and TrainConfig.max_steps counts optimiser steps.
    """

    kl_coef: float = knob(0.05, "beta of the per-token KL penalty r_t = -beta KL_t (the start value when adaptive)")
    target_kl: float | None = knob(None, "adaptive controller: steer the per-response KL toward this (Ziegler et al.)")
    kl_horizon: int = knob(10000, "adaptive controller horizon (TRL v0.11: 10000)")
    kl_estimator: str = knob("k1", "per-token KL estimator (k1 = log p - log p_ref)", KL_ESTIMATORS)
    cliprange: float = knob(0.2, "epsilon of the clipped ratio")
    cliprange_value: float = knob(0.2, "how far a value may move from its rollout value before its loss is clipped")
    vf_coef: float = knob(0.1, "weight of the value loss")
    gamma: float = knob(1.0, "discount")
    lam: float = knob(0.95, "GAE lambda")
    num_ppo_epochs: int = knob(4, "passes over each rollout batch")
    num_minibatches: int = knob(1, "minibatches per pass (one optimiser step each)")
    critic: str = knob("shared", "shared: a value head on the policy's trunk; separate: a critic initialised "
                                 "from the reward model", ("shared", "separate"))

    def __post_init__(self) -> None:
        _check_choices(self)
        self._check_rollout("PPOConfig")
        _check_range("PPOConfig", "kl_coef", self.kl_coef, 0.0)
        if self.target_kl is not None:
            _check_range("PPOConfig", "target_kl", self.target_kl, 0.0, open_low=True)
        for name in ("cliprange", "cliprange_value"):
            if not (isinstance(getattr(self, name), (int, float)) and 0 < getattr(self, name) < 1):
                raise ValueError(f"PPOConfig.{name} must be in (0, 1), got {getattr(self, name)!r}")
        _check_range("PPOConfig", "vf_coef", self.vf_coef, 0.0)
        for name in ("gamma", "lam"):
            _check_range("PPOConfig", name, getattr(self, name), 0.0, 1.0)
        for name in ("kl_horizon", "num_ppo_epochs", "num_minibatches"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"PPOConfig.{name} must be an int >= 1, got {v!r}")


@dataclass
class GRPOConfig(RolloutConfig):
    """Group Relative Policy Optimization (`minillm.stages.grpo.run_grpo`; TRL's GRPO names and defaults).

    One rollout samples TrainConfig.batch_size responses: batch_size / group_size prompts, group_size each.
    """

    temperature: float = knob(1.0, "sampling temperature of the rollouts (TRL's GRPO default 1.0)")
    group_size: int = knob(8, "responses per prompt (TRL: num_generations)")
    epsilon: float = knob(0.2, "lower clip epsilon (and the upper one unless epsilon_high is set)")
    epsilon_high: float | None = knob(None, "upper clip epsilon (DAPO's clip-higher); None: epsilon")
    beta: float = knob(0.0, "k3 KL penalty in the loss (TRL 0.0; DeepSeekMath 0.04)")
    loss_type: str = knob("grpo", "token aggregation of the loss", ("grpo", "bnpo", "dr_grpo", "dapo"))
    scale_rewards: str = knob("group", "divide advantages by the group std, the batch std, or nothing",
                              ("group", "batch", "none"))
    num_iterations: int = knob(1, "passes over each rollout batch (TRL: num_iterations)")
    num_minibatches: int = knob(1, "minibatches per pass (one optimiser step each)")

    def __post_init__(self) -> None:
        _check_choices(self)
        self._check_rollout("GRPOConfig")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2:
            raise ValueError(f"GRPOConfig.group_size must be an int >= 2 (advantages compare a group), "
                             f"got {self.group_size!r}")
        if not (isinstance(self.epsilon, (int, float)) and 0 < self.epsilon < 1):
            raise ValueError(f"GRPOConfig.epsilon must be in (0, 1), got {self.epsilon!r}")
        if self.epsilon_high is not None:
            _check_range("GRPOConfig", "epsilon_high", self.epsilon_high, 0.0, open_low=True)
        _check_range("GRPOConfig", "beta", self.beta, 0.0)
        for name in ("num_iterations", "num_minibatches"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"GRPOConfig.{name} must be an int >= 1, got {v!r}")


@dataclass
class EvalConfig:
    """Evaluation knobs (`minillm.stages.evaluate.evaluate_run`; lm-evaluation-harness's defaults)."""

    format: str = knob("auto", "prompt format: cloze (world question -> start of its answer sentence), hellaswag "
                               "(question -> choice text), mmlu/paren/qa (letters); auto: cloze for world questions",
                       ("auto", "cloze", *FORMATS))
    num_fewshot: int = knob(0, "solved examples before each question")
    sampler: str = knob("random", "few-shot draw: random (seeded, as lm-eval) or first_n", ("random", "first_n"))
    seed: int = knob(1234, "few-shot sampler seed (lm-eval's)")
    robustness: bool = knob(False, "also accuracy under every cyclic order of the choices and every prompt format")
    # The world's items are 5-8 words: Llama 3's n = 8 would leave most of them without a single n-gram.
    contamination_n: int = knob(4, "n-gram length of the contamination check")
    contamination_threshold: float = knob(0.7, "share of an item's words inside corpus n-grams that marks it")
    max_length: int | None = knob(None, "scoring window (None: the model's block_size)")
    stride: int | None = knob(None, "sliding-window stride (None: max_length // 2)")
    batch_size: int = knob(32, "sequences per forward pass")

    def __post_init__(self) -> None:
        _check_choices(self)
        if isinstance(self.num_fewshot, bool) or not isinstance(self.num_fewshot, int) or self.num_fewshot < 0:
            raise ValueError(f"EvalConfig.num_fewshot must be a non-negative integer, got {self.num_fewshot!r}")
        if self.contamination_n < 1 or self.batch_size < 1:
            raise ValueError("EvalConfig: contamination_n and batch_size must be >= 1")
        _check_fraction("EvalConfig", "contamination_threshold", self.contamination_threshold, 0.0, 1.0 + 1e-12)


@dataclass
class Preset:
    """A named bundle: network shape, tokenizer vocabulary, and each stage's TrainConfig and method knobs."""

    model: GPTConfig
    pretrain: TrainConfig
    sft: TrainConfig
    reward: TrainConfig
    dpo: TrainConfig
    vocab_size: int = 1024
    sft_method: SFTConfig = field(default_factory=SFTConfig)
    reward_method: RewardConfig = field(default_factory=RewardConfig)
    # The RPO term keeps the chosen answers likely while DPO widens their margin (lesson 6, section 9).
    dpo_method: DPOConfig = field(default_factory=lambda: DPOConfig(rpo_alpha=1.0))
    pairs_method: PairsConfig = field(default_factory=PairsConfig)
    # RLHF: TrainConfig.batch_size is prompts per rollout (PPO) or responses per rollout (GRPO).
    # lr: TRL's PPO default; larger rates let Adam turn the noise of near-deterministic rollouts into drift
    # (lesson 5, section 8).
    ppo: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=64, batch_size=32, lr=3e-6, min_lr=3e-6, warmup_steps=0, weight_decay=0.0, eval_interval=0,
        eval_iters=1, log_interval=4))
    ppo_method: PPOConfig = field(default_factory=lambda: PPOConfig(max_new_tokens=32, missing_eos_penalty=1.0))
    grpo: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=32, batch_size=64, lr=1e-5, min_lr=1e-5, warmup_steps=0, weight_decay=0.0, eval_interval=0,
        eval_iters=1, log_interval=2))
    grpo_method: GRPOConfig = field(default_factory=lambda: GRPOConfig(max_new_tokens=32, missing_eos_penalty=1.0))
    # Distillation into this preset's network (the student): the same steps and batch for every mode, so each
    # student sees the same number of chats (lesson 10).
    distill: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=300, batch_size=32, lr=1e-3, min_lr=1e-4, warmup_steps=20, weight_decay=0.0, eval_interval=150,
        eval_iters=2, log_interval=25))
    distill_method: DistillConfig = field(default_factory=DistillConfig)
    # Lesson 11: the direct-answer and the worked-answer SFT runs (same steps), then GRPO with the verifier.
    reasoning: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=1500, batch_size=32, lr=1e-3, min_lr=1e-4, warmup_steps=30, weight_decay=0.0, eval_interval=500,
        eval_iters=4, log_interval=50))
    # lesson 11 measures lr 1e-4 (accuracy fell), 2e-5 and batch 128 on the sums.
    reasoning_rl: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=40, batch_size=64, lr=2e-5, min_lr=2e-5, warmup_steps=0, weight_decay=0.0, eval_interval=0,
        eval_iters=1, log_interval=4))
    reasoning_method: ReasoningConfig = field(default_factory=ReasoningConfig)
    feedback_method: FeedbackConfig = field(default_factory=FeedbackConfig)

    def method(self, stage: str) -> Any:
        """The method dataclass of `stage` ("sft", "reward", "dpo", "pairs", "ppo", "grpo", "distill", "reasoning")."""
        return getattr(self, f"{stage}_method")


PRESETS: dict[str, Preset] = {
    # Seconds: the unit tests and the notebooks' smoke runs.
    "tiny": Preset(
        model=GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64, dropout=0.0),
        pretrain=TrainConfig(max_steps=60, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=10,
                             eval_interval=30, eval_iters=2, log_interval=10),
        sft=TrainConfig(max_steps=40, batch_size=16, lr=1e-3, min_lr=1e-4, warmup_steps=5, weight_decay=0.0,
                        eval_interval=20, eval_iters=2, log_interval=10),
        reward=TrainConfig(max_steps=30, batch_size=16, lr=3e-4, min_lr=3e-5, warmup_steps=3, weight_decay=0.0,
                           eval_interval=15, eval_iters=2, log_interval=5),
        dpo=TrainConfig(max_steps=30, batch_size=16, lr=1e-4, min_lr=1e-5, warmup_steps=3, weight_decay=0.0,
                        eval_interval=15, eval_iters=2, log_interval=5),
        ppo=TrainConfig(max_steps=8, batch_size=8, lr=1e-5, min_lr=1e-5, warmup_steps=0, weight_decay=0.0,
                        eval_interval=0, eval_iters=1, log_interval=4),
        ppo_method=PPOConfig(max_new_tokens=16, missing_eos_penalty=1.0),
        grpo=TrainConfig(max_steps=4, batch_size=8, lr=1e-5, min_lr=1e-5, warmup_steps=0, weight_decay=0.0,
                         eval_interval=0, eval_iters=1, log_interval=2),
        grpo_method=GRPOConfig(group_size=4, max_new_tokens=16, missing_eos_penalty=1.0),
        distill=TrainConfig(max_steps=6, batch_size=8, lr=1e-3, min_lr=1e-4, warmup_steps=1, weight_decay=0.0,
                            eval_interval=3, eval_iters=1, log_interval=2),
        distill_method=DistillConfig(max_new_tokens=16),
        reasoning=TrainConfig(max_steps=6, batch_size=8, lr=1e-3, min_lr=1e-4, warmup_steps=1, weight_decay=0.0,
                              eval_interval=3, eval_iters=1, log_interval=2),
        reasoning_rl=TrainConfig(max_steps=2, batch_size=8, lr=1e-5, min_lr=1e-5, warmup_steps=0, weight_decay=0.0,
                                 eval_interval=0, eval_iters=1, log_interval=1),
        # the tiny context (64 tokens) holds no three-digit scratchpad: the code path runs, the answers are cut
        feedback_method=FeedbackConfig(judge_labels=20, cai_prompts=12, max_new_tokens=16, cai_samples=1, cai_steps=4,
                                       eval_samples=1),
        reasoning_method=ReasoningConfig(eval_limit=6, max_new_tokens=20, shots=1, beam_width=2, n_max=4,
                                         pool_limit=3, rl_group_size=4, rl_start_steps=3),
    ),
    # The default: the whole pipeline in minutes on a 2-core laptop CPU.
    # reward_method loglik: the last-token head alone stays at chance on held-out wrong facts (align/reward.py).
    "cpu": Preset(
        reward_method=RewardConfig(loglik=True),
        model=GPTConfig(block_size=128, n_layer=2, n_head=4, n_embd=128, dropout=0.0),
        pretrain=TrainConfig(max_steps=1200, batch_size=24, lr=3e-3, min_lr=3e-4, warmup_steps=50,
                             eval_interval=300, eval_iters=8, log_interval=25),
        sft=TrainConfig(max_steps=500, batch_size=32, lr=5e-4, min_lr=5e-5, warmup_steps=30, weight_decay=0.0,
                        eval_interval=250, eval_iters=4, log_interval=25),
        # Reward model: TRL's default lr is 1e-4 (lesson 4 measures alternatives).
        reward=TrainConfig(max_steps=60, batch_size=32, lr=1e-4, min_lr=1e-5, warmup_steps=6, weight_decay=0.0,
                           eval_interval=30, eval_iters=2, log_interval=10),
        # DPO moves a model that already produces the chosen answers: a small step (lesson 6 measures 5e-6 vs
        # 2e-5; the larger one unlearns refusals). weight_decay 0 as in TRL.
        dpo=TrainConfig(max_steps=30, batch_size=32, lr=5e-6, min_lr=5e-7, warmup_steps=10, weight_decay=0.0,
                        eval_interval=15, eval_iters=2, log_interval=5),
    ),
    # The distillation student of lesson 10: the `cpu` network at half the width and half the heads (about a
    # quarter of its block parameters), pretrained on the same tokens.
    "cpu-small": Preset(
        model=GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=64, dropout=0.0),
        pretrain=TrainConfig(max_steps=1200, batch_size=24, lr=3e-3, min_lr=3e-4, warmup_steps=50,
                             eval_interval=300, eval_iters=8, log_interval=25),
        sft=TrainConfig(max_steps=500, batch_size=32, lr=1e-3, min_lr=1e-4, warmup_steps=30, weight_decay=0.0,
                        eval_interval=250, eval_iters=4, log_interval=25),
        reward=TrainConfig(max_steps=60, batch_size=32, lr=1e-4, min_lr=1e-5, warmup_steps=6, weight_decay=0.0,
                           eval_interval=30, eval_iters=2, log_interval=10),
        dpo=TrainConfig(max_steps=30, batch_size=32, lr=5e-6, min_lr=5e-7, warmup_steps=10, weight_decay=0.0,
                        eval_interval=15, eval_iters=2, log_interval=5),
    ),
    # GPT-2 small (124M) on one consumer GPU.
    "gpu": Preset(
        reward_method=RewardConfig(loglik=True),
        model=GPTConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768, dropout=0.0),
        pretrain=TrainConfig(max_steps=5000, batch_size=16, grad_accum=4, lr=6e-4, min_lr=6e-5,
                             warmup_steps=200, eval_interval=500, eval_iters=20, log_interval=50),
        sft=TrainConfig(max_steps=1000, batch_size=32, lr=1e-4, min_lr=1e-5, warmup_steps=50, weight_decay=0.0,
                        eval_interval=200, eval_iters=10, log_interval=50),
        reward=TrainConfig(max_steps=300, batch_size=32, lr=3e-5, min_lr=3e-6, warmup_steps=20, weight_decay=0.0,
                           eval_interval=100, eval_iters=8, log_interval=10),
        dpo=TrainConfig(max_steps=300, batch_size=32, lr=1e-6, min_lr=1e-7, warmup_steps=30, weight_decay=0.0,
                        eval_interval=100, eval_iters=8, log_interval=10),
        # TRL's PPO learning rate (3e-6) and response length (53)
        ppo=TrainConfig(max_steps=256, batch_size=64, lr=3e-6, min_lr=3e-6, warmup_steps=0, weight_decay=0.0,
                        eval_interval=0, eval_iters=1, log_interval=8),
        ppo_method=PPOConfig(missing_eos_penalty=1.0),
        grpo=TrainConfig(max_steps=128, batch_size=64, lr=1e-6, min_lr=1e-6, warmup_steps=0, weight_decay=0.0,
                         eval_interval=0, eval_iters=1, log_interval=4),
        grpo_method=GRPOConfig(missing_eos_penalty=1.0),
    ),
}


def get_preset(name: str) -> Preset:
    """A deep copy of a named preset, so callers can override fields freely."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def override(obj: Any, values: dict[str, Any]) -> Any:
    """A copy of dataclass `obj` with the given fields replaced (validated by its __post_init__)."""
    known = {f.name for f in fields(obj)}
    unknown = sorted(k for k in values if k not in known)
    if unknown:
        raise ValueError(f"{type(obj).__name__}: unknown field(s) {unknown}")
    return type(obj)(**{**asdict(obj), **values})
