"""``python -m benchmarks.gemm_shapes``: the DiT's block GEMMs at the S2V token count, per GEMM backend, one run.

The profile (``profile_forward``) shows the FFN GEMMs below the attention projections' throughput (figures in
``benchmarks/NOTES.md``). This asks whether another backend does better at those exact shapes before anything in the model changes:
cuBLAS through ``F.linear`` (what the model runs; bias in the epilogue), cuBLAS without the bias, with the weight
stored transposed ([in, out], an NN problem instead of TN), with smaller activations (same shapes), and inductor's
``max-autotune`` GEMM search (Triton templates; for the FFN up-projection with the tanh-GELU fused, as the model's
compiled block would be). Seconds per call (median), TFLOP/s (2·M·N·K), rel-L2 against cuBLAS.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import device_description, markdown_table, median, results_dir, time_fn, write_results

TOKENS = 63360  # later clip, 704×1024×80
SHAPES = {  # name: (in_features K, out_features N) of the 14B model's block linears
    "self_attn.qkv": (5120, 15360),
    "self_attn.o": (5120, 5120),
    "ffn.0": (5120, 13824),
    "ffn.2": (13824, 5120),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gemm_shapes", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma list of: " + ", ".join(SHAPES))
    ap.add_argument("--no-autotune", action="store_true", help="skip inductor's max-autotune search (minutes)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    torch.set_grad_enabled(False)
    rows, errors = [], []
    for name in args.shapes.split(","):
        kd, n = SHAPES[name]
        g = torch.Generator(device=dev).manual_seed(kd + n)
        x = torch.randn(TOKENS, kd, device=dev, dtype=torch.bfloat16, generator=g)
        w = torch.randn(n, kd, device=dev, dtype=torch.bfloat16, generator=g) * kd ** -0.5
        b = torch.randn(n, device=dev, dtype=torch.bfloat16, generator=g) * 0.1
        gelu = name == "ffn.0"

        def model_path(x=x, w=w, b=b, gelu=gelu):
            y = F.linear(x, w, b)
            return F.gelu(y, approximate="tanh") if gelu else y

        wt = w.t().contiguous()  # the weight stored [in, out]: cuBLAS sees an NN instead of a TN problem
        xs = x * 0.05  # smaller activations: same bits toggling? (power, hence clocks, can depend on the data)
        cases = {"cublas linear+bias": lambda: F.linear(x, w, b), "cublas mm (no bias)": lambda: x @ w.t(),
                 "cublas addmm, weight [in, out]": lambda: torch.addmm(b, x, wt),
                 "cublas mm, weight [in, out] (no bias)": lambda: x @ wt,
                 "cublas linear+bias, activations × 0.05": lambda: F.linear(xs, w, b)}
        if not args.no_autotune:
            cases["inductor default" + (" (+gelu)" if gelu else "")] = torch.compile(model_path, dynamic=False)
            cases["inductor max-autotune" + (" (+gelu)" if gelu else "")] = torch.compile(
                model_path, dynamic=False, mode="max-autotune-no-cudagraphs")
        ref = F.linear(x, w, b).float()
        ref_gelu = F.gelu(ref, approximate="tanh") if gelu else ref
        for case, fn in cases.items():
            try:
                out = fn()
                if "gelu" in case:
                    r = ref_gelu
                elif "no bias" in case:
                    r = ref - b.float()
                elif "0.05" in case:
                    r = 0.05 * (ref - b.float()) + b.float()
                else:
                    r = ref
                err = float((out.float() - r).norm() / r.norm())
                t = median(time_fn(fn, dev, warmup=3, repeat=args.repeat))
                rows.append({"linear": name, "backend": case, "m": TOKENS, "n": n, "k": kd, "seconds": t,
                             "tflops": 2 * TOKENS * n * kd / t / 1e12, "rel_l2_vs_cublas": err})
                print(rows[-1], flush=True)
            except Exception as e:
                errors.append({"linear": name, "backend": case, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
                print(errors[-1], flush=True)
        del x, w, b, ref, ref_gelu, wt, xs
        torch.cuda.empty_cache()
    table = markdown_table(rows, ["linear", "backend", "m", "n", "k", "seconds", "tflops", "rel_l2_vs_cublas"])
    if errors:
        table += "\n\n" + markdown_table(errors, ["linear", "backend", "error"])
    meta = {"device": device_description(dev), "dtype": "bf16",
            "command": "python -m benchmarks.gemm_shapes " + " ".join(sys.argv[1:] if argv is None else argv),
            "errors": errors, "notes": "CUDA events, median after 3 warm-ups; the gelu rows include the activation"}
    write_results(results_dir(args.out, dev) / "gemm_shapes.json", rows, meta, table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
