"""Transfer figures with intervals: a method's share of the oracle's gain and its paired margins.

Every figure is a mean over tasks, and its 90 % interval resamples the *tasks* with replacement
(the same draw for every method, so margins are paired). A margin of m over a reference r is
mean_t(m_t − r_t): over `multitask` it is what the generator adds to one adapter for all tasks;
over `mismatched(m)` it is the *description effect*, what m gains from reading its own task's
description rather than another family's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

BASE, ORACLE, MULTITASK = "base", "oracle", "multitask"


def per_task(rows: Sequence[Mapping[str, Any]], split: str) -> dict[str, dict[str, float]]:
    """{method: {task: score}} for one split (several rows of a pair averaged)."""
    acc: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        if r.get("split") == split:
            acc.setdefault(r["method"], {}).setdefault(r["item"], []).append(float(r["score"]))
    return {m: {t: sum(v) / len(v) for t, v in items.items()} for m, items in acc.items()}


def _interval(values: np.ndarray, level: float) -> list[float]:
    low, high = np.nanquantile(values, [(1 - level) / 2, (1 + level) / 2])  # draws with no gap are undefined
    return [float(low), float(high)]


def transfer_table(rows: Sequence[Mapping[str, Any]], split: str, *, level: float = 0.9, draws: int = 4000,
                   seed: int = 0) -> dict[str, dict[str, Any]]:
    """{method: {mean, mean_ci, share, share_ci, over_multitask, over_multitask_ci,
    description_effect, description_effect_ci}} on the tasks every anchor scored."""
    scores = per_task(rows, split)
    if BASE not in scores or ORACLE not in scores:
        return {}
    tasks = sorted(set(scores[BASE]) & set(scores[ORACLE]))
    if not tasks:
        return {}
    picks = np.random.default_rng(seed).integers(0, len(tasks), size=(draws, len(tasks)))

    def vec(method: str) -> np.ndarray | None:
        got = scores.get(method, {})
        return np.array([got[t] for t in tasks]) if all(t in got for t in tasks) else None

    base, oracle = vec(BASE), vec(ORACLE)
    assert base is not None and oracle is not None
    gap, gap_draws = (oracle - base).mean(), (oracle - base)[picks].mean(1)
    multitask = vec(MULTITASK)
    table: dict[str, dict[str, Any]] = {}
    for method in scores:
        mine = vec(method)
        if mine is None:
            continue
        row: dict[str, Any] = {"tasks": len(tasks), "mean": float(mine.mean()), "mean_ci": _interval(mine[picks].mean(1), level)}
        if abs(gap) > 1e-12:
            row["share"] = float((mine - base).mean() / gap)
            row["share_ci"] = _interval((mine - base)[picks].mean(1) / np.where(gap_draws == 0, np.nan, gap_draws), level)
        for key, ref in (("over_multitask", multitask), ("description_effect", vec(f"mismatched({method})"))):
            if ref is not None and method != MULTITASK:
                diff = mine - ref
                row[key], row[f"{key}_ci"] = float(diff.mean()), _interval(diff[picks].mean(1), level)
        table[method] = row
    return table


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.0f} %"


def _pts(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:+.1f}"


def markdown_table(table: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per method: mean, share of the oracle's gain, margins over multitask and mismatched
    (in accuracy points), each with its 90 % interval."""
    lines = ["| method | mean accuracy | share of the oracle's gain | over multitask (points) | "
             "description effect (points) |", "|---|---|---|---|---|"]
    for method, r in table.items():
        if method.startswith("mismatched(") or method.startswith("random("):
            continue
        share = f"{_pct(r.get('share'))} ({_pct(r['share_ci'][0])}…{_pct(r['share_ci'][1])})" if "share" in r else "–"
        cells = [f"{r['mean']:.3f}", share]
        for key in ("over_multitask", "description_effect"):
            cells.append(f"{_pts(r[key])} ({_pts(r[key + '_ci'][0])}…{_pts(r[key + '_ci'][1])})" if key in r else "–")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    controls = [m for m in table if m.startswith(("mismatched(", "random("))]
    for method in controls:
        r = table[method]
        lines.append(f"| {method} | {r['mean']:.3f} | {_pct(r.get('share'))} | – | – |")
    return "\n".join(lines)
