"""HiFT vocoder parity against CosyVoice's own outputs (tests/fixtures/cv2-flow-hift).

Tolerances (all measured on an AVX-512 Xeon, 1 thread; CosyVoice's numbers came from another CPU):
- decode(hift_mel, hift_source) vs hift_wav: measured 8.9e-7 → atol 1e-5 (README's suggestion).
- source(hift_f0) under manual_seed(0) vs hift_source: measured 6e-8 (1 ulp) → atol 1e-6. This
  checks SineGen2 and the RNG draw order in isolation from F0 rounding.
- f0(hift_mel) vs hift_f0: measured 1.1e-4 Hz (1.8e-4 with other MKL code paths) → atol 5e-4 Hz.
  The fixture's F0 head was rescaled ×2478, so last-bit differences of the BLAS/conv summation
  order are amplified; our result and CosyVoice's are equally far (1.3e-4 / 1.6e-4) from a float64
  evaluation, i.e. this is float32 rounding, not a formula difference. 5e-4 Hz is 4e-6 of the
  125 Hz maximum, while every real mistake moves F0 by whole Hz.
- Anything computed from our own F0 (chained source, full inference) inherits that rounding,
  amplified by phase integration: measured 8e-5..1.3e-4 → atol 1e-3 (real mistakes are ≥ 0.016).
- decode of a batch vs of each item alone (random tiny model): float32 rounding of different CPU kernels,
  measured up to 1.5e-6 on peaks of ~0.8 → bound 2e-5 × the peak (relative, so it holds on any x86 CPU).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mamtra_cli.errors import UserError
from mamtra_cli.synthesis.hift import (
    HiFTConfig,
    HiFTVocoder,
    export_state_dict,
    load_hift,
    read_hyperpyyaml_section,
)

# In the repository (README.md there says how it was made), so a fresh clone runs these tests, never skips them.
FIX = Path(__file__).resolve().parents[1] / "fixtures" / "cv2-flow-hift"


@pytest.fixture(autouse=True)
def _one_thread():
    # The reference numbers were computed with one intra-op thread; restore the caller's setting.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _arr(name: str) -> torch.Tensor:
    return torch.from_numpy(np.load(FIX / name))


def _maxabs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(scope="module")
def hift() -> HiFTVocoder:
    return load_hift(FIX / "hift.pt", FIX / "cosyvoice2.yaml")


# ---- fixture parity -------------------------------------------------------------------------------


def test_config_from_shapes_and_yaml(hift):
    section = read_hyperpyyaml_section(FIX / "cosyvoice2.yaml", "hift")
    assert section["sampling_rate"] == 24000  # `!ref <sample_rate>` resolved
    assert section["f0_predictor"]["cond_channels"] == 16
    cfg = hift.cfg
    assert (cfg.base_channels, cfg.f0_cond_channels, cfg.nb_harmonics) == (16, 16, 8)
    assert cfg.upsample_rates == (8, 5, 3) and cfg.upsample_scale == 480
    assert cfg.source_resblock_kernel_sizes == (7, 7, 11)
    # Shapes alone (no yaml) give the same architecture for this checkpoint.
    sd = torch.load(FIX / "hift.pt", weights_only=True)
    assert HiFTConfig.from_checkpoint(sd) == cfg
    # The module's state_dict names, order and shapes are CosyVoice's.
    import json
    keys = json.loads((FIX / "hift_keys.json").read_text())["keys"]
    ours = hift.state_dict()
    assert [k["key"] for k in keys] == list(ours)
    assert all(list(ours[k["key"]].shape) == k["shape"] for k in keys)


def test_f0(hift):
    with torch.no_grad():
        f0 = hift.f0(_arr("hift_mel.npy"))
    ref = _arr("hift_f0.npy")
    assert _maxabs(f0, ref) < 5e-4
    assert ((f0 > 10) == (ref > 10)).all()  # same voiced/unvoiced split (24 of 30 voiced)


def test_source_from_reference_f0(hift):
    torch.manual_seed(0)
    with torch.no_grad():
        s = hift.source(_arr("hift_f0.npy"))
    assert _maxabs(s, _arr("hift_source.npy")) < 1e-6
    # An explicit generator gives the same numbers and leaves the global RNG alone.
    state = torch.get_rng_state()
    with torch.no_grad():
        s2 = hift.source(_arr("hift_f0.npy"), generator=torch.Generator().manual_seed(0))
    assert torch.equal(s, s2)
    assert torch.equal(state, torch.get_rng_state())


def test_source_chained_from_mel(hift):
    torch.manual_seed(0)
    with torch.no_grad():
        s = hift.source(hift.f0(_arr("hift_mel.npy")))
    assert _maxabs(s, _arr("hift_source.npy")) < 1e-3


def test_decode(hift):
    with torch.no_grad():
        wav = hift.decode(_arr("hift_mel.npy"), _arr("hift_source.npy"))
    assert _maxabs(wav, _arr("hift_wav.npy")) < 1e-5
    assert wav.abs().max().item() <= np.float32(0.99)  # audio_limit clamp (0.99 rounded to float32)


def test_decode_e2e_mel(hift):
    # Second input: the flow model's mel with the end-to-end run's recorded source.
    mel = _arr("flow_mel.npy")
    with torch.no_grad():
        wav = hift.decode(mel, _arr("e2e_source.npy"))
    assert _maxabs(wav, _arr("e2e_wav.npy")) < 1e-5
    torch.manual_seed(0)
    _, s = hift.inference(mel)
    assert _maxabs(s, _arr("e2e_source.npy")) < 1e-3


def test_full_inference_seeded(hift):
    mel = _arr("hift_mel.npy")
    torch.manual_seed(0)
    wav, s = hift.inference(mel)
    after = torch.get_rng_state()
    assert wav.shape == (1, 14400) and s.shape == (1, 1, 14400)
    assert _maxabs(wav, _arr("hift_wav_full.npy")) < 1e-3
    assert _maxabs(s, _arr("hift_source.npy")) < 1e-3
    # Internally exact: the same draws as source() and a deterministic decode of that source.
    torch.manual_seed(0)
    with torch.no_grad():
        s_ref = hift.source(hift.f0(mel))
        assert torch.equal(torch.get_rng_state(), after)  # same number of RNG draws
        assert torch.equal(s, s_ref)
        assert torch.equal(wav, hift.decode(mel, s_ref))


def test_cache_source(hift):
    mel = _arr("hift_mel.npy")
    wav0, s0 = hift.inference(mel, generator=torch.Generator().manual_seed(3))
    cache = torch.randn(1, 1, 2400)
    wav1, s1 = hift.inference(mel, generator=torch.Generator().manual_seed(3), cache_source=cache)
    assert torch.equal(s1[:, :, :2400], cache) and torch.equal(s1[:, :, 2400:], s0[:, :, 2400:])
    assert not torch.equal(wav0, wav1)


def test_legacy_weight_names_identical(hift):
    legacy = load_hift(FIX / "hift_legacy_weight_g_v.pt")
    mel, src = _arr("hift_mel.npy"), _arr("hift_source.npy")
    with torch.no_grad():
        assert torch.equal(legacy.decode(mel, src), hift.decode(mel, src))
        assert torch.equal(legacy.f0(mel), hift.f0(mel))
    # Our weights equal torch's own weight_norm of the stored g/v, for a Conv1d and a
    # ConvTranspose1d (where g is per *input* channel, dim 0 of its [in, out, k] weight).
    raw = torch.load(FIX / "hift_legacy_weight_g_v.pt", weights_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, mod in (("conv_pre", torch.nn.Conv1d(80, 16, 7, padding=3)),
                          ("ups.0", torch.nn.ConvTranspose1d(16, 8, 16, 8, padding=4))):
            mod = torch.nn.utils.weight_norm(mod)
            mod.weight_g.data.copy_(raw[f"{name}.weight_g"])
            mod.weight_v.data.copy_(raw[f"{name}.weight_v"])
            torch.nn.utils.remove_weight_norm(mod)
            ours = hift.get_submodule(name).weight
            assert torch.equal(mod.weight, ours)


# ---- loader errors --------------------------------------------------------------------------------


def _save_modified(tmp_path: Path, edit) -> Path:
    sd = dict(torch.load(FIX / "hift.pt", weights_only=True))
    edit(sd)
    p = tmp_path / "hift_bad.pt"
    torch.save(sd, p)
    return p


def test_missing_key(tmp_path):
    p = _save_modified(tmp_path, lambda sd: sd.pop("conv_post.bias"))
    with pytest.raises(UserError, match=r"missing key\(s\) conv_post\.bias") as e:
        load_hift(p)
    assert str(p) in str(e.value)


def test_unexpected_key(tmp_path):
    p = _save_modified(tmp_path, lambda sd: sd.__setitem__("decoder.extra.weight", torch.zeros(2)))
    with pytest.raises(UserError, match=r"unexpected key\(s\) decoder\.extra\.weight"):
        load_hift(p)


def test_wrong_shape(tmp_path):
    key = "resblocks.0.convs1.1.parametrizations.weight.original1"
    p = _save_modified(tmp_path, lambda sd: sd.__setitem__(key, torch.zeros(8, 8, 5)))
    with pytest.raises(UserError, match=r"wrong shape\(s\) resblocks\.0\.convs1\.1\.parametrizations"
                                        r"\.weight\.original1 \[8, 8, 5\] \(expected \[8, 8, 3\]\)"):
        load_hift(p)


def test_yaml_contradicting_shapes(tmp_path):
    y = tmp_path / "cv.yaml"
    y.write_text((FIX / "cosyvoice2.yaml").read_text().replace("base_channels: 16", "base_channels: 32"))
    with pytest.raises(UserError, match=r"wrong shape\(s\) conv_pre"):
        load_hift(FIX / "hift.pt", y)


def test_garbage_and_non_checkpoint_files(tmp_path):
    g = tmp_path / "garbage.pt"
    g.write_bytes(b"\x00\x01this is not a torch file" * 10)
    with pytest.raises(UserError, match="Cannot read .*garbage.pt"):
        load_hift(g)
    lst = tmp_path / "list.pt"
    torch.save([1, 2, 3], lst)
    with pytest.raises(UserError, match="not a HiFT state_dict"):
        load_hift(lst)
    with pytest.raises(UserError, match="does not exist"):
        load_hift(tmp_path / "nope.pt")


# ---- round trip with a different, randomly initialised architecture --------------------------------


def _random_tiny() -> HiFTVocoder:
    cfg = HiFTConfig(base_channels=8, nb_harmonics=4, f0_cond_channels=8, in_channels=20, f0_in_channels=20,
                     resblock_kernel_sizes=(3, 5), resblock_dilation_sizes=((1, 3, 5), (1, 3, 5)),
                     source_resblock_kernel_sizes=(5, 3, 7))
    torch.manual_seed(7)
    m = HiFTVocoder(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("original0"):
                p.uniform_(0.35, 1.05)  # g ≠ ‖v‖ so that folding really divides by the norm
            elif name.endswith("alpha"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3)
    return m


def test_round_trip_both_namings(tmp_path):
    m = _random_tiny()
    mel = torch.randn(1, 20, 6) * 2 - 5
    wav_ref, s_ref = m.inference(mel, generator=torch.Generator().manual_seed(1))
    assert wav_ref.shape == (1, 6 * 480) and torch.isfinite(wav_ref).all()
    for naming, suffix in (("parametrizations", ".parametrizations.weight.original0"), ("legacy", ".weight_g")):
        sd = export_state_dict(m, naming)
        assert any(k.endswith(suffix) for k in sd)
        p = tmp_path / f"tiny_{naming}.pt"
        torch.save(sd, p)
        m2 = load_hift(p)
        assert m2.cfg == m.cfg  # architecture recovered from the shapes alone
        wav, s = m2.inference(mel, generator=torch.Generator().manual_seed(1))
        assert torch.equal(wav, wav_ref) and torch.equal(s, s_ref)
    # Folding weight norm into plain weights changes nothing numerically.
    with torch.no_grad():
        before = m.decode(mel, s_ref)
        m.fold_weight_norm()
        assert torch.equal(m.decode(mel, s_ref), before)
    with pytest.raises(ValueError):
        export_state_dict(m)


def test_batch_and_sinegen_v1_smoke():
    m = _random_tiny()
    mel = torch.randn(2, 20, 4) * 2 - 5
    with torch.no_grad():
        f0 = m.f0(mel)
        s = m.source(f0, generator=torch.Generator().manual_seed(0))
        assert s.shape == (2, 1, 4 * 480)
        wav = m.decode(mel, s)
        for b in range(2):  # batching does not mix items
            alone = m.decode(mel[b:b + 1], s[b:b + 1])
            # Batched and single-item convolutions may run different CPU kernels (oneDNN/MKL choose blocking
            # and vector width by batch size and by the CPU's instruction set), so the two agree only up to
            # float32 rounding accumulated through the conv stack and the iSTFT: 1.5e-6 measured on peaks of
            # ~0.8 (≈ 25 ulps). The bound, 2e-5 × the peak (≈ 170 float32 ulps of it), leaves room for any x86
            # CPU; items mixed by the batch would differ by the order of the signal itself, far above it.
            peak = max(alone.abs().max().item(), 1e-3)
            assert _maxabs(wav[b:b + 1], alone) < 2e-5 * peak
    # sampling_rate 22050 selects CosyVoice 1's original SineGen (not covered by the fixture).
    cfg = HiFTConfig(**{**m.cfg.__dict__, "sampling_rate": 22050, "upsample_rates": (8, 8),
                        "upsample_kernel_sizes": (16, 16), "source_resblock_kernel_sizes": (7, 11),
                        "source_resblock_dilation_sizes": ((1, 3, 5), (1, 3, 5))})
    v1 = HiFTVocoder(cfg).eval()
    wav, s = v1.inference(mel, generator=torch.Generator().manual_seed(0))
    assert wav.shape == (2, 4 * 256) and torch.isfinite(wav).all() and s.shape == (2, 1, 4 * 256)
