"""``torchrun --nproc_per_node 2 -m runtime.generate`` on the CPU (gloo): CFG parallel and Ulysses write the same
video as one process.

The raw frames of the three runs differ by at most 1/255 in ~0.01 % of pixels (float32 batch-1 vs batch-2 and
sliced-sequence rounding; the step itself matches to 1e-5 in test_parallel.py). H.264 at crf 10 turns such
one-level differences into different block decisions (up to ~8/255 on the tiny model's noisy 64×64 frames),
so the MP4s are compared by PSNR and frame count.
"""
from __future__ import annotations

import socket
import subprocess
import sys

import av
import numpy as np
import pytest

RUN = [sys.executable, "-m", "runtime.generate", "--ckpt_dir", "tiny", "--base_seed", "3", "--sample_steps", "8",
       "--device", "cpu"]


def _torchrun() -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(port)]


def _frames(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(np.float64)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0 ** 2 / max(np.mean((a - b) ** 2), 1e-12)))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "one.mp4"
    subprocess.run(RUN + ["--save_file", str(out)], check=True, capture_output=True, timeout=600)
    return _frames(out)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--cfg_parallel"], ["--ulysses_size", "2"]], ids=["cfg-parallel", "ulysses-2"])
def test_torchrun_matches_one_process(tmp_path, single, flags):
    out = tmp_path / "par.mp4"
    proc = subprocess.run(_torchrun() + RUN[1:] + flags + ["--save_file", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines() == [str(out)]  # only rank 0 prints (and writes) the output
    frames = _frames(out)
    assert frames.shape == single.shape
    assert _psnr(frames, single) > 40.0


def test_parallel_flags_without_torchrun_are_one_line(tmp_path):
    proc = subprocess.run(RUN + ["--cfg_parallel", "--save_file", str(tmp_path / "x.mp4")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: 1 process(es) but --ulysses_size 1 with --cfg_parallel needs 2: launch with "
        "`torchrun --nproc_per_node 2 -m runtime.generate ...`")
    assert not (tmp_path / "x.mp4").exists()


def test_torchrun_layout_mismatch_is_one_line_per_rank(tmp_path):
    proc = subprocess.run(_torchrun() + RUN[1:] + ["--ulysses_size", "2", "--cfg_parallel", "--save_file", str(tmp_path / "x.mp4")],
                          capture_output=True, text=True, timeout=300)
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert ours and "launch with `torchrun --nproc_per_node 4" in ours[0]  # one line per rank that got to say it
    assert "exitcode  : 2" in proc.stderr                                            # torchrun reports our exit 2
    assert 'File "' + "runtime/" not in proc.stderr                                # no traceback from our code
    assert not (tmp_path / "x.mp4").exists()
