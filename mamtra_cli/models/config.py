"""Architecture of a speech LM: the Qwen2 backbone sizes, which layer is attention and which Mamba-2,
and the CosyVoice 2 special ids. One `ModelConfig` is enough to rebuild a model with no other file;
it is what `config.yaml` of a model directory holds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from mamtra_cli.errors import UserError

ATTENTION = "attention"
MAMBA = "mamba"
LAYER_TYPES = (ATTENTION, MAMBA)


@dataclass
class MambaConfig:
    """Settings of the Mamba-2 mixers. The widths are not here: they follow from the attention shape
    (d_inner = n_heads·head_dim, d_xb = n_kv_heads·head_dim, d_state = headdim = head_dim) so that the
    layer can inherit Q/K/V/O (DESIGN.md, MambaInLlama layout)."""

    d_conv: int = 4  # depthwise causal conv width over x‖B‖C
    chunk_size: int = 64  # SSD chunk length for prefill/training
    dt_min: float = 1e-3  # dt init range (log-uniform), Mamba's default
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    A_init_min: float = 1.0  # A_log = log U(A_init_min, A_init_max)
    A_init_max: float = 16.0
    norm_eps: float = 1e-6  # gated RMSNorm epsilon (per head group)


@dataclass
class ModelConfig:
    """A CosyVoice 2 style speech LM (`Qwen2LM`) on a Qwen2 backbone, possibly hybrid."""

    hidden_size: int  # H
    intermediate_size: int  # SwiGLU width
    num_attention_heads: int  # n_h query heads
    num_key_value_heads: int  # n_kv (GQA groups)
    head_dim: int  # d
    text_vocab_size: int  # rows of the Qwen2 text embedding (151936 in CosyVoice 2)
    speech_token_size: int  # S speech codes (6561); the decoder has S+3 classes (eos, S+1, fill)
    layer_types: list[str] = field(default_factory=list)  # "attention" | "mamba", one per layer
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    mamba: MambaConfig = field(default_factory=MambaConfig)
    family: str = "cosyvoice2-qwen2lm"

    # ---- derived ids (CosyVoice 2's Qwen2LM) ----
    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @property
    def decoder_classes(self) -> int:
        return self.speech_token_size + 3

    @property
    def eos_id(self) -> int:
        return self.speech_token_size

    @property
    def fill_id(self) -> int:
        return self.speech_token_size + 2

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return (self.speech_token_size, self.speech_token_size + 1, self.speech_token_size + 2)

    @property
    def d_inner(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def d_xb(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == ATTENTION]

    @property
    def mamba_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == MAMBA]

    def __post_init__(self) -> None:
        if isinstance(self.mamba, dict):
            self.mamba = MambaConfig(**self.mamba)
        self.layer_types = list(self.layer_types)
        bad = [t for t in self.layer_types if t not in LAYER_TYPES]
        if bad:
            raise UserError(f"Unknown layer type {bad[0]!r} in layer_types; use 'attention' or 'mamba'.")
        if not self.layer_types:
            raise UserError("The model config has no layers (layer_types is empty).")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )

    # ---- (de)serialisation: config.yaml ----
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        # Derived values are written for readers of the file; from_dict ignores them.
        d["derived"] = {
            "num_layers": self.num_layers,
            "eos_id": self.eos_id,
            "fill_id": self.fill_id,
            "stop_ids": list(self.stop_ids),
            "decoder_classes": self.decoder_classes,
            "attention_layers": self.attention_layers,
            "mamba_layers": self.mamba_layers,
        }
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "ModelConfig":
        d = dict(d)
        derived = d.pop("derived", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"{source} has unknown field(s) {unknown}; is it a MamTra config.yaml?")
        missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in d
                         and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        if missing:
            raise UserError(f"{source} is missing field(s) {missing}; re-create it with `mamtra transfer`.")
        if isinstance(d.get("mamba"), dict):
            d["mamba"] = dict(d["mamba"])  # a copy: the checks below may convert values in place
            mnames = {f.name for f in dataclasses.fields(MambaConfig)}
            bad = sorted(set(d["mamba"]) - mnames)
            if bad:
                raise UserError(f"{source} has unknown mamba field(s) {bad}.")
        problem = _value_problem(d, derived)
        if problem:
            raise UserError(f"{source}: {problem}; correct the file or re-create it with the stage that wrote it.")
        if isinstance(d.get("mamba"), dict):
            d["mamba"] = MambaConfig(**d["mamba"])
        return cls(**d)

    def save(self, path: Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: Path) -> "ModelConfig":
        import yaml

        try:
            d = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"Cannot read model config {path}: {e}.") from None
        if not isinstance(d, dict):
            raise UserError(f"{path} is not a MamTra config.yaml (expected a mapping).")
        return cls.from_dict(d, source=str(path))

    def with_layer_types(self, layer_types: list[str]) -> "ModelConfig":
        return dataclasses.replace(self, layer_types=list(layer_types), mamba=dataclasses.replace(self.mamba))


# ---- checks of a config read from a file ----
# A hand-edited or damaged config.yaml must fail as one sentence naming the file and the field, not as a
# TypeError or a negative tensor size deep inside the model's constructor.
_POSITIVE_INTS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "text_vocab_size", "speech_token_size", "max_position_embeddings")
_POSITIVE_FLOATS = ("rope_theta", "rms_norm_eps")
_MAMBA_POSITIVE_INTS = ("d_conv", "chunk_size")
_MAMBA_POSITIVE_FLOATS = ("dt_min", "dt_max", "dt_init_floor", "A_init_min", "A_init_max", "norm_eps")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # YAML's `true` is not a size


def _as_float(d: dict, key: str):
    """d[key] as a float if it is a number. PyYAML reads `1e-6` (no dot) as a *string*, a well-known YAML 1.1
    quirk, so a numeric string is accepted and converted in place; anything else → None."""
    v = d[key]
    if _is_int(v) or isinstance(v, float):
        return float(v)
    if isinstance(v, str):
        try:
            d[key] = float(v)
            return d[key]
        except ValueError:
            return None
    return None


def _positive_problem(d: dict, ints, floats, prefix: str) -> str | None:
    """The first of `ints` / `floats` present in `d` that is not a positive integer / finite positive number."""
    for key in ints:
        if key in d and not (_is_int(d[key]) and d[key] > 0):
            return f"field {prefix}{key} is {d[key]!r}, but it must be a positive integer"
    for key in floats:
        if key in d:
            v = _as_float(d, key)
            if v is None or not v > 0 or v == float("inf"):
                return f"field {prefix}{key} is {d[key]!r}, but it must be a positive number"
    return None


def _value_problem(d: dict, derived) -> str | None:
    """The first wrong type or impossible value in a config mapping (before construction), as a clause naming
    the field, or None. Converts numeric strings of float fields in place (see `_as_float`)."""
    problem = _positive_problem(d, _POSITIVE_INTS, _POSITIVE_FLOATS, "")
    if problem:
        return problem
    if "family" in d and not isinstance(d["family"], str):
        return f"field family is {d['family']!r}, but it must be a string"
    types = d.get("layer_types")
    if not isinstance(types, (list, tuple)) or not types:
        return f"field layer_types is {types!r}, but it must be a non-empty list of 'attention' / 'mamba'"
    bad = next((t for t in types if t not in LAYER_TYPES), None)
    if bad is not None:
        return f"field layer_types holds {bad!r}, but each entry must be 'attention' or 'mamba'"
    if isinstance(derived, dict) and "num_layers" in derived and derived["num_layers"] != len(types):
        return (f"field layer_types lists {len(types)} layer(s) but derived.num_layers says "
                f"{derived['num_layers']!r} (the two disagree, so the file was edited or damaged)")
    heads, kv = d.get("num_attention_heads"), d.get("num_key_value_heads")
    if _is_int(heads) and _is_int(kv) and heads % kv:
        return (f"field num_attention_heads ({heads}) is not a multiple of field num_key_value_heads ({kv}), "
                "as grouped-query attention needs")
    if ATTENTION in types and _is_int(d.get("head_dim")) and d["head_dim"] % 2:
        return f"field head_dim is {d['head_dim']}, but rotary position embeddings need an even head_dim"
    mamba = d.get("mamba")
    if mamba is None or isinstance(mamba, MambaConfig):
        return None
    if not isinstance(mamba, dict):
        return f"field mamba is {mamba!r}, but it must be a mapping of Mamba-2 settings"
    problem = _positive_problem(mamba, _MAMBA_POSITIVE_INTS, _MAMBA_POSITIVE_FLOATS, "mamba.")
    if problem:
        return problem
    m = MambaConfig(**mamba)
    if m.dt_min > m.dt_max:
        return f"field mamba.dt_min ({m.dt_min}) is larger than field mamba.dt_max ({m.dt_max})"
    if m.A_init_min > m.A_init_max:
        return f"field mamba.A_init_min ({m.A_init_min}) is larger than field mamba.A_init_max ({m.A_init_max})"
    return None
