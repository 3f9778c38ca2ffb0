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
