"""The evaluation report: `report.json`, `report.md` and `report.png` from per-item score rows.

A row is `{"item", "method", "score", "group", "split"}`; other numeric keys (e.g. `nll`) are
averaged too. Methods `base` (no LoRA) and `oracle` (the task's own expert) are the two anchors:
a method's *gain recovered* is (mean_m − mean_base) / (mean_oracle − mean_base), all three means
over the same items, those that have base, oracle and the method. Several rows for one (split,
method, item), e.g. samples, are averaged into one per-item score first.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..adapters import atomic
from ..errors import LoragenError
from .chart import spread_chart

BASE, ORACLE = "base", "oracle"
ALL = "all"  # the split name of rows without one
KEYS = ("item", "method", "score", "group", "split")


def _check(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row.get("item"), str) or not isinstance(row.get("method"), str):
            raise LoragenError(f"report row {i} needs string 'item' and 'method'")
        score = row.get("score")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise LoragenError(f"report row {i} ({row['item']}, {row['method']}) needs a finite 'score', got {score!r}")
        out.append({"group": None, "split": None, **row, "score": float(score)})
    return out


def _ordered_methods(rows: list[dict[str, Any]]) -> list[str]:
    seen = list(dict.fromkeys(r["method"] for r in rows))
    middle = [m for m in seen if m not in (BASE, ORACLE)]
    return [m for m in (BASE,) if m in seen] + middle + [m for m in (ORACLE,) if m in seen]


def _per_item(rows: list[dict[str, Any]], key: str = "score") -> dict[str, dict[str, float]]:
    """{method: {item: mean of `key` over that pair's rows}}."""
    acc: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            acc.setdefault(r["method"], {}).setdefault(r["item"], []).append(float(v))
    return {m: {i: sum(vs) / len(vs) for i, vs in items.items()} for m, items in acc.items()}


def _extras(rows: list[dict[str, Any]]) -> list[str]:
    keys = dict.fromkeys(k for r in rows for k, v in r.items()
                         if k not in KEYS and isinstance(v, (int, float)) and not isinstance(v, bool))
    return list(keys)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def gain_recovered(scores: Mapping[str, Mapping[str, float]], method: str) -> tuple[float | None, int]:
    """(fraction of the oracle's gain over base recovered by `method`, number of items it used)."""
    base, oracle, mine = scores.get(BASE, {}), scores.get(ORACLE, {}), scores.get(method, {})
    items = [i for i in mine if i in base and i in oracle]
    if not items:
        return None, 0
    b = _mean([base[i] for i in items])
    gap = _mean([oracle[i] for i in items]) - b
    if abs(gap) < 1e-12:
        return None, len(items)
    return (_mean([mine[i] for i in items]) - b) / gap, len(items)


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{split: {method: {n, mean, median, std, min, max, gain_recovered, gain_items, mean_<extra>}}}."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for split in dict.fromkeys(r["split"] or ALL for r in rows):
        srows = [r for r in rows if (r["split"] or ALL) == split]
        scores = _per_item(srows)
        extras = {k: _per_item(srows, k) for k in _extras(srows)}
        table: dict[str, dict[str, Any]] = {}
        for m in _ordered_methods(srows):
            vals = list(scores[m].values())
            gain, gain_items = gain_recovered(scores, m)
            table[m] = {"n": len(vals), "mean": _mean(vals), "median": statistics.median(vals),
                        "std": statistics.pstdev(vals), "min": min(vals), "max": max(vals),
                        "gain_recovered": gain, "gain_items": gain_items}
            for k, per in extras.items():
                if per.get(m):
                    table[m][f"mean_{k}"] = _mean(list(per[m].values()))
        out[split] = table
    return out


def group_means(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """{split: {group: {method: mean per-item score}}} for rows that have a group."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for r in rows:
        if r["group"] is not None:
            out.setdefault(r["split"] or ALL, {}).setdefault(str(r["group"]), {})
    for split, groups in out.items():
        for g in groups:
            scores = _per_item([r for r in rows if (r["split"] or ALL) == split and str(r["group"]) == g])
            groups[g] = {m: _mean(list(v.values())) for m, v in scores.items()}
    return out


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "–"
    text = f"{v:.0%}" if pct else f"{v:.3f}"
    return text.lstrip("-") if text.strip("-0.%") == "" else text  # no "-0%"


def markdown(report: dict[str, Any]) -> str:
    metric = report["metric"]
    lines = [f"# {report['title']}", "",
             f"Metric: {metric}, per item, then summarised per method. *Gain recovered* = "
             f"(mean − mean_base) / (mean_oracle − mean_base) over the items that have an oracle "
             f"(their number in brackets).", ""]
    for split, table in report["summary"].items():
        extras = list(dict.fromkeys(k for s in table.values() for k in s if k.startswith("mean_")))
        extra_heads = "".join(f" {k.replace('_', ' ')} |" for k in extras)
        lines += [f"## {split}", "", "| method | n | mean | median | gain recovered |" + extra_heads,
                  "|---|---:|---:|---:|---:|" + "---:|" * len(extras)]
        for m, s in table.items():
            gain = f"{_fmt(s['gain_recovered'], pct=True)} ({s['gain_items']})" if s["gain_items"] else "–"
            lines.append(f"| {m} | {s['n']} | {s['mean']:.3f} | {s['median']:.3f} | {gain} |"
                         + "".join(f" {_fmt(s.get(k))} |" for k in extras))
        groups = report["groups"].get(split)
        if groups:
            methods = list(table)
            lines += ["", f"Mean {metric} per group:", "",
                      "| group | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
            for g, means in sorted(groups.items()):
                lines.append(f"| {g} | " + " | ".join(_fmt(means.get(m)) for m in methods) + " |")
        lines.append("")
    lines += ["![per-item spread per method](report.png)", ""]
    return "\n".join(lines)


def write_report(rows: Sequence[Mapping[str, Any]], out_dir: str | Path, *, title: str,
                 metric: str = "accuracy") -> dict[str, Any]:
    """Write report.json, report.md and report.png under `out_dir`; return report.json's content."""
    checked = _check(rows)
    if not checked:
        raise LoragenError("no scores to report (no item had instances to evaluate on?)")
    out_dir = Path(out_dir)
    report = {"title": title, "metric": metric, "summary": summarise(checked), "groups": group_means(checked),
              "rows": checked}
    atomic.write_bytes(out_dir / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    atomic.write_bytes(out_dir / "report.md", markdown(report).encode())
    scores = {split: _per_item([r for r in checked if (r["split"] or ALL) == split]) for split in report["summary"]}
    atomic.write_bytes(out_dir / "report.png", spread_chart(scores, report["summary"], title=title, metric=metric))
    return report
