"""What `pip install` puts in site-packages: only `mamtra_cli` at the top (the repository's `stages/` and
`profiles/` install as `mamtra_cli.stages` and `mamtra_cli.profiles`), entry points that name those modules, a
package list in pyproject.toml that misses no package, and no code that imports the old top-level names.

pytest puts the repository root on sys.path, so a stale `import stages.x` would still work here while failing
for every user: hence the scans and the subprocess run from a folder outside the repository."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import distributions, entry_points
from pathlib import Path

import pytest

from mamtra_cli.cli import ENTRY_POINT_GROUP

ROOT = Path(__file__).resolve().parents[1]
OLD_TOP_LEVEL = ("stages", "profiles")


def test_installed_distribution_has_no_top_level_stages_or_profiles():
    dists = list(distributions(name="mamtra"))
    # An egg-info in the repository (left by a legacy `setup.py develop` or a `pip wheel .`) lists source
    # files, not installed ones; its top_level.txt still has to be right, since it can shadow the install.
    installed = [d for d in dists if Path(d.locate_file("")).resolve() != ROOT]
    assert installed, "mamtra is not installed; run `pip install -e '.[dev]'`"
    for dist in dists:
        assert not set((dist.read_text("top_level.txt") or "").split()) & set(OLD_TOP_LEVEL), dist.locate_file("")
    for dist in installed:
        top_level = set((dist.read_text("top_level.txt") or "").split())
        # first path component of every installed file that is importable code (not metadata, scripts or the
        # editable-install hooks)
        for f in dist.files or []:
            head = f.parts[0]
            if head != ".." and not head.endswith((".dist-info", ".egg-info", ".pth")) \
                    and not head.startswith("__editable__"):
                top_level.add(head.removesuffix(".py"))
        assert top_level and top_level <= {"mamtra_cli", "__pycache__"}, sorted(top_level)


def test_only_the_namespaced_modules_are_importable_outside_the_repository(tmp_path):
    """Run where the repository is not on sys.path, as a user's program runs: the mapping must hold for the
    editable install (its import hook) as for a wheel."""
    code = ("import importlib.util as u, json; from mamtra_cli import profiles; "
            "spec = lambda n: (u.find_spec(n).origin if u.find_spec(n) else None); "
            "print(json.dumps({n: spec(n) for n in ('stages', 'profiles', 'mamtra_cli.stages.prepare', "
            "'mamtra_cli.profiles')} | {'gpus': profiles.names('gpu')}))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin"}, check=True)
    import json

    found = json.loads(r.stdout)
    for name in OLD_TOP_LEVEL:  # another distribution's `stages` would be its own business, never ours
        assert found[name] is None or not found[name].startswith(str(ROOT)), found
    assert found["mamtra_cli.stages.prepare"] and found["mamtra_cli.profiles"], found
    assert "a6000" in found["gpus"]  # package data (profiles/**/*.yaml) comes along


def test_entry_points_name_the_namespaced_stage_modules():
    eps = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.dist is None or ep.dist.name == "mamtra"]
    assert eps and all(ep.value.startswith("mamtra_cli.stages.") for ep in eps), [ep.value for ep in eps]
    for ep in eps:
        assert callable(ep.load()), ep.value


def _python_files(*folders: str) -> list[Path]:
    return [p for folder in folders for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts]


def test_no_code_imports_the_old_top_level_names():
    old = "|".join(OLD_TOP_LEVEL)
    pattern = re.compile(rf"^\s*(from\s+({old})(\.|\s+import)|import\s+({old})\b)|[\"']({old})\.\w+:\w+[\"']", re.M)
    offenders = [f"{p.relative_to(ROOT)}: {m.group(0).strip()}" for p in _python_files("mamtra_cli", "stages",
                 "profiles", "tests", "scripts") for m in pattern.finditer(p.read_text(encoding="utf-8"))]
    assert not offenders, offenders


def test_the_library_never_imports_a_stage():
    pattern = re.compile(r"^\s*(from|import)\s+mamtra_cli\.stages\b|^\s*from\s+mamtra_cli\s+import\s+.*\bstages\b",
                         re.M)
    offenders = [str(p.relative_to(ROOT)) for p in _python_files("mamtra_cli") if pattern.search(p.read_text())]
    assert not offenders, offenders


def test_pyproject_lists_every_package():
    tomllib = pytest.importorskip("tomllib")
    setuptools_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools_cfg["package-dir"] == {"mamtra_cli": "mamtra_cli", "mamtra_cli.stages": "stages",
                                             "mamtra_cli.profiles": "profiles"}
    code_dirs = {p.parent for p in _python_files("mamtra_cli")}
    expected = {".".join(d.relative_to(ROOT).parts) for d in code_dirs} | {"mamtra_cli.stages", "mamtra_cli.profiles"}
    assert set(setuptools_cfg["packages"]) == expected
