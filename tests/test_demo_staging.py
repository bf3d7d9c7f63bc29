"""The demo world in two stages: a server answers the retrieval methods from the world's experts while
a background build adds the multi-task LoRA and the learned generators; each stage is written whole."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import EXPERTS, uvicorn_server

from loragen.api import ApiSettings, create_app
from loragen.demo import background
from loragen.demo.world import DEMO_VERSION, DemoConfig, DemoWorld, build_demo_experts, finish_demo
from loragen.embeddings import TextEncoder
from loragen.errors import LoragenError
from loragen.training.multitask import MultitaskConfig
from loragen.training.tasks import Instance, Task, write_tasks

# The stand-in for the second stage: a real child process that waits for its gate file, then puts
# the generators in place and marks the world built, as `finish_demo` does.
GATED_BUILD = """
import json, shutil, sys, time
from pathlib import Path
gate, source, root = map(Path, sys.argv[1:4])
while not gate.exists():
    time.sleep(0.02)
shutil.copytree(source, root / "generators")
(root / "BUILD.json").write_text(json.dumps({"version": int(sys.argv[4])}))
"""


def until(check, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return result


@pytest.fixture
def experts_only(world: Path, tmp_path: Path) -> Path:
    """A LORAGEN_HOME whose demo world holds its first stage only (the API world's registry)."""
    demo = DemoWorld(tmp_path / "home" / "demo")
    shutil.copytree(world / "registry", demo.registry)
    demo.experts_manifest.write_text(json.dumps({"version": DEMO_VERSION, "seconds": 0.0, "experts": {}}))
    return tmp_path / "home"


def post(url: str, method: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/loras", json={"description": "decide whether a film review is favourable",
                                               "method": method, "seed": 0}, timeout=60)


def test_retrieval_answers_while_the_learned_generators_train(experts_only: Path, world: Path, encoder: TextEncoder,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = tmp_path / "gate"
    root = experts_only / "demo"
    command = [sys.executable, "-c", GATED_BUILD, str(gate), str(world / "generators"), str(root), str(DEMO_VERSION)]
    monkeypatch.setattr("loragen.api.lifecycle.BackgroundBuild",
                        lambda home: background.BackgroundBuild(home, command=command))
    app = create_app(ApiSettings(home=experts_only, max_wait_ms=1), encoder=encoder)
    with uvicorn_server(app, wait_ready=False) as url:
        assert until(lambda: post(url, "nearest").status_code == 200)
        assert post(url, "weighted").status_code == 200
        until(lambda: "training" in httpx.get(f"{url}/readyz").text)  # the build has started
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503 and "demo_world" in ready.json()["error"]["message"]
        for method in ("sg", "icm", "multitask"):
            r = post(url, method)
            assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready", r.text
            assert int(r.headers["Retry-After"]) > 0
            assert method in r.json()["error"]["message"] and "nearest" in r.json()["error"]["message"]
        batch = httpx.post(f"{url}/v1/loras/batch", json={"descriptions": ["a", "b"], "method": "sg"})
        assert batch.status_code == 503 and "Retry-After" in batch.headers
        gate.touch()
        body = until(lambda: (r := httpx.get(f"{url}/readyz")).status_code == 200 and r.json())
        assert body["components"]["demo_world"] == "ready"
        assert app.state.service.pool.loaded().get(("sg", 0)) is not None  # warmed, not loaded on a request
        r = post(url, "sg")
        assert r.status_code == 200 and r.json()["method"] == "sg", r.text
        assert post(url, "multitask").status_code == 200


def test_a_failed_background_build_is_named_and_stops_blocking(experts_only: Path, encoder: TextEncoder,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("loragen.api.lifecycle.BackgroundBuild",
                        lambda home: background.BackgroundBuild(home, command=[sys.executable, "-c", "exit(3)"]))
    app = create_app(ApiSettings(home=experts_only), encoder=encoder)
    with uvicorn_server(app, wait_ready=False) as url:
        until(lambda: "failed" in httpx.get(f"{url}/readyz").text)
        assert "exit status 3" in httpx.get(f"{url}/readyz").json()["error"]["message"]
        assert post(url, "nearest").status_code == 200
        assert post(url, "sg").status_code != 503  # no generator: the method's own error, not "retry later"


TINY = DemoConfig(multitask=MultitaskConfig(steps=1, rows_per_task=1, train_fraction=0.9))


def test_each_stage_is_written_whole(world: Path, tmp_path: Path, encoder: TextEncoder,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = Path(kwargs.get("out_dir") or args[0])
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text("{}")  # half a stage on disk
        raise LoragenError("crashed mid-build")

    home = tmp_path / "home"
    with monkeypatch.context() as m:
        m.setattr("loragen.demo.world.build_base_model", crash)
        with pytest.raises(LoragenError, match="crashed"):
            build_demo_experts(home, config=TINY, encoder=encoder)
    assert not home.exists() or not list(home.iterdir())  # no world, no temp directory left

    # A first stage by hand (the API world's base model and registry stand in for the demo's).
    demo = DemoWorld(home / "demo")
    shutil.copytree(world / "base", demo.base_model)
    shutil.copytree(world / "registry", demo.registry)
    words = [f"{a}{b}" for a in "abcdefgh" for b in "xyz"]
    write_tasks(demo.tasks, [Task(name, descriptions, [Instance(w, w[::-1]) for w in words])
                             for name, descriptions in EXPERTS.items()])
    torch.save(torch.get_rng_state(), demo.rng_state)
    demo.experts_manifest.write_text(json.dumps({"version": DEMO_VERSION, "seconds": 0.0, "experts": {}}))
    assert demo.has_experts() and not demo.is_built()
    stamp = demo.experts_manifest.stat().st_mtime
    assert build_demo_experts(home, config=TINY, encoder=encoder).experts_manifest.stat().st_mtime == stamp

    monkeypatch.setattr("loragen.demo.world.train_generator", crash)
    with pytest.raises(LoragenError, match="crashed"):
        finish_demo(demo, config=TINY, encoder=encoder)
    assert demo.has_experts() and not demo.is_built()  # a crash leaves nothing that looks finished
    assert not demo.generators.exists() and not demo.manifest.exists()
    assert not [p.name for p in demo.root.iterdir() if p.name.endswith(".tmp")]


def test_a_build_started_with_sigint_ignored_still_stops_on_it_and_leaves_nothing(tmp_path: Path):
    """A shell starts background jobs with SIGINT ignored, and their children inherit it; the build
    a server stops with SIGINT must end anyway, removing its half-built stage."""
    home = tmp_path / "home"
    env = {**os.environ, "LORAGEN_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "loragen.cli", "demo", "build"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        until(lambda: home.is_dir() and any(p.name.startswith(".demo.") for p in home.iterdir()), timeout=120)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()
    assert list(home.iterdir()) == []
