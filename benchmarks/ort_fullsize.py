"""Full-size ONNX Runtime check and timing of the exported FP16 DiT (CUDA EP, IO binding, CUDA graphs).

    python -m benchmarks.ort_fullsize --engines_dir /tmp/eng --check /tmp/eng/check.pt --out DIR

1. parity: the saved validation inputs (written by ``export.build --save-check``) through ONNX Runtime vs the
   saved PyTorch FP32 output (mean relative error, limit 1e-2);
2. timing: one forward at 704×1024, 80 frames, later clip, batch 1 (and batch 2 = one CFG step), through
   the ``onnxruntime`` backend, with the random weights the graph was exported with.

Each row records the execution providers the session ran with (ONNX Runtime falls back to the CPU provider
silently when the CUDA one cannot load) and whether a CUDA graph was used; the meta holds the command, git
revision, date, dtype, shapes and steps, as ``benchmarks.run`` writes them.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import code_revision, device_description, device_slug, markdown_table, median, time_fn, write_results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines_dir", default="engines")
    ap.add_argument("--check", default=None)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-cuda-graph", action="store_true")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    device = torch.device("cuda")
    from benchmarks.run import SCENARIOS, clip_conditions
    from runtime.backends.ort_backend import OrtDiT, onnx_path_in
    from runtime.config import DiTConfig
    from runtime.models.dit import build_dit

    t0 = time.perf_counter()
    model = build_dit(DiTConfig.s2v_14b(), dtype=torch.bfloat16, device=device)  # for prepare() only
    backend = OrtDiT(model, onnx_path_in(args.engines_dir), cuda_graph=not args.no_cuda_graph)
    session_s = time.perf_counter() - t0
    print(f"session ready in {session_s:.0f}s: {backend.session.get_providers()}", flush=True)
    result = {"session_s": round(session_s, 1), "providers": backend.session.get_providers()}
    if args.check:
        chk = torch.load(args.check)
        feeds = {n: t.numpy() for n, t in zip(chk["names"], chk["inputs"])}
        out = backend.session.run(None, feeds)[0]
        ref = chk["ref"].numpy()
        rel = float(np.abs(out.astype(np.float64) - ref).mean() / np.abs(ref).mean())
        result["parity"] = {"shape": list(out.shape), "mean_rel": rel, "max_abs": float(np.abs(out - ref).max()),
                            "limit": 1e-2, "pass": rel <= 1e-2}
        print("parity", result["parity"], flush=True)
    scn = SCENARIOS["later-704x1024-80f"]
    x, cond, _, both = clip_conditions(model, scn, device, model.dtype)
    t_freq = torch.randn(1, model.cfg.freq_dim, device=device)
    rows = []
    for batch, (xx, tt, cc) in ((1, (x, t_freq, cond)), (2, (x.expand(2, -1, -1, -1, -1), t_freq.expand(2, -1), both))):
        torch.cuda.reset_peak_memory_stats(device)
        w0 = time.perf_counter()
        backend.forward(xx, tt, cc)  # capture
        torch.cuda.synchronize()
        first = time.perf_counter() - w0
        ts = time_fn(lambda: backend.forward(xx, tt, cc), device, warmup=0, repeat=args.repeat)
        rows.append({"device": device_slug(device), "variant": "onnxruntime-fp16", "scenario": scn.name, "batch": batch,
                     "providers": backend.session.get_providers(), "cuda_graph": backend.cuda_graph,
                     "seconds": median(ts), "all_s": ts, "first_call_s": round(first, 1),
                     "torch_peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30})
        print(rows[-1], flush=True)
    meta = {"device": device_description(device), **result, "git": code_revision(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "dtype": "FP16 ONNX graph (FP32 islands inside), bf16 PyTorch model for prepare()",
            "shapes": {"height": scn.height, "width": scn.width, "infer_frames": scn.infer_frames, "clip": scn.clip,
                       "batch": [1, 2]},
            "steps": {"timed": "one DiT forward per repeat", "repeat": args.repeat},
            "command": "python -m benchmarks.ort_fullsize " + " ".join(argv or __import__("sys").argv[1:])}
    table = markdown_table(rows, ["device", "variant", "providers", "scenario", "batch", "seconds", "first_call_s"])
    write_results(args.out / "ort_fullsize.json", rows, meta, table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
