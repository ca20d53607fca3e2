"""The main job, `python -m minillm pipeline`: every stage in order, then a report card.

    world data -> tokenizer -> pretraining -> samples, perplexity, fact completion
               -> SFT (+ data-size and masking experiments) -> evaluation of every stage's model

Each stage writes into its own directory under --out (default runs/pipeline), records its numbers in
`summary.json`, and adds a section to `report.md`, so an instructor can run one command and show the
class what each stage did. A figure averaged over prompts carries its 95% bootstrap interval over those
prompts; `--seeds 0,1,2` runs the whole job once per training seed (the world stays fixed) into
seed_0/, seed_1/, ... and writes a report card of mean ± std over the seeds (`minillm.eval.stats`).
A stage is a function `stage(ctx)` of one shared context dict:

    ctx = {"out", "data", "tok", "preset" (name), "model_overrides", "train_overrides" (the user's flags),
           "runs":     {stage name: run directory},     the models produced so far
           "card":     [[stage, metric, value, interval]],  rows of the report card: value a number, a
                                                        tuple (before -> after) or text; interval (lo, hi) or None
           "sections": [markdown],                      the report's body
           "summary":  {...},                           summary.json
           "timings":  {stage: seconds}}
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

import torch

from minillm.config import TrainConfig, get_preset, override
from minillm.datasets import read_jsonl, tokenize_corpus
from minillm.eval.perplexity import perplexity
from minillm.eval.stats import bootstrap_ci, mean_std
from minillm.eval.task import evaluate_instructions, fact_completion_accuracy
from minillm.plots import plot_alignment_tax, plot_frontier, plot_series
from minillm.runs import load_plain_run, load_run
from minillm.sampling import generate_completions
from minillm.stages.compare import compare_qlora
from minillm.stages.compress import run_compress
from minillm.stages.dpo import reward_and_kl, run_dpo
from minillm.stages.evaluate import (
    evaluate_run,
    render_alignment_tax,
    report_rows,
    run_alignment_tax,
    safety_report,
)
from minillm.stages.feedback import run_feedback
from minillm.stages.grpo import run_grpo
from minillm.stages.judge import run_judge
from minillm.stages.pairs import reward_model_scorer, sample_responses
from minillm.stages.ppo import run_ppo
from minillm.stages.pretrain import pretrain
from minillm.stages.reasoning import run_reasoning
from minillm.stages.reward import run_reward
from minillm.stages.sft import run_sft
from minillm.tokenizer import Tokenizer
from minillm.utils import atomic_write_text, pick_device, write_json
from minillm.world import gold_reward, write_world

SAMPLE_PROMPTS = ["Mira", "The town of Oakvale", "3 plus 4 is", "Everyone knows"]
SFT_DATA_SIZES = (16, 64, 256)
Ctx = dict[str, Any]


def read_jsonl_rows(path: Path) -> list[dict[str, Any]]:
    return [r for _, r in read_jsonl(path)]


def ensure_world(data_dir: Path, seed: int) -> None:
    """Use the bundled world data; generate it only when it is missing."""
    if (data_dir / "corpus_train.txt").exists():
        return
    print(f"[world] {data_dir} has no world data: generating it with seed {seed}")
    write_world(seed, data_dir)


def ensure_tokenizer(tok_path: Path, corpus: Path, vocab_size: int):
    """Load the bundled tokenizer, or train one (and save it) when it is missing."""
    if (tok_path / "tokenizer.json").exists() or tok_path.is_file():
        return Tokenizer.load(tok_path)
    t0 = time.perf_counter()
    tok = Tokenizer.train(corpus, vocab_size)
    tok_path.mkdir(parents=True, exist_ok=True)
    tok.save(tok_path)
    print(f"[tokenizer] trained {tok.vocab_size} tokens in {time.perf_counter() - t0:.1f}s -> {tok_path}")
    return tok


def fmt(value: Any) -> str:
    """A report value: floats to 3 decimals, (before, after) as 'before -> after', the rest as text."""
    if isinstance(value, (tuple, list)):
        return " -> ".join(fmt(v) for v in value)
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def card(ctx: Ctx, stage: str, metric: str, value: Any, values: list[float] | None = None) -> None:
    """Add a report-card row; `values` (the per-prompt numbers a mean was taken over) adds its 95% bootstrap
    interval."""
    ctx["card"].append([stage, metric, value, bootstrap_ci(values) if values else None])


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table; floats to 3 decimals, pipes and newlines escaped."""
    def cell(v: Any) -> str:
        s = f"{v:.3f}" if isinstance(v, float) else str(v)
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- stages
def train_config(ctx: Ctx, stage: str) -> TrainConfig:
    """The preset's TrainConfig of `stage` with the user's flags (they apply to every stage of the pipeline)."""
    return override(getattr(get_preset(ctx["preset"]), stage), ctx["train_overrides"])


def stage_pretrain(ctx: Ctx) -> None:
    preset = get_preset(ctx["preset"])
    model_cfg = override(preset.model, {**ctx["model_overrides"], "vocab_size": ctx["tok"].vocab_size})
    train_cfg = train_config(ctx, "pretrain")
    print(f"[pretrain] preset {ctx['preset']}: {model_cfg}")
    data = ctx["data"]
    model, result = pretrain(ctx["tok"], data / "corpus_train.txt", data / "corpus_val.txt", model_cfg, train_cfg,
                             ctx["out"] / "base")
    ctx["runs"]["base"] = ctx["out"] / "base"
    ctx["timings"]["pretrain"] = result.seconds
    ctx["summary"]["model"] = asdict(model_cfg)
    ctx["summary"]["parameters"] = model.num_parameters()
    ctx["summary"]["pretrain"] = asdict(result)
    card(ctx, "pretrain", "steps", result.step)
    card(ctx, "pretrain", "final train loss", result.train_loss)
    card(ctx, "pretrain", "final validation loss", result.val_loss)
    card(ctx, "pretrain", "training tokens/s", round(result.tokens_per_s))
    card(ctx, "pretrain", "wall time (s)", round(result.seconds))
    ctx["sections"].append("## Pretraining\n\n![pretraining loss](base/loss_curve.png)")


