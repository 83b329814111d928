"""Figures people look at: accuracy matrix, selection frequency, prototype-vs-task similarity."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def heatmap(
    matrix: Sequence[Sequence[float | None]],
    *,
    rows: Sequence[str],
    cols: Sequence[str],
    title: str,
    path: Path,
    fmt: str = "{:.1f}",
    cmap: str = "viridis",
    xlabel: str = "",
    ylabel: str = "",
) -> Path:
    """Annotated heatmap; ``None`` cells (e.g. the upper triangle of an accuracy matrix) blank."""
    data = [[math.nan if v is None else float(v) for v in row] + [math.nan] * (len(cols) - len(row)) for row in matrix]
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(cols), 1.0 + 0.6 * len(rows)))
    im = ax.imshow(data, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(cols)), labels=cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), labels=rows)
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, fmt.format(v), ha="center", va="center", color="w", fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
