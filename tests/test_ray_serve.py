"""`serve --engine ray`: the app on a Ray Serve deployment of 2 replicas on a local Ray (2 CPUs,
started here, shut down after), against the plain server on the same world (conftest's API world).
One deployment for the module; the replica-kill test runs last."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray")

from conftest import uvicorn_server  # noqa: E402

from loragen.api import ApiSettings, create_app  # noqa: E402
from loragen.api.ray_serve import RayServeOptions, deploy, patient_proxy_env  # noqa: E402
from loragen.registry import Registry  # noqa: E402

SEEDED = {"description": "translate english into french", "method": "sg", "seed": 3}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _settings(world: Path, port: int = 0) -> ApiSettings:
    return ApiSettings(registry=world / "registry", generator=world / "generators", home=world / "home",
                       max_wait_ms=5, encoder_dtype="float32", host="127.0.0.1", port=port)


# Ray starts its workers with OMP_NUM_THREADS=1: the in-process side of each comparison matches it.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def plain(world, encoder):
    with uvicorn_server(create_app(_settings(world), encoder=encoder)) as url:
        yield url


@pytest.fixture(scope="module")
def on_ray(world):
    import ray
    from ray import serve

    patient_proxy_env()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        url = deploy(_settings(world, _free_port()), RayServeOptions(replicas=2))
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def _replica_pids() -> list[int]:
    import psutil

    return sorted(p.pid for p in psutil.process_iter(["cmdline"])
                  if "ServeReplica:loragen" in " ".join(p.info["cmdline"] or []))


def test_replicas_answer_as_the_plain_server(on_ray, plain):
    ready = httpx.get(f"{on_ray}/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert len(_replica_pids()) == 2
    want = httpx.post(f"{plain}/v1/loras", json=SEEDED, params={"format": "safetensors"}, timeout=60)
    assert want.status_code == 200
    for _ in range(4):  # spread over both replicas: each gives the same bytes
        got = httpx.post(f"{on_ray}/v1/loras", json=SEEDED, params={"format": "safetensors"}, timeout=60)
        assert got.status_code == 200 and got.content == want.content
    meta = httpx.post(f"{on_ray}/v1/loras", json=SEEDED, timeout=60).json()
    assert meta["neighbours"] == httpx.post(f"{plain}/v1/loras", json=SEEDED, timeout=60).json()["neighbours"]


def test_a_bad_request_gets_the_same_error(on_ray, plain):
    for body in ({"description": ""}, {"description": "x", "method": "nope"}, {"k": 2}):
        ours, theirs = (httpx.post(f"{u}/v1/loras", json=body, timeout=60) for u in (on_ray, plain))
        assert 400 <= ours.status_code < 500 and ours.status_code == theirs.status_code
        assert ours.json() == theirs.json() and set(ours.json()["error"]) == {"code", "message"}
    ours, theirs = (httpx.post(f"{u}/v1/loras", content=b"{oops", headers={"content-type": "application/json"})
                    for u in (on_ray, plain))
    assert ours.status_code == theirs.status_code == 400 and ours.json() == theirs.json()
    write = httpx.delete(f"{on_ray}/v1/experts/math", timeout=30)
    assert write.status_code == 405 and write.json()["error"]["code"] == "read_only"


def test_the_openai_client_completes_through_the_deployment(on_ray, plain, world):
    import openai

    base = Registry.open(world / "registry").spec.base_model
    texts = []
    for url in (on_ray, plain):
        oa = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        done = oa.completions.create(model=base, prompt="hello", max_tokens=6, temperature=0,
                                     extra_body={"description": SEEDED["description"], "seed": 3})
        assert done.choices[0].text is not None and done.usage.completion_tokens >= 1
        texts.append(done.choices[0].text)
    assert texts[0] == texts[1]


def test_a_killed_replica_fails_requests_cleanly_and_is_restarted(on_ray):
    """SIGKILL one replica under steady load: every request succeeds or gets a 5xx, none takes
    longer than 30 s, and Ray starts a new replica after which all is served again."""
    before = _replica_pids()
    assert len(before) == 2
    results: list[tuple[int | str, float]] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        with httpx.Client(timeout=30) as c:
            n = 0
            while not stop.is_set():
                n += 1
                started = time.monotonic()
                try:
                    code: int | str = c.post(f"{on_ray}/v1/loras", json={"description": f"sort words {worker} {n}",
                                                                       "method": "weighted"}).status_code
                except httpx.HTTPError as exc:
                    code = type(exc).__name__
                results.append((code, time.monotonic() - started))

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(2)
    os.kill(before[0], signal.SIGKILL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        now = _replica_pids()
        if len(now) == 2 and before[0] not in now and httpx.get(f"{on_ray}/readyz", timeout=30).status_code == 200:
            break
        time.sleep(1)
    else:
        pytest.fail(f"the replica was not restarted: {_replica_pids()}")
    served = len(results)
    time.sleep(2)  # service resumes: requests after the restart succeed
    stop.set()
    for t in threads:
        t.join(timeout=60)
    codes = [c for c, _ in results]
    assert all(c == 200 or (isinstance(c, int) and 500 <= c < 600) for c in codes), sorted(set(map(str, codes)))
    assert max(s for _, s in results) < 30
    assert len(results) > served and all(c == 200 for c, _ in results[served + 3:])
    assert codes.count(200) > len(codes) // 2
