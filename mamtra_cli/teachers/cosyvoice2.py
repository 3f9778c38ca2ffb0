"""Reader for CosyVoice 2 teachers: the HyperPyYAML config, the Qwen2 config.json and `llm.pt`.

A CosyVoice 2 model directory holds `cosyvoice2.yaml` (HyperPyYAML), `llm.pt` (the speech LM
`Qwen2LM`'s state_dict, float32) and `CosyVoice-BlankEN/config.json` (the Qwen2 backbone's sizes). The LM
weights proper are in `llm.pt`; `CosyVoice-BlankEN/model.safetensors` holds different "base" weights that
`llm.pt` replaces, so it is never read here.

Sizes are taken from config.json and from the tensor shapes (text vocabulary = rows of the text
embedding, speech vocabulary = rows of `speech_embedding` − 3); nothing assumes the 0.5B model's numbers.
Every key of `llm.pt` is checked against the key set and the shapes that config.json implies, so a
checkpoint and a config.json that do not belong together fail with one sentence instead of loading
garbage.

Naming (CosyVoice → MamTra):
    llm.model.model.embed_tokens.weight     → text_embedding.weight
    llm.model.model.layers.{i}.<rest>       → backbone.layers.{i}.<rest>
    llm.model.model.norm.weight             → backbone.norm.weight
    llm.model.lm_head.weight                → (dropped: a tied copy of embed_tokens that CosyVoice never uses)
    llm_embedding / speech_embedding / llm_decoder keep their names.
"""

from __future__ import annotations

import json
from pathlib import Path

from mamtra_cli.checkpoints import load_foreign_checkpoint
from mamtra_cli.errors import UserError
from mamtra_cli.hyperpyyaml import Tagged, load_hyperpyyaml  # noqa: F401 (re-exported)
from mamtra_cli.models.config import ATTENTION, ModelConfig

YAML_NAME = "cosyvoice2.yaml"
LLM_PT_NAME = "llm.pt"
QWEN_DIR_NAME = "CosyVoice-BlankEN"
CONFIG_JSON_NAME = "config.json"
FINGERPRINT_LIMIT = 64 * 1024 * 1024

CV_PREFIX = "llm.model.model."
CV_LM_HEAD = "llm.model.lm_head.weight"
# Entries that CosyVoice's training loop adds next to the tensors of a saved checkpoint.
_TRAINING_EXTRAS = ("epoch", "step")

# --------------------------------------------------------------------------------------------------
# The llm: section
# --------------------------------------------------------------------------------------------------

_LLM_SCALARS = ("llm_input_size", "llm_output_size", "speech_token_size", "length_normalized_loss",
                "lsm_weight", "mix_ratio")
_SAMPLING_KEYS = ("top_p", "top_k", "win_size", "tau_r")


def read_llm_section(yaml_dict: dict, source: str = "the CosyVoice config") -> dict:
    """The speech LM settings of a loaded cosyvoice2.yaml: whatever of llm_input_size, llm_output_size,
    speech_token_size, length_normalized_loss, lsm_weight, mix_ratio is present; `class` (e.g.
    cosyvoice.llm.llm.Qwen2LM), `backbone_class`, `pretrain_path`, and `sampling` with the function name
    and its top_p / top_k / win_size / tau_r (CosyVoice's ras_sampling)."""
    llm = yaml_dict.get("llm") if isinstance(yaml_dict, dict) else None
    if llm is None:
        raise UserError(f"{source} has no `llm:` section; is it a CosyVoice 2 config (cosyvoice2.yaml)?")
    args = llm.args if isinstance(llm, Tagged) else llm
    if not isinstance(args, dict):
        raise UserError(f"The `llm:` section of {source} is not a mapping of settings; "
                        "is it a CosyVoice 2 config (cosyvoice2.yaml)?")
    out: dict = {}
    if isinstance(llm, Tagged):
        out["class"] = llm.target
    for k in _LLM_SCALARS:
        if k in args and not isinstance(args[k], Tagged):
            out[k] = args[k]
    backbone = args.get("llm")
    if isinstance(backbone, Tagged):
        out["backbone_class"] = backbone.target
        pp = backbone.get("pretrain_path")
        if pp is not None and not isinstance(pp, Tagged):
            out["pretrain_path"] = pp
    sampling = args.get("sampling")
    if sampling is not None:
        s: dict = {}
        if isinstance(sampling, Tagged):
            s["function"] = sampling.target
        sargs = sampling.args if isinstance(sampling, Tagged) else sampling
        if isinstance(sargs, dict):
            for k in _SAMPLING_KEYS:
                if k in sargs and not isinstance(sargs[k], Tagged):
                    s[k] = sargs[k]
        out["sampling"] = s
    return out


