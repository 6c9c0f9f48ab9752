"""``python -m benchmarks.official_process``: the official ``WanModel_S2V`` forward timed in a process of its own.

``benchmarks.run`` starts this before it allocates anything on the GPU, so the official model runs as it does
for a user: its own process, warmed up, alone on the GPU, no other model's allocations or compiled graphs
beside it. The weights are ``benchmarks.run.build``'s seeded random weights and the inputs
``benchmarks.run.forward_inputs``: the same tensors the parent's variants see. Each attention route
(``benchmarks.official.use_attention``) is warmed up, then timed ``--repeat`` times (CUDA events around the
call alone). Writes ``rows.json`` and ``outputs.safetensors`` (one output per variant) to ``--out``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main(argv=None) -> int:
    from benchmarks.common import device_slug, median, time_fn
    from benchmarks.official import build_official, official_forward, use_attention
    from benchmarks.run import SCENARIOS, build, forward_inputs

    ap = argparse.ArgumentParser(prog="python -m benchmarks.official_process", description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    ap.add_argument("--official-repo", required=True)
    ap.add_argument("--attention", default="sdpa", help="comma list of official attention routes: sdpa, fa3")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    scn = SCENARIOS[args.scenario]
    device = torch.device("cuda" if torch.cuda.is_available() and scn.model != "tiny" else "cpu")
    torch.set_grad_enabled(False)
    base = build(scn, device)
    cfg = base.cfg
    official = build_official(args.official_repo, cfg, base.state_dict())
    del base
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    inp = forward_inputs(cfg, scn, device, dtype)
    fn = lambda: official_forward(official, inp.x, inp.timestep, inp.text, inp.ref, inp.motion, inp.audio,  # noqa: E731
                                  scn.clip == "first")
    rows, outputs = [], {}
    for kernel in [k for k in args.attention.split(",") if k]:
        use_attention(kernel)
        name = "official" if kernel == "sdpa" else f"official:{kernel}"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        outputs[name] = fn().float().cpu().contiguous()
        times = time_fn(fn, device, warmup=max(0, args.warmup - 1), repeat=args.repeat)
        fwd_s = median(times)
        row = {"device": device_slug(device), "variant": name, "precision": "bf16 autocast" if device.type == "cuda"
               else "fp32", "scenario": scn.name, "gpus": 1, "process": "own", "official_attention": kernel,
               "attention": f"{kernel} (official {'fallback' if kernel == 'sdpa' else 'flash_attention, FA3 build of ours'})",
               "dit_forward_s": fwd_s, "forward_all_s": times,
               "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
        print(f"[{name}] forward {fwd_s:.3f} s ({', '.join(f'{t:.3f}' for t in times)})", flush=True)
        rows.append(row)
    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    save_file(outputs, args.out / "outputs.safetensors")
    (args.out / "rows.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
