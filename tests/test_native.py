"""The native runner: CMake configures everywhere and says what it builds against (TensorRT, else TensorRT-RTX)
or why not; the source compiles against TensorRT's public headers where they are installed."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_configures_and_reports_the_runner(tmp_path):
    out = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path / "b"), f"-DPython3_EXECUTABLE={sys.executable}"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if "s2v_trt_runner:" in ln)
    assert "building against TensorRT" in line or "skipped (" in line
    if "skipped" in line and importlib.util.find_spec("tensorrt_rtx_libs") is not None:
        # the rtx extra is installed: the message must say why its wheel is not enough
        assert "libtensorrt_rtx.so.1 but no headers" in line


def test_runner_compiles_against_tensorrt_headers():
    inc = [p for p in (Path("/usr/include/x86_64-linux-gnu"), Path("/usr/include")) if (p / "NvInfer.h").is_file()]
    cuda = Path("/usr/local/cuda/include")
    if not inc or not (cuda / "cuda_runtime_api.h").is_file() or shutil.which("g++") is None:
        pytest.skip("TensorRT headers (NvInfer.h) or the CUDA headers are not installed here")
    out = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "-w", f"-I{inc[0]}", f"-I{cuda}",
                          str(ROOT / "native" / "trt_runner.cpp")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
