"""The judge stage (`python -m minillm judge`): a model grades the world's preference pairs, against the gold reward.

For each held-out pair (x, chosen, rejected) the two answers go into the slots a and b in an order fixed by a
seeded coin (so the gold reward prefers slot a about half the time and a judge that always says "A" cannot look
good), and the judge (`minillm.eval.judge`) gives

    pairwise     P(a > b), both orders averaged          agreement and Cohen's kappa with the gold preference
    single       p("Yes") of each answer alone           agreement of s(a) > s(b) with gold
    position     share of pairs whose verdict follows the slot in both orders
    verbosity    share of the rambling pairs (gold prefers the short answer) where the judge picks the longer
    self-pref.   the judge's own greedy answers against another model's, on the held-out questions: how often the
                 judge prefers its own, next to how often the gold reward does (Panickssery et al. 2024)

Agreement per rejected kind shows what a judge can see (a rude word, a refusal) and what it cannot (a wrong fact
it does not know).
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from minillm.datasets import read_jsonl
from minillm.eval.judge import (
    PAIRWISE_TEMPLATE,
    agreement,
    check_template,
    cohen_kappa,
    length_preference,
    pairwise_preferences,
    position_bias,
    single_scores,
)
from minillm.eval.task import answer_questions
from minillm.runs import load_plain_run
from minillm.utils import atomic_write_text, write_json
from minillm.world import gold_reward, make_world

__all__ = ["gold_preference", "judge_pairs", "load_pairs", "render_judge_report", "run_judge", "self_preference"]


def load_pairs(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Preference rows {prompt (str), chosen, rejected, kind, rejected_kind} of a JSONL file; errors name file:line."""
    path = Path(path)
    rows = []
    for line, r in read_jsonl(path):
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(r.get(key), str) or not r[key].strip():
                raise ValueError(f"{path}:{line}: field {key!r} must be a non-empty string")
        rows.append({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
                     "kind": r.get("kind", "-"), "rejected_kind": r.get("rejected_kind", "-")})
    if not rows:
        raise ValueError(f"{path}: no preference pairs")
    return rows


def gold_preference(prompt: str, a: str, b: str, world) -> float:
    """1 if the gold reward prefers a, 0 if it prefers b, 1/2 on a tie."""
    ra, rb = gold_reward(prompt, a, world), gold_reward(prompt, b, world)
    return 1.0 if ra > rb else 0.0 if ra < rb else 0.5


def _decided(judge: list[float], gold: list[float]) -> tuple[list[float], list[float]]:
    """The pairs where gold is not a tie (agreement is undefined on a tie)."""
    keep = [i for i, g in enumerate(gold) if g != 0.5]
    return [judge[i] for i in keep], [gold[i] for i in keep]


def judge_pairs(judge, tok, pairs: list[dict[str, Any]], template: str = PAIRWISE_TEMPLATE, seed: int = 0,
                world=None) -> dict[str, Any]:
    """Pairwise and single-answer verdicts on `pairs`, in seeded slot orders, with the metrics of the module doc."""
    world = world if world is not None else make_world(0)
    coin = random.Random(seed)
    flips = [coin.random() < 0.5 for _ in pairs]
    a = [p["rejected"] if f else p["chosen"] for p, f in zip(pairs, flips)]
    b = [p["chosen"] if f else p["rejected"] for p, f in zip(pairs, flips)]
    q = [p["prompt"] for p in pairs]
    gold = [gold_preference(x, ya, yb, world) for x, ya, yb in zip(q, a, b)]
    pw = pairwise_preferences(judge, tok, q, a, b, template)
    s_a, s_b = single_scores(judge, tok, q, a), single_scores(judge, tok, q, b)
    single = [1.0 if x > y else 0.0 if x < y else 0.5 for x, y in zip(s_a, s_b)]
    j, g = _decided(pw["preference"], gold)
    sj, sg = _decided(single, gold)
    per_kind: dict[str, list[bool]] = {}
    for p, x, y in zip(pairs, pw["preference"], gold):
        if y != 0.5:
            per_kind.setdefault(p["rejected_kind"], []).append((x > 0.5) == (y > 0.5))
    rambling = [i for i, p in enumerate(pairs) if p["rejected_kind"] == "rambling"]
    return {
        "n": len(pairs), "n_decided": len(j),
        "pairwise_agreement": agreement(j, g), "pairwise_kappa": cohen_kappa(j, g),
        "single_agreement": agreement(sj, sg),
        "position_bias": position_bias(pw["a_first"], pw["b_first"]),
        "prefers_slot_a": sum(x > 0.5 for x in pw["a_first"]) / len(pairs),
        "verbosity_bias": (length_preference([pw["preference"][i] for i in rambling], [a[i] for i in rambling],
                                             [b[i] for i in rambling]) if rambling else None),
        "n_rambling": len(rambling),
        "agreement_per_kind": {k: sum(v) / len(v) for k, v in sorted(per_kind.items())},
        "rows": [{"prompt": x, "a": ya, "b": yb, "gold": gg, "judge": pp, "a_first": af, "b_first": bf,
                  "single_a": sa, "single_b": sb}
                 for x, ya, yb, gg, pp, af, bf, sa, sb in zip(q, a, b, gold, pw["preference"], pw["a_first"],
                                                               pw["b_first"], s_a, s_b)],
    }


