"""`loragen.evaluation.report.write_report` on a small fixture with hand-computed numbers."""

from __future__ import annotations

import json
import math

import pytest

from loragen.errors import LoragenError
from loragen.evaluation.report import write_report

R = [  # (split, item, group, method, score[, nll])
    ("heldout", "a", "g1", "base", 0.2, 2.0), ("heldout", "a", "g1", "oracle", 0.6, 1.0),
    ("heldout", "a", "g1", "sg", 0.4, 1.5), ("heldout", "a", "g1", "weighted", 0.2, 2.0),
    ("heldout", "b", "g2", "base", 0.4, 3.0), ("heldout", "b", "g2", "oracle", 0.8, 1.0),
    ("heldout", "b", "g2", "sg", 0.6, 2.5), ("heldout", "b", "g2", "weighted", 0.4, 3.0),
    ("heldout", "c", "g1", "sg", 1.0, 0.5),  # no base, no oracle: counts in the mean, not in the gain
    ("train", "t", None, "base", 0.5), ("train", "t", None, "oracle", 0.5),
    ("train", "t", None, "sg", 0.5), ("train", "t", None, "sg", 0.7),  # two samples: averaged per item
]


def _rows():
    rows = []
    for split, item, group, method, score, *nll in R:
        row = {"item": item, "method": method, "score": score, "group": group, "split": split}
        if nll:
            row["nll"] = nll[0]
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    report = write_report(_rows(), out, title="fixture", metric="accuracy")
    return out, report


def test_summary_numbers(written):
    out, returned = written
    report = json.loads((out / "report.json").read_text())
    assert report["summary"] == returned["summary"] and report["metric"] == "accuracy"
    assert len(report["rows"]) == len(R)
    held = report["summary"]["heldout"]
    assert list(held) == ["base", "sg", "weighted", "oracle"]  # base first, oracle last
    sg = held["sg"]
    assert sg["n"] == 3 and sg["mean"] == pytest.approx(2.0 / 3) and sg["median"] == pytest.approx(0.6)
    # over a and b: base 0.3, oracle 0.7, sg 0.5 -> half the gain
    assert sg["gain_recovered"] == pytest.approx(0.5) and sg["gain_items"] == 2
    assert held["weighted"]["gain_recovered"] == pytest.approx(0.0)
    assert held["oracle"]["gain_recovered"] == pytest.approx(1.0)
    assert sg["mean_nll"] == pytest.approx((1.5 + 2.5 + 0.5) / 3)
    train = report["summary"]["train"]
    assert train["sg"]["n"] == 1 and train["sg"]["mean"] == pytest.approx(0.6)
    assert train["sg"]["gain_recovered"] is None  # oracle = base: no gain to recover
    assert report["groups"]["heldout"]["g1"]["sg"] == pytest.approx(0.7)
    assert report["groups"]["heldout"]["g2"]["oracle"] == pytest.approx(0.8)
    assert "train" not in report["groups"]  # no groups there


def test_markdown_table(written):
    out, _ = written
    md = (out / "report.md").read_text()
    assert md.startswith("# fixture")
    assert "## heldout" in md and "## train" in md
    assert "| sg | 3 | 0.667 | 0.600 | 50% (2) | 1.500 |" in md
    assert "| weighted | 2 | 0.300 | 0.300 | 0% (2) | 2.500 |" in md
    assert "| g1 | 0.200 | 0.700 | 0.200 | 0.600 |" in md  # per-group means, columns in method order
    assert "| sg | 1 | 0.600 | 0.600 | – (1) |" in md


def test_png_is_a_real_image(written):
    from PIL import Image

    out, _ = written
    png = out / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        width, height = im.size
    assert width >= 600 and height >= 2 * 300  # one panel per split, stacked


@pytest.mark.parametrize("bad, match", [
    ([], "no scores"),
    ([{"item": "a", "method": "sg"}], "finite 'score'"),
    ([{"item": "a", "method": "sg", "score": math.nan}], "finite 'score'"),
    ([{"item": 3, "method": "sg", "score": 0.1}], "string 'item'"),
])
def test_bad_rows_are_refused(tmp_path, bad, match):
    with pytest.raises(LoragenError, match=match):
        write_report(bad, tmp_path, title="bad")
    assert not (tmp_path / "report.json").exists()


def test_rows_without_split_or_group(tmp_path):
    rows = [{"item": "x", "method": "base", "score": 0.0}, {"item": "x", "method": "oracle", "score": 1.0},
            {"item": "x", "method": "sg", "score": 0.25}]
    report = write_report(rows, tmp_path, title="plain", metric="exact_match")
    assert list(report["summary"]) == ["all"] and report["groups"] == {}
    assert report["summary"]["all"]["sg"]["gain_recovered"] == pytest.approx(0.25)
    assert "exact_match" in (tmp_path / "report.md").read_text()