def stage_base_eval(ctx: Ctx) -> None:
    """Samples, sliding-window validation perplexity and held-out-phrasing fact completion."""
    model, tok, _ = load_run(ctx["runs"]["base"])
    prompts = [tok.encode(p) for p in SAMPLE_PROMPTS]
    greedy = generate_completions(model, prompts, 30, eos_id=tok.eot_id, temperature=0)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    sampled = generate_completions(model, prompts, 30, eos_id=tok.eot_id, temperature=0.8, top_k=50, generator=gen)
    block = model.config.block_size
    ppl = perplexity(model, tokenize_corpus(ctx["data"] / "corpus_val.txt", tok), max_length=block,
                     stride=block // 2, batch_size=16)
    facts = fact_completion_accuracy(model, tok, read_jsonl_rows(ctx["data"] / "probes.jsonl"))
    write_json(ctx["out"] / "fact_completion.json", facts["rows"])
    ctx["summary"]["val_perplexity"] = ppl
    ctx["summary"]["fact_completion"] = {k: v for k, v in facts.items() if k != "rows"}
    card(ctx, "base", f"validation perplexity (sliding window, {ppl['n_tokens']:,} tokens)", ppl["ppl"])
    card(ctx, "base", f"fact completion, held-out phrasing (greedy, {facts['n']} probes)", facts["accuracy"],
         [r["correct"] for r in facts["rows"]])
    body = ["## The base model", "",
            "Fact completion by attribute: " + ", ".join(f"{k} {v:.2f}" for k, v in facts["per_attribute"].items()),
            "", "Samples:", "",
            md_table(["prompt", "greedy", "sampled (T=0.8, top-k 50)"],
                     [[p, tok.decode(g), tok.decode(s)] for p, g, s in zip(SAMPLE_PROMPTS, greedy, sampled)])]
    wrong = [r for r in facts["rows"] if not r["correct"]][:8]
    if wrong:
        body += ["", "Some fact completions it got wrong:", "",
                 md_table(["prompt", "answer", "completion"], [[r["prompt"], r["answer"], r["completion"].strip()]
                                                              for r in wrong])]
    ctx["sections"].append("\n".join(body))


def _sft_eval(run_dir: Path, records: list[dict], mode: str = "chat", shots: list[dict] | None = None) -> dict:
    model, tok, _ = load_run(run_dir)
    return evaluate_instructions(model, tok, records, mode=mode, shots=shots)


def stage_sft(ctx: Ctx) -> None:
    """SFT on the world chats; base (few-shot) vs SFT on held-out characters."""
    run = run_sft(ctx["runs"]["base"], ctx["data"] / "sft_train.jsonl", ctx["out"] / "sft", train_config(ctx, "sft"),
                  get_preset(ctx["preset"]).sft_method)
    result, stats = run.result, run.stats
    ctx["runs"]["sft"] = ctx["out"] / "sft"
    ctx["timings"]["sft"] = result.seconds
    test = read_jsonl_rows(ctx["data"] / "sft_test.jsonl")
    shots = [r for r in read_jsonl_rows(ctx["data"] / "sft_train.jsonl") if r.get("kind") == "fact"][:3]
    base = _sft_eval(ctx["runs"]["base"], test, mode="fewshot", shots=shots)
    sft = _sft_eval(ctx["runs"]["sft"], test)
    write_json(ctx["out"] / "sft" / "eval_test.json", sft["rows"])
    keys = ["exact_match", "fact_exact_match", "refusal_accuracy", "false_refusals", "gold_reward",
            "wrong_character"]
    ctx["summary"]["sft"] = {"train": asdict(result), "stats": stats,
                             "base_fewshot": {k: base[k] for k in keys}, "sft": {k: sft[k] for k in keys}}
    answerable = [r for r in sft["rows"] if r["kind"] != "refusal"]
    card(ctx, "sft", "held-out exact match: base few-shot -> SFT", (base["exact_match"], sft["exact_match"]),
         [r["exact"] for r in answerable])
    card(ctx, "sft", "wrong-character answers (share of held-out fact questions)", sft["wrong_character"],
         [r["wrong_character"] for r in sft["rows"] if r["kind"] == "fact"])
    card(ctx, "sft", "refusal accuracy on held-out forbidden requests", sft["refusal_accuracy"],
         [r["refused"] for r in sft["rows"] if r["kind"] == "refusal"])
    card(ctx, "sft", "false refusals on held-out fact and math questions", sft["false_refusals"],
         [r["refused"] for r in answerable])
    card(ctx, "sft", "mean gold reward: base few-shot -> SFT", (base["gold_reward"], sft["gold_reward"]),
         [r["gold_reward"] for r in sft["rows"]])
    card(ctx, "sft", "wall time (s)", round(result.seconds))
    examples = [[r["question"], r["answer"], "yes" if r["exact"] else "no"] for r in sft["rows"][:6]]
    ctx["sections"].append("\n".join([
        "## SFT: base model (3-shot prompt) vs SFT model, held-out characters", "",
        md_table(["metric", "base, 3-shot", "SFT"], [[k, base[k], sft[k]] for k in keys]), "",
        f"{stats['train_examples']} training chats ({stats['dropped_too_long']} dropped as too long), "
        f"{result.step} steps. Greedy answers of the SFT model:", "",
        md_table(["question", "answer", "exact"], examples), "",
        "![SFT loss](sft/loss_curve.png)"]))


def stage_sft_experiments(ctx: Ctx) -> None:
    """Data size (16, 64, 256, all chats), the masking ablation (loss on all tokens) and training the whole
    embedding table (which makes the model forget the names SFT never asks it to say)."""
    cfg = train_config(ctx, "sft")
    method = get_preset(ctx["preset"]).sft_method
    test = read_jsonl_rows(ctx["data"] / "sft_test.jsonl")
    t0 = time.perf_counter()
    rows, sizes, ems = [], [], []
    for n in SFT_DATA_SIZES:
        out = ctx["out"] / "sft_experiments" / f"n{n}"
        run_sft(ctx["runs"]["base"], ctx["data"] / "sft_train.jsonl", out, cfg, override(method, {"limit": n}),
                progress=False)
        r = _sft_eval(out, test)
        rows.append([f"{n} chats", r["exact_match"], r["refusal_accuracy"], r["gold_reward"]])
        sizes.append(n)
        ems.append(r["exact_match"])
    full = ctx["summary"]["sft"]["sft"]
    n_all = ctx["summary"]["sft"]["stats"]["train_examples"]
    rows.append([f"all ({n_all} chats)", full["exact_match"], full["refusal_accuracy"], full["gold_reward"]])
    sizes.append(n_all)
    ems.append(full["exact_match"])
    ablations = [("all chats, loss on every token", "loss_on_all", {"loss_on": "all"}),
                 ("all chats, whole embedding table trained", "embeddings_all", {"embeddings": "all"})]
    for label, name, kwargs in ablations:
        out = ctx["out"] / "sft_experiments" / name
        run_sft(ctx["runs"]["base"], ctx["data"] / "sft_train.jsonl", out, cfg, override(method, kwargs),
                progress=False)
        r = _sft_eval(out, test)
        rows.append([label, r["exact_match"], r["refusal_accuracy"], r["gold_reward"]])
    plot_series(sizes, {"held-out exact match": ems}, ctx["out"] / "sft_experiments" / "data_size.png",
                xlabel="SFT chats", title="SFT data size", logx=True)
    ctx["timings"]["sft_experiments"] = time.perf_counter() - t0
    ctx["summary"]["sft_experiments"] = rows
    ctx["sections"].append("\n".join([
        "## SFT experiments: data size and loss masking", "",
        md_table(["SFT data", "held-out exact match", "refusal accuracy", "mean gold reward"], rows), "",
        "![data size](sft_experiments/data_size.png)"]))


def _card_rows(ctx: Ctx, stage: str, rows: dict[str, Any], values: dict[str, list[float]] | None = None) -> None:
    """Report-card rows from metric -> value, with a bootstrap interval for the metrics in `values`."""
    for k, v in rows.items():
        card(ctx, stage, k, v, (values or {}).get(k))
    ctx["summary"][stage] = rows


def stage_reward(ctx: Ctx) -> None:
    """Bradley-Terry reward model from the SFT model; accuracy against the gold preferences."""
    data = ctx["data"]
    run = run_reward(ctx["runs"]["sft"], data / "prefs_train.jsonl", ctx["out"] / "rm", train_config(ctx, "reward"),
                     get_preset(ctx["preset"]).reward_method, test=data / "prefs_test.jsonl")
    ctx["runs"]["rm"] = ctx["out"] / "rm"
    per_pair = json.loads((ctx["out"] / "rm" / "eval.json").read_text())["per_pair"]
    values = {"reward model: held-out pairwise accuracy vs gold": [p["correct"] for p in per_pair]}
    for kind in run.stats["test_per_kind_accuracy"]:
        values[f"reward model: accuracy, rejected = {kind}"] = [p["correct"] for p in per_pair if p["kind"] == kind]
    _card_rows(ctx, "reward", reward_rows(run.result, run.stats), values)
    ctx["sections"].append("## Reward model\n\n![reward model calibration](rm/calibration.png)")


def reward_rows(result, stats: dict[str, Any]) -> dict[str, Any]:
    """The reward model's report rows (metric -> value)."""
    rows = {
        "reward model: held-out pairwise accuracy vs gold": stats["test_accuracy"],
        "reward model: calibration error (ECE)": stats["test_ece"],
        "reward model: final train loss": result.train_loss,
        "reward model: reward offset (mean on SFT samples)": stats["reward_offset"],
        "reward model: train seconds": result.seconds,
    }
    for kind, acc in stats["test_per_kind_accuracy"].items():
        rows[f"reward model: accuracy, rejected = {kind}"] = acc
    return rows


def stage_dpo(ctx: Ctx) -> None:
    """DPO from the SFT model on the preference pairs; gold reward and exact match vs SFT."""
    data, out = ctx["data"], ctx["out"]
    cfg, method = train_config(ctx, "dpo"), get_preset(ctx["preset"]).dpo_method
    run = run_dpo(ctx["runs"]["sft"], data / "prefs_train.jsonl", out / "dpo", cfg, method,
                  test=data / "prefs_test.jsonl")
    ctx["runs"]["dpo"] = out / "dpo"
    sft_eval, sampled_sft = sft_heldout(ctx)
    dpo_eval, sampled = heldout_eval(ctx, out / "dpo")
    greedy = [(s["gold_reward"], d["gold_reward"]) for s, d in zip(sft_eval["rows"], dpo_eval["rows"])]
    exact = [r["exact"] for r in dpo_eval["rows"] if r["kind"] != "refusal"]
    _card_rows(ctx, "dpo", {
        "SFT: gold reward (greedy, sft_test)": sft_eval["gold_reward"],
        "SFT: exact match (greedy, sft_test)": sft_eval["exact_match"],
        "SFT: gold reward of samples (T=1)": sampled_sft["reward"],
        "DPO: gold reward (greedy, sft_test)": dpo_eval["gold_reward"],
        "DPO: exact match (greedy, sft_test)": dpo_eval["exact_match"],
        "DPO: implicit-reward accuracy (prefs_test)": run.stats["test_accuracy"],
        "DPO: gold reward of samples (T=1)": sampled["reward"],
        "DPO - SFT: gold reward (greedy)": dpo_eval["gold_reward"] - sft_eval["gold_reward"],
        "DPO - SFT: gold reward of samples (T=1)": sampled["reward"] - sampled_sft["reward"],
        "DPO: KL(pi || pi_ref) per response (T=1)": sampled["kl"],
        "DPO: train seconds": run.result.seconds,
        "DPO: settings": f"beta {method.beta}, loss_type {method.loss_type}, rpo_alpha {method.rpo_alpha}",
    }, {
        "SFT: gold reward (greedy, sft_test)": [s for s, _ in greedy],
        "DPO: gold reward (greedy, sft_test)": [d for _, d in greedy],
        "DPO: exact match (greedy, sft_test)": exact,
        "DPO - SFT: gold reward (greedy)": [d - s for s, d in greedy],  # paired: the same prompts
        "SFT: gold reward of samples (T=1)": sampled_sft["rewards"],
        "DPO: gold reward of samples (T=1)": sampled["rewards"],
    })
    ctx["sections"].append("## DPO\n\n![DPO loss](dpo/loss_curve.png)")


HELDOUT_SAMPLES = 4  # sampled answers per held-out prompt for the T=1 gold reward and KL


def heldout_set(ctx: Ctx) -> tuple[list[dict[str, Any]], list[str], torch.nn.Module]:
    """(sft_test records, their user prompts, the SFT model on the pipeline's device), read once per run."""
    if "heldout" not in ctx:
        records = read_jsonl_rows(ctx["data"] / "sft_test.jsonl")
        prompts = [next(m["content"] for m in r["messages"] if m["role"] == "user") for r in records]
        sft, _, _ = load_plain_run(ctx["runs"]["sft"], device=_device(ctx))
        ctx["heldout"] = (records, prompts, sft)
    return ctx["heldout"]


def heldout_eval(ctx: Ctx, run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(greedy `evaluate_instructions` on sft_test, T=1 samples' gold reward and KL to the SFT model) of a run."""
    records, prompts, sft = heldout_set(ctx)
    policy, tok, _ = load_plain_run(run_dir, device=_device(ctx))
    return evaluate_instructions(policy, tok, records), reward_and_kl(policy, sft, tok, prompts,
                                                                     n_samples=HELDOUT_SAMPLES)


def _device(ctx: Ctx) -> torch.device:
    """Where the pipeline's evaluations run: the --device flag, else CUDA when there is one."""
    return pick_device(ctx["train_overrides"].get("device", "auto"))


def sft_heldout(ctx: Ctx) -> tuple[dict[str, Any], dict[str, Any]]:
    """The SFT model's `heldout_eval`, computed once per pipeline run."""
    if "sft_heldout" not in ctx:
        ctx["sft_heldout"] = heldout_eval(ctx, ctx["runs"]["sft"])
    return ctx["sft_heldout"]


def need_runs(ctx: Ctx, stage: str, *keys: str) -> None:
    """A clear error when a stage needs the run of a stage that was skipped and left nothing in --out."""
    missing = [k for k in keys if k not in ctx["runs"]]
    if missing:
        producers = {v: k for k, v in RUN_KEYS.items()}
        raise ValueError(f"pipeline stage {stage!r} needs the {', '.join(producers[k] for k in missing)} run, which "
                         f"was skipped and is not in {ctx['out']}; skip {stage!r} too or run that stage")


def _rl_stage(ctx: Ctx, name: str, runner: Callable[..., Any]) -> None:
    """PPO or GRPO from the SFT model against the reward model; held-out gold reward and KL vs SFT."""
    need_runs(ctx, name, "sft", "rm")
    data, out = ctx["data"], ctx["out"]
    cfg, method = train_config(ctx, name), get_preset(ctx["preset"]).method(name)
    run = runner(ctx["runs"]["sft"], ctx["runs"]["rm"], data / "sft_train.jsonl", out / name, cfg, method)
    ctx["runs"][name] = out / name
    ctx["timings"][name] = run.result.seconds
    sft_eval, sampled_sft = sft_heldout(ctx)
    ev, sampled = heldout_eval(ctx, out / name)
    label = name.upper()
    greedy = [(s["gold_reward"], d["gold_reward"]) for s, d in zip(sft_eval["rows"], ev["rows"])]
    _card_rows(ctx, name, {
        f"{label}: gold reward (greedy, sft_test)": ev["gold_reward"],
        f"{label}: exact match (greedy, sft_test)": ev["exact_match"],
        f"{label}: gold reward of samples (T=1)": sampled["reward"],
        f"{label} - SFT: gold reward (greedy)": ev["gold_reward"] - sft_eval["gold_reward"],
        f"{label} - SFT: gold reward of samples (T=1)": sampled["reward"] - sampled_sft["reward"],
        f"{label}: KL(pi || pi_ref) per response (T=1)": sampled["kl"],
        f"{label}: reward-model score, first -> last rollout": (run.stats["first_rollout_scores"],
                                                               run.stats["objective/scores"]),
        f"{label}: gold reward of rollouts, first -> last": (run.stats["first_rollout_gold"],
                                                             run.stats["objective/gold"]),
        f"{label}: summed entropy per rollout response, last rollout": run.stats["objective/entropy"],
        **({f"{label}: groups with zero reward spread, last rollout": run.stats["frac_reward_zero_std"]}
           if "frac_reward_zero_std" in run.stats else {}),
        f"{label}: train seconds": run.result.seconds,
    }, {
        f"{label}: gold reward (greedy, sft_test)": [d for _, d in greedy],
        f"{label} - SFT: gold reward (greedy)": [d - s for s, d in greedy],
        f"{label}: gold reward of samples (T=1)": sampled["rewards"],
    })
    ctx["sections"].append(f"## {label}\n\n![{label} rollouts: proxy score, gold reward, KL]({name}/rollouts.png)")


def stage_ppo(ctx: Ctx) -> None:
    _rl_stage(ctx, "ppo", run_ppo)


def stage_grpo(ctx: Ctx) -> None:
    _rl_stage(ctx, "grpo", run_grpo)


BEST_OF = (1, 2, 4, 8, 16)
FRONTIER_DPO_BETAS = (0.03, 0.3)


def stage_frontier(ctx: Ctx) -> None:
    """Best-of-N with the reward model (KL = log N - (N-1)/N, Stiennon et al.) next to DPO, PPO and GRPO:
    the gold reward of held-out samples against KL(pi || pi_SFT), one plot."""
    need_runs(ctx, "frontier", "sft", "rm")
    data, out = ctx["data"], ctx["out"]
    _, prompts, sft = heldout_set(ctx)
    scorer = reward_model_scorer(ctx["runs"]["rm"], device=str(_device(ctx)))
    rows = best_of_n(sft, ctx["tok"], prompts, scorer, BEST_OF)
    points = {"SFT": [(0.0, sft_heldout(ctx)[1]["reward"])],
              "best-of-N (reward model picks)": [(r["kl"], r["gold"]) for r in rows]}
    dpo_method = get_preset(ctx["preset"]).dpo_method
    dpo_runs = {dpo_method.beta: ctx["runs"].get("dpo")}
    for beta in FRONTIER_DPO_BETAS:  # the DPO paper's beta sweep, beside the pipeline's own DPO run
        run_dpo(ctx["runs"]["sft"], data / "prefs_train.jsonl", out / "frontier" / f"dpo_beta{beta}",
                train_config(ctx, "dpo"), replace(dpo_method, beta=beta), progress=False)
        dpo_runs[beta] = out / "frontier" / f"dpo_beta{beta}"
    for beta, run_dir in sorted(dpo_runs.items()):
        if run_dir is not None:
            _, sampled = heldout_eval(ctx, run_dir)
            points.setdefault("DPO (beta sweep)", []).append((sampled["kl"], sampled["reward"]))
            card(ctx, "frontier", f"DPO beta {beta}: gold reward of samples (T=1)", sampled["reward"])
            card(ctx, "frontier", f"DPO beta {beta}: KL(pi || pi_ref) per response (T=1)", sampled["kl"])
    for name in ("ppo", "grpo"):
        if name in ctx["runs"]:
            _, sampled = heldout_eval(ctx, ctx["runs"][name])
            points[name.upper()] = [(sampled["kl"], sampled["reward"])]
    plot_frontier(points, out / "frontier.png", title="gold reward vs KL to the SFT model (held-out, T=1)")
    _card_rows(ctx, "frontier", {f"best-of-{r['n']}: gold reward (KL {r['kl']:.2f})": r["gold"] for r in rows})
    ctx["summary"]["frontier"] = {k: v for k, v in points.items()}
    ctx["sections"].append("## Reward vs KL\n\n![frontier](frontier.png)")


def best_of_n(policy, tokenizer, prompts: list[str], scorer, ns: tuple[int, ...] = BEST_OF, seed: int = 0
              ) -> list[dict[str, float]]:
    """For each N: mean gold reward of the reward model's favourite among the first N samples (T=1) per prompt,
    and the analytic KL(best-of-N || pi) = log N - (N - 1) / N."""
    n_max = max(ns)
    samples = sample_responses(policy, tokenizer, [[{"role": "user", "content": p}] for p in prompts], n_max,
                               seed=seed)
    flat_p = [[{"role": "user", "content": p}] for p, ys in zip(prompts, samples) for _ in ys]
    flat_y = [y or " " for ys in samples for y in ys]
    scores = scorer(flat_p, flat_y)
    gold = [gold_reward(p, y) for p, ys in zip(prompts, samples) for y in ys]
    rows = []
    for n in ns:
        picks = []
        for i in range(len(prompts)):
            s = [(-float("inf") if math.isnan(v) else v) for v in scores[i * n_max:i * n_max + n]]
            picks.append(gold[i * n_max + max(range(n), key=s.__getitem__)])
        rows.append({"n": n, "gold": sum(picks) / len(picks), "kl": math.log(n) - (n - 1) / n})
    return rows


BEST_OF_SAFETY = 4  # the RM-guided column of the safety table: the best of 4 SFT samples by the reward model


def stage_eval(ctx: Ctx) -> None:
    """Validation perplexity and world MCQ accuracy of every stage's model, and the safety rates of each chat model."""
    per_stage = pipeline_eval({**{k: v for k, v in ctx["runs"].items() if k != "rm"}, "data": ctx["data"]})
    probes = Path(ctx["data"]) / "safety_test.jsonl"  # absent from a world folder written before lesson 12's probes
    if probes.is_file():
        rows = read_jsonl_rows(probes)
        shots = [r for r in read_jsonl_rows(ctx["data"] / "sft_train.jsonl") if r.get("kind") == "fact"][:3]
        asked = {stage: {} for stage in ("sft", "dpo", "ppo", "grpo") if stage in per_stage}
        if "base" in per_stage:
            asked = {"base": {"shots": shots}, **asked}  # the base model reads the SFT comparison's 3-shot prompt
        for stage, how in asked.items():
            rates = safety_report(ctx["runs"][stage], rows, **how)
            per_stage[stage].update({f"safety: {k.replace('_', ' ')}": v for k, v in rates.items() if "/" not in k})
        if "sft" in per_stage and "rm" in ctx["runs"]:
            rates = safety_report(ctx["runs"]["sft"], rows, reward=ctx["runs"]["rm"], n=BEST_OF_SAFETY)
            per_stage[f"SFT + RM best-of-{BEST_OF_SAFETY}"] = {f"safety: {k.replace('_', ' ')}": v
                                                              for k, v in rates.items() if "/" not in k}
    metrics = sorted({m for rows in per_stage.values() for m in rows})
    ctx["summary"]["eval"] = per_stage
    ctx["sections"].append("\n".join([
        "## Evaluation of every stage's model (validation perplexity, world MCQ test set, safety probes)",
        "",
        md_table(["metric"] + list(per_stage), [[m] + [per_stage[s].get(m, "") for s in per_stage]
                                                for m in metrics])]))
    stage_alignment_tax(ctx)


def stage_alignment_tax(ctx: Ctx) -> None:
    """What each post-training stage cost in pretraining knowledge (perplexity, fact completion) against the base."""
    runs = {k: v for k, v in ctx["runs"].items() if k != "rm" and (Path(v) / "ckpt.pt").is_file()}
    if "base" not in runs:
        return
    rows = run_alignment_tax(runs, ctx["data"])
    ctx["summary"]["alignment_tax"] = rows
    for r in rows:
        if r["model"] != "base":
            card(ctx, r["model"], "alignment tax: pretraining perplexity / base's", r["perplexity_ratio"])
            card(ctx, r["model"], "alignment tax: fact completion lost vs base", r["facts_lost"])
    plot_alignment_tax(rows, ctx["out"] / "alignment_tax.png")
    ctx["sections"].append("\n".join([
        "## The alignment tax: what each stage cost in pretraining knowledge", "",
        render_alignment_tax(rows), "", "![alignment tax](alignment_tax.png)"]))


def pipeline_eval(ctx: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Perplexity and MCQ rows for every stage's run in ctx: {stage: run_dir, ..., "data": world dir}.

    "data" (optional, default data/world) names the directory with corpus_val.txt and mcq_test.jsonl;
    every other key is a stage whose value is a run directory (those without ckpt.pt are skipped).
    Each run's full report is written to <run_dir>/eval.json. Returns {stage: report_rows(report)}.
    """
    data = Path(ctx.get("data", "data/world"))
    rows: dict[str, dict[str, Any]] = {}
    for stage, run_dir in ctx.items():
        if stage == "data" or run_dir is None or not (Path(run_dir) / "ckpt.pt").is_file():
            continue
        report = evaluate_run(run_dir, ppl=data / "corpus_val.txt", mcq=data / "mcq_test.jsonl")
        write_json(Path(run_dir) / "eval.json", report)
        rows[stage] = report_rows(report)
    return rows


def pipeline_qlora(ctx: dict[str, Any]) -> dict[str, Any]:
    """The QLoRA comparison as a stage of the main job; returns report rows (metric -> value).

    ctx: "preset" (name), "data" (world data dir), "out" (pipeline dir), "base" (pretrained run dir);
    optional "progress" (bool). Writes out/qlora_compare (table.md, results.json, one run per method).
    """
    data = Path(ctx["data"])
    summary = compare_qlora(ctx["base"], data / "sft_train.jsonl", data / "sft_test.jsonl",
                            Path(ctx["out"]) / "qlora_compare", get_preset(ctx["preset"]).sft,
                            progress=ctx.get("progress", True))
    rows: dict[str, Any] = {}
    for r in summary["rows"]:
        rows[f"{r['method']}: held-out exact match"] = r["exact_match"]
        rows[f"{r['method']}: validation loss"] = r["val_loss"]
        rows[f"{r['method']}: train seconds"] = r["train_seconds"]
        rows[f"{r['method']}: params+buffers+grads+AdamW (MB)"] = r["memory"]["total"] / 2**20
    nf4 = next(e for e in summary["errors"] if e["name"].startswith("trained model: every"))
    rows["NF4 / int4 quantisation error (trained weights)"] = nf4["nf4"] / nf4["int4"]
    return rows


# The distillation student of each preset: a smaller network with the same tokenizer.
STUDENT_PRESETS = {"tiny": "tiny", "cpu": "cpu-small", "cpu-small": "tiny", "gpu": "cpu"}


def stage_compress(ctx: Ctx) -> None:
    """Lesson 10: pruning, post-training quantization and distillation of the pipeline's models, one table."""
    need_runs(ctx, "compress", "base", "sft")
    out = ctx["out"] / "compress"
    preset = get_preset(ctx["preset"])
    summary = run_compress(ctx["runs"]["base"], ctx["runs"]["sft"], ctx["data"], out,
                           student_preset=STUDENT_PRESETS[ctx["preset"]],
                           recovery_steps=max(1, preset.sft.max_steps // 5),
                           device=ctx["train_overrides"].get("device", "auto"))
    ctx["summary"]["compress"] = summary
    rows = {r["model"]: r for r in summary["combined"]}
    chat = rows["chat model (fp32)"]
    for name, r in rows.items():
        if name != "chat model (fp32)":
            card(ctx, "compress", f"{name}: gold reward (chat model {chat['gold_reward']:.2f}), "
                                  f"{r['bytes'] / chat['bytes']:.2f}x the bytes", r["gold_reward"])
    ctx["sections"].append("## Compression\n\nThe whole report: [compress/report.md](compress/report.md)\n\n"
                           "![pruning](compress/pruning.png)")


def stage_reasoning(ctx: Ctx) -> None:
    """Lesson 11: direct vs worked-answer SFT, prompting, decoding, test-time compute and RLVR, one report."""
    need_runs(ctx, "reasoning", "base", "sft")
    preset = get_preset(ctx["preset"])
    out = ctx["out"] / "reasoning"
    s = run_reasoning(ctx["runs"]["base"], ctx["data"], out, train_config(ctx, "reasoning"),
                      train_config(ctx, "reasoning_rl"), preset.reasoning_method, chat=ctx["runs"]["sft"],
                      reward=ctx["runs"].get("rm"))
    ctx["summary"]["reasoning"] = s
    for fmt in ("direct", "cot"):
        for task in ("addition", "two_hop"):
            card(ctx, "reasoning", f"SFT on {fmt} answers: held-out {task} accuracy", s["sft"][fmt][task]["accuracy"])
    n_max = str(preset.reasoning_method.n_max)
    card(ctx, "reasoning", f"addition, majority vote of {n_max} samples", s["scaling"]["addition"][n_max]["majority"])
    if "after" in s["rlvr"]:
        card(ctx, "reasoning", "addition after GRPO with the verifier (RLVR)", s["rlvr"]["after"]["addition"])
    ctx["sections"].append("## Reasoning\n\nThe whole report: [reasoning/report.md](reasoning/report.md)\n\n"
                           "![test-time compute](reasoning/scaling.png)")


def stage_feedback(ctx: Ctx) -> None:
    """Lesson 12: the SFT model and a trained judge as judges, and AI feedback (RLAIF, Constitutional AI)."""
    need_runs(ctx, "feedback", "sft", "rm")
    data, out = ctx["data"], ctx["out"] / "feedback"
    preset = get_preset(ctx["preset"])
    s = run_feedback(ctx["runs"]["sft"], ctx["runs"]["rm"], data, out, train_config(ctx, "sft"),
                     train_config(ctx, "dpo"), preset.feedback_method, preset.dpo_method, progress=False)
    # self-preference needs answers that differ: the SFT run on the fewest chats (the pipeline's DPO model gives
    # the SFT model's greedy answer to almost every held-out question)
    small = ctx["out"] / "sft_experiments" / f"n{SFT_DATA_SIZES[0]}"
    against = small if (small / "ckpt.pt").is_file() else ctx["runs"].get("dpo")
    judges = {"SFT model": run_judge(ctx["runs"]["sft"], data / "prefs_test.jsonl", out / "judge_sft",
                                     against=against, questions=data / "sft_test.jsonl")}
    if (out / "trained_judge" / "ckpt.pt").is_file():
        judges["trained judge"] = run_judge(out / "trained_judge", data / "prefs_test.jsonl", out / "judge_trained",
                                            against=against, questions=data / "sft_test.jsonl",
                                            own=ctx["runs"]["sft"])
    ctx["summary"]["feedback"] = {"models": s["models"], "judges": {k: {m: v for m, v in j.items() if m != "rows"}
                                                                    for k, j in judges.items()}}
    for name, j in judges.items():
        card(ctx, "feedback", f"{name} as judge: agreement with gold (held-out pairs)", j["pairwise_agreement"])
        card(ctx, "feedback", f"{name} as judge: position bias", j["position_bias"])
    for name, r in s["models"].items():
        card(ctx, "feedback", f"{name}: gold reward (greedy)", r["gold_reward"])
    ctx["sections"].append("## AI feedback and judges\n\nThe whole report: [feedback/report.md](feedback/report.md); "
                           "the judges: [SFT model](feedback/judge_sft/report.md), "
                           "[trained judge](feedback/judge_trained/report.md)")


STAGES: list[tuple[str, Callable[[Ctx], None]]] = [
    ("pretrain", stage_pretrain),
    ("base_eval", stage_base_eval),
    ("sft", stage_sft),
    ("sft_experiments", stage_sft_experiments),
    ("reward", stage_reward),
    ("dpo", stage_dpo),
    ("ppo", stage_ppo),
    ("grpo", stage_grpo),
    ("frontier", stage_frontier),
    ("eval", stage_eval),
]
# Run only when asked for (`--with compress`): minutes more on a CPU.
OPTIONAL_STAGES: list[tuple[str, Callable[[Ctx], None]]] = [
    ("compress", stage_compress),
    ("reasoning", stage_reasoning),
    ("feedback", stage_feedback),
]


STAGE_RUN_DIRS = {"pretrain": "base", "sft": "sft", "reward": "rm", "dpo": "dpo", "ppo": "ppo", "grpo": "grpo"}
RUN_KEYS = {"pretrain": "base", "sft": "sft", "reward": "rm", "dpo": "dpo", "ppo": "ppo", "grpo": "grpo"}


def run_pipeline(out: str | Path = "runs/pipeline", data: str | Path = "data/world",
                 tokenizer: str | Path = "data/tokenizer", preset: str = "cpu",
                 model_overrides: dict[str, Any] | None = None, train_overrides: dict[str, Any] | None = None,
                 seed_world: int = 0, skip: list[str] | tuple[str, ...] = (),
                 seeds: list[int] | tuple[int, ...] | None = None,
                 with_stages: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Every stage of STAGES in order (except `skip`), then the OPTIONAL_STAGES named in `with_stages`, from
    `preset`; train_overrides apply to every stage.

    With `seeds`, the whole job runs once per training seed (TrainConfig.seed of every stage) into
    out/seed_<s>/, and out/report.md + out/summary.json hold mean ± std over the seeds and each seed's values.
    """
    unknown = set(skip) - {name for name, _ in STAGES}
    if unknown:
        raise ValueError(f"--skip: unknown stage(s) {sorted(unknown)}; stages are {[n for n, _ in STAGES]}")
    unknown = set(with_stages) - {name for name, _ in OPTIONAL_STAGES}
    if unknown:
        raise ValueError(f"--with: unknown stage(s) {sorted(unknown)}; optional stages are "
                         f"{[n for n, _ in OPTIONAL_STAGES]}")
    train_overrides = dict(train_overrides or {})
    seed = override(get_preset(preset).pretrain, train_overrides).seed  # a bad flag fails here, before any work
    if seeds is not None:
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"--seeds: need distinct seeds, got {list(seeds)}")
        t0 = time.perf_counter()
        per_seed = {s: run_pipeline(Path(out) / f"seed_{s}", data, tokenizer, preset, model_overrides,
                                    {**train_overrides, "seed": s}, seed_world, skip, with_stages=with_stages)
                    for s in seeds}
        return write_seeds_report(Path(out), preset, per_seed, time.perf_counter() - t0)
    t_total = time.perf_counter()
    out, data = Path(out), Path(data)
    out.mkdir(parents=True, exist_ok=True)
    ensure_world(data, seed_world)
    tok = ensure_tokenizer(Path(tokenizer), data / "corpus_train.txt", get_preset(preset).vocab_size)
    ctx: Ctx = {"preset": preset, "model_overrides": dict(model_overrides or {}), "train_overrides": train_overrides,
                "out": out, "data": data, "tok": tok, "runs": {}, "card": [], "sections": [],
                "summary": {"preset": preset, "device": str(pick_device(train_overrides.get("device", "auto"))),
                            "seed": seed},
                "timings": {"world+tokenizer": time.perf_counter() - t_total}}
    for name, stage in STAGES + [(n, f) for n, f in OPTIONAL_STAGES if n in with_stages]:
        if name in skip:
            # A skipped training stage reuses the run a previous pipeline left in --out, if any.
            run_dir = out / STAGE_RUN_DIRS.get(name, name)
            if name in STAGE_RUN_DIRS and (run_dir / "ckpt.pt").exists():
                ctx["runs"][RUN_KEYS[name]] = run_dir
            continue
        t0 = time.perf_counter()
        stage(ctx)
        ctx["timings"].setdefault(name, time.perf_counter() - t0)
        ctx["timings"][name + " (with evaluation)"] = time.perf_counter() - t0
        write_report(ctx)  # after every stage, so a long run shows progress
    ctx["timings"]["total"] = time.perf_counter() - t_total
    write_report(ctx)
    print(f"[pipeline] done in {ctx['timings']['total']:.0f}s: report at {out / 'report.md'}")
    return {**ctx["summary"], "card": ctx["card"], "timings_s": ctx["timings"]}


def aggregate_card(cards: list[list[list[Any]]]) -> list[dict[str, Any]]:
    """One row per (stage, metric) of the first card: the per-seed values and, where they are numbers (or
    before -> after pairs of numbers), their mean and std over seeds (`mean_std`)."""
    rows = []
    for stage, metric, *_ in cards[0]:
        values = [next((r[2] for r in c if r[0] == stage and r[1] == metric), None) for c in cards]
        row: dict[str, Any] = {"stage": stage, "metric": metric, "values": values}
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            row["mean"], row["std"] = mean_std(values)
        elif all(isinstance(v, (tuple, list)) for v in values) and len({len(v) for v in values}) == 1:
            stats = [mean_std([v[k] for v in values]) for k in range(len(values[0]))]
            row["mean"], row["std"] = [m for m, _ in stats], [sd for _, sd in stats]
        rows.append(row)
    return rows


def fmt_mean_std(row: dict[str, Any]) -> str:
    """'0.586 ± 0.020', '0.000 ± 0.000 -> 0.586 ± 0.020', or the per-seed texts when they are not numbers."""
    if "mean" not in row:
        texts = {fmt(v) for v in row["values"]}
        return texts.pop() if len(texts) == 1 else " / ".join(fmt(v) for v in row["values"])
    if isinstance(row["mean"], list):
        return " -> ".join(f"{m:.3f} ± {sd:.3f}" for m, sd in zip(row["mean"], row["std"]))
    if all(isinstance(v, int) for v in row["values"]):  # counts and rounded seconds
        return f"{row['mean']:.1f} ± {row['std']:.1f}"
    return f"{row['mean']:.3f} ± {row['std']:.3f}"


def write_seeds_report(out: Path, preset: str, per_seed: dict[int, dict[str, Any]], seconds: float) -> dict[str, Any]:
    """report.md and summary.json over seeds: mean ± std (sample std over the seeds) and each seed's value."""
    seeds = list(per_seed)
    rows = aggregate_card([per_seed[s]["card"] for s in seeds])
    table = [[r["stage"], r["metric"], fmt_mean_std(r)] + [fmt(v) for v in r["values"]] for r in rows]
    lines = ["# minillm pipeline report, over training seeds", "",
             f"Preset `{preset}`, the world fixed, TrainConfig.seed = {', '.join(map(str, seeds))} for every stage. "
             "mean ± std: the sample standard deviation over the seeds. Each seed's own report (with 95% bootstrap "
             "intervals over prompts) is in seed_<s>/report.md.", "",
             md_table(["stage", "metric", "mean ± std"] + [f"seed {s}" for s in seeds], table), "",
             f"Total time: {seconds:.0f} s."]
    summary = {"preset": preset, "seeds": seeds, "card": rows, "per_seed": {str(s): per_seed[s] for s in seeds},
               "seconds": seconds}
    write_json(out / "summary.json", summary)
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    print(f"[pipeline] {len(seeds)} seeds done in {seconds:.0f}s: report at {out / 'report.md'}")
    return summary


def write_report(ctx: Ctx) -> None:
    s = ctx["summary"]
    m = s.get("model")
    lines = ["# minillm pipeline report", ""]
    if m:
        lines += [f"Preset `{s['preset']}` on `{s['device']}`: {m['n_layer']} layers, {m['n_head']} heads, "
                  f"{m['n_embd']} wide, context {m['block_size']}, vocabulary {m['vocab_size']} "
                  f"({s['parameters']:,} parameters).", ""]
    rows = [[stage, metric, fmt(value) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")]
            for stage, metric, value, ci in ctx["card"]]
    lines += ["## Report card", "", "Figures averaged over prompts show their 95% bootstrap interval over those "
              "prompts in brackets.", "", md_table(["stage", "metric", "value"], rows), ""]
    lines += [sec + "\n" for sec in ctx["sections"]]
    lines += ["## Time per stage (seconds)", "",
              md_table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in ctx["timings"].items()])]
    write_json(ctx["out"] / "summary.json", {**s, "timings_s": ctx["timings"], "card": ctx["card"]})
    atomic_write_text(ctx["out"] / "report.md", "\n".join(lines) + "\n")
