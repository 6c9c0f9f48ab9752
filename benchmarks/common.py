"""Shared benchmark utilities: device naming, CUDA-event timing, result files."""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_slug(device: torch.device | str | None = None) -> str:
    """Folder name for results: 'nvidia-h100', 'nvidia-h200', or 'cpu'."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    m = re.search(r"(h100|h200|h20|a100|b200|l40s?|gh200)", name)
    return f"nvidia-{m.group(1)}" if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def results_dir(out: Path | None, device: torch.device | str | None = None, suffix: str = "") -> Path:
    """``out`` if given, else ``benchmarks/results/<device slug><suffix>``."""
    return out or RESULTS / f"{device_slug(device)}{suffix}"


def code_revision() -> str:
    """This project's revision for result files: ``S2V_CODE_REV`` when set (a device machine's copy of the tree
    reports the commit it was cut from, not the one that runs), else ``git rev-parse`` (+dirty)."""
    import subprocess

    rev = os.environ.get("S2V_CODE_REV")
    if rev:
        return rev
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
    return head + ("+dirty" if dirty else "")


def device_description(device: torch.device | str | None = None) -> str:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}), torch {torch.__version__}"
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} threads), torch {torch.__version__}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 1, repeat: int = 3) -> list[float]:
    """Seconds per call (CUDA events on GPU, perf_counter on CPU), after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def peak_mem_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def write_results(path: Path, rows: list[dict], meta: dict, table: str) -> None:
    """Write ``rows`` as JSON (with ``meta``) and a Markdown table next to it, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    tmp.replace(path)
    md = path.with_suffix(".md")
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(table + "\n")
    tmp.replace(md)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def demo_image_at(height: int, width: int):
    """``runtime.demo``'s reference image at a request's exact size (the benchmarks' inputs)."""
    from PIL import Image

    from runtime.demo import demo_image

    return demo_image(max(height, width)).resize((width, height), Image.BICUBIC)


def small_gpu(device: torch.device) -> bool:
    """An 80 GB-class card (under 100 GiB): the resident full-size pipeline, its graphs' pool and the default VAE
    decode do not fit it together (runtime.memory_plan), so the benchmarks take the low-memory VAE there."""
    return device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory < 100 * 2**30