def self_preference(judge, tok, other, other_tok, prompts: list[str], template: str = PAIRWISE_TEMPLATE,
                    world=None, own_model=None) -> dict[str, Any]:
    """The judge's greedy answers ("own"; `own_model`'s when given, e.g. the chat model a judge was fine-tuned
    from) against `other`'s on the same prompts; identical answers are dropped.

    judge_prefers_own = share of the remaining pairs where P(own > other) > 1/2; gold_prefers_own the same for
    the gold reward (ties count 1/2); self_preference = their difference (> 0: the judge favours itself).
    """
    world = world if world is not None else make_world(0)
    own = answer_questions((judge if own_model is None else own_model).eval(), tok, prompts, max_new_tokens=48)
    theirs = answer_questions(other.eval(), other_tok, prompts, max_new_tokens=48)
    keep = [i for i in range(len(prompts)) if own[i] != theirs[i]]
    if not keep:
        return {"n": 0, "judge_prefers_own": None, "gold_prefers_own": None, "self_preference": None}
    q = [prompts[i] for i in keep]
    pref = pairwise_preferences(judge, tok, q, [own[i] for i in keep], [theirs[i] for i in keep], template)
    gold = [gold_preference(q[k], own[i], theirs[i], world) for k, i in enumerate(keep)]
    judge_own = sum(p > 0.5 for p in pref["preference"]) / len(keep)
    gold_own = sum(gold) / len(keep)
    return {"n": len(keep), "judge_prefers_own": judge_own, "gold_prefers_own": gold_own,
            "self_preference": judge_own - gold_own,
            "examples": [{"prompt": q[k], "own": own[i], "other": theirs[i], "judge": pref["preference"][k],
                          "gold": gold[k]} for k, i in enumerate(keep[:8])]}


def run_judge(judge_run: str | os.PathLike, pairs: str | os.PathLike, out: str | os.PathLike,
              against: str | os.PathLike | None = None, questions: str | os.PathLike | None = None,
              template: str | None = None, seed: int = 0, own: str | os.PathLike | None = None) -> dict[str, Any]:
    """Judge the pairs with the chat model in `judge_run`; with `against` (a chat run) and `questions` (an SFT
    test file) also measure self-preference (of the judge's own answers, or those of the run `own`). Writes
    out/results.json and out/report.md; returns the summary."""
    template = template if template is not None else PAIRWISE_TEMPLATE
    check_template(template, ("question", "a", "b"))
    rows = load_pairs(pairs)
    if against is not None and questions is None:
        raise ValueError("--against needs --questions (an SFT test file whose user turns are asked)")
    judge, tok, _ = load_plain_run(judge_run)
    summary: dict[str, Any] = {"judge": str(judge_run), "pairs": str(pairs), "template": template,
                               **judge_pairs(judge, tok, rows, template, seed)}
    if against is not None:
        other, other_tok, _ = load_plain_run(against)
        prompts = [next(m["content"] for m in r["messages"] if m["role"] == "user")
                   for _, r in read_jsonl(questions) if "messages" in r]
        if not prompts:
            raise ValueError(f"{questions}: no chat records with a user turn ('messages')")
        own_model = None if own is None else load_plain_run(own)[0]
        summary["self"] = {"against": str(against), "own": str(own or judge_run),
                           **self_preference(judge, tok, other, other_tok, prompts, template, own_model=own_model)}
    out = Path(out)
    write_json(out / "results.json", summary)
    atomic_write_text(out / "report.md", render_judge_report(summary))
    return summary


def _f(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def render_judge_report(s: dict[str, Any]) -> str:
    """The judge's report in markdown: the headline metrics, agreement per rejected kind, self-preference."""
    lines = [f"# LLM-as-judge: {s['judge']} on {s['pairs']}", "",
             "| metric | value |", "| --- | ---: |",
             f"| pairs (gold decided) | {s['n']} ({s['n_decided']}) |",
             f"| pairwise agreement with gold (both orders averaged) | {_f(s['pairwise_agreement'])} |",
             f"| Cohen's kappa | {_f(s['pairwise_kappa'])} |",
             f"| single-answer agreement with gold | {_f(s['single_agreement'])} |",
             f"| position bias (same slot in both orders) | {_f(s['position_bias'])} |",
             f"| says A when the first answer is in slot A | {_f(s['prefers_slot_a'])} |",
             f"| verbosity bias (prefers the rambling answer, {s['n_rambling']} pairs) | {_f(s['verbosity_bias'])} |",
             "", "| rejected kind | agreement with gold |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.3f} |" for k, v in s["agreement_per_kind"].items()]
    if "self" in s:
        m = s["self"]
        lines += ["", f"Self-preference, {m['own']}'s answers against {m['against']}'s ({m['n']} questions whose "
                  f"answers differ): the judge prefers the first in {_f(m['judge_prefers_own'])} of them, the gold reward in "
                  f"{_f(m['gold_prefers_own'])}; self-preference {_f(m['self_preference'])}."]
    return "\n".join(lines) + "\n"
