"""The `loragen` command. Each group lives in its own module; errors become one line + exit 2."""

from __future__ import annotations

import os
import signal
import sys

import typer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ..errors import LoragenError  # noqa: E402

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _register() -> None:
    from . import batch_cmds, bench_cmds, eval_cmds, generate_cmds, registry_cmds, serve_cmds

    app.add_typer(registry_cmds.app, name="registry", help="Manage the expert registry.")
    app.add_typer(generate_cmds.demo_app, name="demo")
    app.add_typer(generate_cmds.train_app, name="train")
    app.command("generate")(generate_cmds.generate)
    app.command("complete")(generate_cmds.complete)
    app.command("batch")(batch_cmds.batch)
    app.add_typer(eval_cmds.app, name="eval")
    app.add_typer(bench_cmds.app, name="bench", help="Speed benchmarks (decode: fused vs naive).")
    app.command("serve")(serve_cmds.serve)


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars on every command are noise
    # A command started in the background by a shell inherits SIGINT ignored; Ctrl-C, and a
    # server stopping its background build (`demo.background`), rely on it to end a command cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _register()
    try:
        # Without standalone mode, click returns typer.Exit's code instead of exiting with it.
        code = app(standalone_mode=False)
    except LoragenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # click usage errors carry their own exit code
        import click

        # typer >= 0.2x raises its own vendored click's exceptions, which are TyperExceptions.
        if isinstance(exc, (click.ClickException, typer.TyperException)) and hasattr(exc, "show"):
            exc.show()
            sys.exit(getattr(exc, "exit_code", 2))
        raise
    if isinstance(code, int) and code:
        sys.exit(code)
