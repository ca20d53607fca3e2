"""Matplotlib figures used by the lessons and the pipeline report.

Figures are built with `matplotlib.figure.Figure` directly rather than pyplot: saving a file then needs no
screen and never switches the global backend, so a notebook's inline plots keep working after a training run.
"""
from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure


def save_figure(fig: Figure, png_path: str | Path) -> Path:
    """Write the PNG through a temporary file and a rename."""
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(png_path)
    return png_path


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path, title: str = "loss") -> Path:
    """Train loss (and validation loss where measured) against the step, from metrics.jsonl."""
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per unit)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, png_path)


def plot_series(x: list[float], series: dict[str, list[float]], png_path: str | Path, xlabel: str = "",
                ylabel: str = "", title: str = "", logx: bool = False) -> Path:
    """One line per named series over shared x values."""
    fig = Figure(figsize=(5, 3.2))
    ax = fig.add_subplot()
    for name, ys in series.items():
        ax.plot(x, ys, "o-", label=name)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, png_path)


def plot_frontier(points: dict[str, list[tuple[float, float]]], png_path: str | Path,
                  xlabel: str = "KL(pi || pi_ref) per response (nats)", ylabel: str = "gold reward",
                  title: str = "reward vs KL") -> Path:
    """One marker line per method through its (KL, reward) points, e.g. PPO/GRPO/DPO runs and best-of-N."""
    fig = Figure(figsize=(5.5, 3.6))
    ax = fig.add_subplot()
    for name, xy in points.items():
        xy = sorted(xy)
        ax.plot([x for x, _ in xy], [y for _, y in xy], "o-" if len(xy) > 1 else "o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, png_path)


def plot_pruning(rows: list[dict], png: str | Path) -> Path:
    """Perplexity and fact completion against the share of block weights removed, one line per method."""
    fig = Figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 2)
    dense = next(r for r in rows if r["method"] == "dense")
    for key, ax, label in (("ppl", axes[0], "validation perplexity (log scale)"),
                           ("fact_completion", axes[1], "fact completion")):
        for method, marker in (("magnitude", "o-"), ("wanda", "s-"), ("structured", "^-")):
            pts = [(0.0, dense[key])] + [(r["removed"], r[key]) for r in rows
                                        if r["method"] == method and not r["recovered"]]
            ax.plot(*zip(*pts), marker, label=method)
        for r in rows:
            if r["recovered"]:
                ax.plot(r["removed"], r[key], "*", ms=11, color="k")
        for method, marker, color, label in (("2:4", "D", "tab:red", "2:4 (Wanda)"),
                                             ("l0", "P", "tab:purple", "L0 gates (structured)")):
            point = [r for r in rows if r["method"] == method and not r["recovered"]]
            if point:
                ax.plot(point[0]["removed"], point[0][key], marker, color=color, label=label)
        ax.plot([], [], "*", color="k", label="after recovery (50%)")
        ax.set_xlabel("share of block weights removed")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if key == "ppl":
            ax.set_yscale("log")
    axes[1].legend(fontsize=8)
    fig.suptitle("pruning the base model")
    fig.tight_layout()
    return save_figure(fig, png)


def plot_alignment_tax(rows: list[dict], png: str | Path, title: str = "the alignment tax") -> Path:
    """Pretraining validation perplexity and fact completion of each model (rows of `alignment_tax`), as bars."""
    fig = Figure(figsize=(10, 3.4))
    axes = fig.subplots(1, 2)
    names = [r["model"] for r in rows]
    for ax, key, label in ((axes[0], "perplexity", "pretraining validation perplexity"),
                           (axes[1], "fact_completion", "fact completion (held-out phrasing)")):
        ax.bar(names, [r[key] for r in rows], color="tab:blue")
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=30)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, png)
