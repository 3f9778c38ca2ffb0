"""MamTra: hybrid Mamba-Transformer speech LMs distilled from CosyVoice 2 style teachers.

The Python API (`mamtra_cli.api`, which documents it) is reachable from here:

    import mamtra_cli
    tts = mamtra_cli.load("mini")
    tts.save("Hello, how are you doing today?", "hello.wav")

and `mamtra_cli.transfer(...)`, `.distill(...)`, `.score(...)`, `.export(...)`, `.evaluate(...)`,
`.profile_vram(...)`, … — one function per `mamtra` command. They are imported on first use, so
`import mamtra_cli` (and with it `mamtra --help`) stays fast and pulls in no torch.
"""

import importlib

__version__ = "0.1.0"


def __getattr__(name: str):
    # import_module, not `from mamtra_cli import api`: the latter asks this very hook for `api` and recurses.
    api = importlib.import_module("mamtra_cli.api")
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'mamtra_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(importlib.import_module("mamtra_cli.api").__all__))
