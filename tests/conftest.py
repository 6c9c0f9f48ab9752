from __future__ import annotations

import io
import socket
from pathlib import Path

import pytest
import torch

# The official reference outputs ship with the project (tests/golden, see its README); the example media stay in
# the development checkout's ../shared/samples, and the few tests that need a real photo skip without them.
GOLDEN = Path(__file__).resolve().parent / "golden"
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SAMPLES = SHARED / "samples"


@pytest.fixture(autouse=True)
def _no_grad_and_threads():
    torch.manual_seed(0)
    with torch.no_grad():
        yield


def step_inputs(model, frames: int = 3, lat_h: int = 8, lat_w: int = 12, motion: bool = True, batch: int = 1,
                seed: int = 0, pose: bool = True, t: float = 700.0, text_tokens: int = 7):
    """The one builder of random DiT step inputs for tests: (x, t_freq, ClipConditions), through ``prepare`` (so
    the conditions are what a clip gives), on the model's device. ``batch`` stacks independent CFG-style branches."""
    from runtime.models.dit import ClipConditions, timestep_frequencies

    cfg = model.cfg
    dev = model.patch_embedding.weight.device
    g = torch.Generator(device=dev).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=dev)  # noqa: E731
    conds = [model.prepare(r(1, text_tokens, cfg.text_dim), r(1, 16, 1, lat_h, lat_w),
                           r(1, 16, 19, lat_h, lat_w) if motion else None, r(1, 16, frames, lat_h, lat_w) if pose else None,
                           r(1, cfg.audio_layers, cfg.audio_dim, 4 * frames), frames)
             for _ in range(batch)]
    x = r(batch, cfg.in_dim, frames, lat_h, lat_w)
    return x, timestep_frequencies([t] * batch, cfg.freq_dim).to(dev), ClipConditions.cat(conds)


def mean_rel(out, ref) -> float:
    """Mean absolute difference relative to the mean magnitude of ``ref`` (numpy arrays or tensors)."""
    import numpy as np

    out, ref = (np.asarray(a.detach().cpu().double() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
                for a in (out, ref))
    return float(np.abs(out - ref).mean() / max(np.abs(ref).mean(), 1e-30))


@pytest.fixture(scope="module")
def pipe():
    """The tiny built-in pipeline on the CPU, one per test module (tests that patch it use monkeypatch)."""
    from runtime import S2VPipeline

    return S2VPipeline.from_pretrained("tiny", device="cpu")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers and torch.distributed rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Payload:
    """A pickle that would print "pickled code ran" if unpickled: loaders must refuse it, never run it."""

    def __reduce__(self):
        return (print, ("pickled code ran",))


def wav_bytes(pcm, rate: int) -> bytes:
    """A 16-bit PCM wav in memory; ``pcm`` is float (channels, samples) in [-1, 1] (1-D means mono), samples may be 0."""
    import av
    import numpy as np

    pcm = np.asarray(pcm)
    pcm = pcm[None] if pcm.ndim == 1 else pcm
    buf = io.BytesIO()
    layout = "mono" if pcm.shape[0] == 1 else "stereo"
    with av.open(buf, "w", format="wav") as out:
        a = out.add_stream("pcm_s16le", rate=rate, layout=layout)
        if pcm.shape[1]:
            f = av.AudioFrame.from_ndarray((np.clip(pcm.T, -1, 1) * 32767).astype(np.int16).reshape(1, -1),
                                           format="s16", layout=layout)
            f.sample_rate, f.pts = rate, 0
            out.mux(a.encode(f))
        out.mux(a.encode(None))
    return buf.getvalue()


def pose_mp4(frames: int, size: int) -> bytes:
    """A pose video in memory: ``frames`` frames of ``size``² (a moving white bar on black), 16 fps mpeg4."""
    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        s = out.add_stream("mpeg4", rate=16)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(frames):
            fr = np.zeros((size, size, 3), np.uint8)
            fr[:, (i * 3) % size:(i * 3) % size + 8] = 255
            for pkt in s.encode(av.VideoFrame.from_ndarray(fr, format="rgb24")):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)
    return buf.getvalue()


def png_bytes(im) -> bytes:
    """A PIL image as PNG bytes."""
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def golden_dir() -> Path:
    """tests/golden; a missing manifest fails (the data is part of the project, so a skip would hide its loss)."""
    if not (GOLDEN / "manifest.json").is_file():
        pytest.fail(f"golden reference data missing at {GOLDEN}; restore tests/golden from the repository")
    return GOLDEN


def golden_manifest() -> dict:
    import json

    return json.loads((golden_dir() / "manifest.json").read_text())


def samples_or_skip() -> Path:
    if not SAMPLES.is_dir():
        pytest.skip(f"sample media not found at {SAMPLES}")
    return SAMPLES


def write_inputs(folder: Path) -> tuple[Path, Path]:
    """A real reference image and a 1 s speech-like wav, for CLI cases that must get past the input checks."""
    from runtime.demo import demo_image, demo_speech, save_wav

    image, audio = folder / "face.png", folder / "speech.wav"
    demo_image().save(image)
    save_wav(audio, *demo_speech(1.0))
    return image, audio
