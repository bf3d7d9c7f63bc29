"""`batch --engine ray` on a local Ray (2 CPUs, started here and shut down after): the same manifest
and byte-identical adapters as the local engine, and a resume after an interrupt that regenerates
nothing finished. The tiny world is test_batch's. Also: nothing imports Ray unless it runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_batch import ENV, _items, _manifest, _state, _write, world  # noqa: F401  (world: a fixture)

from loragen.batch import BatchConfig, run_batch
from loragen.batch.ray_engine import RayEngine


def test_the_plain_paths_never_import_ray():
    code = ("import sys, loragen.cli.serve_cmds, loragen.cli.batch_cmds, loragen.cli.ray_serve_cmds, loragen.api, "
            "loragen.api.ray_serve, loragen.batch.ray_engine; assert 'ray' not in sys.modules, 'ray imported'")
    res = subprocess.run([sys.executable, "-c", code], env={**ENV, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


# Ray starts its workers with OMP_NUM_THREADS=1: the in-process side of each comparison matches it.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _config(world: Path, tmp_path: Path, out: str, lines: list) -> BatchConfig:
    return BatchConfig(input=_write(tmp_path / "in.jsonl", lines), out=tmp_path / out, registry=world / "registry",
                       methods=["weighted", "sg"], generators={"sg": world / "generators" / "sg"}, batch_size=4)


def _without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "timings"} for r in records]


def test_ray_engine_writes_what_the_local_engine_writes(world, tmp_path, local_ray):
    lines = [*_items(20), "not json"]  # 20 items x 2 methods, and one bad line recorded beside them
    local = run_batch(_config(world, tmp_path, "local", lines))
    remote = run_batch(_config(world, tmp_path, "ray", lines), engine=RayEngine(workers=2))
    assert remote.exit_code == local.exit_code == 1 and remote.failed_items == local.failed_items == ["line:21"]
    assert remote.written == local.written == 40
    assert _without_timings(_manifest(tmp_path / "ray")) == _without_timings(_manifest(tmp_path / "local"))
    files = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local" / "adapters").rglob("*")
                   if p.is_file())
    assert len({f.parent for f in files}) == 40 and files == sorted(p.relative_to(tmp_path / "ray")
                                               for p in (tmp_path / "ray" / "adapters").rglob("*") if p.is_file())
    for f in files:
        assert (tmp_path / "ray" / f).read_bytes() == (tmp_path / "local" / f).read_bytes(), f


def test_ray_engine_resumes_without_regenerating_what_finished(world, tmp_path, local_ray):
    config = _config(world, tmp_path, "out", _items(12))

    def interrupt(chunk: int) -> None:
        if chunk == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch(config, after_chunk=interrupt, engine=RayEngine(workers=1))
    named = {r["path"] for r in _manifest(config.out) if r["status"] == "ok"}
    assert len(named) == 16  # two chunks of 4 items x 2 methods
    before = {k: v for k, v in _state(config.out).items() if k in named}
    summary = run_batch(config, engine=RayEngine(workers=1))
    assert summary.skipped == 16 and summary.written == 8 and summary.exit_code == 0
    after = _state(config.out)
    assert len(after) == 24 and {k: after[k] for k in before} == before