def test_oracle_share_interval_pairs_each_description_with_its_task_s_oracle():
    from loragen.bench.demo_eval import oracle_share_interval

    oracle = [{"method": "oracle", "split": "unseen", "task": f"t{i}", "exact_match": 0.8} for i in range(15)]
    right = [{"method": "sg", "split": "unseen", "task": f"t{i}", "exact_match": 0.8} for i in range(15)]
    assert oracle_share_interval(oracle + right, "sg", "unseen") == [1.0, 1.0]
    one_miss = [dict(r, exact_match=0.0) if r["task"] == "t0" else r for r in right]
    low, high = oracle_share_interval(oracle + one_miss, "sg", "unseen")
    assert low < 14 / 15 < high == 1.0  # one misread in 15: a 95 % target is inside the interval
    assert oracle_share_interval(oracle + one_miss, "sg", "unseen") == [low, high]  # seeded
    assert oracle_share_interval(one_miss, "sg", "unseen") is None  # no oracle rows on the split
    assert oracle_share_interval(oracle + right, "icm", "unseen") is None


def test_demo_table_shows_each_share_with_its_interval():
    from loragen.bench.demo_eval import markdown_table

    report = {"table": {"sg": {"unseen": 0.885, "dev": 0.795}, "oracle": {"unseen": 0.949, "dev": 0.953}},
              "oracle_share_90": {"sg": {"unseen": [0.80, 1.0], "dev": None}}}
    lines = markdown_table(report).splitlines()
    assert lines[2] == "| sg |  | 0.885 (93% of oracle; 90% CI 80%–100%) |  | 0.795 (83% of oracle) |  |"
    assert lines[3] == "| oracle |  | 0.949 (100% of oracle) |  | 0.953 (100% of oracle) |  |"


def test_demo_ambiguous_counts_split_failures_by_the_flag():
    from loragen.bench.demo_eval import ambiguous_counts, markdown_table

    row = lambda m, task, em, amb, split="blind": {"method": m, "split": split, "task": task,  # noqa: E731
                                                 "exact_match": em, "ambiguous": amb}
    rows = [row("sg", "a", 0.0, True), row("sg", "a", 0.9, True), row("sg", "b", 0.2, False),
            row("sg", "b", 0.8, False), row("sg", "b", 0.9, False), row("base", "a", 0.0, None),
            row("sg", "held", 0.0, True, "heldout")]
    counts = ambiguous_counts(rows, {"a": 1.0, "b": 0.5})  # failing: below half the task's oracle
    assert counts == {"sg": {"blind": [2, 1, 3, 1]}}  # no flag (base) and tasks without an oracle are left out
    report = {"table": {"sg": {"blind": 0.5}, "oracle": {"blind": 0.9}}, "ambiguous": counts}
    assert markdown_table(report).splitlines()[-1] == "- sg: blind 2 ambiguous (1 failing), 3 not (1 failing)"


def test_blind_shares_are_reported_per_batch():
    from loragen.bench.demo_eval import blind_batch_shares, markdown_table
    from loragen.demo import sets

    batch_of = sets.batch_of("blind")
    assert len(batch_of) == sum(len(v) for v in sets.by_task("blind").values())  # no text in two batches
    assert all(batch_of[t] == i for i, b in enumerate(sets.batches("blind"), 1) for ts in b.values() for t in ts)
    row = lambda m, task, em, batch: {"method": m, "split": "blind", "task": task,  # noqa: E731
                                      "exact_match": em, "batch": batch}
    rows = [row("oracle", "a", 0.8, 1), row("sg", "a", 0.8, 1), row("icm", "a", 0.8, 1),
            row("oracle", "a", 0.8, 3), row("sg", "a", 0.0, 3), row("icm", "a", 0.8, 3),
            row("oracle", "b", 0.5, 3), row("sg", "b", 0.5, 3), row("icm", "b", 0.5, 3),
            {"method": "sg", "split": "dev", "task": "a", "exact_match": 0.0}]  # other splits have no batch
    shares = blind_batch_shares(rows)
    assert shares["sg"]["1"] == [1.0, 1.0, 1.0] and shares["icm"]["3"][0] == 1.0
    assert shares["sg"]["3"][0] == pytest.approx(0.5 / 1.3)  # summed exact match over summed oracle
    report = {"table": {"sg": {"blind": 0.5}, "oracle": {"blind": 0.9}}, "blind_batches": {"sg": shares["sg"]}}
    assert markdown_table(report).splitlines()[-1].startswith("- sg: batch 1 100% (100%–100%), batch 3 38% (")
