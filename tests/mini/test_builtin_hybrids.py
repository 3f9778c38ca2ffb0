"""Shipped hybrids of the mini voice (`mini-1-1`, …): stored as their difference from the mini teacher
(`pack_hybrid`), materialised bit-identically into a cached mini voice directory (`materialize`), and accepted by
name wherever `mini` is (score, synth, distill, export, profile, pseudo-label, the Python API).

A real 1:1 hybrid is made from the built-in mini with `transfer`, one Mamba and one attention tensor are
perturbed (so "differs from the teacher" is exercised on both kinds of layer), and it is packed into a temporary
HYBRIDS_DIR; the cache root is a temporary MAMTRA_CACHE_DIR."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mamtra_cli import checkpoints
from mamtra_cli.errors import UserError
from mamtra_cli.mini import BUILTIN_DIR, hybrids, is_builtin, mini_dir
from tests.stages.harness import one_error, run

pytestmark = pytest.mark.skipif(not (BUILTIN_DIR / "model.safetensors").is_file(),
                                reason="the built-in mini voice is not in this checkout (mamtra build-mini)")

NAME = "mini-1-1"
SHIPPED_DIR = hybrids.HYBRIDS_DIR  # the real one: the autouse fixture below points HYBRIDS_DIR elsewhere
MAMBA_KEY = "backbone.layers.0.mamba.out_proj.weight"  # layer 0 is Mamba in a 1:1 hybrid (uniform placement)
ATTN_KEY = "backbone.layers.1.self_attn.q_proj.weight"  # layer 1 stays attention, copied from the teacher


@pytest.fixture(scope="module")
def hybrid_dir(tmp_path_factory) -> Path:
    """A full model directory: the 1:1 hybrid of the built-in mini, with MAMBA_KEY and ATTN_KEY perturbed."""
    from mamtra_cli.models.config import ModelConfig
    from mamtra_cli.weight_transfer import transfer_to_dir

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("hybrid") / "h"
    transfer_to_dir("mini", d, ratio="1:1", threads=1)
    state = load_file(str(d / checkpoints.WEIGHTS_FILE))
    g = torch.Generator().manual_seed(0)
    for key in (MAMBA_KEY, ATTN_KEY):
        state[key] = state[key] + 0.01 * torch.randn(state[key].shape, generator=g)
    checkpoints.save_model_dir(d, ModelConfig.load(d / checkpoints.CONFIG_FILE), state, checkpoints.read_manifest(d))
    return d


@pytest.fixture(scope="module")
def packed(hybrid_dir, tmp_path_factory) -> tuple[Path, dict]:
    """(a HYBRIDS_DIR holding mini-1-1 packed from `hybrid_dir`, pack_hybrid's summary)."""
    root = tmp_path_factory.mktemp("shipped")
    summary = hybrids.pack_hybrid(hybrid_dir, root / NAME, manifest={"stage": "build-hybrids", "seed": 0})
    return root, summary


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def shipped(packed, module_cache, monkeypatch) -> Path:
    """Every test sees the packed mini-1-1 as shipped, and a cache shared by the module (built once)."""
    monkeypatch.setattr(hybrids, "HYBRIDS_DIR", packed[0])
    monkeypatch.setenv("MAMTRA_CACHE_DIR", str(module_cache))
    return packed[0]


def copy_shipped(src_root: Path, tmp_path: Path, monkeypatch) -> Path:
    """A private HYBRIDS_DIR (a copy of the packed one) that a test may damage."""
    root = tmp_path / "hybrids"
    shutil.copytree(src_root, root)
    monkeypatch.setattr(hybrids, "HYBRIDS_DIR", root)
    return root / NAME


def data_file(tmp_path: Path, rows: int = 4) -> Path:
    """The built-in demo_test.jsonl cut to its header and `rows` utterances."""
    lines = (BUILTIN_DIR / "demo_test.jsonl").read_text().splitlines()
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines[: rows + 1]) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- the format
def test_pack_stores_only_the_tensors_not_shared_with_the_teacher(hybrid_dir, packed):
    root, summary = packed
    own = load_file(str(root / NAME / hybrids.OWN_WEIGHTS))
    full = load_file(str(hybrid_dir / checkpoints.WEIGHTS_FILE))
    mamba = {k for k in full if ".mamba." in k}
    assert {int(k.split(".")[2]) for k in mamba} == {0, 2, 4, 6, 8, 10}
    assert set(own) == mamba | {ATTN_KEY}
    assert not any(k.endswith("embedding.weight") or k.startswith("llm_decoder") for k in own)
    assert all(torch.equal(own[k], full[k]) and own[k].dtype == full[k].dtype for k in own)
    assert summary["own_tensors"] == len(own) and summary["shared_tensors"] == len(full) - len(own)
    size = (root / NAME / hybrids.OWN_WEIGHTS).stat().st_size
    assert summary["own_bytes"] == size < 0.2 * (hybrid_dir / checkpoints.WEIGHTS_FILE).stat().st_size
    manifest = json.loads((root / NAME / checkpoints.MANIFEST_FILE).read_text())
    base_sha = checkpoints.file_fingerprint(BUILTIN_DIR / checkpoints.WEIGHTS_FILE)["sha256"]
    assert manifest["base"] == {"name": "mini", "weights_sha256": base_sha}
    assert manifest["stage"] == "build-hybrids" and manifest["own_weights"]["tensors"] == len(own)
    assert (root / NAME / "config.yaml").read_bytes() == (hybrid_dir / "config.yaml").read_bytes()
    assert not any(p.name.startswith(".") for p in root.iterdir())  # the temporary sibling is gone


