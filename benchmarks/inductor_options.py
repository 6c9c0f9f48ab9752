"""``python -m benchmarks.inductor_options``: do inductor settings shorten the compiled blocks' elementwise kernels?

The profile (``profile_later-…-fa3.md``) shows the fused Triton kernels per forward; the largest, the q/k
RMSNorm + RoPE, is memory-bound. Its reduction runs over 5,120 channels, above inductor's
limit for a persistent (single-pass) reduction (1,024), so the row is read twice. Candidates, each compiled afresh
on the same model and inputs: ``triton.multi_kernel`` (also generates the persistent variant and picks the faster
at run time), ``coordinate_descent_tuning`` (tunes the Triton kernels' block sizes). Per setting: forward seconds
(CUDA events, median), the Triton kernels' time from one profiled forward, rel-L2 vs the default setting.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import device_description, markdown_table, median, results_dir, sync, time_fn, write_results

SETTINGS = {
    "default": {},
    "multi_kernel": {"triton.multi_kernel": 1},
    "coordinate_descent": {"coordinate_descent_tuning": True},
    "multi_kernel+coordinate_descent": {"triton.multi_kernel": 1, "coordinate_descent_tuning": True},
}


def triton_ms(fn, device) -> float:
    """Milliseconds of inductor's fused elementwise (Triton) kernels in one call of ``fn`` (CUDA), grouped as in
    ``benchmarks.profile_forward``."""
    from benchmarks.profile_forward import family, kernel_times

    return sum(sum(ts) for name, ts in kernel_times(fn, device).items() if family(name) == "fused elementwise (triton)")


def main(argv=None) -> int:
    from benchmarks.run import SCENARIOS, build, clip_conditions
    from runtime.models.dit import timestep_frequencies

    ap = argparse.ArgumentParser(prog="python -m benchmarks.inductor_options", description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default="later-704x1024-80f", choices=sorted(SCENARIOS))
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of {', '.join(SETTINGS)}")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    scn = SCENARIOS[args.scenario]
    dev = torch.device("cuda" if scn.model != "tiny" else "cpu")  # tiny-cpu: a smoke run of the script itself
    torch.set_grad_enabled(False)
    model = build(scn, dev)
    model.set_attention(args.attention)
    x, cond, _, _ = clip_conditions(model, scn, dev, model.dtype)
    t_freq = timestep_frequencies([500.0], model.cfg.freq_dim).to(dev)
    step = lambda: model.step(x, t_freq, *cond.as_tuple())  # noqa: E731
    rows, errors, ref = [], [], None
    meta = {"device": device_description(dev), "scenario": scn.name, "tokens": cond.num_tokens,
            "attention": model.attention_impl,
            "command": "python -m benchmarks.inductor_options " + " ".join(sys.argv[1:] if argv is None else argv),
            "notes": "one model, blocks recompiled per setting (torch._dynamo.reset between); compiled blocks "
                     "without a CUDA graph; warmup_s = compilation + the first two forwards; forward = CUDA "
                     "events, median of repeats after those"}
    out = results_dir(args.out, dev)

    def save():
        table = markdown_table(rows, ["setting", "forward_s", "triton_ms", "warmup_s", "rel_l2_vs_default"])
        if errors:
            table += "\n\n" + markdown_table(errors, ["setting", "error"])
        write_results(out / f"inductor_options_{scn.name}.json", rows, {**meta, "errors": errors}, table)
        return table

    for name in [s.strip() for s in args.settings.split(",") if s.strip()]:
        model.uncompile_blocks()
        torch._dynamo.reset()
        try:
            model.compile_blocks(options=SETTINGS[name] or None)
            t0 = time.perf_counter()
            y = step()
            step()
            sync(dev)
            warmup_s = time.perf_counter() - t0
            y = y.float()
            ref = y if ref is None else ref
            fwd = median(time_fn(step, dev, warmup=0, repeat=args.repeat))
            rows.append({"setting": name, "options": SETTINGS[name], "forward_s": fwd,
                         "triton_ms": triton_ms(step, dev) if dev.type == "cuda" else None, "warmup_s": warmup_s,
                         "rel_l2_vs_default": float((y - ref).norm() / ref.norm())})
            print(rows[-1], flush=True)
        except Exception as e:  # a setting that fails to compile is a result, not the end of the run
            errors.append({"setting": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            print(errors[-1], flush=True)
        save()
    print(save())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