# --------------------------------------------------------------------------------------------------
# Qwen2 config.json → sizes
# --------------------------------------------------------------------------------------------------


def _read_qwen_config(config_json: Path) -> dict:
    try:
        cfg = json.loads(Path(config_json).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"Qwen2 config {config_json} does not exist; pass the config.json that belongs to "
                        "the llm.pt (CosyVoice-BlankEN/config.json in a CosyVoice 2 directory).") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"Cannot read Qwen2 config {config_json}: {e}; pass a Qwen2 config.json "
                        "as transformers writes it.") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{config_json} is not a Qwen2 config.json (expected a JSON object).")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers")
               if not isinstance(cfg.get(k), int) or isinstance(cfg.get(k), bool) or cfg.get(k) <= 0]
    if missing:
        raise UserError(f"{config_json} lacks a positive integer {', '.join(missing)}; "
                        "pass a Qwen2 config.json as transformers writes it.")
    mt = cfg.get("model_type")
    if mt is not None and mt != "qwen2":
        raise UserError(f"{config_json} describes a {mt!r} model; a CosyVoice 2 teacher has a 'qwen2' "
                        "backbone (pass the CosyVoice-BlankEN/config.json of the model).")
    if cfg.get("rope_scaling"):
        raise UserError(f"{config_json} sets rope_scaling {cfg['rope_scaling']!r}, which MamTra does not "
                        "support; CosyVoice 2 uses plain RoPE (rope_scaling null).")
    if cfg.get("use_sliding_window"):
        raise UserError(f"{config_json} sets use_sliding_window true, which MamTra does not support; "
                        "CosyVoice 2 uses full attention (use_sliding_window false).")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"{config_json} sets hidden_act {act!r}; MamTra's Qwen2 MLP is SwiGLU with 'silu'.")
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if cfg["hidden_size"] % heads:
            raise UserError(f"{config_json}: hidden_size {cfg['hidden_size']} is not divisible by "
                            f"num_attention_heads {heads} and no head_dim is given.")
        head_dim = cfg["hidden_size"] // heads
    if heads % kv:
        raise UserError(f"{config_json}: num_attention_heads {heads} is not a multiple of "
                        f"num_key_value_heads {kv}.")
    return {
        "hidden_size": cfg["hidden_size"],
        "intermediate_size": cfg["intermediate_size"],
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": int(head_dim),
        "num_hidden_layers": cfg["num_hidden_layers"],
        "rope_theta": float(cfg.get("rope_theta", 10000.0)),  # transformers' Qwen2Config default
        "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "max_position_embeddings": int(cfg.get("max_position_embeddings", 32768)),
        "vocab_size": cfg.get("vocab_size"),
    }


