"""Running a `mamtra` stage in a fresh process, as a user would from a shell: the recipes that chain stages
(`mamtra demo`, `mamtra build-hybrids`) use `run_stage`, so the stages meet only through the files they write
and every command that made an artefact can be recorded and re-run by hand.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import threading

from mamtra_cli.errors import UserError


def run_stage(args: list[str], console, commands: list[str], rename: list[tuple[str, str]], env: dict,
              prefix: str = "") -> dict:
    """One stage in a fresh process (`python -m mamtra_cli.cli ARGS --json`): its progress goes to our stderr
    (each line after `prefix`, so that stages run side by side can be told apart), its one JSON object comes
    back. A failing stage stops the caller with its own error message above ours.

    The stage may work inside a temporary directory that is renamed at the end: every line it prints, and the
    command appended to `commands`, have each `rename` (old, new) pair applied, so no message names a path
    that will not exist."""

    def final(text: str) -> str:
        for old, new in rename:
            text = text.replace(old, new)
        return text

    shown = "mamtra " + final(shlex.join(args))
    console.print(f"{prefix}$ {shown}", style="bold cyan", markup=False, highlight=False)
    commands.append(shown)
    proc = subprocess.Popen([sys.executable, "-m", "mamtra_cli.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    stdout: list[str] = []
    reader = threading.Thread(target=lambda: stdout.append(proc.stdout.read()), daemon=True)
    reader.start()  # read stdout meanwhile: a child blocked on a full stdout pipe would never end its stderr
    for line in proc.stderr:
        sys.stderr.write(prefix + final(line))
        sys.stderr.flush()
    reader.join()
    if proc.wait() != 0:
        raise UserError(f"The step `{shown}` failed (exit {proc.returncode}); its message is above.")
    lines = [line for line in "".join(stdout).splitlines() if line.startswith("{")]
    if not lines:
        raise UserError(f"The step `{shown}` printed no JSON result; run it by hand to see why.")
    return json.loads(lines[-1])
