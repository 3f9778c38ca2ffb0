"""CosyVoice 2 teacher reader: numerical parity with CosyVoice's own code on the cv2-tiny fixture,
HyperPyYAML parsing, error messages, tiny-teacher directories of several sizes, and export round trips."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mamtra_cli.errors import UserError
from mamtra_cli.teachers import load_teacher
from mamtra_cli.teachers.cosyvoice2 import (Tagged, load_cosyvoice2_lm, load_hyperpyyaml, read_llm_section,
                                            to_cosyvoice2_state_dict)
from mamtra_cli.teachers.tiny import make_tiny_cosyvoice2_dir

# In the repository (README.md there says how it was made), so a fresh clone runs these tests, never skips them.
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "cv2-tiny"

ATOL = 1e-5


# ------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def fixture_model():
    torch.manual_seed(0)
    model, info = load_teacher(FIXTURE)
    return model, info


@pytest.fixture(scope="module")
def reference():
    return json.loads((FIXTURE / "reference.json").read_text())


@pytest.fixture(scope="module")
def data():
    utts = [json.loads(line) for line in (FIXTURE / "data.jsonl").read_text().splitlines() if line.strip()]
    return {u["utt"]: u for u in utts}


def _batch(utts: list[dict]):
    """Right-padded batch, ids padded with 0, like CosyVoice's processor.padding."""
    b = len(utts)
    t_max = max(len(u["text_tokens"]) for u in utts)
    s_max = max(len(u["speech_tokens"]) for u in utts)
    text = torch.zeros(b, t_max, dtype=torch.long)
    speech = torch.zeros(b, s_max, dtype=torch.long)
    for i, u in enumerate(utts):
        text[i, :len(u["text_tokens"])] = torch.tensor(u["text_tokens"])
        speech[i, :len(u["speech_tokens"])] = torch.tensor(u["speech_tokens"])
    text_lens = torch.tensor([len(u["text_tokens"]) for u in utts], dtype=torch.int32)
    speech_lens = torch.tensor([len(u["speech_tokens"]) for u in utts], dtype=torch.int32)
    return text, text_lens, speech, speech_lens


def _maxabs(a, b) -> float:
    return float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max())


# ------------------------------------------------------------------------------------------ (a) parity
def test_fixture_loads_with_sizes_from_files(fixture_model):
    model, info = fixture_model
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == \
        (64, 176, 4, 2, 16)
    assert (c.num_layers, c.text_vocab_size, c.speech_token_size, c.decoder_classes) == (6, 512, 100, 103)
    assert c.rope_theta == 1e6 and c.rms_norm_eps == 1e-6 and c.max_position_embeddings == 4096
    assert set(c.layer_types) == {"attention"}
    assert not model.training
    assert info["format"] == "cosyvoice2"
    assert info["num_parameters"] == 324263
    assert info["dropped_keys"] == ["llm.model.lm_head.weight"]
    assert len(info["llm_pt"]["sha256"]) == 64
    assert info["sampling"] == {"function": "cosyvoice.utils.common.ras_sampling", "top_p": 0.8, "top_k": 25,
                                "win_size": 10, "tau_r": 0.1}


@torch.no_grad()
def test_fixture_batch_loss_matches_cosyvoice(fixture_model, reference, data):
    model, _ = fixture_model
    order = reference["batch_order"]
    assert order == sorted(data, key=lambda u: -(len(data[u]["text_tokens"]) + len(data[u]["speech_tokens"])))
    out = model.forward_train(*_batch([data[u] for u in order]))
    assert out.num_tokens == reference["total_tokens"] == 108
    assert abs(float(out.loss) - reference["batch_loss"]) < ATOL
    assert abs(float(out.acc) - reference["batch_acc"]) < 1e-7
    assert out.correct == 1
    assert abs(float(out.ce_sum) - reference["total_ce_sum"]) < 108 * ATOL
    # u2 sits in row 1 of the padded batch; right padding must not change its logits.
    u2_logits = torch.from_numpy(np.load(FIXTURE / "u2_logits.npy"))
    assert _maxabs(out.logits[1, :44], u2_logits) < ATOL


