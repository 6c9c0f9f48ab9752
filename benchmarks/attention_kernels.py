"""``python -m benchmarks.attention_kernels``: self-attention kernels and GEMMs at the S2V shapes, one run.

Per token count (63,360 = later clip, 59,136 = first clip at 704×1024×80; 40 heads × 128): torch SDPA,
cuDNN called directly, FlashAttention-4 (its default tile and each SM90 tile of ``SWEEP_TILES``), cuDNN FP8
(kernel alone, and with the per-tensor quantisation of q/k/v that the model does), and FlashAttention-3 where built
(``native/fa3/``: bf16, and FP8 with per-head q/k/v scales and bf16 output, kernel alone and
with eager per-head quantisation) — seconds per call, TFLOP/s (4·S²·5120 per call), and rel-L2 against a float32
reference on a slice of queries. GEMMs at the FFN up-projection shape: bf16, FP8 row-wise (``_scaled_mm``).
``sdpa fp16`` / ``cudnn fp16`` / ``gemm fp16``: the same kernels on fp16 copies of the inputs (same tensor-core rate
on paper; under the H200's power cap the data type can change the clock).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import device_description, markdown_table, median, results_dir, time_fn, write_results

TOKENS = (63360, 59136)
HEADS, HEAD_DIM = 40, 128
# FlashAttention-4 SM90 tiles tried beside the library default (none beat it at the S2V shapes)
SWEEP_TILES: tuple[tuple[int, int], ...] = ((128, 128), (128, 144), (128, 160), (128, 176), (128, 192))


def reference(q, k, v, rows: int = 2048) -> torch.Tensor:
    """float32 attention for the first ``rows`` queries (all keys)."""
    qs = q[:, :rows].float().transpose(1, 2)
    return F.scaled_dot_product_attention(qs, k.float().transpose(1, 2), v.float().transpose(1, 2)).transpose(1, 2)


def fa3_fp8_quantising(q, k, v) -> torch.Tensor:
    """FA3's FP8 forward including the (eager) per-head quantisation of bf16 q/k/v."""
    from runtime.kernels import fa3
    from runtime.kernels.fp8 import quantize_heads

    (q8, dq), (k8, dk), (v8, dv) = (quantize_heads(t) for t in (q, k, v))
    return fa3.attention_fp8(q8, k8, v8, dq, dk, dv)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.attention_kernels", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated kernel-name prefixes to run (e.g. fa3,fa4,cudnn,fp8); "
                    "default all, GEMMs included (name them 'gemm')")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    torch.set_grad_enabled(False)
    from runtime.kernels import cudnn_sdpa, fa3, fa4
    from runtime.kernels.fp8 import quantize_heads, quantize_rows, quantize_tensor, weight_scales
    from runtime.models.attention import _kernel, unavailable_reason

    prefixes = [p.strip() for p in args.only.split(",") if p.strip()]

    def wanted(name: str) -> bool:
        return not prefixes or any(name == p or name.startswith(p + " ") for p in prefixes)

    rows, errors = [], []
    for s in TOKENS:
        g = torch.Generator(device=dev).manual_seed(s)
        q, k, v = (torch.randn(1, s, HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
        ref = reference(q, k, v)
        flops = 4 * s * s * HEADS * HEAD_DIM
        q8, dq = quantize_tensor(q)
        k8, dk = quantize_tensor(k)
        v8, dv = quantize_tensor(v)
        fa3_why = fa3.available(dev)
        # per-(batch, head) scales for FA3's FP8 forward (only when it is built: 3 × 0.3 GB)
        if fa3_why or not wanted("fa3 fp8 (kernel)"):
            (q8h, dqh), (k8h, dkh), (v8h, dvh) = [(None, None)] * 3
        else:
            (q8h, dqh), (k8h, dkh), (v8h, dvh) = (quantize_heads(t) for t in (q, k, v))
        h16 = [t.half() for t in (q, k, v)] if wanted("sdpa fp16") or wanted("cudnn fp16") else [None] * 3
        cases = {"sdpa": lambda: _kernel(q, k, v, "sdpa"), "cudnn": lambda: _kernel(q, k, v, "cudnn"),
                 "sdpa fp16": lambda: _kernel(*h16, "sdpa"), "cudnn fp16": lambda: _kernel(*h16, "cudnn"),
                 "fa4": lambda: _kernel(q, k, v, "fa4"),
                 **{f"fa4 {m}x{n}": (lambda t=(m, n): fa4.run(q, k, v, t)) for m, n in SWEEP_TILES},
                 "fp8 (kernel)": lambda: (cudnn_sdpa.sdpa_fp8(q8, k8, v8, dq, dk, dv).float() * dv),
                 "fp8 (with q/k/v quantisation)": lambda: _kernel(q, k, v, "fp8"),
                 "fa3": lambda: fa3.attention(q, k, v),
                 "fa3 fp8 (kernel)": lambda: fa3.attention_fp8(q8h, k8h, v8h, dqh, dkh, dvh),
                 "fa3 fp8 (with q/k/v quantisation)": lambda: fa3_fp8_quantising(q, k, v)}
        for name, fn in cases.items():
            if not wanted(name):
                continue
            why = fa3_why if name.startswith("fa3") else unavailable_reason(name.split()[0], dev)
            if why:
                errors.append({"kernel": name, "tokens": s, "error": why})
                continue
            try:
                out = fn()
                err = float((out[:, :ref.shape[1]].float() - ref).norm() / ref.norm())
                t = median(time_fn(fn, dev, warmup=2, repeat=args.repeat))
                rows.append({"kernel": name, "tokens": s, "seconds": t, "tflops": flops / t / 1e12, "rel_l2_vs_fp32": err})
                print(rows[-1], flush=True)
            except Exception as e:
                errors.append({"kernel": name, "tokens": s, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
                print(errors[-1], flush=True)
        del q, k, v, q8, k8, v8, q8h, k8h, v8h, h16
    m, kd, n = 63360, 5120, 13824
    a = torch.randn(m, kd, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, kd, device=dev, dtype=torch.bfloat16) * 0.02
    ref = a.float() @ w.float().t()
    w8, sw = weight_scales(w)
    a8, sa = quantize_rows(a)
    a16, w16 = (a.half(), w.half()) if wanted("gemm fp16") else (None, None)
    gemms = {"bf16": lambda: a @ w.t(), "fp16": lambda: a16 @ w16.t(),
             "fp8 rowwise": lambda: torch._scaled_mm(a8, w8.t(), scale_a=sa, scale_b=sw, out_dtype=torch.bfloat16),
             "fp8 rowwise fast-accum": lambda: torch._scaled_mm(a8, w8.t(), scale_a=sa, scale_b=sw, out_dtype=torch.bfloat16,
                                                                use_fast_accum=True),
             "fp8 rowwise + activation quantisation": lambda: torch._scaled_mm(*[quantize_rows(a)[0]], w8.t(),
                                                                               scale_a=sa, scale_b=sw, out_dtype=torch.bfloat16)}
    for name, fn in gemms.items():
        if not wanted(f"gemm {name}"):
            continue
        try:
            out = fn()
            t = median(time_fn(fn, dev, warmup=2, repeat=args.repeat))
            rows.append({"kernel": f"gemm {name}", "tokens": m, "seconds": t, "tflops": 2 * m * kd * n / t / 1e12,
                         "rel_l2_vs_fp32": float((out.float() - ref).norm() / ref.norm())})
            print(rows[-1], flush=True)
        except Exception as e:
            errors.append({"kernel": f"gemm {name}", "tokens": m, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            print(errors[-1], flush=True)
    table = markdown_table(rows, ["kernel", "tokens", "seconds", "tflops", "rel_l2_vs_fp32"])
    if errors:
        table += "\n\n" + markdown_table(errors, ["kernel", "tokens", "error"])
    meta = {"device": device_description(dev), "shape": f"1 × S × {HEADS} heads × {HEAD_DIM}, bf16 inputs",
            "command": "python -m benchmarks.attention_kernels " + " ".join(sys.argv[1:] if argv is None else argv),
            "cudnn": torch.backends.cudnn.version(), "errors": errors,
            "notes": "CUDA events, median of repeats after 2 warm-ups; rel-L2 on the first 2048 queries vs float32"}
    out = results_dir(args.out, dev)
    write_results(out / "attention_kernels.json", rows, meta, table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
