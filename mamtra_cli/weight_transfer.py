"""Attention → Mamba-2 transfer (the paper's Fig. 2): which layers become Mamba, and how they are initialised.

Layouts. A ratio `1:k` over L layers keeps L/(k+1) attention layers (an error if it does not divide).
Placements: `uniform` (attention last in each group of k+1: for 24 layers and 1:1 the odd layers, for 1:3
layers 3, 7, …, 23 — MambaInLlama's layout), `uniform-first` (first in each group), `front`, `back`,
`importance` (measured: keep the layers whose replacement alone hurts the teacher most, `layer_importance`),
or an explicit list of attention layer indices.

Init. `reused`: for each replaced layer C ← W_Q (+ Q bias), B ← W_K (+ K bias), x ← W_V (+ V bias),
out_proj ← W_O; z, dt, dt_bias, A_log, D, conv, gate norm get Mamba's usual init. `xavier` / `kaiming`
(the Fig. 6 ablations): in_proj and out_proj drawn fresh instead. Everything outside the replaced mixers —
embeddings, head, MLPs, both norms of every layer, kept attention layers — is copied bit for bit.

`transfer` works on a model in memory; `transfer_to_dir` is `mamtra transfer`: teacher in, hybrid model
directory out (config.yaml, model.safetensors, manifest.json).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from mamtra_cli.errors import UserError
from mamtra_cli.models.config import ATTENTION, MAMBA, ModelConfig
from mamtra_cli.models.speech_lm import SpeechLM

PLACEMENTS = ("uniform", "uniform-first", "front", "back", "importance")
FIXED_PLACEMENTS = PLACEMENTS[:4]  # laid out from the layer count alone; `importance` needs data
INITS = ("reused", "xavier", "kaiming")


def parse_ratio(ratio: str) -> int:
    """'1:k' → k (Mamba layers per attention layer)."""
    m = re.fullmatch(r"\s*1\s*:\s*(\d+)\s*", ratio or "")
    if not m or int(m.group(1)) < 0:
        raise UserError(f"Bad --ratio {ratio!r}; write attention:Mamba as 1:k, e.g. 1:1, 1:3, 1:5 or 1:11.")
    return int(m.group(1))


def attention_layers_for(num_layers: int, k: int, placement: str,
                         importance: list[dict] | None = None) -> list[int]:
    """The attention layers of a 1:k layout. `importance` (`layer_importance`'s records) is what the
    `importance` placement ranks by: the L/(k+1) layers with the largest CE increase, ties to the lower index."""
    check_placement(placement, probe_given=importance is not None)
    if num_layers % (k + 1):
        raise UserError(f"Ratio 1:{k} does not divide the teacher's {num_layers} layers "
                        f"({num_layers} is not a multiple of {k + 1}); choose another ratio or --attention-layers.")
    n_attn, group = num_layers // (k + 1), k + 1
    if placement == "uniform":
        return [g * group + k for g in range(n_attn)]
    if placement == "uniform-first":
        return [g * group for g in range(n_attn)]
    if placement == "front":
        return list(range(n_attn))
    if placement == "importance":
        if len(importance) < n_attn:
            raise UserError(f"Ratio 1:{k} keeps {n_attn} attention layers but the teacher has only "
                            f"{len(importance)}; choose a higher k.")
        ranked = sorted(importance, key=lambda r: (-r["ce_increase"], r["layer"]))
        return sorted(r["layer"] for r in ranked[:n_attn])
    return list(range(num_layers - n_attn, num_layers))


def check_placement(placement: str, probe_given: bool) -> None:
    """One sentence for an unknown placement, or for `importance` without the data it measures on."""
    if placement not in PLACEMENTS:
        raise UserError(f"Unknown --placement {placement!r}; use one of {', '.join(PLACEMENTS)} "
                        "or --attention-layers.")
    if placement == "importance" and not probe_given:
        raise UserError("--placement importance measures every layer on data; give --probe-data MANIFEST "
                        "(a few dozen utterances of the teacher's kind).")


def layer_importance(teacher: SpeechLM, utts: list, seed: int = 0, batch_size: int = 8,
                     progress=None) -> list[dict]:
    """How much the teacher relies on each of its attention layers: for every attention layer i, the teacher
    with layer i alone replaced by its attention-initialised Mamba (`transfer(..., init="reused")`, untrained)
    is scored on `utts` (`scoring.score_utterances`, teacher forcing). Returns one record per attention layer,
    {layer, ce, ce_increase} (CE in nats per speech token, increase over the unchanged teacher's).

    Why this ranks layers: the Mamba layers are trained afterwards and the kept attention layers are not, so
    the layers worth keeping are those whose job a transferred Mamba does worst. On the mini voice (12 layers,
    400 real utterances) replacing layer 5 or 0 alone raised CE from 2.72 to 6.36 / 6.32 and layer 9 or 11
    to 3.41 / 3.63. Distilled alike, the 1:3 hybrid with `uniform` layers 3, 7, 11 had Whisper WER 0.957 and with
    these layers (0, 3, 5) 0.663, the teacher 0.531 (issue 13's notes)."""
    from mamtra_cli.scoring import score_utterances

    if not utts:
        raise UserError("The --probe-data manifest has no utterances; give a few dozen.")
    base = score_utterances(teacher, utts, batch_size=batch_size)["ce"]
    attention = teacher.config.attention_layers
    records = []
    for i in attention:
        student, _ = transfer(teacher, [j for j in attention if j != i], init="reused", seed=seed)
        ce = score_utterances(student, utts, batch_size=batch_size)["ce"]
        records.append({"layer": i, "ce": ce, "ce_increase": ce - base})
        del student
        if progress:
            progress(i)
    return records


def parse_layer_list(text: str, num_layers: int) -> list[int]:
    try:
        idx = sorted({int(t) for t in text.replace(" ", "").split(",") if t != ""})
    except ValueError:
        raise UserError(f"Bad --attention-layers {text!r}; give comma-separated layer indices, e.g. 3,7,11.") from None
    bad = [i for i in idx if not 0 <= i < num_layers]
    if bad:
        raise UserError(f"--attention-layers index {bad[0]} is out of range; the teacher has layers 0..{num_layers - 1}.")
    return idx


def layer_types_from(num_layers: int, attention_layers: list[int]) -> list[str]:
    keep = set(attention_layers)
    return [ATTENTION if i in keep else MAMBA for i in range(num_layers)]


@torch.no_grad()
def transfer(teacher: SpeechLM, attention_layers: list[int], init: str = "reused", seed: int = 0
             ) -> tuple[SpeechLM, list[dict]]:
    """Build the hybrid student. Returns (student, per-layer records {layer, type, source})."""
    if init not in INITS:
        raise UserError(f"Unknown --init {init!r}; use one of {', '.join(INITS)}.")
    tcfg: ModelConfig = teacher.config
    if any(t != ATTENTION for t in tcfg.layer_types):
        # A hybrid teacher is fine as long as every layer kept as attention is attention in the teacher.
        bad = [i for i in attention_layers if tcfg.layer_types[i] != ATTENTION]
        if bad:
            raise UserError(f"Layer {bad[0]} of the teacher is not attention, so it cannot stay attention.")
    scfg = tcfg.with_layer_types(layer_types_from(tcfg.num_layers, attention_layers))
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        student = SpeechLM(scfg)
    student = student.to_empty(device="cpu")
    student.backbone.rotary = type(student.backbone.rotary)(scfg.head_dim, scfg.rope_theta)
    t_state = teacher.state_dict()
    s_state = student.state_dict()
    records = []
    # 1) everything that exists in both (embeddings, head, norms, MLPs, kept mixers) is copied bit for bit
    for name, tensor in s_state.items():
        if name in t_state and ".mamba." not in name:
            tensor.copy_(t_state[name])
    # 2) the new Mamba mixers
    for i, layer in enumerate(student.backbone.layers):
        if scfg.layer_types[i] == ATTENTION:
            records.append({"layer": i, "type": ATTENTION, "source": f"teacher layer {i} attention (copied)"})
            continue
        if tcfg.layer_types[i] == MAMBA:  # a hybrid teacher's Mamba layer is copied as is
            for name, tensor in layer.mamba.state_dict().items():
                tensor.copy_(t_state[f"backbone.layers.{i}.mamba.{name}"])
            records.append({"layer": i, "type": MAMBA, "source": f"teacher layer {i} mamba (copied)"})
            continue
        mixer = layer.mamba
        mixer.reset_ssm_parameters(gen)
        attn = teacher.backbone.layers[i].self_attn
        if init == "reused":
            _init_from_attention(mixer, attn, scfg, gen)
            src = f"teacher layer {i} attention: C←W_Q+b_Q, B←W_K+b_K, x←W_V+b_V, out←W_O"
        else:
            _init_fresh(mixer, init, gen)
            src = f"fresh {init} in_proj/out_proj (MLP and norms from teacher layer {i})"
        records.append({"layer": i, "type": MAMBA, "source": src, "init": init})
    return student.eval(), records


def in_proj_slices(cfg: ModelConfig) -> dict[str, slice]:
    """Row ranges of in_proj's output: [z | x | B | C | dt]."""
    di, dx, nh = cfg.d_inner, cfg.d_xb, cfg.num_attention_heads
    edges = [0, di, di + dx, di + 2 * dx, 2 * di + 2 * dx, 2 * di + 2 * dx + nh]
    return {name: slice(edges[j], edges[j + 1]) for j, name in enumerate(("z", "x", "B", "C", "dt"))}


def _init_from_attention(mixer, attn, cfg: ModelConfig, gen: torch.Generator) -> None:
    s = in_proj_slices(cfg)
    w, b = mixer.in_proj.weight, mixer.in_proj.bias
    # z and dt rows have no attention counterpart: nn.Linear's default init (U(±1/√fan_in)), as Mamba has.
    bound = 1.0 / math.sqrt(w.shape[1])
    w.uniform_(-bound, bound, generator=gen)
    b.zero_()
    w[s["x"]] = attn.v_proj.weight
    b[s["x"]] = attn.v_proj.bias
    w[s["B"]] = attn.k_proj.weight
    b[s["B"]] = attn.k_proj.bias
    w[s["C"]] = attn.q_proj.weight
    b[s["C"]] = attn.q_proj.bias
    mixer.out_proj.weight.copy_(attn.o_proj.weight)


def _xavier(w: torch.Tensor, gen: torch.Generator) -> None:
    bound = math.sqrt(6.0 / (w.shape[0] + w.shape[1]))
    w.uniform_(-bound, bound, generator=gen)


def _init_fresh(mixer, init: str, gen: torch.Generator) -> None:
    for lin in (mixer.in_proj, mixer.out_proj):
        if init == "xavier":
            _xavier(lin.weight, gen)
        else:  # kaiming-normal for a linear layer followed by a (near-)linear path: std = √(2 / fan_in)
            lin.weight.normal_(0.0, math.sqrt(2.0 / lin.weight.shape[1]), generator=gen)
        if lin.bias is not None:
            lin.bias.zero_()


def count_changed_layers(teacher: nn.Module, student: nn.Module) -> list[int]:
    return [i for i, (a, b) in enumerate(zip(teacher.backbone.layers, student.backbone.layers))
            if a.layer_type != b.layer_type]


# ------------------------------------------------------------------------------------------- a model directory
def transfer_to_dir(teacher: str | Path, out: Path, ratio: str | None = None, profile: str | None = None,
                    placement: str = "uniform", attention_layers: str | list[int] | None = None, init: str = "reused",
                    config_json: Path | None = None, seed: int = 0, threads: int | None = None, force: bool = False,
                    probe_data: Path | None = None, *, console=None) -> dict:
    """`mamtra transfer`: load `teacher` (`mini`, a CosyVoice 2 dir, an llm.pt with `config_json`, or a MamTra
    model dir), replace some attention layers with Mamba-2 layers initialised from them, and write the hybrid
    to the model directory `out`. Returns the summary that `mamtra transfer --json` prints.

    Exactly one of `ratio` ("1:k", laid out by `placement`), `profile` (a layout profile name or YAML path)
    or `attention_layers` (indices, as a list or "3,7,11") says which layers stay attention. `init`: reused
    (C←Q, B←K, x←V, out←O) | xavier | kaiming; `seed` draws the fresh Mamba parameters. `probe_data` (a data
    manifest) is what placement `importance` scores each layer on (`layer_importance`); its table goes to the
    summary and the manifest. `console` (rich) gets progress and the final line; default stderr.
    """
    from rich.markup import escape

    from mamtra_cli import checkpoints, profiles
    from mamtra_cli.cli import apply_threads, check_threads, count_parameters, stderr_console
    from mamtra_cli.models.speech_lm import parameter_counts
    from mamtra_cli.teachers import load_teacher

    console = console or stderr_console()
    out = Path(out)
    check_threads(threads)
    if init not in INITS:
        raise UserError(f"Unknown --init {init!r}; use one of {', '.join(INITS)}.")
    if sum(x is not None for x in (ratio, profile, attention_layers)) != 1:
        raise UserError("Give exactly one of --ratio, --profile or --attention-layers.")
    if attention_layers is not None and not isinstance(attention_layers, str):
        attention_layers = ",".join(str(i) for i in attention_layers)
    checkpoints.check_output_dir(out, force)
    k = parse_ratio(ratio) if ratio is not None else None
    probing = placement == "importance" and ratio is not None
    check_placement(placement, probe_given=probe_data is not None or not probing)
    if probe_data is not None and not probing:
        raise UserError("--probe-data is read only by --ratio with --placement importance; drop it or use both.")
    if probing:
        from mamtra_cli.data_manifest import manifest_files

        manifest_files(Path(probe_data))  # a missing file fails before the teacher loads

    with console.status("loading teacher"):
        model, info = load_teacher(str(teacher), config_json)
    n_threads = apply_threads(threads, count_parameters(model))
    n = model.config.num_layers
    if attention_layers is not None:
        layers = parse_layer_list(attention_layers, n)
        placement_used = "explicit"
    elif profile is not None:
        prof = profiles.load("layouts", profile)
        if prof.get("num_layers") != n:
            raise UserError(f"Profile {profile!r} is for {prof.get('num_layers')} layers but the teacher has {n}; "
                            f"use --ratio {prof.get('ratio', '1:k')} instead.")
        layers = parse_layer_list(",".join(map(str, prof["attention_layers"])), n)
        placement_used = prof.get("placement", "explicit")
    else:
        importance = None
        if probing:
            from mamtra_cli.data_manifest import read_manifest
            from mamtra_cli.scoring import check_utterance_lengths

            cfg = model.config  # read with the teacher's vocabularies: a token it has no row for is refused
            _, probe_utts = read_manifest(Path(probe_data), text_vocab=cfg.text_vocab_size,
                                          speech_vocab=cfg.speech_token_size)
            check_utterance_lengths(probe_utts, cfg.max_position_embeddings, str(probe_data))
            attention_layers_for(n, k, "uniform")  # a ratio that does not divide is refused before the probe
            n_attn = len(cfg.attention_layers)
            with console.status(f"probing {n_attn} attention layers on {len(probe_utts)} utterances") as st:
                importance = layer_importance(model, probe_utts, seed=seed,
                                              progress=lambda i: st.update(f"probed layer {i} of {n_attn}"))
        layers = attention_layers_for(n, k, placement, importance)
        placement_used = placement

    with console.status(f"transferring ({init} init)"):
        student, records = transfer(model, layers, init=init, seed=seed)
    counts = parameter_counts(student)
    summary = {
        "out": str(out), "layer_types": student.config.layer_types, "attention_layers": layers,
        "mamba_layers": student.config.mamba_layers, "init": init, "placement": placement_used,
        "parameters": counts, "teacher_parameters": parameter_counts(model), "threads": n_threads,
    }
    probe = None
    if placement_used == "importance" and attention_layers is None and profile is None:
        pd = Path(probe_data)
        probe = {"data": checkpoints.file_fingerprint(pd) if pd.is_file() else {"path": str(pd.resolve())},
                 "utterances": len(probe_utts),
                 "layers": importance}
        summary["importance"] = importance
    manifest = checkpoints.run_manifest(
        "transfer", inputs={"teacher": info}, seed=seed,
        parameters={"ratio": ratio, "profile": profile, "placement": placement_used,
                    "attention_layers": layers, "init": init, **({"probe": probe} if probe else {})},
        outputs={"layers": records, "parameters": counts},
    )
    with checkpoints.staged_output(out, force) as tmp:
        checkpoints.save_model_dir(tmp, student.config, student.state_dict(), manifest)
    console.print(f"[green]wrote[/green] {escape(str(out))}: {len(layers)} attention + {len(student.config.mamba_layers)} "
                  f"Mamba layers, {counts['total']:,} parameters")
    return summary