def _expected_shapes(q: dict, text_vocab: int, speech_classes: int) -> dict[str, tuple[int, ...]]:
    """Every key of a CosyVoice 2 Qwen2LM state_dict with its shape, in CosyVoice's order."""
    H, I, d = q["hidden_size"], q["intermediate_size"], q["head_dim"]
    nq, nkv = q["num_attention_heads"] * d, q["num_key_value_heads"] * d
    shapes: dict[str, tuple[int, ...]] = {"llm_embedding.weight": (2, H),
                                          CV_PREFIX + "embed_tokens.weight": (text_vocab, H)}
    for i in range(q["num_hidden_layers"]):
        p = f"{CV_PREFIX}layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (nq, H), p + "self_attn.q_proj.bias": (nq,),
            p + "self_attn.k_proj.weight": (nkv, H), p + "self_attn.k_proj.bias": (nkv,),
            p + "self_attn.v_proj.weight": (nkv, H), p + "self_attn.v_proj.bias": (nkv,),
            p + "self_attn.o_proj.weight": (H, nq),
            p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I),
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
        })
    shapes[CV_PREFIX + "norm.weight"] = (H,)
    shapes[CV_LM_HEAD] = (text_vocab, H)
    shapes["llm_decoder.weight"] = (speech_classes, H)
    shapes["llm_decoder.bias"] = (speech_classes,)
    shapes["speech_embedding.weight"] = (speech_classes, H)
    return shapes


def _cv_to_ours(key: str) -> str | None:
    if key == CV_LM_HEAD:
        return None
    if key == CV_PREFIX + "embed_tokens.weight":
        return "text_embedding.weight"
    if key == CV_PREFIX + "norm.weight":
        return "backbone.norm.weight"
    if key.startswith(CV_PREFIX + "layers."):
        return "backbone." + key[len(CV_PREFIX):]
    return key


def _ours_to_cv(key: str) -> str:
    if key == "text_embedding.weight":
        return CV_PREFIX + "embed_tokens.weight"
    if key == "backbone.norm.weight":
        return CV_PREFIX + "norm.weight"
    if key.startswith("backbone.layers."):
        return CV_PREFIX + key[len("backbone."):]
    return key


def _few(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _locate(path: Path, config_json: Path | None) -> tuple[Path, Path, Path | None]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"Teacher {path} does not exist; pass a CosyVoice 2 model directory (with llm.pt and "
                        f"{QWEN_DIR_NAME}/config.json) or an llm.pt file.")
    if path.is_dir():
        llm_pt = path / LLM_PT_NAME
        if not llm_pt.is_file():
            others = [n for n in ("cosyvoice.yaml", "cosyvoice3.yaml") if (path / n).is_file()]
            hint = (f" (it has {others[0]}: only CosyVoice 2 models are supported)" if others
                    and not (path / YAML_NAME).is_file() else "")
            raise UserError(f"{path} has no {LLM_PT_NAME}{hint}; pass a CosyVoice 2 model directory "
                            f"(cosyvoice2.yaml, llm.pt, {QWEN_DIR_NAME}/config.json) such as CosyVoice2-0.5B.")
        base = path
    else:
        llm_pt = path
        base = path.parent
    if config_json is None:
        config_json = base / QWEN_DIR_NAME / CONFIG_JSON_NAME
        if not config_json.is_file():
            what = f"{path} has no {QWEN_DIR_NAME}/{CONFIG_JSON_NAME}" if path.is_dir() else \
                f"No Qwen2 config.json was given for {path} (and {config_json} does not exist)"
            raise UserError(f"{what}; pass the config.json that belongs to this llm.pt "
                            "(--teacher-config / config_json).")
    config_json = Path(config_json)
    if not config_json.is_file():
        raise UserError(f"Qwen2 config {config_json} does not exist; pass the config.json that belongs to "
                        f"{llm_pt}.")
    yaml_path = base / YAML_NAME
    return llm_pt, config_json, (yaml_path if yaml_path.is_file() else None)


