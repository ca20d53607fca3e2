"""`python -m minillm <command>`: the front door. One sub-command per stage; `--help` on each lists its flags.

Every training command starts from a preset (`--preset tiny|cpu|gpu`). Each field of the network
(`GPTConfig`), of the stage's optimisation (`TrainConfig`) and of its method (`SFTConfig`, `RewardConfig`,
`DPOConfig`, `PairsConfig` in `minillm.config`) is a flag generated from the dataclass, whose default is the
preset's value: a knob is spelled once, in `config.py`. This module and `pipeline.py` are the only ones that
import the stages; nothing in the library imports them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from minillm import assignments
from minillm.config import (
    PRESETS, DistillConfig, DPOConfig, EvalConfig, FeedbackConfig, GRPOConfig, PairsConfig, PPOConfig, ReasoningConfig,
    RewardConfig, SFTConfig, TrainConfig, get_preset, override,
)
from minillm.memory import MODEL_PRESETS, format_memory_table, gpt2_param_count, memory_table
from minillm.model import GPTConfig
from minillm.peft.apply import PEFT_METHODS
from minillm.pipeline import run_pipeline
from minillm.hf_gpt2 import save_hf_gpt2
from minillm.runs import load_plain_run, load_run
from minillm.sampling import generate_completions, stream_tokens
from minillm.stages import compare
from minillm.stages.compress import run_compress
from minillm.stages.distill import PRETRAIN_KD, run_distill, student_base
from minillm.stages.dpo import run_dpo
from minillm.stages.feedback import LABELLERS, run_feedback
from minillm.stages.harness import run_lm_eval_cli
from minillm.stages.judge import run_judge
from minillm.stages.evaluate import DEFAULT_FEWSHOT, DEFAULT_MCQ, DEFAULT_PPL, evaluate_run, render_table
from minillm.stages.grpo import run_grpo
from minillm.stages.pairs import run_pairs
from minillm.stages.ppo import run_ppo
from minillm.stages.pretrain import run_pretrain
from minillm.stages.reasoning import PARTS as REASONING_PARTS, run_reasoning
from minillm.stages.reward import run_reward
from minillm.stages.sft import run_sft
from minillm.tokenizer import Tokenizer
from minillm.utils import check_writable, pick_device, write_json
from minillm.world import write_world

DEFAULT_DATA = "data/world"
DEFAULT_TOKENIZER = "data/tokenizer"
# The stages whose knobs live in a method dataclass of the preset (`Preset.method(stage)`).
METHOD_CONFIGS = {"sft": SFTConfig, "reward": RewardConfig, "dpo": DPOConfig, "pairs": PairsConfig, "ppo": PPOConfig,
                  "grpo": GRPOConfig, "distill": DistillConfig, "reasoning": ReasoningConfig,
                  "feedback": FeedbackConfig}


# ----------------------------------------------------------------------------- flags from dataclasses
def _optional(kind: type):
    """argparse type for an `X | None` field: 'none' gives None."""
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__
    return parse


def _preset_values(cls: type, name: str, stage: str | None) -> str:
    """'default 0.1' when every preset agrees (or no preset holds `cls`), else 'presets: cpu 5e-06, gpu 1e-06, ...'."""
    if stage is None:
        return f"default {next(f.default for f in dataclasses.fields(cls) if f.name == name)}"
    values = {}
    for preset_name, preset in sorted(PRESETS.items()):
        obj = preset.model if cls is GPTConfig else getattr(preset, stage) if cls is TrainConfig \
            else preset.method(stage)
        values[preset_name] = getattr(obj, name)
    if len(set(map(repr, values.values()))) == 1:
        return f"default {next(iter(values.values()))}"
    return "presets: " + ", ".join(f"{k} {v}" for k, v in values.items())


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, stage: str | None = None,
                        skip: tuple[str, ...] = ()) -> None:
    """One `--field-name` flag per field of dataclass `cls`, typed like the field; unset flags keep the preset's
    value (the help shows it for `stage`'s config in each preset). `X | None` fields take 'none'."""
    group = parser.add_argument_group(f"{cls.__name__} (default: the preset's value)" if stage else cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_ = "; ".join(x for x in (f.metadata.get("help", ""), _preset_values(cls, f.name, stage)) if x)
        dest = f"{cls.__name__}.{f.name}"
        type_name = str(f.type).replace(" | None", "")
        if type_name == "bool":
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_)
            continue
        kind = {"int": int, "float": float, "str": str}[type_name]
        choices = f.metadata.get("choices")
        group.add_argument(flag, dest=dest, type=_optional(kind) if "None" in str(f.type) else kind,
                           default=argparse.SUPPRESS, choices=choices,
                           metavar="{" + ",".join(choices) + "}" if choices else kind.__name__.upper(), help=help_)


def collect_overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` the user set on the command line."""
    prefix = cls.__name__ + "."
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix)}


def stage_train_config(args: argparse.Namespace, stage: str) -> TrainConfig:
    """The preset's TrainConfig for a fine-tuning stage with the user's --flag overrides."""
    return override(getattr(get_preset(args.preset), stage), collect_overrides(args, TrainConfig))


def stage_method(args: argparse.Namespace, stage: str) -> Any:
    """The preset's method dataclass for `stage` with the user's --flag overrides."""
    return override(get_preset(args.preset).method(stage), collect_overrides(args, METHOD_CONFIGS[stage]))


def _seed_list(text: str) -> list[int]:
    """argparse type: comma-separated integers."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_preset_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="named configuration (default: cpu)")


def add_training_flags(p: argparse.ArgumentParser) -> None:
    add_preset_flag(p)
    add_dataclass_flags(p, GPTConfig, "pretrain", skip=("vocab_size",))
    add_dataclass_flags(p, TrainConfig, "pretrain")


PREFS_HELP = "preference JSONL: prompt, chosen, rejected"


def add_run_paths(p: argparse.ArgumentParser, init: str, init_help: str, data_file: str, data_help: str, out: str,
                  test_help: str | None = None) -> None:
    """--init, --data (a file of the world data by default), [--test,] --out and --resume of a training stage."""
    p.add_argument("--init", default=init, help=init_help)
    p.add_argument("--data", default=f"{DEFAULT_DATA}/{data_file}", help=data_help)
    if test_help:
        p.add_argument("--test", default=f"{DEFAULT_DATA}/prefs_test.jsonl", help=test_help)
    p.add_argument("--out", default=out)
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in OUT")


def add_stage_flags(p: argparse.ArgumentParser, stage: str, peft: bool = False) -> None:
    """--preset, the stage's TrainConfig and method flags, and the PEFT flags."""
    add_preset_flag(p)
    add_dataclass_flags(p, TrainConfig, stage)
    if stage in METHOD_CONFIGS:
        add_dataclass_flags(p, METHOD_CONFIGS[stage], stage)
    if peft:
        add_peft_flags(p)


# ----------------------------------------------------------------------------- commands
def cmd_world(args: argparse.Namespace) -> None:
    paths = write_world(args.seed, args.out)
    for name, path in paths.items():
        print(f"{name:16s} {path}  ({Path(path).stat().st_size:,} bytes)")


def cmd_tokenizer(args: argparse.Namespace) -> None:
    if not Path(args.corpus).is_file():  # Tokenizer.train also takes text: a mistyped path would be trained on
        raise FileNotFoundError(f"--corpus {args.corpus}: file not found")
    t0 = time.perf_counter()
    tok = Tokenizer.train(args.corpus, args.vocab_size)
    seconds = time.perf_counter() - t0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = tok.save(args.out)
    print(f"trained a {tok.vocab_size}-token BPE on {args.corpus} in {seconds:.2f}s -> {path}")


def cmd_pretrain(args: argparse.Namespace) -> None:
    # run_pretrain takes the vocabulary size from the tokenizer
    model_cfg = override(get_preset(args.preset).model, collect_overrides(args, GPTConfig))
    _print_run(run_pretrain(args.tokenizer, args.data, args.out, stage_train_config(args, "pretrain"), model_cfg,
                            resume=args.resume))


def cmd_generate(args: argparse.Namespace) -> None:
    model, tok, _ = load_run(args.ckpt, device=args.device)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    prompts = args.prompt or ["Mira lives in"]
    outs = generate_completions(model, [tok.encode(p) for p in prompts], args.max_new_tokens, eos_id=tok.eot_id,
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                use_cache=not args.no_cache, generator=gen)
    for p, ids in zip(prompts, outs):
        print(f"{p}{tok.decode(ids)}")


def peft_spec(args: argparse.Namespace) -> dict[str, Any] | None:
    """The PEFT method and its hyperparameters from --peft, the named flags and --peft-arg KEY=VALUE."""
    if not args.peft:
        return None
    spec: dict[str, Any] = {"method": args.peft}
    if args.target_modules:
        spec["target_modules"] = args.target_modules.split(",")
    named = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
             "num_virtual_tokens": "num_virtual_tokens"}
    for flag, key in named.items():
        value = getattr(args, flag)
        if value is not None:
            spec[key] = value
    if args.use_rslora:
        spec["use_rslora"] = True
    for item in args.peft_arg or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--peft-arg expects KEY=VALUE, got {item!r}")
        try:
            spec[key] = json.loads(raw)
        except json.JSONDecodeError:
            spec[key] = raw
    return spec


def add_peft_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parameter-efficient fine-tuning")
    g.add_argument("--peft", choices=sorted(PEFT_METHODS), default=None, help="train through this PEFT method")
    g.add_argument("--target-modules", default=None, help="comma-separated module names (default: the method's)")
    g.add_argument("--lora-r", type=int, default=None, help="rank r (LoRA, VeRA)")
    g.add_argument("--lora-alpha", type=float, default=None)
    g.add_argument("--lora-dropout", type=float, default=None)
    g.add_argument("--use-rslora", action="store_true", help="scaling alpha / sqrt(r)")
    g.add_argument("--num-virtual-tokens", type=int, default=None, help="P for prefix and prompt tuning")
    g.add_argument("--peft-arg", action="append", metavar="KEY=VALUE",
                   help="any other hyperparameter of the method (value parsed as JSON), e.g. k=2, scale=0.5")


def _print_run(run) -> None:
    print(json.dumps({**dataclasses.asdict(run.result), **run.stats}, indent=2, default=str))


def cmd_sft(args: argparse.Namespace) -> None:
    _print_run(run_sft(args.init, args.data, args.out, stage_train_config(args, "sft"), stage_method(args, "sft"),
                       peft=peft_spec(args), resume=args.resume))


def cmd_reward(args: argparse.Namespace) -> None:
    _print_run(run_reward(args.init, args.data, args.out, stage_train_config(args, "reward"),
                          stage_method(args, "reward"), test=args.test or None, resume=args.resume))


def cmd_dpo(args: argparse.Namespace) -> None:
    _print_run(run_dpo(args.init, args.data, args.out, stage_train_config(args, "dpo"), stage_method(args, "dpo"),
                       peft=peft_spec(args), test=args.test or None, resume=args.resume))


def cmd_ppo(args: argparse.Namespace) -> None:
    _print_run(run_ppo(args.init, args.reward, args.data, args.out, stage_train_config(args, "ppo"),
                       stage_method(args, "ppo"), peft=peft_spec(args)))


def cmd_grpo(args: argparse.Namespace) -> None:
    _print_run(run_grpo(args.init, args.reward, args.data, args.out, stage_train_config(args, "grpo"),
                        stage_method(args, "grpo"), peft=peft_spec(args)))


def cmd_distill(args: argparse.Namespace) -> None:
    student = args.student
    if student is None:
        student = Path(args.out) / "student_base"
        how = " with word-level KD from the teacher's base model" if args.pretrain_kd else ""
        print(f"[distill] pretraining a {args.preset} student on the teacher's corpus{how} into {student}")
        student_base(args.teacher, args.preset, student, kd=PRETRAIN_KD if args.pretrain_kd else None)
    data = args.data or json.loads((Path(args.teacher) / "config.json").read_text()).get("data")
    if not data:
        raise ValueError(f"distill: {args.teacher}/config.json names no chat data; give --data")
    _print_run(run_distill(args.teacher, student, data, args.out, stage_train_config(args, "distill"),
                           stage_method(args, "distill")))


def cmd_compress(args: argparse.Namespace) -> None:
    summary = run_compress(args.base, args.sft, args.data, args.out, student=args.student,
                           student_preset=args.student_preset, recovery_steps=args.recovery_steps, device=args.device,
                           distill=not args.no_distill)
    print(Path(args.out, "report.md").read_text())
    print(f"summary: {Path(args.out, 'summary.json')} ({len(summary['combined'])} models in the combined table)")


def cmd_reasoning(args: argparse.Namespace) -> None:
    rl_cfg = get_preset(args.preset).reasoning_rl
    if args.rl_steps is not None:
        rl_cfg = override(rl_cfg, {"max_steps": args.rl_steps})
    run_reasoning(args.base, args.data, args.out, stage_train_config(args, "reasoning"), rl_cfg,
                  stage_method(args, "reasoning"), chat=args.chat, reward=args.reward, progress=True,
                  parts=tuple(args.parts.split(",")) if args.parts else REASONING_PARTS)
    print(Path(args.out, "report.md").read_text())
    print(f"summary: {Path(args.out, 'summary.json')}")


CHAT_HELP = "/reset clears the conversation, /temp T sets the temperature, /top_p P (or none), /quit leaves"


def chat_prompt(tok, messages: list[dict[str, str]], room: int) -> tuple[list[int], int]:
    """The chat template of `messages` ending in an assistant header, with the oldest turns dropped until it fits
    in `room` tokens; returns (ids, number of messages dropped). The newest user turn is always kept (cropped from
    the left if it alone is too long)."""
    dropped = 0
    while True:
        ids = tok.apply_chat_template(messages[dropped:], add_generation_prompt=True)[0]
        if len(ids) <= room or len(messages) - dropped <= 1:
            return ids[-room:], dropped
        dropped += 2 if len(messages) - dropped > 2 else 1  # a user turn and the answer to it


def run_chat(model, tok, max_new_tokens: int = 64, temperature: float = 0.7, top_p: float | None = 0.9,
             read=input, write=print, seed: int = 0) -> list[dict[str, str]]:
    """A read-eval-print loop over the chat template: tokens are printed as they decode; returns the history."""
    messages: list[dict[str, str]] = []
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    room = model.config.block_size - max_new_tokens
    write(f"[chat] {CHAT_HELP}")
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            return messages
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return messages
        if line == "/reset":
            messages = []
            write("[chat] the conversation is cleared")
            continue
        if line.startswith(("/temp", "/top_p")):
            name, _, value = line.partition(" ")
            try:
                if name == "/temp":
                    temperature = float(value)
                    if not temperature >= 0:
                        raise ValueError
                else:
                    top_p = None if value.strip() == "none" else float(value)
                    if top_p is not None and not 0 < top_p <= 1:
                        raise ValueError
            except ValueError:
                write(f"[chat] {name} needs a number ({'>= 0' if name == '/temp' else 'in (0, 1], or none'})")
                continue
            write(f"[chat] temperature {temperature}, top_p {top_p}")
            continue
        if line.startswith("/"):
            write(f"[chat] unknown command {line.split()[0]}; {CHAT_HELP}")
            continue
        messages.append({"role": "user", "content": line})
        ids, dropped = chat_prompt(tok, messages, room)
        if dropped:
            messages = messages[dropped:]
            write(f"[chat] the oldest {dropped} message(s) no longer fit the context of {model.config.block_size} "
                  "tokens and were dropped")
        answer: list[int] = []
        shown = ""
        write("model> ", end="")
        for token in stream_tokens(model, ids, max_new_tokens, temperature, None, top_p, tok.end_id, gen):
            answer.append(token)
            text = tok.decode(answer)
            if not text.endswith("\ufffd"):  # wait for the rest of a character cut between tokens
                write(text[len(shown):], end="", flush=True)
                shown = text
        text = tok.decode(answer).strip()
        write(tok.decode(answer)[len(shown):])
        messages.append({"role": "assistant", "content": text})


def cmd_chat(args: argparse.Namespace) -> None:
    model, tok, _ = load_plain_run(args.run, device=pick_device(args.device))
    run_chat(model.eval(), tok, args.max_new_tokens, args.temperature, None if args.top_p <= 0 else args.top_p,
             seed=args.seed)


def cmd_lm_eval(args: argparse.Namespace) -> None:
    try:
        run_lm_eval_cli([a for a in args.lm_eval_args if a != "--"])
    except ModuleNotFoundError as e:
        raise ValueError(f"lm-eval is not installed ({e}); pip install lm_eval") from e


def cmd_export(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise FileExistsError(f"--out {out} is not empty; choose an empty folder or pass --force")
    model, tok, _ = load_plain_run(args.run)  # a LoRA/VeRA/KronA run is merged into plain weights first
    save_hf_gpt2(model.eval(), out, tok)
    print(f"[export] {args.run} -> {out}: config.json, model.safetensors, vocab.json, merges.txt, tokenizer_config.json "
          "(load with transformers.GPT2LMHeadModel.from_pretrained and AutoTokenizer.from_pretrained)")


def cmd_judge(args: argparse.Namespace) -> None:
    template = None
    if args.template is not None:
        template = Path(args.template).read_text(encoding="utf-8").strip()
    run_judge(args.judge, args.pairs, args.out, against=args.against, questions=args.questions, template=template,
              seed=args.seed, own=args.own)
    print(Path(args.out, "report.md").read_text())


def _named_files(items: list[str]) -> dict[str, str]:
    """--labels NAME=FILE ... as {name: file}."""
    out = {}
    for item in items:
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            raise ValueError(f"--labels: expected NAME=FILE, got {item!r}")
        out[name] = path
    return out


def cmd_feedback(args: argparse.Namespace) -> None:
    preset = get_preset(args.preset)
    labellers = [x for x in args.labellers.split(",") if x]
    run_feedback(args.sft, args.rm, args.data, args.out, preset.sft, preset.dpo, stage_method(args, "feedback"),
                 preset.dpo_method, constitution=args.constitution, labellers=labellers,
                 extra_labels=_named_files(args.labels), cai=not args.no_cai)
    print(Path(args.out, "report.md").read_text())


def add_rl_paths(p: argparse.ArgumentParser, out: str) -> None:
    """--init (the chat policy), --reward (the reward model), --data (the prompts) and --out of PPO and GRPO."""
    p.add_argument("--init", default="runs/sft", help="run directory of the chat policy (SFT); also the reference")
    p.add_argument("--reward", default="runs/rm", help="run directory of the reward model (`minillm reward`), or "
                   "'verifier': 1 for a right final answer, else 0 (sums and two-hop questions; lesson 11)")
    p.add_argument("--data", default=f"{DEFAULT_DATA}/sft_train.jsonl",
                   help="prompts: JSONL with a 'prompt' field, or chats (the prompt is everything before the answer)")
    p.add_argument("--out", default=out)
    p.add_argument("--overwrite", action="store_true", help="replace the run already in OUT")


def cmd_assignments(args: argparse.Namespace) -> None:
    if args.action == "list":
        manifest = assignments.load_manifest(args.repo)
        rows = [[a.id, a.title, a.lesson, a.points,
                 f"{len(a.tests)} in " + ", ".join(sorted({Path(t.split('::')[0]).name for t in a.tests}))]
                for a in manifest.assignments]
        print(assignments.format_table(rows, ["id", "title", "lesson", "points", "tests"]))
        print(f"\n{len(rows)} assignments, {sum(a.points for a in manifest.assignments)} points")
        return
    if not args.out:
        raise ValueError("assignments make: --out DIR is required")
    result = assignments.make_student_copy(args.repo, args.out, only=args.only, force=args.force)
    print(f"wrote {result['files']} files to {result['out']}; stripped: {', '.join(result['stripped'])}")


def cmd_grade(args: argparse.Namespace) -> None:
    result = assignments.grade(args.repo, only=args.only, extra_tests=args.extra_tests)
    rows = [[t["name"], f"{t['score']:g} / {t['max_score']}", t["output"].splitlines()[0]] for t in result["tests"]]
    print(assignments.format_table(rows, ["assignment", "points", "tests"]))
    print(f"\ntotal: {result['score']:g} of {result['max_score']} points")
    if args.json:
        write_json(args.json, {"score": result["score"], "tests": result["tests"]})


def cmd_pairs(args: argparse.Namespace) -> None:
    stats = run_pairs(args.policy, args.prompts, args.out, stage_method(args, "pairs"), scorer=args.scorer,
                      device=args.device)
    print(json.dumps(stats, indent=2))


def cmd_memory(args: argparse.Namespace) -> None:
    """Weights / gradients / AdamW state by fine-tuning method, for a preset or a named GPT-2 shape."""
    if args.preset in PRESETS:
        c = get_preset(args.preset).model
        shape = (c.n_layer, c.n_head, c.n_embd, get_preset(args.preset).vocab_size, c.block_size)
    else:
        shape = MODEL_PRESETS[args.preset]
    n = gpt2_param_count(shape[0], shape[2], shape[3], shape[4])["total"]
    print(f"{args.preset}: {n / 1e6:,.1f}M parameters (n_layer, n_head, n_embd, vocab, block = {shape})\n")
    print(format_memory_table(memory_table(*shape, lora_r=args.lora_r, lora_targets=args.lora_targets,
                                           gpu_gib=args.gpu_gib)))


def cmd_pipeline(args: argparse.Namespace) -> None:
    run_pipeline(args.out, args.data, args.tokenizer, args.preset, collect_overrides(args, GPTConfig),
                 collect_overrides(args, TrainConfig), seed_world=args.seed_world, skip=args.skip or [],
                 seeds=args.seeds, with_stages=args.with_stages or [])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minillm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("world", help="generate the synthetic world data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_DATA)
    p.set_defaults(func=cmd_world)

    p = sub.add_parser("tokenizer", help="train the byte-level BPE tokenizer")
    p.add_argument("--corpus", default=f"{DEFAULT_DATA}/corpus_train.txt")
    p.add_argument("--vocab-size", type=int, default=get_preset("cpu").vocab_size)
    p.add_argument("--out", default=DEFAULT_TOKENIZER)
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("pretrain", help="pretrain a GPT on the world corpus")
    add_training_flags(p)
    p.add_argument("--data", default=DEFAULT_DATA, help="directory with corpus_train.txt and corpus_val.txt")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
    p.add_argument("--out", default="runs/base")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in OUT")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("sft", help="supervised fine-tuning on chats (loss on the assistant tokens)")
    add_stage_flags(p, "sft", peft=True)
    add_run_paths(p, "runs/base", "run directory to start from", "sft_train.jsonl",
                  "JSONL/JSON: messages or Alpaca records", "runs/sft")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser(
        "reward", help="train a Bradley-Terry reward model on preference pairs",
        description="Train r(x, y) = score(h_last) on prompt/chosen/rejected pairs (loss -log sigma(r_w - r_l)), "
                    "starting from an SFT run; then shift it to mean 0 on SFT samples and evaluate it on --test.")
    add_stage_flags(p, "reward")
    add_run_paths(p, "runs/sft", "run directory to start from (the SFT policy)", "prefs_train.jsonl",
                  PREFS_HELP, "runs/rm",
                  test_help="held-out preference JSONL for accuracy and calibration ('' to skip)")
    p.set_defaults(func=cmd_reward)

    p = sub.add_parser(
        "dpo", help="Direct Preference Optimization (and IPO, cDPO, robust, hinge) of an SFT run",
        description="Train the policy on prompt/chosen/rejected pairs with -log sigma(beta h), "
                    "h = log pi/pi_ref(y_w) - log pi/pi_ref(y_l); the reference is the --init model "
                    "(a frozen copy, or the same model with adapters disabled under --peft).")
    add_stage_flags(p, "dpo", peft=True)
    add_run_paths(p, "runs/sft", "run directory of the SFT policy (also the reference)", "prefs_train.jsonl",
                  PREFS_HELP, "runs/dpo",
                  test_help="held-out preference JSONL for the implicit-reward accuracy ('' to skip)")
    p.set_defaults(func=cmd_dpo)

    p = sub.add_parser(
        "ppo", help="RLHF: clipped PPO with a KL penalty against a reward model (lesson 5)",
        description="Sample responses to the prompts, score them with the reward model, and update the policy with "
                    "PPO's clipped objective; per-token reward -beta KL(pi || pi_ref) plus the score at the last "
                    "token, GAE advantages from a value head (shared trunk, or --critic separate).")
    add_stage_flags(p, "ppo", peft=True)
    add_rl_paths(p, "runs/ppo")
    p.set_defaults(func=cmd_ppo)

    p = sub.add_parser(
        "grpo", help="GRPO: PPO without a critic, group-normalised rewards (lesson 5)",
        description="Sample --group-size responses per prompt, advantage = (r - group mean) / group std, "
                    "clipped policy loss (+ beta k3 KL); no value model.")
    add_stage_flags(p, "grpo", peft=True)
    add_rl_paths(p, "runs/grpo")
    p.set_defaults(func=cmd_grpo)

    p = sub.add_parser(
        "distill", help="knowledge distillation of a chat model into a smaller student (lesson 10)",
        description="Fine-tune a small pretrained student on the chats: --mode sft (no teacher), word (alpha kd + "
                    "(1 - alpha) CE), seq (the teacher's greedy answers) or on_policy (GKD: kd on the student's own "
                    "samples). Without --student, a student of --student-preset's network is first pretrained on "
                    "the teacher's corpus with the teacher's tokenizer (into OUT/student_base).")
    p.add_argument("--student-preset", dest="preset", default="cpu-small", choices=sorted(PRESETS),
                   help="the student's network and its distill TrainConfig (default: cpu-small)")
    add_dataclass_flags(p, TrainConfig, "distill")
    add_dataclass_flags(p, DistillConfig, "distill")
    p.add_argument("--teacher", default="runs/sft", help="run directory of the teacher (a chat model)")
    p.add_argument("--student", default=None, help="a pretrained student run with the teacher's tokenizer")
    p.add_argument("--pretrain-kd", action="store_true",
                   help="without --student: pretrain the student with word-level KD (alpha 1, T 1) from the "
                        "pretraining run of the teacher's lineage instead of cross-entropy alone")
    p.add_argument("--data", default=None, help="chats JSONL (default: the teacher's own SFT data)")
    p.add_argument("--out", default="runs/distill")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in OUT")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser(
        "compress", help="lesson 10: pruning, post-training quantization and distillation, cost and effect",
        description="Prunes the base model (magnitude, Wanda, 2:4, structured heads/neurons; 10%..90%, with a "
                    "recovery fine-tune at 50%), quantizes it (int8, LLM.int8(), NF4, RTN and GPTQ at 4 and 3 "
                    "bits), shows the outlier problem, distils the chat model into a smaller student, and puts "
                    "every method applied to the chat model in one table (OUT/report.md, OUT/summary.json).")
    p.add_argument("--base", default="runs/pipeline/base", help="the pretrained run (pruning and PTQ curves)")
    p.add_argument("--sft", default="runs/pipeline/sft", help="the chat model (combined table; the teacher)")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--out", default="runs/compress")
    p.add_argument("--student", default=None, help="a pretrained student run (default: pretrain one)")
    p.add_argument("--student-preset", default="cpu-small", choices=sorted(PRESETS),
                   help="the student's network and distill TrainConfig (default: cpu-small)")
    p.add_argument("--recovery-steps", type=int, default=100, help="fine-tuning steps after pruning")
    p.add_argument("--no-distill", action="store_true", help="leave distillation out (faster)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser(
        "reasoning", help="lesson 11: chain of thought, beam search, self-consistency, best-of-N and RLVR",
        description="SFT from --base on direct vs worked (scratchpad / chain-of-thought) answers to the world's sums "
                    "and two-hop questions; prompting (zero-shot, few-shot, zero-shot CoT) of the base and --chat "
                    "models; greedy vs beam vs sampling; accuracy with N samples (majority vote, best-of-N by the "
                    "verifier or the --reward model, weighted vote); GRPO with the verifier as reward. Writes "
                    "OUT/report.md, OUT/summary.json, OUT/scaling.png.")
    add_stage_flags(p, "reasoning")
    p.add_argument("--base", default="runs/pipeline/base", help="the pretrained run both SFT runs start from")
    p.add_argument("--chat", default=None, help="a chat SFT run for the prompting rows (e.g. runs/pipeline/sft)")
    p.add_argument("--reward", default=None, help="a reward-model run for best-of-N and weighted voting")
    p.add_argument("--rl-steps", type=int, default=None, help="GRPO steps with the verifier (default: the preset's)")
    p.add_argument("--parts", default=None, help=f"comma-separated subset of {','.join(REASONING_PARTS)}: re-run only "
                   "those, reusing OUT/sft_direct and OUT/sft_cot")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--out", default="runs/reasoning")
    p.set_defaults(func=cmd_reasoning)

    p = sub.add_parser(
        "lm-eval", help="EleutherAI's lm-evaluation-harness on a run (pip install lm_eval)",
        description="Registers this library's model with lm-eval as 'minillm' and runs lm-eval's command line with "
                    "the remaining arguments, e.g. --model_args run=runs/pipeline/sft --tasks TASK --include_path DIR.")
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="arguments for lm_eval (--model minillm is added)")
    p.set_defaults(func=cmd_lm_eval)

    p = sub.add_parser(
        "chat", help="talk to a chat run in the terminal (tokens stream as they decode)",
        description=f"A conversation in the chat template with the --run model; {CHAT_HELP}. When the history no "
                    "longer fits the context, the oldest turns are dropped (with a notice).")
    p.add_argument("--run", default="runs/pipeline/sft", help="the chat run")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling; 0 turns it off")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "export", help="write a run as a Hugging Face GPT-2 folder (weights, config, tokenizer)",
        description="Writes OUT/config.json, OUT/model.safetensors and GPT-2 tokenizer files (vocab.json, merges.txt, "
                    "tokenizer_config.json, special_tokens_map.json) that transformers' GPT2LMHeadModel and "
                    "AutoTokenizer load with this run's logits and token ids. A LoRA/VeRA/KronA run is merged first.")
    p.add_argument("--run", required=True, help="the run directory to export")
    p.add_argument("--out", required=True, help="an empty (or new) folder")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "judge", help="lesson 12: a model judges the preference pairs; agreement with gold and the judge's biases",
        description="Pairwise (both orders averaged) and single-answer verdicts of the --judge chat model on --pairs, "
                    "against the world's gold reward: agreement, Cohen's kappa, position bias, verbosity bias, "
                    "agreement per rejected kind, and with --against, self-preference. Writes OUT/report.md and "
                    "OUT/results.json.")
    p.add_argument("--judge", default="runs/pipeline/sft", help="the chat run that judges")
    p.add_argument("--pairs", default=f"{DEFAULT_DATA}/prefs_test.jsonl", help=PREFS_HELP)
    p.add_argument("--against", default=None, help="another chat run: self-preference of the judge against it")
    p.add_argument("--own", default=None, help="the run whose answers count as the judge's own (default: the judge; "
                   "for a judge fine-tuned from a chat model, that chat model)")
    p.add_argument("--questions", default=f"{DEFAULT_DATA}/sft_test.jsonl",
                   help="chats whose questions both models answer for --against")
    p.add_argument("--template", default=None, help="a text file with the pairwise template: {question}, {a}, {b}")
    p.add_argument("--seed", type=int, default=0, help="the coin that puts chosen in slot A or B")
    p.add_argument("--out", default="runs/judge")
    p.set_defaults(func=cmd_judge)

    p = sub.add_parser(
        "feedback", help="lesson 12: RLAIF and Constitutional AI: label pairs with models, DPO on each labeller",
        description="Labels prefs_train with the gold reward, the reward model, the SFT model as judge, a judge "
                    "trained on a few gold verdicts and a constitution; measures each labeller's agreement with gold "
                    "and the gold reward of a DPO model trained on its labels; then Constitutional AI (critique -> "
                    "revision -> SFT -> constitution-labelled pairs -> DPO). Writes OUT/report.md, OUT/results.json, "
                    "OUT/labels/*.jsonl.")
    add_preset_flag(p)
    add_dataclass_flags(p, FeedbackConfig, "feedback")
    p.add_argument("--sft", default="runs/pipeline/sft", help="the chat run: the policy, the judge, the critic")
    p.add_argument("--rm", default="runs/pipeline/rm", help="the reward-model run (the 'rm' labeller)")
    p.add_argument("--data", default=DEFAULT_DATA, help="the world folder: prefs_train/test, sft_test, safety_test")
    p.add_argument("--constitution", default="data/constitution.txt", help="principles, one 'name: sentence' a line")
    p.add_argument("--labellers", default=",".join(LABELLERS), help=f"comma-separated subset of {','.join(LABELLERS)}")
    p.add_argument("--labels", nargs="*", default=[], metavar="NAME=FILE",
                   help="your own label files ({prompt, p_chosen} per line, in the order of prefs_train.jsonl)")
    p.add_argument("--no-cai", action="store_true", help="leave the Constitutional AI runs out")
    p.add_argument("--out", default="runs/feedback")
    p.set_defaults(func=cmd_feedback)

    p = sub.add_parser(
        "pairs", help="sample N responses per prompt, score them, write best/worst as preference pairs",
        description="On-policy pairs (Llama 2/3 style): y_1..y_N ~ pi(.|x), chosen = argmax score, rejected = "
                    "argmin score, ties skipped; written as prompt/chosen/rejected JSONL for `reward` and `dpo`.")
    add_preset_flag(p)
    add_dataclass_flags(p, PairsConfig, "pairs")
    p.add_argument("--policy", default="runs/sft", help="run directory of the policy that samples")
    p.add_argument("--prompts", default=f"{DEFAULT_DATA}/sft_train.jsonl",
                   help="JSONL with a 'prompt' field, or chats (messages / Alpaca): "
                        "the prompt is everything before the last answer")
    p.add_argument("--scorer", default="gold", help="'gold' (the world's gold reward) or a reward-model run directory")
    p.add_argument("--out", default="runs/pairs.jsonl")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_pairs)

    p = sub.add_parser(
        "assignments", help="the course kit: list the graded assignments, or make the students' copy",
        description="list: the assignments of assignments/manifest.json. make: a copy of the repository where each "
                    "selected solution block (# BEGIN ASSIGNMENT <id> ... # END ASSIGNMENT) raises "
                    "NotImplementedError with a hint.")
    p.add_argument("action", choices=["list", "make"])
    p.add_argument("--repo", default=".", help="the solution repository (default: the current folder)")
    p.add_argument("--out", default=None, help="make: the folder to write (must be empty, or --force)")
    p.add_argument("--only", nargs="+", metavar="ID", default=None, help="make: strip only these assignments")
    p.add_argument("--force", action="store_true", help="make: replace the contents of a non-empty --out")
    p.set_defaults(func=cmd_assignments)

    p = sub.add_parser("grade", help="run each assignment's tests and print its points",
                       description="Runs the tests of every assignment (one pytest process) in --repo and scores "
                                   "points x passed / total per assignment.")
    p.add_argument("--repo", default=".", help="the tree to grade (default: the current folder)")
    p.add_argument("--only", nargs="+", metavar="ID", default=None, help="grade only these assignments")
    p.add_argument("--json", default=None, help="write the autograder results JSON here")
    p.add_argument("--extra-tests", default=None, help="a folder of private tests: <id>/test_*.py per assignment")
    p.set_defaults(func=cmd_grade)

    p = sub.add_parser("generate", help="sample from a trained run")
    p.add_argument("--ckpt", default="runs/base", help="run directory")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_generate)

    add_eval_command(sub)
    add_peft_compare_command(sub)
    add_qlora_compare_command(sub)

    p = sub.add_parser("memory", help="memory table: full fine-tuning vs LoRA vs QLoRA, from the shapes")
    p.add_argument("--preset", default="gpu", choices=sorted(PRESETS) + sorted(MODEL_PRESETS),
                   help="a minillm preset or a GPT-2 / 7B shape (default: gpu)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-targets", nargs="+", default=["c_attn"])
    p.add_argument("--gpu-gib", type=float, default=16.0, help="GPU memory for the 'fits' column")
    p.set_defaults(func=cmd_memory)

    p = sub.add_parser("pipeline", help="the main job: every stage in order, a report card at the end",
                       description="Every stage in order (world, tokenizer, pretraining, SFT and its experiments, "
                                   "reward model, DPO, evaluation) and a report card. A TrainConfig flag applies "
                                   "to every stage; the defaults shown are pretraining's, each stage has its own "
                                   "in the preset.")
    add_training_flags(p)
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
    p.add_argument("--out", default="runs/pipeline")
    p.add_argument("--seed-world", type=int, default=0, help="seed used when the world data must be generated")
    p.add_argument("--seeds", type=_seed_list, default=None, metavar="S,S,...",
                   help="run the whole job once per training seed (e.g. 0,1,2) into OUT/seed_S; the report shows "
                        "mean ± std over seeds")
    p.add_argument("--skip", action="append", metavar="STAGE",
                   help="skip a stage (repeatable): pretrain, base_eval, sft, sft_experiments, ...")
    p.add_argument("--with", dest="with_stages", action="append", metavar="STAGE", choices=["compress", "reasoning", "feedback"],
                   help="add an optional stage (repeatable): compress (lesson 10: pruning, quantization, "
                        "distillation), reasoning (lesson 11: chain of thought, test-time compute, RLVR), feedback "
                        "(lesson 12: judges, RLAIF, Constitutional AI); minutes more each on a CPU")
    p.set_defaults(func=cmd_pipeline)
    return parser


# ----------------------------------------------------------------------------- eval and the comparisons
def _optional_path(value: str) -> str | None:
    return None if value.lower() in ("", "none") else value


def add_eval_command(subparsers: argparse._SubParsersAction) -> None:
    """`minillm eval`: perplexity + multiple-choice accuracy of a run, printed and written as JSON."""
    p = subparsers.add_parser(
        "eval", help="perplexity and multiple-choice accuracy of a trained run",
        description="Validation perplexity (sliding window) and bits per byte, multiple-choice accuracy "
                    "(acc, acc_norm, acc_bytes) by log-likelihood ranking as lm-evaluation-harness does, and "
                    "optional robustness and contamination checks. Prints a table and writes JSON.")
    p.add_argument("--ckpt", default="runs/sft", help="run directory (config.json, ckpt.pt, tokenizer/)")
    p.add_argument("--ppl", type=_optional_path, default=DEFAULT_PPL,
                   help=f"text file for perplexity, documents separated by blank lines (default {DEFAULT_PPL}; "
                        "'none' skips)")
    p.add_argument("--mcq", type=_optional_path, default=DEFAULT_MCQ,
                   help=f"multiple-choice items: our JSONL, an MMLU CSV or HellaSwag JSONL (default {DEFAULT_MCQ}; "
                        "'none' skips)")
    p.add_argument("--fewshot-data", type=_optional_path, default=DEFAULT_FEWSHOT,
                   help=f"where few-shot examples come from (default {DEFAULT_FEWSHOT}; 'none': the evaluated items)")
    p.add_argument("--contamination", metavar="CORPUS", default=None,
                   help="training corpus to check the MCQ items against (n-gram overlap)")
    add_dataclass_flags(p, EvalConfig)
    p.add_argument("--device", default="auto", help="auto picks cuda > mps > cpu")
    p.add_argument("--out", default=None, help="JSON report (default: CKPT/eval.json)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> None:
    """Run `evaluate_run` with the command's flags, print the table, write the JSON report atomically."""
    out = check_writable(Path(args.out) if args.out else Path(args.ckpt) / "eval.json")  # before the scoring
    report = evaluate_run(args.ckpt, ppl=args.ppl, mcq=args.mcq, fewshot_data=args.fewshot_data,
                          contamination=args.contamination,
                          method=override(EvalConfig(), collect_overrides(args, EvalConfig)), device=args.device)
    write_json(out, report)
    print(render_table(report))
    print(f"wrote {out}")


def add_peft_compare_command(subparsers: argparse._SubParsersAction) -> None:
    """`python -m minillm peft-compare`: fine-tune one base run with every method and tabulate the costs."""
    p = subparsers.add_parser(
        "peft-compare", help="fine-tune one base model with full FT and every PEFT method; table + chart",
        description="Fine-tunes --init on the SFT data with full fine-tuning and each PEFT method (the preset's "
                    "sft settings; PEFT methods get --peft-lr), then writes table.md, comparison.png and "
                    "results.json to --out: trainable parameters, adapter size, training time and bytes, "
                    "held-out exact match, and forward slowdown unmerged/merged.",
    )
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="whose sft TrainConfig (default: cpu)")
    add_dataclass_flags(p, TrainConfig, "sft")
    p.add_argument("--init", default="runs/pipeline/base", help="base run directory (default: runs/pipeline/base)")
    p.add_argument("--data", default="data/world/sft_train.jsonl", help="SFT training chats")
    p.add_argument("--test-data", default="data/world/sft_test.jsonl", help="held-out questions for exact match")
    p.add_argument("--out", default="runs/peft_compare")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated subset of {','.join(compare.DEFAULT_METHODS)} (default: all)")
    p.add_argument("--peft-lr", type=float, default=None,
                   help=f"learning rate of the PEFT methods (default: {compare.PEFT_LR_MULTIPLIER:g} x the full-FT lr)")
    p.add_argument("--analytic-preset", default="gpu", choices=sorted(PRESETS),
                   help="preset whose parameter counts are tabulated analytically (default: gpu)")
    p.add_argument("--timing-repeats", type=int, default=5, help="at least N timed forward passes (default: 5)")
    p.add_argument("--timing-seconds", type=float, default=3.0,
                   help="time budget per method for the forward timing (default: 3)")
    p.add_argument("--no-chat-tokens", action="store_true",
                   help="do not train the chat template tokens' embeddings in PEFT runs (the ablation)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each PEFT run's ckpt.pt (by default only adapter.pt, since ckpt.pt repeats the base)")
    p.set_defaults(func=cmd_peft_compare)


def cmd_peft_compare(args: argparse.Namespace) -> None:
    """Run `compare.compare_methods` with the command's flags (it checks --init and --peft-lr first)."""
    summary = compare.compare_methods(args.init, args.data, args.test_data, args.out, stage_train_config(args, "sft"),
                                      methods=compare.parse_methods(args.methods), peft_lr=args.peft_lr,
                                      analytic_preset=args.analytic_preset, timing_repeats=args.timing_repeats,
                                      timing_seconds=args.timing_seconds, keep_checkpoints=args.keep_checkpoints,
                                      chat_tokens=not args.no_chat_tokens)
    print(compare.render_table(summary["rows"]))
    print(f"[peft-compare] wrote {Path(args.out) / 'table.md'}")


def add_qlora_compare_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `qlora-compare`."""
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="whose sft TrainConfig (default: cpu)")
    add_dataclass_flags(p, TrainConfig, "sft")
    p.add_argument("--init", default="runs/pipeline/base", help="base run directory (default: runs/pipeline/base)")
    p.add_argument("--data", default="data/world/sft_train.jsonl", help="SFT training chats")
    p.add_argument("--test-data", default="data/world/sft_test.jsonl", help="held-out questions for exact match")
    p.add_argument("--out", default="runs/qlora_compare", help="output directory (table.md, results.json, runs)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated subset of {','.join(compare.QLORA_SPECS)} "
                        f"(default: {','.join(compare.QLORA_METHODS)})")
    p.add_argument("--peft-lr", type=float, default=None,
                   help=f"learning rate of LoRA/QLoRA (default: {compare.PEFT_LR_MULTIPLIER:g} x the full-FT lr)")
    p.add_argument("--lora-r", type=int, default=compare.LORA_R, help=f"LoRA rank r (default: {compare.LORA_R})")
    p.add_argument("--lora-alpha", type=float, default=compare.LORA_ALPHA,
                   help=f"lora_alpha (default: {compare.LORA_ALPHA})")
    p.add_argument("--no-chat-tokens", action="store_true",
                   help="do not train the chat tokens' embedding rows in the adapter runs")
    p.add_argument("--gaussian-numel", type=int, default=2**20,
                   help="Gaussian values in the quantisation error table (default: 2^20)")
    p.set_defaults(func=cmd_qlora_compare)


def add_qlora_compare_command(subparsers: argparse._SubParsersAction) -> None:
    """`python -m minillm qlora-compare`: QLoRA vs LoRA vs full fine-tuning, and the NF4/FP4/int4 errors."""
    p = subparsers.add_parser(
        "qlora-compare", help="QLoRA vs LoRA vs full fine-tuning (exact match, time, bytes); NF4/FP4/int4 error",
        description="Fine-tunes --init on the SFT data with full fine-tuning, LoRA and QLoRA (same steps; "
                    "LoRA/QLoRA on every linear layer with the same r, alpha and --peft-lr), measures held-out "
                    "exact match, training time and bytes, tabulates the quantisation error of NF4, FP4 and "
                    "int4 on Gaussian and on the base run's weights, and writes table.md and results.json "
                    "to --out.")
    add_qlora_compare_arguments(p)


def cmd_qlora_compare(args: argparse.Namespace) -> None:
    """Run `compare.compare_qlora` with the command's flags (it checks --init and --peft-lr first)."""
    methods = compare.parse_methods(args.methods, compare.QLORA_SPECS, compare.QLORA_METHODS)
    summary = compare.compare_qlora(args.init, args.data, args.test_data, args.out, stage_train_config(args, "sft"),
                                    methods, args.peft_lr, args.lora_r, args.lora_alpha, not args.no_chat_tokens,
                                    args.gaussian_numel)
    print(compare.render_qlora_table(summary["rows"]))
    print(compare.render_error_table(summary["errors"]))
    print(f"[qlora-compare] wrote {Path(args.out) / 'table.md'}")


def check_not_overwriting_a_run(args: argparse.Namespace) -> None:
    """A training command whose --out already holds a run would replace its checkpoint and metrics."""
    if not hasattr(args, "overwrite") or args.overwrite or getattr(args, "resume", False):
        return
    found = [name for name in ("ckpt.pt", "adapter.pt") if (Path(args.out) / name).exists()]
    if found:
        how = "--resume to continue it or --overwrite to replace it" if hasattr(args, "resume") else \
            "--overwrite to replace it"
        raise FileExistsError(f"--out {args.out} already holds a run ({found[0]}); pass {how}")


def check_not_overwriting_init(args: argparse.Namespace) -> None:
    """A training command whose --out is its --init would write the new model over the one it starts from."""
    init, out = getattr(args, "init", None), getattr(args, "out", None)
    if init and out and Path(init).resolve() == Path(out).resolve():
        raise ValueError(f"--out {out} is the --init run: training would overwrite the model it starts from; "
                         "choose another --out")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm-eval"] and not {"-h", "--help"} & set(argv[1:2]):
        # every later argument belongs to lm-eval (argparse would try to read its --flags as ours)
        argv = ["lm-eval", "--", *argv[1:]]
    args = build_parser().parse_args(argv)
    try:
        check_not_overwriting_init(args)
        check_not_overwriting_a_run(args)
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
        print(f"minillm {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
