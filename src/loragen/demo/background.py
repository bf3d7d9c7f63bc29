"""The demo world's second stage (`world.finish_demo`) in a child process, so that a server can answer
from the world's experts while the multi-task LoRA and the learned generators train.

A child process keeps the training's Python loops off the server's interpreter; it runs at a lower
priority, so requests come first on a busy CPU. Its output (progress bars) goes to the server's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from ..errors import LoragenError

log = logging.getLogger(__name__)

# What the second stage adds: the methods that cannot answer until it is done.
PENDING_METHODS = ("multitask", "icm", "sg")
NICENESS = 10


class BackgroundBuild:
    """`loragen demo build` for the world under `home`, in a child process started by `start`."""

    def __init__(self, home: Path, command: list[str] | None = None, *, output: Path | None = None,
                 env: dict[str, str] | None = None, niceness: int = NICENESS) -> None:
        """`output`: a file that takes the child's output (stdout and stderr) instead of this
        process's; `env`: variables set for the child on top of this process's; `niceness`: how far
        below this process the child runs."""
        self.home = Path(home)
        self.command = command or [sys.executable, "-m", "loragen.cli", "demo", "build"]
        self.output, self.env, self.niceness = output, dict(env or {}), niceness
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopped = False

    def start(self) -> None:
        if self._stopped:  # stopped before it started
            return
        env = {**os.environ, **self.env, "LORAGEN_HOME": str(self.home)}
        with contextlib.ExitStack() as files:
            out = files.enter_context(self.output.open("ab")) if self.output else None
            self._proc = subprocess.Popen(self.command, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT if out else None)
        if self.niceness:
            with contextlib.suppress(OSError):  # threads the child starts later inherit it
                os.setpriority(os.PRIO_PROCESS, self._proc.pid, self.niceness)
        log.info("finishing the demo world in the background (pid %d)", self._proc.pid)

    @property
    def running(self) -> bool:
        """Started and not yet exited."""
        return self._proc is not None and self._proc.poll() is None

    def wait(self) -> None:
        """Block until the child is done; raise if it failed or was stopped."""
        if self._proc is None:
            what = "stopped" if self._stopped else "never started"
            raise LoragenError(f"the demo world's background build was {what}")
        code = self._proc.wait()
        if self._stopped:
            raise LoragenError("the demo world's background build was stopped")
        if code != 0:
            raise LoragenError(f"the demo world's background build failed (exit status {code}); "
                               "run `loragen demo build` to see why")

    def stop(self) -> None:
        """End the child (its half-written stage is discarded; the next build redoes it)."""
        self._stopped = True
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)  # as Ctrl-C: the build removes its temp files