def load_cosyvoice2_lm(path: Path, config_json: Path | None = None):
    """Read a CosyVoice 2 speech LM.

    `path`: a CosyVoice 2 model directory (llm.pt + CosyVoice-BlankEN/config.json; cosyvoice2.yaml is
    optional and only cross-checked) or an `llm.pt` file (then `config_json` names its Qwen2 config.json;
    without it, `CosyVoice-BlankEN/config.json` beside the file is used if present).

    Returns `(ModelConfig, state_dict in MamTra naming, info)`; every user-fixable problem raises
    `UserError` with one sentence.
    """
    import torch

    from mamtra_cli.checkpoints import file_fingerprint

    llm_pt, config_json, yaml_path = _locate(Path(path), config_json)
    q = _read_qwen_config(config_json)

    obj = load_foreign_checkpoint(llm_pt, "pass a CosyVoice 2 llm.pt (a torch.save'd Qwen2LM state_dict)")
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict) \
            and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"{llm_pt} holds a {type(obj).__name__}, not a state_dict; pass CosyVoice 2's llm.pt.")
    sd = dict(obj)
    extras = {k: sd.pop(k) for k in _TRAINING_EXTRAS if k in sd and not isinstance(sd[k], torch.Tensor)}
    non_tensor = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if not any(k.startswith(CV_PREFIX) for k in sd):
        some = _few(sorted(sd), 3) if sd else "no keys at all"
        raise UserError(f"{llm_pt} is not a CosyVoice 2 speech-LM checkpoint: it has no "
                        f"'{CV_PREFIX}*' keys (it has {some}); pass the llm.pt of a CosyVoice 2 model "
                        "(not flow.pt or hift.pt).")
    if non_tensor:
        raise UserError(f"{llm_pt} has {len(non_tensor)} non-tensor entr{'y' if len(non_tensor) == 1 else 'ies'} "
                        f"({_few(non_tensor)}); pass a plain CosyVoice 2 llm.pt state_dict.")

    # Sizes that only the tensors know.
    emb = sd.get(CV_PREFIX + "embed_tokens.weight")
    text_vocab = int(emb.shape[0]) if emb is not None and emb.dim() == 2 else (q["vocab_size"] or 0)
    sp = sd.get("speech_embedding.weight")
    speech_classes = int(sp.shape[0]) if sp is not None and sp.dim() == 2 else None
    if speech_classes is None:
        dec = sd.get("llm_decoder.weight")
        speech_classes = int(dec.shape[0]) if dec is not None and dec.dim() == 2 else 3

    expected = _expected_shapes(q, text_vocab, speech_classes)
    missing = [k for k in expected if k not in sd and k != CV_LM_HEAD]
    unexpected = [k for k in sd if k not in expected]
    wrong = [(k, tuple(sd[k].shape), expected[k]) for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} key(s) missing ({_few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) ({_few(unexpected)})")
    if wrong:
        shown = "; ".join(f"{k} is {list(s)} but config.json implies {list(e)}" for k, s, e in wrong[:3])
        more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        problems.append(f"{len(wrong)} tensor(s) with the wrong shape ({shown}{more})")
    if q["vocab_size"] is not None and q["vocab_size"] != text_vocab and not wrong:
        problems.append(f"the text embedding has {text_vocab} rows but config.json says vocab_size "
                        f"{q['vocab_size']}")
    if speech_classes < 4:
        problems.append(f"speech_embedding has {speech_classes} rows, fewer than the 3 special tokens plus one "
                        "speech code")
    if problems:
        raise UserError(
            f"{llm_pt} does not match {config_json} ({q['num_hidden_layers']} layers, hidden "
            f"{q['hidden_size']}, {q['num_attention_heads']}/{q['num_key_value_heads']} heads of "
            f"{q['head_dim']}, MLP {q['intermediate_size']}): " + ", ".join(problems)
            + "; pass the config.json that belongs to this llm.pt (and an llm.pt saved from CosyVoice 2's "
            "Qwen2LM).")
    bad_dtype = [k for k, v in sd.items() if not v.is_floating_point()]
    if bad_dtype:
        raise UserError(f"{llm_pt} has non-floating-point weights ({_few(bad_dtype)}); "
                        "pass a CosyVoice 2 llm.pt.")
    speech_token_size = speech_classes - 3

    # Optional cross-check with cosyvoice2.yaml.
    llm_section: dict = {}
    if yaml_path is not None:
        llm_section = read_llm_section(load_hyperpyyaml(yaml_path), source=str(yaml_path))
        cls = llm_section.get("class", "")
        if cls and not cls.endswith("Qwen2LM"):
            raise UserError(f"{yaml_path} builds {cls}, not CosyVoice 2's Qwen2LM; only CosyVoice 2 "
                            "speech LMs are supported.")
        sts = llm_section.get("speech_token_size")
        if isinstance(sts, int) and sts != speech_token_size:
            raise UserError(f"{yaml_path} says speech_token_size {sts} but {llm_pt} has "
                            f"{speech_classes} speech_embedding rows (= {speech_token_size} + 3); "
                            "the yaml and llm.pt come from different models — use the matching pair.")
        for key in ("llm_input_size", "llm_output_size"):
            v = llm_section.get(key)
            if isinstance(v, int) and v != q["hidden_size"]:
                raise UserError(f"{yaml_path} says {key} {v} but {config_json} and {llm_pt} have hidden size "
                                f"{q['hidden_size']}; the yaml comes from a different model — use the "
                                "matching pair.")

    config = ModelConfig(
        hidden_size=q["hidden_size"],
        intermediate_size=q["intermediate_size"],
        num_attention_heads=q["num_attention_heads"],
        num_key_value_heads=q["num_key_value_heads"],
        head_dim=q["head_dim"],
        text_vocab_size=text_vocab,
        speech_token_size=speech_token_size,
        layer_types=[ATTENTION] * q["num_hidden_layers"],
        rope_theta=q["rope_theta"],
        rms_norm_eps=q["rms_norm_eps"],
        max_position_embeddings=q["max_position_embeddings"],
    )
    ours = {}
    for k, v in sd.items():
        nk = _cv_to_ours(k)
        if nk is not None:
            ours[nk] = v
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in ours.values()})
    info = {
        "format": "cosyvoice2",
        "llm_pt": file_fingerprint(llm_pt, limit_bytes=FINGERPRINT_LIMIT),
        "config_json": file_fingerprint(config_json),
        "yaml": str(yaml_path.resolve()) if yaml_path is not None else None,
        "llm_section": llm_section,
        "sampling": llm_section.get("sampling", {}),
        "dropped_keys": [CV_LM_HEAD] if CV_LM_HEAD in sd else [],
        "training_extras": {k: v for k, v in extras.items() if isinstance(v, (int, float, str))},
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "num_parameters": int(sum(v.numel() for v in ours.values())),
    }
    return config, ours, info


