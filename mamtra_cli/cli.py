"""The `mamtra` command line: a Typer app whose sub-commands are discovered through the entry-point
group `mamtra.stages`, so an outside package can add a stage.

An entry point `NAME = "module:function"` registers `function` as `mamtra NAME`; a dotted name
`GROUP.NAME` registers it as `mamtra GROUP NAME` (e.g. `profile.vram` → `mamtra profile vram`).
Stage modules import torch and friends inside their functions, so building this app (and
`mamtra --help`) stays fast: only the stage modules themselves are imported here.

Errors: a `UserError` anywhere becomes one sentence on stderr and exit code 2.
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import entry_points

import typer

from mamtra_cli import __version__
from mamtra_cli.errors import UserError

ENTRY_POINT_GROUP = "mamtra.stages"

GROUP_HELP = {
    "profile": "Measure memory, cache growth and speed of teacher and hybrids side by side.",
}


# ----------------------------------------------------------------------------------------- shared options
# Options that several stages take, checked the same way everywhere: a bad value is one sentence and exit
# 2 here, instead of a RuntimeError from deep inside torch (torch.set_num_threads(-1), torch.device("tpu"))
# after the models have loaded.

def check_threads(threads: int | None, option: str = "--threads") -> None:
    """--threads: None or 0 means automatic (`default_threads`), a positive number that many intra-op threads."""
    if threads is not None and threads < 0:
        raise UserError(f"{option} must be 0 (automatic: 1 for small models, else at most the usable CPUs) or "
                        f"a positive number of CPU threads (got {threads}).")


# -- how many CPU threads torch uses when --threads is 0 or not given
# Small models do tiny matrix products: with several threads each op spends more time waking and joining
# threads than computing, and on a loaded machine every op waits for the slowest thread (measured on a
# loaded 2-core box: `mamtra demo` 42.5 min with torch's default against 171 s with one thread; synth of the
# hello sentence 13 s against 0.3 s). So a model below SMALL_MODEL_PARAMETERS gets one thread. A larger
# model gets torch's default, but never more threads than CPUs this process may run on (torch counts the
# machine's cores, not the container's CPU affinity), so it never oversubscribes.
SMALL_MODEL_PARAMETERS = 25_000_000  # the built-in mini voice has 2.5 M; CosyVoice 2's LM 0.5 B
_TORCH_DEFAULT_THREADS: int | None = None
THREADS_HELP = ("CPU threads for torch (0 or unset: 1 for models under 25 M parameters such as the mini voice, "
                "else torch's default capped at the CPUs this process may use).")


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask where the OS has one, else os.cpu_count()."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _torch_default_threads() -> int:
    """torch's own default thread count, read once: after a stage has called torch.set_num_threads (tests
    run several stages in one process), torch.get_num_threads() no longer tells the default."""
    global _TORCH_DEFAULT_THREADS
    if _TORCH_DEFAULT_THREADS is None:
        import torch

        _TORCH_DEFAULT_THREADS = torch.get_num_threads()
    return _TORCH_DEFAULT_THREADS


def default_threads(parameters: int | None, torch_default: int, cpus: int) -> int:
    """The thread count used when --threads is 0 or not given (the rule above, as a pure function):
    1 for a model of fewer than SMALL_MODEL_PARAMETERS parameters, else min(torch's default, usable CPUs).
    `parameters` None means the model is not known (yet): the second rule applies."""
    if parameters is not None and parameters < SMALL_MODEL_PARAMETERS:
        return 1
    return max(1, min(int(torch_default), int(cpus)))


def apply_threads(threads: int | None, parameters: int | None = None, option: str = "--threads") -> int:
    """Check --threads, set torch's intra-op thread count and return it: `threads` when positive, else
    `default_threads` for a model of `parameters` parameters. Stages record the returned count in --json."""
    import torch

    check_threads(threads, option)
    n = threads if threads else default_threads(parameters, _torch_default_threads(), usable_cpus())
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def count_parameters(*models) -> int:
    """Parameters of the largest of `models` (the one that decides how many threads are worth it)."""
    return max((sum(p.numel() for p in m.parameters()) for m in models if m is not None), default=0)


def stderr_console(quiet: bool = False):
    """The console of a stage's diagnostics and progress (stderr). soft_wrap: when stderr is a file or a
    pipe rich would otherwise hard-wrap every message at 80 columns, breaking paths and numbers in logs."""
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True, quiet=quiet)


def parse_device(device: str, option: str = "--device", allow_index: bool = True) -> str:
    """--device → "cpu", "cuda" or (with `allow_index`) "cuda:N". "auto" picks cuda when a GPU is usable.

    Anything else (tpu, mps, a typo) and CUDA without a GPU are UserErrors naming the value. Stages whose
    measurements assume the default CUDA device (the profile workers) pass allow_index=False."""
    import torch

    value = str(device).strip().lower()
    choices = "auto, cpu or cuda" + (" (or cuda:N)" if allow_index else "")
    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if value == "cpu":
        return "cpu"
    kind, _, index = value.partition(":")
    if kind != "cuda" or (index and not (allow_index and index.isdigit())):
        raise UserError(f"Unknown {option} {device!r}; use {choices}.")
    if not torch.cuda.is_available():
        raise UserError(f"{option} {device} asks for CUDA but no GPU is usable here; use {option} cpu.")
    if index and int(index) >= torch.cuda.device_count():
        raise UserError(f"{option} {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"numbered from 0; use {option} cuda:0.")
    return value


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"mamtra {__version__}")
        raise typer.Exit()


def build_app() -> typer.Typer:
    app = typer.Typer(
        name="mamtra",
        help="Hybrid Mamba-Transformer speech LMs: transfer, distill, export, synthesize, profile.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
    )

    @app.callback()
    def _root(version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                           help="Print the version and exit.")) -> None:
        pass

    groups: dict[str, typer.Typer] = {}
    eps = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
    for ep in eps:
        try:
            fn = ep.load()
        except Exception as e:  # a broken third-party stage must not take the whole CLI down
            print(f"mamtra: warning: stage {ep.name!r} ({ep.value}) failed to load: {e}", file=sys.stderr)
            continue
        if "." in ep.name:
            group, name = ep.name.split(".", 1)
            if group not in groups:
                groups[group] = typer.Typer(help=GROUP_HELP.get(group), no_args_is_help=True,
                                            rich_markup_mode=None)
                app.add_typer(groups[group], name=group)
            groups[group].command(name)(fn)
        else:
            app.command(ep.name)(fn)
    return app


def main(argv: list[str] | None = None) -> int:
    app = build_app()
    try:
        app(args=argv, prog_name="mamtra", standalone_mode=False)
    except UserError as e:
        # Under torchrun every rank meets the same bad input; one message is enough.
        if os.environ.get("RANK", "0") == "0":
            print(f"mamtra: error: {e}", file=sys.stderr)
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("mamtra: aborted", file=sys.stderr)
        return 130
    except Exception as e:
        # Usage errors (unknown option, missing argument) are click exceptions that carry their own exit
        # code (2). Typer may vendor its own click, so recognise them by shape rather than by class.
        if hasattr(e, "show") and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            return e.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
