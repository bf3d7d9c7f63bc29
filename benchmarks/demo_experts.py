"""The demo world's first stage (base pre-train, 18 experts, their exact match) built from nothing
under each variant of its expert recipe, one after another; prints each one's wall time and the
experts' held-out exact match. Run it on an idle machine:

    python benchmarks/demo_experts.py default seeded seeded-300 one-process

default: the shipped recipe (`DemoConfig`). seeded: the basis stays the seeded one (no basis_lr).
seeded-300: that, with 300 steps. one-process: the shipped recipe in one process (workers 1).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from loragen.demo.world import DemoConfig, build_demo_experts
from loragen.embeddings import TextEncoder

VARIANTS = {
    "default": {},
    "seeded": {"basis_lr": None},
    "seeded-300": {"basis_lr": None, "steps": 300},
    "one-process": {"workers": 1},
}


def main(names: list[str]) -> None:
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        sys.exit(f"error: name variants among {', '.join(VARIANTS)}")
    encoder = TextEncoder()
    for name in names:
        config = DemoConfig()
        config.experts = dataclasses.replace(config.experts, **VARIANTS[name])
        with tempfile.TemporaryDirectory() as home:
            started = time.perf_counter()
            world = build_demo_experts(Path(home), config=config, encoder=encoder)
            seconds = time.perf_counter() - started
            scores = {k: v["exact_match"] for k, v in json.loads(world.experts_manifest.read_text())["experts"].items()}
        low = min(scores, key=scores.__getitem__)
        print(f"{name}: {seconds:.1f} s; exact match mean {statistics.mean(scores.values()):.3f}, "
              f"lowest {low} {scores[low]:.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
