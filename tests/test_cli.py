"""The `mamtra` command: stage discovery through entry points, fast --help, python -m, error exit codes."""

import subprocess
import sys
from importlib.metadata import entry_points

from mamtra_cli.cli import ENTRY_POINT_GROUP, main

CORE_STAGES = {"transfer", "score", "distill", "export", "synth", "prepare", "tiny-teacher",
               "profile.vram", "profile.cache-growth", "profile.speed", "profile.scan"}


def test_stages_are_registered_as_entry_points():
    names = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert CORE_STAGES <= names


def test_every_registered_stage_loads(capsys):
    assert main(["--help"]) == 0
    out, err = capsys.readouterr()
    assert "failed to load" not in err
    for name in ("transfer", "score", "distill", "synth", "profile"):
        assert name in out


def test_help_does_not_import_torch():
    # Heavy imports live inside the stage functions, so building the CLI must not pull in torch.
    code = ("import sys; from mamtra_cli.cli import build_app; build_app(); "
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


def test_python_dash_m_and_version():
    r = subprocess.run([sys.executable, "-m", "mamtra_cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("mamtra ")


def test_usage_error_exits_2(capsys):
    assert main(["transfer", "--no-such-option"]) == 2
    assert main(["no-such-command"]) == 2
