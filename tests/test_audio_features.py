"""Audio feature path: wav2vec2 hidden states (tiny model), 50 -> 30 Hz interpolation and 16 fps bucketing
against float64 numpy re-implementations, clip counts, golden parity."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.errors import CheckpointError, InputError
from runtime.models import audio as A
from tests.conftest import golden_dir, golden_manifest


# --- golden ----------------------------------------------------------------------------------------


def test_golden_audio_parity():
    from runtime.golden_checks.audio import check

    cases = check(golden_dir(), golden_manifest())
    assert len(cases) >= 3 and all(c.passed for c in cases), cases
    assert all(c.rel_l2 == 0.0 for c in cases)  # same ops, same inputs: bit-exact


# --- float64 references written from the spec (§3.5) -----------------------------------------------


def _interp_ref(x: np.ndarray, n: int) -> np.ndarray:
    """Linear, align_corners=True along axis 1. The source positions are formed in float32, as torch (and
    hence the official code) forms them: for long inputs their rounding moves outputs by ~T * 1e-7,
    far more than the blend's own error, so a float64 position would hide real blend bugs behind a
    loose tolerance."""
    t = x.shape[1]
    scale = np.float32(t - 1) / np.float32(n - 1) if n > 1 else np.float32(0)
    pos = (np.arange(n, dtype=np.float32) * scale).astype(np.float64)
    lo = np.minimum(np.floor(pos).astype(int), t - 1)
    hi = np.minimum(lo + 1, t - 1)
    w = (pos - lo)[None, :, None]
    return x[:, lo] * (1 - w) + x[:, hi] * w


def _bucket_ref(x: np.ndarray, fps: int, frames: int, m: int) -> tuple[np.ndarray, int]:
    layers, n, c = x.shape
    clips = int(n / (frames * 30 / fps)) + 1
    rows = []
    for i in range(clips * frames):
        src = round(i * 30 / fps)  # Python round: half to even, like numpy
        if src >= n:
            rows.append(np.zeros((layers, (2 * m + 1) * c)))
            continue
        win = [min(max(src + k * int(30 / fps), 0), n - 1) for k in range(-m, m + 1)]
        rows.append(x[:, win].reshape(layers, -1))
    return np.stack(rows), clips


# --- interpolation ---------------------------------------------------------------------------------


def test_frames_30_keeps_the_official_float_expression():
    assert A.frames_30(205) == 122  # exact arithmetic would give 123
    assert A.frames_30(250) == 150 and A.frames_30(123) == 73
    odd = [t for t in range(1, 5000) if A.frames_30(t) != (t * 3) // 5]
    assert odd and all(A.frames_30(t) == (t * 3) // 5 - 1 for t in odd)
    assert all(A.frames_30(t) == int(t / 50.0 * 30) for t in range(1, 5000))


@pytest.mark.parametrize("t", [2, 3, 7, 50, 123, 205, 499, 1234])
def test_interpolation_matches_float64_reference(t):
    rng = np.random.default_rng(t)
    x = rng.standard_normal((3, t, 5))
    got = A.interpolate_50_to_30(torch.from_numpy(x).float())
    n = int(t / 50.0 * 30)
    assert got.shape == (3, n, 5)
    np.testing.assert_allclose(got.double().numpy(), _interp_ref(x, n), rtol=0, atol=2e-6)
    # endpoints are copied exactly (align_corners=True)
    assert torch.equal(got[:, 0], torch.from_numpy(x[:, 0]).float())
    if n > 1:
        assert torch.equal(got[:, -1], torch.from_numpy(x[:, -1]).float())


def test_interpolation_rejects_too_short():
    with pytest.raises(InputError):
        A.interpolate_50_to_30(torch.zeros(2, 1, 4))


# --- bucketing -------------------------------------------------------------------------------------


def test_bucket_indices_round_half_to_even():
    idx, clips = A.bucket_indices(1000, fps=16, batch_frames=80)
    assert idx[:13].tolist() == [0, 2, 4, 6, 8, 9, 11, 13, 15, 17, 19, 21, 22]
    assert idx[4] == 8 and idx[12] == 22 and idx[20] == 38  # ties 7.5 -> 8, 22.5 -> 22, 37.5 -> 38
    assert clips == int(1000 / 150) + 1


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("m", [0, 1])
def test_bucketing_matches_float64_reference(seed, m):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    frames = int(rng.choice([16, 48, 80]))
    x = rng.standard_normal((4, n, 3))
    got, clips = A.bucket_audio(torch.from_numpy(x), fps=16, batch_frames=frames, m=m)
    want, want_clips = _bucket_ref(x, 16, frames, m)
    assert clips == want_clips
    assert got.shape == want.shape == (clips * frames, 4, (2 * m + 1) * 3)
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("n, clips", [(1, 1), (149, 1), (150, 2), (299, 2), (300, 3)])
def test_clip_count_rule(n, clips):
    out, got = A.bucket_audio(torch.ones(2, n, 3), batch_frames=80)
    assert got == clips and out.shape[0] == 80 * clips
    # frames past the audio are silent: exactly the ones whose index reaches n
    silent = (out == 0).all(dim=(1, 2))
    assert silent.tolist() == [round(i * 1.875) >= n for i in range(80 * clips)]


def test_needed_clips_official_vs_minimal():
    # 80080 samples = 250 wav2vec2 frames -> N30 = 150: one full clip of audio, plus an all-silent one
    c = A.needed_clips(80080, 80)
    assert (c.frames_50, c.frames_30, c.official, c.minimal) == (250, 150, 2, 1)
    c = A.needed_clips(80000, 80)  # exactly 5 s: 249 frames -> N30 149
    assert (c.frames_50, c.frames_30, c.official, c.minimal) == (249, 149, 1, 1)
    c = A.needed_clips(16000 * 12, 80)
    assert c.official == c.minimal == 3
    for samples in (16000 * 3 + 123, 16000 * 17, 400 + 320 * 999):
        c = A.needed_clips(samples, 48)
        _, clips = A.bucket_audio(torch.zeros(1, c.frames_30, 1), batch_frames=48)
        assert c.official == clips and 1 <= c.minimal <= c.official


def test_conv_frames_formula():
    def ref(n):
        for k, s in zip(A.CONV_KERNELS, A.CONV_STRIDES):
            n = math.floor((n - k) / s) + 1
        return n

    assert A.conv_frames(160000) == 499  # 10 s
    for n in (400, 401, 719, 720, 16000, 12345, 80080):
        assert A.conv_frames(n) == ref(n)
    assert A.conv_frames(399) == 0


# --- wav2vec2 on a tiny model ----------------------------------------------------------------------


LAYERS = 3


@pytest.fixture(scope="module")
def tiny_w2v(tmp_path_factory) -> Path:
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    folder = tmp_path_factory.mktemp("ckpt") / A.WAV2VEC_DIR
    cfg = Wav2Vec2Config(
        vocab_size=12, hidden_size=16, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8,) * 7, conv_kernel=A.CONV_KERNELS, conv_stride=A.CONV_STRIDES, conv_bias=True,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, do_stable_layer_norm=True,
        feat_extract_norm="layer", mask_time_prob=0.05, layerdrop=0.1,  # both must be inactive at inference
    )
    torch.manual_seed(0)
    Wav2Vec2ForCTC(cfg).save_pretrained(folder)  # the official folder is a CTC fine-tune
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(folder)
    return folder


def _wave(n, seed=0):
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(np.arange(n) / 7.0) + 0.05 * rng.standard_normal(n) + 0.2).astype(np.float32)


def test_wav2vec2_shapes_and_frame_count(tiny_w2v):
    feats = A.Wav2Vec2Features.from_checkpoint(tiny_w2v.parent, device="cpu")
    assert not feats.model.training
    for n in (720, 4321, 16000):  # 720 samples: the shortest audio with one 30 Hz frame
        h = feats(_wave(n))
        assert h.shape == (LAYERS + 1, A.conv_frames(n), 16) and h.dtype == torch.float32


def test_wav2vec2_hidden_state_semantics(tiny_w2v):
    """Entry 0 = input of layer 1, entry k = residual stream after k layers, last = after the final
    LayerNorm, computed here by hand from the model's modules on the processor-normalised waveform."""
    feats = A.Wav2Vec2Features.from_dir(tiny_w2v, device="cpu")
    wav = _wave(8000, seed=1)
    h = feats(wav)
    m = feats.model
    x = wav.astype(np.float32)
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)  # the processor's do_normalize
    with torch.no_grad():
        conv = m.feature_extractor(torch.from_numpy(x)[None]).transpose(1, 2)
        s, _ = m.feature_projection(conv)
        s = s + m.encoder.pos_conv_embed(s)
        want = [s]
        for layer in m.encoder.layers:
            out = layer(s)
            s = out[0] if isinstance(out, tuple) else out
            want.append(s)
        want[-1] = m.encoder.layer_norm(s)  # the un-normed last output is not part of the stack
    torch.testing.assert_close(h, torch.cat(want), rtol=1e-5, atol=1e-5)
    # the official class (Wav2Vec2ForCTC) gives the same stack; its last entry must be the normed output,
    # which transformers 5.x only reports as last_hidden_state (4.x also as hidden_states[-1])
    from transformers import Wav2Vec2ForCTC

    ctc = Wav2Vec2ForCTC.from_pretrained(str(tiny_w2v), local_files_only=True).eval()
    iv = feats.feature_extractor(wav, sampling_rate=16000, return_tensors="pt").input_values
    with torch.no_grad():
        base = ctc.wav2vec2(iv, output_hidden_states=True)
    assert torch.equal(torch.cat(base.hidden_states[:-1]), h[:-1])
    assert torch.equal(base.last_hidden_state[0], h[-1])


