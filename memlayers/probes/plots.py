"""Pictures and tables of probe records: depth x length heatmaps, retention curves, markdown.

matplotlib is imported inside the functions (``import memlayers`` stays light) and drawn with the
Agg canvas directly, so plotting works on machines without a display and never changes the
caller's pyplot backend.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence

# matplotlib is optional (the extra memlayers[plots]); without it runs write records and summary.md only.
PLOTS_INSTALL = "pip install 'memlayers[plots]'"

# The red-yellow-green of the customary needle-in-a-haystack heatmaps (0 = red, 1 = green).
HEATMAP_COLORS = ("#F0496E", "#EBB839", "#0CD79F")

AXIS_LABELS = {
    "context_length": "Context length (tokens)",
    "depth": "Needle depth (%)",
    "distance": "Intervening tokens",
    "load": "Further facts written",
    "seq_len": "Sequence length (tokens)",
    "num_kv_pairs": "Key-value pairs",
    "after_batch": "Last fact batch injected",
    "facts_batch": "Fact batch asked about",
}


def plots_available() -> bool:
    """Whether matplotlib can be imported (the heatmaps and curves need it; summaries do not)."""
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        return False
    return True


def fmt_tokens(n: int) -> str:
    """1024 -> '1k', 1536 -> '1.5k', 1000 -> '1000'."""
    if n >= 1024 and n % 512 == 0:
        return f"{n / 1024:g}k"
    return str(n)


def _label(axis: str, v) -> str:
    if axis == "depth":
        return f"{100 * v:g}"
    if axis in ("context_length", "distance", "seq_len"):
        return fmt_tokens(int(v))
    return f"{v:g}" if isinstance(v, float) else str(v)


def grid(records: Sequence[Dict], x: str, y: str):
    """``(xs, ys, scores)`` with ``scores[i][j]`` the mean score at ``(ys[i], xs[j])`` (None if missing)."""
    if not records:
        raise ValueError("records must not be empty")
    for r in records:
        if x not in r or y not in r or "score" not in r:
            raise ValueError(f"every record needs {x!r}, {y!r} and 'score'; got keys {sorted(r)}")
    xs = sorted({r[x] for r in records})
    ys = sorted({r[y] for r in records})
    sums: Dict = {}
    for r in records:
        s = sums.setdefault((r[y], r[x]), [0.0, 0])
        s[0] += r["score"]
        s[1] += 1
    scores = [[(sums[(yv, xv)][0] / sums[(yv, xv)][1]) if (yv, xv) in sums else None for xv in xs] for yv in ys]
    return xs, ys, scores


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def plot_heatmap(records: Sequence[Dict], path, *, x: str = "context_length", y: str = "depth", title: Optional[str] = None) -> Path:
    """Save a heatmap of mean score per (``y``, ``x``) cell, red (0) to green (1) on a fixed 0..1
    scale, each cell annotated; missing cells are blank. Returns the PNG path."""
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap

    xs, ys, scores = grid(records, x, y)
    data = np.array([[np.nan if v is None else v for v in row] for row in scores], dtype=float)
    fig = _figure(max(4.5, 1.0 + 0.9 * len(xs)), max(3.0, 1.2 + 0.45 * len(ys)))
    ax = fig.add_subplot(1, 1, 1)
    cmap = LinearSegmentedColormap.from_list("needle", HEATMAP_COLORS)
    im = ax.imshow(data, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    for i in range(len(ys)):
        for j in range(len(xs)):
            if not np.isnan(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=8, color="black")
    ax.set_xticks(range(len(xs)), [_label(x, v) for v in xs])
    ax.set_yticks(range(len(ys)), [_label(y, v) for v in ys])
    ax.set_xlabel(AXIS_LABELS.get(x, x))
    ax.set_ylabel(AXIS_LABELS.get(y, y))
    if title:
        ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="Score")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def plot_curves(records: Sequence[Dict], path, *, x: str = "distance", y: str = "load", title: Optional[str] = None) -> Path:
    """Save retention curves side by side: score vs ``x`` (one line per ``y``) and score vs ``y``
    (one line per ``x``), y-axis fixed to 0..1. Returns the PNG path."""
    xs, ys, scores = grid(records, x, y)
    fig = _figure(10, 4)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, yv in enumerate(ys):
        pts = [(xv, scores[i][j]) for j, xv in enumerate(xs) if scores[i][j] is not None]
        left.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{y} = {_label(y, yv)}")
    for j, xv in enumerate(xs):
        pts = [(yv, scores[i][j]) for i, yv in enumerate(ys) if scores[i][j] is not None]
        right.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{x} = {_label(x, xv)}")
    from matplotlib.ticker import MaxNLocator

    for ax, axis, values in ((left, x, xs), (right, y, ys)):
        if all(isinstance(v, int) for v in values):  # counts and batch numbers: no fractional ticks
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(AXIS_LABELS.get(axis, axis))
        ax.set_ylabel("Score")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def summary_markdown(records: Sequence[Dict], *, x: str, y: str, title: Optional[str] = None) -> str:
    """A markdown table of mean scores: one row per ``y`` value, one column per ``x`` value, with
    row means, column means and the overall mean.

    Example:
        >>> print(summary_markdown([{"context_length": 1024, "depth": 0.5, "score": 1.0}], x="context_length", y="depth"))
        | Needle depth (%) \\ Context length (tokens) | 1k | mean |
        | --- | --- | --- |
        | 50 | 1.00 | 1.00 |
        | mean | 1.00 | 1.00 |
    """
    xs, ys, scores = grid(records, x, y)

    def mean(vals: List) -> str:
        vals = [v for v in vals if v is not None]
        return f"{sum(vals) / len(vals):.2f}" if vals else "-"

    lines = [f"## {title}", ""] if title else []
    lines.append(f"| {AXIS_LABELS.get(y, y)} \\ {AXIS_LABELS.get(x, x)} | " + " | ".join(_label(x, v) for v in xs) + " | mean |")
    lines.append("| " + " | ".join(["---"] * (len(xs) + 2)) + " |")
    for i, yv in enumerate(ys):
        cells = ["-" if v is None else f"{v:.2f}" for v in scores[i]]
        lines.append(f"| {_label(y, yv)} | " + " | ".join(cells) + f" | {mean(scores[i])} |")
    col = [mean([scores[i][j] for i in range(len(ys))]) for j in range(len(xs))]
    lines.append("| mean | " + " | ".join(col) + f" | {mean([v for row in scores for v in row])} |")
    return "\n".join(lines)
