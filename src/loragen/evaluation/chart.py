"""`report.png`: per method, the spread of per-item scores (box + points), one panel per split."""

from __future__ import annotations

import io
import random
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


ANCHORS = (("base", "grey"), ("oracle", "tab:green"))  # dashed lines at these methods' means


def spread_chart(scores: dict[str, dict[str, dict[str, float]]], summary: dict[str, dict[str, dict[str, Any]]], *,
                 title: str, metric: str) -> bytes:
    """PNG bytes from `scores` = {split: {method: {item: score}}}; `summary` (report.summarise)
    fixes the splits, the method order and the means."""
    splits = list(summary)
    width = max(6.0, 0.75 * max(len(t) for t in summary.values()) + 2.0)
    fig, axes = plt.subplots(len(splits), 1, figsize=(width, 3.6 * len(splits)), squeeze=False)
    jitter = random.Random(0)
    for ax, split in zip(axes[:, 0], splits):
        methods = list(summary[split])
        data = [list(scores[split][m].values()) for m in methods]
        ax.boxplot(data, showfliers=False, widths=0.55, medianprops={"color": "black"})
        for x, values in enumerate(data, start=1):
            xs = [x + jitter.uniform(-0.18, 0.18) for _ in values]
            ax.scatter(xs, values, s=10, alpha=0.55, color="tab:blue", zorder=3, linewidths=0)
            ax.scatter([x], [summary[split][methods[x - 1]]["mean"]], marker="D", s=28, color="tab:red", zorder=4)
        for anchor, colour in ANCHORS:
            if anchor in summary[split]:
                ax.axhline(summary[split][anchor]["mean"], ls="--", lw=1, color=colour, label=f"{anchor} mean")
        ax.set_xticks(range(1, len(methods) + 1), [f"{m}\n(n={len(d)})" for m, d in zip(methods, data)],
                      rotation=30 if len(methods) > 8 else 0, fontsize=8)
        ax.set_ylabel(metric)
        ax.set_title(f"{split}: per-item {metric} (box: quartiles, ◆: mean)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
