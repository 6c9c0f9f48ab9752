"""``python -m benchmarks.profile_forward``: where one DiT forward's GPU time goes, by kernel family.

Random 14B weights at a scenario's shapes, compiled blocks (``torch-compile``: the kernels ``torch-graph`` replays,
without the graph so that the profiler sees each launch), one profiled forward after warm-up. Kernels are grouped
into attention / GEMM / fused elementwise (Triton) / other by name; the table gives milliseconds per forward, the
share, and the ten most expensive kernels of each family.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.common import device_description, markdown_table, median, results_dir, time_fn, write_results
from benchmarks.flops import dit_forward_flops

FAMILIES = (  # first match wins; names as CUPTI reports them
    # Triton first: inductor names a fused norm/RoPE kernel after the ops it feeds (…_fa3_attention_…); its GEMM
    # templates (max-autotune) are GEMMs
    ("gemm", re.compile(r"^triton_tem", re.I)),
    ("fused elementwise (triton)", re.compile(r"^triton_|triton", re.I)),
    ("attention", re.compile(r"fmha|flash|attention|sdpa|cudnn_generated|fprop_sm90|kernel_cutlass_kernel_flash", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|sm90_xmma|cutlass|_scaled_mm|matmul", re.I)),
    ("copy / cast / other elementwise", re.compile(r"elementwise|copy|cast|fill|reduce|cat|index", re.I)),
)


def family(name: str) -> str:
    for fam, pat in FAMILIES:
        if pat.search(name):
            return fam
    return "other"


def kernel_times(fn, device: torch.device) -> dict[str, list[float]]:
    """Milliseconds of each CUDA kernel launched by one call of ``fn`` (torch.profiler / CUPTI), by kernel name."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    kernels: dict[str, list[float]] = defaultdict(list)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0:
            kernels[e.name].append(e.device_time / 1e3)
    return kernels


def main(argv=None) -> int:
    from benchmarks.run import SCENARIOS, Variant, build, clip_conditions
    from runtime.backends import make_backend
    from runtime.models.dit import timestep_frequencies

    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile_forward", description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default="later-704x1024-80f", choices=sorted(SCENARIOS))
    ap.add_argument("--variant", default="torch-compile", help="backend[:attention][@precision], as in benchmarks.run")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    scn = SCENARIOS[args.scenario]
    dev = torch.device("cuda")
    torch.set_grad_enabled(False)
    v = Variant(args.variant)
    model = build(scn, dev)
    if v.precision == "fp8":
        model.set_precision("fp8")
    model.set_attention(v.attention)  # FP8 attention only where named (:fp8, :fa3-fp8)
    x, cond, _, _ = clip_conditions(model, scn, dev, torch.bfloat16)
    t_freq = timestep_frequencies([500.0], model.cfg.freq_dim).to(dev)
    backend = make_backend(v.backend, model)
    for _ in range(2):
        backend.forward(x, t_freq, cond)
    wall_ms = 1e3 * median(time_fn(lambda: backend.forward(x, t_freq, cond), dev, warmup=0, repeat=2))
    kernels = kernel_times(lambda: backend.forward(x, t_freq, cond), dev)
    total = sum(sum(t) for t in kernels.values())
    fam_ms: dict[str, float] = defaultdict(float)
    fam_top: dict[str, list] = defaultdict(list)
    for name, ts in kernels.items():
        f = family(name)
        fam_ms[f] += sum(ts)
        fam_top[f].append((sum(ts), len(ts), name))
    fl = dit_forward_flops(model.cfg, scn.latent_frames, scn.height // 16, scn.width // 16, cond.extra.shape[1])
    work = {"attention": fl.attention, "gemm": fl.linear}  # FLOP model: the rate each family ran at in the model
    rows = [{"family": f, "ms_per_forward": ms, "share": ms / total,
             "tflops": work[f] / ms / 1e9 if f in work else None,
             "top": [{"ms": t, "calls": n, "kernel": k[:160]} for t, n, k in sorted(fam_top[f], reverse=True)[:10]]}
            for f, ms in sorted(fam_ms.items(), key=lambda kv: -kv[1])]
    table = (f"Forward wall time {wall_ms:.0f} ms (unprofiled, median of 2); kernel time {total:.0f} ms.\n\n"
             + markdown_table([{k: r[k] for k in ("family", "ms_per_forward", "share", "tflops")} for r in rows],
                              ["family", "ms_per_forward", "share", "tflops"]))
    for r in rows:
        table += f"\n\n**{r['family']}** (top kernels)\n\n" + markdown_table(r["top"], ["ms", "calls", "kernel"])
    meta = {"device": device_description(dev), "scenario": scn.name, "variant": v.spec, "tokens": cond.num_tokens,
            "kernel_ms_total": total, "wall_ms": wall_ms,
            "command": "python -m benchmarks.profile_forward " + " ".join(sys.argv[1:] if argv is None else argv),
            "notes": "torch.profiler (CUPTI) kernel times of one forward after 2 warm-ups; random 14B weights"}
    out = results_dir(args.out, dev)
    write_results(out / f"profile_{scn.name}_{v.spec.replace(':', '-').replace('@', '-')}.json", rows, meta, table)
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
