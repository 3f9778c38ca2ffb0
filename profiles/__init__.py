"""Shipped YAML profiles: hybrid layouts (`layouts/`), GPU cards (`gpu/`) and teacher architectures (`arch/`).

Each is a small YAML file; a user can pass a path to their own file wherever a profile name is accepted.
The folder sits at the top of the repository and installs as `mamtra_cli.profiles` (see pyproject.toml).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mamtra_cli.errors import UserError

ROOT = Path(__file__).resolve().parent
KINDS = ("layouts", "gpu", "arch")


def names(kind: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / kind).glob("*.yaml"))


def load(kind: str, name_or_path: str) -> dict:
    """A profile by name (e.g. `a6000`, `mamtra-1-5`) or by path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        path = p
    else:
        path = ROOT / kind / f"{name_or_path}.yaml"
        if not path.exists():
            raise UserError(f"Unknown {kind} profile {name_or_path!r}; known: {', '.join(names(kind))} "
                            "(or pass the path of a YAML file).")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"Profile {path} is not valid YAML: {e}.") from None
    if not isinstance(data, dict):
        raise UserError(f"Profile {path} must be a YAML mapping.")
    return data