def test_packing_the_same_weights_twice_gives_the_same_bytes(hybrid_dir, packed, tmp_path):
    """safetensors writes its metadata in a hash-map order that changes between calls; the packed file (whose
    sha256 the manifest records and the cache keys on) must not."""
    again = hybrids.pack_hybrid(hybrid_dir, tmp_path / "again", manifest=json.loads(
        (packed[0] / NAME / checkpoints.MANIFEST_FILE).read_text()))
    first = (packed[0] / NAME / hybrids.OWN_WEIGHTS).read_bytes()
    assert (tmp_path / "again" / hybrids.OWN_WEIGHTS).read_bytes() == first and again["own_bytes"] == len(first)


def test_save_safetensors_writes_sorted_metadata_and_loads_back(tmp_path):
    from safetensors import safe_open

    tensors = {"b": torch.arange(5.0), "a": torch.ones(2, 3, dtype=torch.float16)}
    meta = {"zeta": "1", "format": "pt", "alpha": "x" * 13, "mamtra": "0.1", "m2": "y"}
    blobs = set()
    for i in range(8):  # a new hash-map order is likely among 8 saves of 5 keys (24 of 120 orders seen in trials)
        path = tmp_path / f"w{i}.safetensors"
        checkpoints.save_safetensors(tensors, path, dict(reversed(meta.items())) if i % 2 else meta)
        blobs.add(path.read_bytes())
    assert len(blobs) == 1
    blob = blobs.pop()
    n = int.from_bytes(blob[:8], "little")  # safetensors: u64 little-endian header length, then the JSON header
    header = json.loads(blob[8:8 + n])
    assert list(header["__metadata__"]) == sorted(meta)
    with safe_open(str(tmp_path / "w3.safetensors"), "pt") as f:
        assert f.metadata() == meta
        assert torch.equal(f.get_tensor("a"), tensors["a"]) and torch.equal(f.get_tensor("b"), tensors["b"])


def test_the_shipped_hybrids_are_what_the_documented_command_builds():
    """`mamtra build-hybrids --out mamtra_cli/builtin/hybrids --force` (README) runs each ratio's shipped recipe
    and placement: a shipped hybrid packed under others would not be what that command rebuilds."""
    from dataclasses import asdict

    from mamtra_cli.mini.build_hybrids import RATIOS, shipped_placement, shipped_recipe

    for ratio in RATIOS:
        name = "mini-" + ratio.replace(":", "-")
        manifest = json.loads((SHIPPED_DIR / name / "manifest.json").read_text())
        expected = json.loads(json.dumps(asdict(shipped_recipe(ratio))))  # tuples → lists, as in the manifest
        assert manifest["parameters"]["recipe"] == expected, name
        assert manifest["rebuild"] == f"mamtra build-hybrids --ratios {ratio} --out DIR", name
        assert manifest["parameters"]["ratio"] == ratio
        assert manifest["parameters"]["placement"] == shipped_placement(ratio), name


