"""HyperPyYAML, read-only: CosyVoice's configs (cosyvoice2.yaml) use `!new:`, `!name:`, `!ref`, `!apply:`
tags that plain `yaml.safe_load` rejects. Here tags become `Tagged` markers, simple references are
resolved, and nothing is ever imported or called. Shared by the LM reader, the flow and HiFT loaders.
"""

from __future__ import annotations

import ast
import copy
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mamtra_cli.errors import UserError



@dataclass
class Tagged:
    """A HyperPyYAML tagged node, e.g. `!new:cosyvoice.llm.llm.Qwen2LM {...}` becomes
    `Tagged(kind="new", target="cosyvoice.llm.llm.Qwen2LM", args={...})`; `!ref <x>` becomes
    `Tagged("ref", "", "<x>")` until it is resolved. Nothing is ever imported or called."""

    kind: str  # new | name | apply | ref | copy | tuple | include | <any other tag>
    target: str  # the part after "kind:" (a dotted name or a path); "" when absent
    args: Any = None  # mapping, list, scalar or None, as written
    line: int = 0  # 1-based line in the yaml file (for messages)

    @property
    def tag(self) -> str:
        return f"!{self.kind}:{self.target}" if self.target else f"!{self.kind}"

    def get(self, key: str, default=None):
        """Keyword argument `key` of a mapping-style node."""
        return self.args.get(key, default) if isinstance(self.args, dict) else default


class _Loader(yaml.SafeLoader):
    """SafeLoader that accepts every `!…` tag and reads YAML 1.2 floats such as `1e-5`
    (HyperPyYAML uses ruamel.yaml, for which `1e-5` is a float; PyYAML's YAML 1.1 reads it as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _construct_tagged(loader: _Loader, suffix: str, node: yaml.Node) -> Tagged:
    kind, _, target = suffix.partition(":")
    if isinstance(node, yaml.MappingNode):
        args = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        args = loader.construct_sequence(node, deep=True)
    else:
        args = loader.construct_scalar(node)
        if args == "":
            args = None
    return Tagged(kind=kind, target=target, args=args, line=node.start_mark.line + 1)


_Loader.add_multi_constructor("!", _construct_tagged)

_REF_RE = re.compile(r"<([^<>]+)>")
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNOPS = {ast.USub: operator.neg, ast.UAdd: operator.pos}


class _Unresolved(Exception):
    pass


def _safe_arith(expr: str):
    """Evaluate + - * / // % ** and parentheses over numbers; anything else is left unresolved."""
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        raise _Unresolved(expr) from None

    def ev(n):
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float)) and not isinstance(n.value, bool):
            return n.value
        if isinstance(n, ast.BinOp) and type(n.op) in _BINOPS:
            return _BINOPS[type(n.op)](ev(n.left), ev(n.right))
        if isinstance(n, ast.UnaryOp) and type(n.op) in _UNOPS:
            return _UNOPS[type(n.op)](ev(n.operand))
        raise _Unresolved(expr)

    try:
        return ev(tree)
    except (ArithmeticError, ValueError):
        raise _Unresolved(expr) from None


class _Resolver:
    def __init__(self, root: dict):
        self.root = root
        self.active: set[str] = set()

    def lookup(self, name: str):
        """`a`, `a.b`, `a[b]`, `a[0]`: walk mappings, lists and the args of tagged nodes."""
        parts = [p for p in re.split(r"[.\[\]]", name.strip()) if p != ""]
        if not parts:
            raise _Unresolved(name)
        if name in self.active:
            raise _Unresolved(name)  # a cycle: leave it
        self.active.add(name)
        try:
            cur: Any = self.root
            for i, p in enumerate(parts):
                if isinstance(cur, Tagged):
                    cur = cur.args
                if isinstance(cur, dict) and p in cur:
                    cur = cur[p]
                elif isinstance(cur, (list, tuple)) and p.lstrip("-").isdigit() and -len(cur) <= int(p) < len(cur):
                    cur = cur[int(p)]
                else:
                    raise _Unresolved(name)
                cur = self.value(cur)  # the referenced value may itself be a reference
            return cur
        finally:
            self.active.discard(name)

    def ref(self, text) -> Any:
        if not isinstance(text, str):
            raise _Unresolved(text)
        refs = _REF_RE.findall(text)
        if not refs:
            raise _Unresolved(text)
        if _REF_RE.fullmatch(text.strip()):
            return self.lookup(refs[0])
        values = [self.lookup(r) for r in refs]
        pieces = iter(values)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            try:
                return _safe_arith(_REF_RE.sub(lambda m: repr(next(pieces)), text))
            except _Unresolved:
                pass
        if all(isinstance(v, (str, int, float)) for v in values):  # string interpolation, e.g. <dir>/x
            pieces = iter(values)
            return _REF_RE.sub(lambda m: str(next(pieces)), text)
        raise _Unresolved(text)

    def value(self, v):
        if isinstance(v, Tagged):
            if v.kind == "ref":
                try:
                    return self.ref(v.args)
                except _Unresolved:
                    return v
            if v.kind == "copy":
                try:
                    return copy.deepcopy(self.ref(v.args))
                except _Unresolved:
                    return v
            if v.kind == "tuple":
                inner = self.value(v.args)
                return tuple(inner) if isinstance(inner, list) else (inner,)
            v.args = self.value(v.args)
            return v
        if isinstance(v, dict):
            for k in list(v):
                v[k] = self.value(v[k])
            return v
        if isinstance(v, list):
            for i, x in enumerate(v):
                v[i] = self.value(x)
            return v
        return v


def load_hyperpyyaml(path: Path, overrides: dict | None = None) -> dict:
    """Read a HyperPyYAML file (e.g. CosyVoice's cosyvoice2.yaml) without importing or building anything.

    Tags become `Tagged` markers; `!ref <name>`, `!ref <a.b>`, arithmetic such as `!ref <a> * <b>` and
    string interpolation such as `!ref <dir>/x` are resolved where the referenced values are plain;
    `!copy` becomes a deep copy and `!tuple` a tuple. Anything else (e.g. a reference to an object that
    would be built, `!include:`) stays as it is. `overrides` replaces top-level keys before references
    are resolved, as CosyVoice does for `qwen_pretrain_path`.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"HyperPyYAML config {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"Cannot read HyperPyYAML config {path}: {e}.") from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"Cannot parse HyperPyYAML config {path}{where}: {problem}; "
                        "check the YAML syntax there.") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"HyperPyYAML config {path} is not a mapping at the top level; "
                        "expected a CosyVoice config such as cosyvoice2.yaml.")
    if overrides:
        data.update(overrides)
    return _Resolver(data).value(data)


def plain(value: Any) -> Any:
    """Tagged markers → plain data: `!new:cls {args}` becomes its argument mapping (or list/scalar), an
    unresolved `!ref` becomes None. For readers that only need the numbers of a section."""
    if isinstance(value, Tagged):
        return None if value.kind in ("ref", "copy") else plain(value.args)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    return value


def read_section(path: Path, section: str) -> dict:
    """The `section:` mapping of a HyperPyYAML file as plain data (see `plain`), references resolved."""
    data = load_hyperpyyaml(path)
    value = plain(data.get(section))
    if not isinstance(value, dict):
        raise UserError(f"{path} has no `{section}:` section; pass the cosyvoice2.yaml of the model directory.")
    return value
