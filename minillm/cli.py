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

    p = sub.add_parser("pipeline", help="the main job: every stage in order, a report card at the end")
    add_training_flags(p)
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
    p.add_argument("--out", default="runs/pipeline")
    p.add_argument("--seed-world", type=int, default=0, help="seed used when the world data must be generated")
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