def test_names_are_the_complete_folders_in_ratio_order(tmp_path, monkeypatch):
    for name in ("mini-1-11", "mini-1-3", "mini-1-1", "mini-1-5", "incomplete"):
        (tmp_path / name).mkdir()
        for f in hybrids.SHIPPED_FILES[: 2 if name == "incomplete" else 3]:
            (tmp_path / name / f).write_text("")
    monkeypatch.setattr(hybrids, "HYBRIDS_DIR", tmp_path)
    assert hybrids.builtin_hybrid_names() == ["mini-1-1", "mini-1-3", "mini-1-5", "mini-1-11"]
    assert is_builtin("mini") and is_builtin("mini-1-11")
    assert not is_builtin("mini-1-7") and not is_builtin("incomplete") and not is_builtin(str(tmp_path / "mini-1-1"))


def test_same_bits_tells_signed_zeros_apart():
    assert hybrids.same_bits(torch.tensor([0.0, float("nan")]), torch.tensor([0.0, float("nan")]))
    assert not hybrids.same_bits(torch.tensor([0.0]), torch.tensor([-0.0]))
    assert not hybrids.same_bits(torch.tensor([1.0]), torch.tensor([1.0], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- materialising
def test_materialize_is_bit_identical_and_built_once(hybrid_dir, tmp_path, monkeypatch):
    from mamtra_cli.mini.backend import MiniBackend

    monkeypatch.setenv("MAMTRA_CACHE_DIR", str(tmp_path / "cache"))
    d = mini_dir(NAME)
    assert d.parent == tmp_path / "cache" / "builtin" and d.name.startswith(f"{NAME}-") and len(d.name) == len(NAME) + 17
    got, want = load_file(str(d / checkpoints.WEIGHTS_FILE)), load_file(str(hybrid_dir / checkpoints.WEIGHTS_FILE))
    assert set(got) == set(want)
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    assert checkpoints.is_model_dir(d) and MiniBackend.accepts(d, d)
    checkpoints.check_model_dir(d)
    made = checkpoints.read_manifest(d)
    assert made["stage"] == "build-hybrids" and made["materialized_from"]["name"] == NAME
    assert (d / "codec.yaml").resolve() == (BUILTIN_DIR / "codec.yaml").resolve()
    stamp = (d / checkpoints.WEIGHTS_FILE).stat().st_mtime_ns
    assert hybrids.materialize(NAME) == d and (d / checkpoints.WEIGHTS_FILE).stat().st_mtime_ns == stamp
    assert [p.name for p in d.parent.iterdir()] == [d.name]  # no temporary directories left behind


def test_changed_own_weights_materialise_into_a_new_directory(shipped, tmp_path, monkeypatch):
    first = mini_dir(NAME)
    src = copy_shipped(shipped, tmp_path, monkeypatch)
    own = load_file(str(src / hybrids.OWN_WEIGHTS))
    own[MAMBA_KEY] = own[MAMBA_KEY] * 2
    save_file(own, str(src / hybrids.OWN_WEIGHTS))
    second = mini_dir(NAME)
    assert second != first and second.parent == first.parent
    assert torch.equal(load_file(str(second / checkpoints.WEIGHTS_FILE))[MAMBA_KEY], own[MAMBA_KEY])


def test_a_damaged_cache_entry_is_rebuilt_in_place(hybrid_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MAMTRA_CACHE_DIR", str(tmp_path / "cache"))
    d = hybrids.materialize(NAME)
    weights = d / checkpoints.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])  # an interrupted copy, a full disk
    assert hybrids.materialize(NAME) == d
    got, want = load_file(str(weights)), load_file(str(hybrid_dir / checkpoints.WEIGHTS_FILE))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert [p.name for p in d.parent.iterdir()] == [d.name]


def test_a_losing_racer_uses_the_winners_directory(shipped, tmp_path, monkeypatch):
    monkeypatch.setenv("MAMTRA_CACHE_DIR", str(tmp_path / "cache"))
    winner = hybrids.materialize(NAME)
    stamp = (winner / checkpoints.WEIGHTS_FILE).stat().st_mtime_ns
    real, looks = hybrids._is_complete, []

    def is_complete(d):  # the loser's first look came before the winner's rename: it builds its own copy
        looks.append(d)
        return len(looks) > 1 and real(d)

    monkeypatch.setattr(hybrids, "_is_complete", is_complete)
    assert hybrids.materialize(NAME) == winner
    assert (winner / checkpoints.WEIGHTS_FILE).stat().st_mtime_ns == stamp  # the winner's files, untouched
    assert [p.name for p in winner.parent.iterdir()] == [winner.name]  # the loser's copy removed


def test_unwritable_cache_root_falls_back_to_a_temporary_directory(shipped, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("MAMTRA_CACHE_DIR", str(tmp_path / "file" / "cache"))
    monkeypatch.setattr(hybrids, "_warned", set())
    d = hybrids.materialize(NAME)
    again = hybrids.materialize(NAME)
    err = capsys.readouterr().err
    assert again == d and checkpoints.is_model_dir(d) and not str(d).startswith(str(tmp_path))
    assert err.count("mamtra: warning: cannot write the cache") == 1 and len(err.strip().splitlines()) == 1


def test_wrong_base_is_one_sentence_and_exit_2(shipped, tmp_path, monkeypatch, capsys):
    src = copy_shipped(shipped, tmp_path, monkeypatch)
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["base"]["weights_sha256"] = "0" * 64
    (src / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"Built-in hybrid mini-1-1 was distilled from another mini voice .*"
                                        r"`mamtra build-hybrids`"):
        hybrids.materialize(NAME)
    code, _, err = run(capsys, "score", "--model", NAME, "--data", data_file(tmp_path))
    assert code == 2 and "distilled from another mini voice" in one_error(err)


def test_own_weights_that_do_not_fit_the_config_are_refused(shipped, tmp_path, monkeypatch):
    src = copy_shipped(shipped, tmp_path, monkeypatch)
    monkeypatch.setenv("MAMTRA_CACHE_DIR", str(tmp_path / "cache"))
    own = load_file(str(src / hybrids.OWN_WEIGHTS))
    own["backbone.layers.99.mamba.D"] = torch.zeros(4)
    save_file(own, str(src / hybrids.OWN_WEIGHTS))
    with pytest.raises(UserError, match="does not match its config.yaml .*unexpected key"):
        hybrids.materialize(NAME)
    assert not (tmp_path / "cache" / "builtin").exists() or not any((tmp_path / "cache" / "builtin").iterdir())


# ---------------------------------------------------------------------------------------------- by name everywhere
def test_score_by_name_equals_score_of_the_directory(hybrid_dir, tmp_path, capsys):
    data = data_file(tmp_path)
    code, by_name, err = run(capsys, "score", "--model", NAME, "--data", data, "--threads", "1", "--json")
    assert code == 0, err
    code, by_dir, err = run(capsys, "score", "--model", hybrid_dir, "--data", data, "--threads", "1", "--json")
    assert code == 0, err
    a, b = json.loads(by_name), json.loads(by_dir)
    assert a["utterances"] == 4 and a["ce"] == b["ce"] and a["accuracy"] == b["accuracy"]


def test_synth_by_name_writes_the_same_wav_as_the_materialised_directory(tmp_path, capsys):
    args = ["synth", "Hello.", "--seed", "0", "--threads", "1", "--json"]
    code, out, err = run(capsys, *args, "--model", NAME, "--out", tmp_path / "a.wav")
    assert code == 0, err
    assert json.loads(out)["sample_rate"] == 16000
    code, _, err = run(capsys, *args, "--model", mini_dir(NAME), "--out", tmp_path / "b.wav")
    assert code == 0, err
    assert (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()


def test_python_api_loads_a_shipped_hybrid():
    import mamtra_cli

    tts = mamtra_cli.load(NAME, threads=1)
    assert tts.backend.model_dir == mini_dir(NAME) and tts.sample_rate == 16000
    assert "".join("A" if t == "attention" else "M" for t in tts.backend.lm.config.layer_types) == "MA" * 6


def test_distill_with_a_shipped_hybrid_as_student(tmp_path, capsys):
    code, out, err = run(capsys, "distill", "--teacher", "mini", "--student", NAME, "--data", data_file(tmp_path),
                         "--max-steps", "1", "--threads", "1", "--out", tmp_path / "kd", "--json")
    assert code == 0, err
    assert json.loads(out)["steps"] == 1
    student = checkpoints.read_manifest(tmp_path / "kd")["inputs"]["student"]
    assert student["name"] == NAME and student["path"] == str(mini_dir(NAME).resolve())


def test_export_and_transfer_from_a_shipped_hybrid(tmp_path, capsys):
    code, out, err = run(capsys, "export", "--model", NAME, "--out", tmp_path / "b", "--threads", "1", "--json")
    assert code == 0, err
    assert json.loads(out)["format"] == "mini" and json.loads(out)["layer_types"] == "MA" * 6
    assert (tmp_path / "b" / "codec.yaml").is_file() and (tmp_path / "b" / "sample_voice.wav").is_file()
    exported = load_file(str(tmp_path / "b" / checkpoints.WEIGHTS_FILE))
    assert torch.equal(exported[MAMBA_KEY], load_file(str(mini_dir(NAME) / checkpoints.WEIGHTS_FILE))[MAMBA_KEY])
    info = checkpoints.read_manifest(tmp_path / "b")["inputs"]["model"]
    assert info["format"] == "mamtra-builtin" and info["name"] == NAME
    code, out, err = run(capsys, "transfer", "--teacher", NAME, "--attention-layers", "3,7,11",
                         "--out", tmp_path / "t", "--threads", "1", "--json")
    assert code == 0, err
    assert checkpoints.read_manifest(tmp_path / "t")["inputs"]["teacher"]["name"] == NAME


def test_profile_cache_growth_of_a_shipped_hybrid(capsys):
    code, out, err = run(capsys, "profile", "cache-growth", "--model", NAME, "--lengths", "8", "--dtype", "fp32",
                         "--fill", "synthetic", "--decode-steps", "0", "--threads", "1", "--json")
    assert code == 0, err
    (m,) = json.loads(out)["models"]
    assert m["name"] == NAME and m["layout"] == "MA" * 6


def test_pseudo_label_and_eval_rows_by_name(tmp_path, capsys):
    from mamtra_cli.evaluation.lists import load_eval_list
    from mamtra_cli.evaluation.runner import parse_systems

    code, out, err = run(capsys, "pseudo-label", "--teacher", NAME, "--texts", "mini-grammar", "--count", "2",
                         "--max-tokens", "8", "--keep-capped", "--threads", "1", "--out", tmp_path / "pl", "--json")
    assert code == 0, err
    (system,) = parse_systems([NAME], [], False, False, load_eval_list("mini-heldout"))
    assert system.name == NAME and system.source == NAME


def test_eval_assets_go_only_to_the_models_that_borrow_a_codec(tmp_path):
    """One --assets serves a mixed evaluation: the built-in voice, a shipped hybrid and a bundle carry their own
    codec (the built-in voice refused any --assets, which stopped `eval --model mini --model h=DIR --assets mini`
    after the other rows had been scored)."""
    from mamtra_cli.evaluation.lists import load_eval_list
    from mamtra_cli.evaluation.runner import parse_systems
    from mamtra_cli.synthesis.backend import BUNDLE_FILE
    from mamtra_cli.synthesis.loading import resolve_backend

    hybrid, bundle = tmp_path / "hybrid", tmp_path / "bundle"
    hybrid.mkdir()
    bundle.mkdir()
    (bundle / BUNDLE_FILE).write_text("{}\n")
    systems = parse_systems(["mini", NAME, f"h={hybrid}", f"b={bundle}"], [], False, False,
                            load_eval_list("mini-heldout"), assets=Path("mini"))
    assert [s.assets for s in systems] == [None, None, Path("mini"), None]
    assert resolve_backend("mini", Path("mini")).lm is not None  # the codec it already has
    with pytest.raises(UserError, match="drop --assets"):
        resolve_backend("mini", tmp_path)


@pytest.mark.parametrize("args", [["score", "--model", "mini-1-7", "--data", "DATA"],
                                  ["synth", "Hello.", "--model", "mini-1-7", "--out", "OUT"]])
def test_an_unknown_name_is_still_a_missing_path(args, tmp_path, capsys):
    args = [str(data_file(tmp_path)) if a == "DATA" else str(tmp_path / "x.wav") if a == "OUT" else a for a in args]
    code, _, err = run(capsys, *args)
    assert code == 2 and "mini-1-7 does not exist" in one_error(err)
