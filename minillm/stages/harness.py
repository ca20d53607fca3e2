"""Our model inside EleutherAI's lm-evaluation-harness: a `LM` class registered as "minillm".

lm-eval asks a model three things, and each is one of our functions:

    loglikelihood(context, continuation)   -> (sum log p(continuation | context), is_greedy)   `eval/loglik.py::loglikelihood`
    loglikelihood_rolling(text)            -> sum_i log p(x_i | x_<i), every token once        `eval/perplexity.py::rolling_loglikelihood`
    generate_until(context, until=[...])   -> greedy text, cut at the first stop string      `sampling.py::generate_completions`

so lm-eval's acc / acc_norm on a multiple-choice task and its word perplexity on a rolling task equal ours from
`evaluate_mcq` and `document_perplexity` (`tests/reference/test_lm_eval_reference.py`). lm-eval is an optional
dependency: `pip install lm_eval`, then

    python -m minillm lm-eval --model_args run=runs/pipeline/sft --tasks <task> [any lm_eval flag]

(lm-eval has no plugin mechanism, so the command registers the model and then runs lm-eval's own command line),
or from Python: `minillm.eval.harness.register()` and `lm_eval.simple_evaluate(model="minillm", ...)`.
"""
from __future__ import annotations

import sys
from typing import Any

from minillm.eval.loglik import loglikelihood
from minillm.eval.perplexity import rolling_loglikelihood
from minillm.runs import load_plain_run
from minillm.sampling import generate_completions
from minillm.utils import pick_device

__all__ = ["register", "minillm_lm_class", "run_lm_eval_cli"]

_CLASS: type | None = None


def minillm_lm_class() -> type:
    """The `lm_eval.api.model.LM` subclass for our runs (built once; lm-eval is imported only here)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    from lm_eval.api.model import LM  # optional dependency: only this adapter needs lm-eval

    class MinillmLM(LM):
        """model_args: run=<run directory> (required), batch_size=32, device=auto, max_length=<block_size>."""

        def __init__(self, run: str, batch_size: int | str = 32, device: str = "auto",
                     max_length: int | None = None, **_: Any) -> None:
            super().__init__()
            self.model, self.tok, _cfg = load_plain_run(run, device=pick_device(device))
            self.model.eval()
            self.batch = int(batch_size) if str(batch_size).isdigit() else 32
            self.max_length = None if max_length is None else int(max_length)

        @classmethod
        def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> "MinillmLM":
            # lm-eval's own --device defaults to cuda:0 even without a GPU: only model_args' device counts
            extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k != "device"}
            return cls(**{**extra, **arg_dict})

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "MinillmLM":
            return cls.create_from_arg_obj(dict(kv.split("=", 1) for kv in arg_string.split(",") if kv),
                                           additional_config)

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            pairs = [tuple(r.args) for r in requests]
            return loglikelihood(self.model, self.tok, pairs, batch_size=self.batch, max_length=self.max_length)

        def loglikelihood_rolling(self, requests) -> list[float]:
            return [rolling_loglikelihood(self.model, self.tok.encode(r.args[0]), self.tok.eot_id, self.max_length,
                                          self.batch) for r in requests]

        def generate_until(self, requests) -> list[str]:
            out = []
            for r in requests:
                context, kwargs = r.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                ids = self.tok.encode(context)
                gen = generate_completions(self.model, [ids], int(kwargs.get("max_gen_toks", 64)),
                                           eos_id=self.tok.eot_id, temperature=0.0)[0]
                text = self.tok.decode(gen)
                cuts = [text.index(s) for s in until if s and s in text]
                out.append(text[:min(cuts)] if cuts else text)
            return out

    _CLASS = MinillmLM
    return _CLASS


def register() -> type:
    """Register the class in lm-eval's model registry as "minillm" (idempotent); returns it."""
    from lm_eval.api.registry import get_model, register_model  # optional dependency

    cls = minillm_lm_class()
    try:
        if get_model("minillm") is cls:
            return cls
    except ValueError:
        pass
    register_model("minillm")(cls)
    return cls


def run_lm_eval_cli(argv: list[str]) -> None:
    """lm-eval's command line with "minillm" registered and `--model minillm` filled in."""
    from lm_eval.__main__ import cli_evaluate  # optional dependency

    register()
    if "--model" not in argv:
        argv = ["--model", "minillm", *argv]
    old = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = old