@torch.no_grad()
def test_fixture_per_utterance_losses(fixture_model, reference, data):
    model, _ = fixture_model
    for utt, u in data.items():
        out = model.forward_train(*_batch([u]))
        assert out.num_tokens == reference["utt_num_targets"][utt]
        assert out.logits.shape[1] == reference["utt_seq_len"][utt]
        assert abs(float(out.loss) - reference["utt_loss"][utt]) < ATOL, utt
        assert abs(float(out.ce_sum) - reference["utt_ce_sum"][utt]) < 1e-4, utt
        assert abs(float(out.acc) - reference["utt_acc"][utt]) < 1e-7, utt


@torch.no_grad()
def test_fixture_u2_logits_and_hidden(fixture_model, data):
    model, _ = fixture_model
    out = model.forward_train(*_batch([data["u2"]]))
    logits = torch.from_numpy(np.load(FIXTURE / "u2_logits.npy"))
    hidden = torch.from_numpy(np.load(FIXTURE / "u2_hidden.npy"))
    assert out.logits.shape == (1, 44, 103) and out.hidden.shape == (1, 44, 64)
    assert _maxabs(out.hidden[0], hidden) < ATOL
    assert _maxabs(out.logits[0], logits) < ATOL
    assert out.targets[0, :13].eq(-1).all() and int(out.targets[0, -1]) == 100


@torch.no_grad()
def test_fixture_incremental_decode_logprobs(fixture_model, reference):
    model, _ = fixture_model
    inf = reference["inference"]
    ref = torch.from_numpy(np.load(FIXTURE / "step_logprobs.npy"))
    text = torch.tensor([inf["prompt_text_tokens"] + inf["text_tokens"]])
    prompt_speech = torch.tensor([inf["prompt_speech_tokens"]])
    prefix = model.inference_prefix(text, prompt_speech)
    assert prefix.shape == (1, inf["prefix_len"], 64)

    cache = model.new_cache(1)
    h = model.forward_embeds(prefix, cache=cache)
    rows = [model.llm_decoder(h[:, -1]).log_softmax(-1)[0]]
    for tok in inf["fed_speech_tokens"]:
        h = model.forward_embeds(model.speech_embedding(torch.tensor([[tok]])), cache=cache)
        rows.append(model.llm_decoder(h[:, -1]).log_softmax(-1)[0])
    got = torch.stack(rows)
    assert got.shape == ref.shape == (7, 103)
    assert _maxabs(got, ref) < ATOL

    # The same rows from one causal forward over all 33 positions, without a cache.
    fed = model.speech_embedding(torch.tensor([inf["fed_speech_tokens"]]))
    full = model.forward_embeds(torch.cat([prefix, fed], dim=1))
    full_rows = model.llm_decoder(full[0, inf["prefix_len"] - 1:]).log_softmax(-1)
    assert _maxabs(full_rows, ref) < ATOL


# ------------------------------------------------------------------------------------------ (b) yaml
def test_fixture_yaml_parses():
    with pytest.raises(Exception):
        import yaml

        yaml.safe_load((FIXTURE / "cosyvoice2.yaml").read_text())
    d = load_hyperpyyaml(FIXTURE / "cosyvoice2.yaml")
    llm = read_llm_section(d)
    assert llm["speech_token_size"] == 100
    assert llm["llm_input_size"] == 64 and llm["llm_output_size"] == 64
    assert llm["class"] == "cosyvoice.llm.llm.Qwen2LM"
    assert llm["backbone_class"] == "cosyvoice.llm.llm.Qwen2Encoder"
    assert llm["length_normalized_loss"] is True and llm["lsm_weight"] == 0 and llm["mix_ratio"] == [5, 15]
    assert llm["sampling"]["top_k"] == 25 and llm["sampling"]["tau_r"] == 0.1
    # References, arithmetic references, YAML 1.2 floats and the other sections.
    est = d["flow"].args["decoder"].args["estimator"]
    assert est.args["static_chunk_size"] == 50  # !ref <chunk_size> * <token_mel_ratio>
    assert d["hift"].args["sampling_rate"] == 24000
    assert d["train_conf"]["optim_conf"]["lr"] == 1e-5
    assert isinstance(d["hifigan"].args["generator"], Tagged) and d["hifigan"].args["generator"].kind == "new"
    assert [t.target.rsplit(".", 1)[-1] for t in d["data_pipeline"]][:2] == ["parquet_opener", "tokenize"]
    assert isinstance(d["__set_seed1"], Tagged) and d["__set_seed1"].kind == "apply"


