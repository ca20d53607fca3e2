"""`python -m minillm <command>`: one sub-command per stage. `python -m minillm <command> --help` for flags.

Every training command starts from a preset (`--preset tiny|cpu|gpu`) and lets any field of the network
(`--n-layer`, `--n-embd`, ...) or of the optimisation (`--max-steps`, `--lr`, ...) be overridden by a flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from minillm.config import PRESETS, TrainConfig, get_preset, override
from minillm.model import GPTConfig

DEFAULT_DATA = "data/world"
DEFAULT_TOKENIZER = "data/tokenizer"


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One `--field-name` flag per dataclass field, typed like its default, defaulting to None (= preset)."""
    group = parser.add_argument_group(f"{cls.__name__} overrides (default: the preset's value)")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            group.add_argument(flag, dest=f"{cls.__name__}.{f.name}", action=argparse.BooleanOptionalAction,
                               default=None)
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(f.type), type(f.default))
            group.add_argument(flag, dest=f"{cls.__name__}.{f.name}", type=kind, default=None, metavar=kind.__name__.upper())


def collect_overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    prefix = cls.__name__ + "."
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}


def resolve_configs(args: argparse.Namespace, vocab_size: int) -> tuple[GPTConfig, TrainConfig]:
    """Preset, then the flags the user gave; the vocabulary always comes from the tokenizer."""
    preset = get_preset(args.preset)
    model_cfg = override(preset.model, {**collect_overrides(args, GPTConfig), "vocab_size": vocab_size})
    train_cfg = override(preset.pretrain, collect_overrides(args, TrainConfig))
    return model_cfg, train_cfg


def add_training_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="named configuration (default: cpu)")
    add_dataclass_flags(p, GPTConfig, skip=("vocab_size",))
    add_dataclass_flags(p, TrainConfig)


# ----------------------------------------------------------------------------- commands
def cmd_world(args: argparse.Namespace) -> None:
    from minillm.world import write_world

    paths = write_world(args.seed, args.out)
    for name, path in paths.items():
        print(f"{name:16s} {path}  ({Path(path).stat().st_size:,} bytes)")


def cmd_tokenizer(args: argparse.Namespace) -> None:
    from minillm.tokenizer import Tokenizer

    t0 = time.perf_counter()
    tok = Tokenizer.train(args.corpus, args.vocab_size)
    seconds = time.perf_counter() - t0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = tok.save(args.out)
    print(f"trained a {tok.vocab_size}-token BPE on {args.corpus} in {seconds:.2f}s -> {path}")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from minillm.pretrain import pretrain
    from minillm.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    model_cfg, train_cfg = resolve_configs(args, tok.vocab_size)
    data = Path(args.data)
    _, result = pretrain(tok, data / "corpus_train.txt", data / "corpus_val.txt", model_cfg, train_cfg, args.out,
                         resume=args.resume)
    print(json.dumps(dataclasses.asdict(result), indent=2))


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from minillm.pretrain import load_run
    from minillm.sampling import generate_completions

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


def stage_train_config(args: argparse.Namespace, stage: str) -> TrainConfig:
    """The preset's config for a fine-tuning stage with the user's --flag overrides."""
    return override(getattr(get_preset(args.preset), stage), collect_overrides(args, TrainConfig))


def cmd_sft(args: argparse.Namespace) -> None:
    from minillm.finetune import run_sft

    cfg = stage_train_config(args, "sft")
    _, result, stats = run_sft(args.init, args.data, args.out, cfg, peft=peft_spec(args), packing=args.pack,
                               loss_on=args.loss_on, limit=args.limit, resume=args.resume)
    print(json.dumps({**dataclasses.asdict(result), **stats}, indent=2))


def add_peft_flags(p: argparse.ArgumentParser) -> None:
    from minillm.peft.apply import PEFT_METHODS

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


def cmd_memory(args: argparse.Namespace) -> None:
    """Weights / gradients / AdamW state by fine-tuning method, for a preset or a named GPT-2 shape."""
    from minillm.memory import MODEL_PRESETS, format_memory_table, gpt2_param_count, memory_table

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
    from minillm.pipeline import run_pipeline

    run_pipeline(args)


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
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("sft", help="supervised fine-tuning on chats (loss on the assistant tokens)")
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="named configuration (default: cpu)")
    add_dataclass_flags(p, TrainConfig)
    add_peft_flags(p)
    p.add_argument("--init", default="runs/base", help="run directory to start from")
    p.add_argument("--data", default=f"{DEFAULT_DATA}/sft_train.jsonl", help="JSONL/JSON: messages or Alpaca records")
    p.add_argument("--out", default="runs/sft")
    p.add_argument("--pack", action="store_true", help="pack several short chats into one row")
    p.add_argument("--loss-on", choices=["response", "all"], default="response",
                   help="which tokens carry the loss (all = the masking ablation)")
    p.add_argument("--limit", type=int, default=None, help="use only N conversations (data-size experiments)")
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=cmd_sft)

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

    from minillm.align.dpo_train import add_dpo_command
    from minillm.align.onpolicy import add_pairs_command
    from minillm.align.rm_train import add_reward_command
    from minillm.eval.run import add_eval_command
    from minillm.memory import MODEL_PRESETS
    from minillm.peft.compare import add_peft_compare_command
    from minillm.quant.experiment import add_qlora_compare_command

    add_reward_command(sub)
    add_dpo_command(sub)
    add_pairs_command(sub)
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

    p = sub.add_parser("pipeline", help="the main job: every stage in order, a report card at the end")
    add_training_flags(p)
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
    p.add_argument("--out", default="runs/pipeline")
    p.add_argument("--seed-world", type=int, default=0, help="seed used when the world data must be generated")
    p.add_argument("--skip", action="append", metavar="STAGE",
                   help="skip a stage (repeatable): pretrain, base_eval, sft, sft_experiments, ...")
    p.set_defaults(func=cmd_pipeline)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"minillm {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