def test_wav2vec2_then_resample_and_bucket(tiny_w2v):
    feats = A.Wav2Vec2Features.from_dir(tiny_w2v, device="cpu")
    n = 16000 * 2 + 777
    h = feats(_wave(n))
    z, clips = A.bucket_audio(A.interpolate_50_to_30(h), fps=16, batch_frames=16)
    plan = A.needed_clips(n, 16)
    assert clips == plan.official and z.shape == (16 * clips, LAYERS + 1, 16)


def test_wav2vec2_input_validation(tiny_w2v):
    feats = A.Wav2Vec2Features.from_dir(tiny_w2v, device="cpu")
    with pytest.raises(InputError, match="mono"):
        feats(np.zeros((2, 16000), np.float32))
    with pytest.raises(InputError, match="short"):
        feats(np.zeros(719, np.float32))
    with pytest.raises(InputError, match="NaN"):
        feats(np.full(16000, np.nan, np.float32))
    with pytest.raises(InputError, match="floating"):
        feats(np.zeros(16000, np.int16))
    assert feats(_wave(16000)[None]).shape[0] == LAYERS + 1  # [1, N] is accepted as mono


def test_wav2vec2_missing_weights(tiny_w2v, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / A.WAV2VEC_DIR
    broken.mkdir()
    for f in tiny_w2v.iterdir():
        if f.suffix == ".json":
            (broken / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(tiny_w2v / "model.safetensors"))
    sd.pop("wav2vec2.encoder.layers.1.attention.k_proj.weight")
    save_file(sd, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match="k_proj"):
        A.Wav2Vec2Features.from_dir(broken, device="cpu")
    with pytest.raises(CheckpointError, match="config.json"):
        A.Wav2Vec2Features.from_dir(tmp_path / "absent", device="cpu")
