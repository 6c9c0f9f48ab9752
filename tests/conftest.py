from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GOLDEN = SHARED / "golden"
SAMPLES = SHARED / "samples"


@pytest.fixture(autouse=True)
def _no_grad_and_threads():
    torch.manual_seed(0)
    with torch.no_grad():
        yield


def golden_or_skip() -> Path:
    if not (GOLDEN / "manifest.json").is_file():
        pytest.skip(f"golden reference data not found at {GOLDEN}")
    return GOLDEN


def samples_or_skip() -> Path:
    if not SAMPLES.is_dir():
        pytest.skip(f"sample media not found at {SAMPLES}")
    return SAMPLES