def test_hyperpyyaml_refs_tags_and_errors(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text(
        "sr: 24000\nhalf: !ref <sample.rate> // 2\nsample:\n  rate: !ref <sr>\n"
        "dir: out\nsub: !ref <dir>/save\nt: !tuple (1, 2)\nlst: !tuple [1, 2]\nc: !copy <sample>\n"
        "inc: !include:other.yaml\nweird: !foo:bar.Baz {a: 1}\nbroken: !ref <nope>\n"
        "neg: !ref -<sr> + 1\nself: !ref <self>\n")
    d = load_hyperpyyaml(p, overrides={"dir": "/data"})
    assert d["half"] == 12000 and d["sample"]["rate"] == 24000
    assert d["sub"] == "/data/save"
    assert d["lst"] == (1, 2)
    assert d["c"] == {"rate": 24000} and d["c"] is not d["sample"]
    assert d["inc"].kind == "include" and d["inc"].target == "other.yaml"
    assert d["weird"].tag == "!foo:bar.Baz" and d["weird"].args == {"a": 1}
    assert isinstance(d["broken"], Tagged) and d["broken"].kind == "ref"  # left unresolved
    assert d["neg"] == -23999
    assert isinstance(d["self"], Tagged)  # a cycle is left alone

    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\nb: [1, 2\nc: 3\n")
    with pytest.raises(UserError, match=r"bad\.yaml.*line \d+"):
        load_hyperpyyaml(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_hyperpyyaml(tmp_path / "none.yaml")
    with pytest.raises(UserError, match="no `llm:` section"):
        read_llm_section({"flow": 1})


# ------------------------------------------------------------------------------------------ (c) errors
@pytest.fixture
def tiny_dir(tmp_path):
    return make_tiny_cosyvoice2_dir(tmp_path / "cv2", layers=2, hidden=32, heads=4, kv_heads=2,
                                    intermediate=48, text_vocab=40, speech_tokens=12)


def _resave(d: Path, edit) -> None:
    sd = torch.load(d / "llm.pt", weights_only=True)
    edit(sd)
    torch.save(sd, d / "llm.pt")


def test_error_missing_directory(tmp_path):
    with pytest.raises(UserError, match="nowhere.*does not exist"):
        load_cosyvoice2_lm(tmp_path / "nowhere")
    with pytest.raises(UserError, match="nowhere.*does not exist"):
        load_teacher(tmp_path / "nowhere")


def test_error_directory_without_llm_pt(tiny_dir):
    (tiny_dir / "llm.pt").unlink()
    with pytest.raises(UserError, match=r"cv2 has no llm\.pt"):
        load_cosyvoice2_lm(tiny_dir)
    with pytest.raises(UserError, match=r"no llm\.pt"):
        load_teacher(tiny_dir)


def test_error_directory_without_config_json(tiny_dir):
    (tiny_dir / "CosyVoice-BlankEN" / "config.json").unlink()
    with pytest.raises(UserError, match=r"CosyVoice-BlankEN/config\.json.*config\.json that belongs"):
        load_cosyvoice2_lm(tiny_dir)


def test_error_llm_pt_missing_key(tiny_dir):
    key = "llm.model.model.layers.1.mlp.up_proj.weight"
    _resave(tiny_dir, lambda sd: sd.pop(key))
    with pytest.raises(UserError) as e:
        load_cosyvoice2_lm(tiny_dir)
    msg = str(e.value)
    assert key in msg and "1 key(s) missing" in msg and "llm.pt" in msg and "config.json that belongs" in msg


def test_error_llm_pt_extra_key(tiny_dir):
    key = "llm.model.model.layers.2.mlp.up_proj.weight"
    _resave(tiny_dir, lambda sd: sd.__setitem__(key, torch.zeros(48, 32)))
    with pytest.raises(UserError, match=r"1 unexpected key\(s\) \(" + key.replace(".", r"\.")):
        load_cosyvoice2_lm(tiny_dir)


def test_error_config_hidden_size_disagrees(tiny_dir):
    cfg_path = tiny_dir / "CosyVoice-BlankEN" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["hidden_size"] = 48
    alt = tiny_dir / "other_config.json"
    alt.write_text(json.dumps(cfg))
    with pytest.raises(UserError) as e:
        load_cosyvoice2_lm(tiny_dir / "llm.pt", alt)
    msg = str(e.value)
    assert "other_config.json" in msg and "llm_embedding.weight is [2, 32]" in msg and "[2, 48]" in msg
    assert "wrong shape" in msg and "and " in msg and "more" in msg
    assert msg.count(".") >= 1 and "\n" not in msg


def test_error_truncated_llm_pt(tiny_dir):
    raw = (tiny_dir / "llm.pt").read_bytes()
    (tiny_dir / "llm.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match=r"Cannot read .*llm\.pt"):
        load_cosyvoice2_lm(tiny_dir)
    (tiny_dir / "llm.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match=r"llm\.pt"):
        load_teacher(tiny_dir)


def test_error_not_an_llm_checkpoint_and_yaml_mismatch(tiny_dir):
    good = (tiny_dir / "llm.pt").read_bytes()
    torch.save({"decoder.weight": torch.zeros(2, 2)}, tiny_dir / "llm.pt")
    with pytest.raises(UserError, match="not a CosyVoice 2 speech-LM checkpoint"):
        load_cosyvoice2_lm(tiny_dir)
    (tiny_dir / "llm.pt").write_bytes(good)
    y = tiny_dir / "cosyvoice2.yaml"
    y.write_text(y.read_text().replace("speech_token_size: 12", "speech_token_size: 13"))
    with pytest.raises(UserError, match=r"cosyvoice2\.yaml says speech_token_size 13"):
        load_cosyvoice2_lm(tiny_dir)


def test_legacy_format_and_pickled_module(tiny_dir):
    sd = torch.load(tiny_dir / "llm.pt", weights_only=True)
    torch.save(sd, tiny_dir / "llm.pt", _use_new_zipfile_serialization=False)  # cannot be mmap-ed
    config, ours, _ = load_cosyvoice2_lm(tiny_dir)
    assert torch.equal(ours["text_embedding.weight"], sd["llm.model.model.embed_tokens.weight"])
    torch.save(torch.nn.Linear(2, 2), tiny_dir / "llm.pt")
    with pytest.raises(UserError, match=r"llm\.pt holds more than plain tensors"):
        load_cosyvoice2_lm(tiny_dir)


def test_lm_head_optional_and_training_extras_accepted(tiny_dir):
    def edit(sd):
        sd.pop("llm.model.lm_head.weight")
        sd["epoch"], sd["step"] = 3, 1200

    _resave(tiny_dir, edit)
    config, sd, info = load_cosyvoice2_lm(tiny_dir)
    assert info["dropped_keys"] == [] and info["training_extras"] == {"epoch": 3, "step": 1200}
    assert "epoch" not in sd and config.speech_token_size == 12


def test_load_teacher_other_specs(tmp_path, tiny_dir):
    from mamtra_cli.mini import BUILTIN_DIR

    if (BUILTIN_DIR / "model.safetensors").is_file():  # the shipped voice, by name
        model, info = load_teacher("mini")
        assert info["format"] == "mamtra-builtin" and model.config.num_layers == 12 and not model.training
    else:
        with pytest.raises(UserError, match="built-in mini model is not shipped"):
            load_teacher("mini")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a CosyVoice 2 model directory"):
        load_teacher(tmp_path / "empty")
    # An llm.pt file with its config.json given explicitly (copied elsewhere).
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(tiny_dir / "llm.pt", other / "llm.pt")
    with pytest.raises(UserError, match="config.json"):
        load_teacher(other / "llm.pt")
    model, info = load_teacher(other / "llm.pt", tiny_dir / "CosyVoice-BlankEN" / "config.json")
    assert not model.training and info["yaml"] is None and model.config.num_layers == 2


def test_load_teacher_mamtra_model_dir(tmp_path, tiny_dir):
    from mamtra_cli import checkpoints

    model, _ = load_teacher(tiny_dir)
    out = tmp_path / "student"
    out.mkdir()
    checkpoints.save_model_dir(out, model.config, model.state_dict(),
                               checkpoints.run_manifest("test", inputs={}, parameters={}))
    again, info = load_teacher(out)
    assert info["format"] == "mamtra" and not again.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


# ------------------------------------------------------------------------------------------ (d) sizes
SIZES = [
    dict(hidden=32, layers=3, heads=4, kv_heads=1, intermediate=40, head_dim=12, text_vocab=300, speech_tokens=37,
         rope_theta=1e4, rms_norm_eps=1e-5, seed=1),
    dict(hidden=48, layers=2, heads=6, kv_heads=3, intermediate=64, text_vocab=97, speech_tokens=5, seed=2),
    dict(),  # the defaults
]


@pytest.mark.parametrize("kw", SIZES, ids=["head_dim12", "h48", "default"])
def test_tiny_sizes_load_and_round_trip(tmp_path, kw):
    d = make_tiny_cosyvoice2_dir(tmp_path / "t", **kw)
    config, sd, info = load_cosyvoice2_lm(d)
    assert config.hidden_size == kw.get("hidden", 64) and config.num_layers == kw.get("layers", 4)
    assert config.head_dim == kw.get("head_dim") or config.hidden_size // config.num_attention_heads
    assert config.text_vocab_size == kw.get("text_vocab", 512)
    assert config.speech_token_size == kw.get("speech_tokens", 100)
    assert config.rope_theta == kw.get("rope_theta", 1e6) and config.rms_norm_eps == kw.get("rms_norm_eps", 1e-6)
    assert info["llm_section"]["speech_token_size"] == config.speech_token_size

    original = torch.load(d / "llm.pt", weights_only=True)
    back = to_cosyvoice2_state_dict(config, sd)
    assert list(back) == list(original)
    for k in original:
        assert back[k].dtype == original[k].dtype and torch.equal(back[k], original[k]), k
    assert back["llm.model.lm_head.weight"] is back["llm.model.model.embed_tokens.weight"]

    # The model runs at these sizes, and a re-saved export loads again to the same numbers.
    model, _ = load_teacher(d)
    batch = (torch.tensor([[1, 2, 3]]), torch.tensor([3]), torch.tensor([[0, 1]]), torch.tensor([2]))
    with torch.no_grad():
        ref = model.forward_train(*batch)
    torch.save(to_cosyvoice2_state_dict(model.config, model.state_dict()), d / "llm.pt")
    model2, _ = load_teacher(d)
    with torch.no_grad():
        assert torch.equal(model2.forward_train(*batch).logits, ref.logits)


def test_tiny_dir_is_deterministic_and_real_format(tmp_path):
    a = make_tiny_cosyvoice2_dir(tmp_path / "a", seed=7, layers=1, hidden=16, heads=2, kv_heads=1,
                                 intermediate=24, text_vocab=20, speech_tokens=4)
    b = make_tiny_cosyvoice2_dir(tmp_path / "b", seed=7, layers=1, hidden=16, heads=2, kv_heads=1,
                                 intermediate=24, text_vocab=20, speech_tokens=4)
    sa, sb = (torch.load(x / "llm.pt", weights_only=True) for x in (a, b))
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert len(sa) == 2 + 12 * 1 + 5  # llm_embedding, embed_tokens, layer keys, norm, lm_head, decoder×2, speech
    norms = [k for k in sa if "norm" in k]
    assert all(abs(float(sa[k].mean()) - 1) < 0.2 for k in norms)
    assert 0.01 < float(sa["llm_decoder.weight"].std()) < 0.03
    cfg = json.loads((a / "CosyVoice-BlankEN" / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["tie_word_embeddings"] is True
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["use_sliding_window"] is False
    text = (a / "cosyvoice2.yaml").read_text()
    assert "!new:cosyvoice.llm.llm.Qwen2LM" in text and "!name:cosyvoice.utils.common.ras_sampling" in text
    from safetensors.torch import load_file

    base = load_file(str(a / "CosyVoice-BlankEN" / "model.safetensors"))
    assert not torch.equal(base["model.embed_tokens.weight"], sa["llm.model.model.embed_tokens.weight"])
    with pytest.raises(UserError, match="multiple of --kv-heads"):
        make_tiny_cosyvoice2_dir(tmp_path / "c", heads=4, kv_heads=3)


def test_tiny_teacher_stage(tmp_path):
    import typer
    from typer.testing import CliRunner

    from mamtra_cli.stages.tiny_teacher import tiny_teacher

    app = typer.Typer()
    app.command()(tiny_teacher)
    app.command("noop")(lambda: None)
    out = tmp_path / "teacher"
    args = ["tiny-teacher", "--out", str(out), "--layers", "1", "--hidden", "16", "--heads", "2", "--kv-heads", "1",
            "--text-vocab", "20", "--speech-tokens", "4", "--seed", "3"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(out)
    assert (out / "manifest.json").is_file() and json.loads((out / "manifest.json").read_text())["seed"] == 3
    config, _, _ = load_cosyvoice2_lm(out)
    assert config.num_layers == 1 and config.speech_token_size == 4
    r = CliRunner().invoke(app, args)
    assert isinstance(r.exception, UserError) and "--force" in str(r.exception)
    r = CliRunner().invoke(app, args + ["--force"])
    assert r.exit_code == 0, r.output
    assert not any(p.name.startswith(".teacher") for p in tmp_path.iterdir())
    r = CliRunner().invoke(app, ["tiny-teacher", "--help"])
    assert "tiny random-weight CosyVoice 2-format teacher" in r.output


# ------------------------------------------------------------------------------------------ transformers
@torch.no_grad()
def test_hidden_states_match_transformers_qwen2(fixture_model, data):
    transformers = pytest.importorskip("transformers")
    model, _ = fixture_model
    cfg = transformers.Qwen2Config(**{k: v for k, v in json.loads(
        (FIXTURE / "CosyVoice-BlankEN" / "config.json").read_text()).items()
        if k not in ("architectures", "transformers_version", "torch_dtype", "model_type")})
    hf = transformers.Qwen2Model(cfg).eval()
    raw = torch.load(FIXTURE / "llm.pt", weights_only=True)
    hf.load_state_dict({k[len("llm.model.model."):]: v for k, v in raw.items()
                        if k.startswith("llm.model.model.")}, strict=True)
    ours = model.forward_train(*_batch([data["u2"]]))
    embeds, _, _ = model.unistream_inputs(*_batch([data["u2"]]))
    theirs = hf(inputs_embeds=embeds).last_hidden_state
    assert _maxabs(ours.hidden, theirs) < ATOL