def to_cosyvoice2_state_dict(config: ModelConfig, state_dict: dict) -> dict:
    """MamTra naming → CosyVoice 2 `Qwen2LM` naming for an all-attention model, with the tied
    `llm.model.lm_head.weight` re-added (the same tensor as the text embedding), in CosyVoice's key order.
    `torch.save` of the result is an llm.pt that CosyVoice loads with strict=True."""
    if any(t != ATTENTION for t in config.layer_types):
        raise UserError("Only all-attention models can be written in CosyVoice 2's llm.pt naming; this model "
                        f"has Mamba layers {config.mamba_layers}.")
    mapped = {_ours_to_cv(k): v for k, v in state_dict.items()}
    emb = mapped.get(CV_PREFIX + "embed_tokens.weight")
    if emb is None:
        raise UserError("The state_dict has no text_embedding.weight; it is not a MamTra speech LM.")
    mapped[CV_LM_HEAD] = emb
    q = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
         "head_dim": config.head_dim, "num_attention_heads": config.num_attention_heads,
         "num_key_value_heads": config.num_key_value_heads, "num_hidden_layers": config.num_layers}
    order = _expected_shapes(q, config.text_vocab_size, config.decoder_classes)
    missing = [k for k in order if k not in mapped]
    extra = [k for k in mapped if k not in order]
    if missing or extra:
        raise UserError(f"The state_dict does not fit its config for CosyVoice 2 export: missing "
                        f"{_few(missing) or 'none'}, unexpected {_few(extra) or 'none'}.")
    return {k: mapped[k] for k in order}
