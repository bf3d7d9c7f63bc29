"""What the service has loaded and warmed so far: each component is waiting, loading, ready or failed.

`/readyz` answers 200 only when every component is ready, else 503 naming the ones that are not.
A component may join later (the demo world's background build, `demo_world`).
"""

from __future__ import annotations

COMPONENTS = ("registry", "encoder", "generators", "base_model")


class Readiness:
    def __init__(self, components: tuple[str, ...] = COMPONENTS) -> None:
        self.state: dict[str, str] = {c: "waiting" for c in components}

    def waiting(self, component: str) -> None:
        """`component` joins the ones to wait for."""
        self.state[component] = "waiting"

    def loading(self, component: str, what: str = "loading") -> None:
        self.state[component] = what

    def done(self, component: str) -> None:
        self.state[component] = "ready"

    def failed(self, component: str, error: BaseException) -> None:
        self.state[component] = f"failed: {error}"

    @property
    def ready(self) -> bool:
        return all(s == "ready" for s in self.state.values())

    def pending(self) -> str:
        """The components that are not ready, e.g. "encoder (loading), base_model (waiting)"."""
        return ", ".join(f"{c} ({s})" for c, s in self.state.items() if s != "ready")
