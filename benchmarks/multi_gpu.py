"""``torchrun --nproc_per_node N -m benchmarks.multi_gpu``: one CFG step on 1 GPU vs CFG parallel vs Ulysses.

Every layout runs in this one launch on the same random 14B weights and inputs (704×1024×80 later clip by
default), with the single-GPU backend per rank (compiled blocks, CUDA graph, fastest attention kernel):

- ``1 GPU``: rank 0 alone runs the batch-2 CFG step;
- ``cfg-parallel``: each CFG branch on its own rank group, one all-gather per step;
- ``ulysses-U``: the sequence split over the ranks of each branch (all-to-all around attention).

Rows carry ``gpus``, ``step_s``, speedup over 1 GPU, per-rank peak memory, rel-L2 of the velocity against the
1-GPU result, and what ran: the backend, whether the blocks were compiled and whether a CUDA graph was
replayed (read from the backend after the run, not from ``--graph``). The meta holds the command, git revision,
date, dtype, shapes and steps, as ``benchmarks.run`` writes them.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.common import code_revision, device_description, device_slug, markdown_table, median, results_dir, time_fn, write_results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="torchrun --nproc_per_node N -m benchmarks.multi_gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default="later-704x1024-80f")
    ap.add_argument("--layouts", default="cfg,ulysses", help="comma list of: cfg, ulysses, cfg+ulysses")
    ap.add_argument("--attention", default="fastest")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--graph", default="on", choices=("on", "off"), help="CUDA graphs per rank (off: compiled blocks only)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    from benchmarks.run import SCENARIOS, build, clip_conditions, fastest_attention, rel_l2
    from runtime import parallel
    from runtime.backends.torch_backend import CompiledDiT, GraphDiT
    from runtime.models.dit import timestep_frequencies

    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local)
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", device_id=dev)
    rank = dist.get_rank()
    torch.set_grad_enabled(False)
    scn = SCENARIOS[args.scenario]
    model = build(scn, dev)  # same seed on every rank: same weights
    x, cond, uncond, both = clip_conditions(model, scn, dev, model.dtype)
    t_freq = timestep_frequencies([500.0], model.cfg.freq_dim).to(dev)
    choice = [args.attention]
    if args.attention == "fastest":
        if rank == 0:
            choice[0], _ = fastest_attention(model, cond.num_tokens, dev)
        dist.broadcast_object_list(choice, src=0)
    model.set_attention(choice[0])
    make = (lambda m: GraphDiT(m, warmup=1)) if args.graph == "on" else CompiledDiT
    x2, t2 = x.expand(2, -1, -1, -1, -1), t_freq.expand(2, -1)
    rows, ref = [], None

    def ran(backend) -> dict:
        """What a backend actually ran, read after its calls (not the flags asked for)."""
        inner = getattr(backend, "inner", backend)
        return {"backend": inner.name, "compiled": bool(inner.model.compiled),
                "graph": "on" if isinstance(inner, GraphDiT) and bool(inner.graphs) else "off"}

    def record(name: str, gpus: int, fn, ulysses: int = 1, backend=None):
        nonlocal ref
        torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize(dev)
        first = time.perf_counter() - t0
        ts = time_fn(fn, dev, warmup=0, repeat=args.repeat)
        peak = torch.tensor([torch.cuda.max_memory_allocated(dev) / 2**30], device=dev)
        peaks = [torch.zeros_like(peak) for _ in range(world)]
        dist.all_gather(peaks, peak)
        if rank == 0:
            if ref is None:
                ref = out.float()
            row = {"device": device_slug(dev), "variant": name, "precision": "bf16", "scenario": scn.name, "gpus": gpus,
                   "ulysses": ulysses, "attention": choice[0], **ran(backend), "step_s": median(ts), "step_all_s": ts,
                   "first_call_s": first, "peak_mem_gib_per_rank": [round(float(p), 2) for p in peaks[:gpus]],
                   "rel_l2_vs_1gpu": rel_l2(out, ref)}
            rows.append(row)
            print(row, flush=True)

    # 1 GPU: rank 0 alone (the others wait)
    if rank == 0:
        single = make(model)
        record_fn = lambda: single.forward(x2, t2, both)  # noqa: E731
    dist.barrier()
    if rank == 0:
        torch.cuda.reset_peak_memory_stats(dev)
        out = record_fn()
        torch.cuda.synchronize(dev)
        ts = time_fn(record_fn, dev, warmup=0, repeat=args.repeat)
        ref = out.float()
        rows.append({"device": device_slug(dev), "variant": "1 GPU", "precision": "bf16", "scenario": scn.name, "gpus": 1,
                     "ulysses": 1, "attention": choice[0], **ran(single), "step_s": median(ts), "step_all_s": ts,
                     "peak_mem_gib_per_rank": [round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)], "rel_l2_vs_1gpu": 0.0})
        print(rows[-1], flush=True)
        del single
    dist.barrier()
    torch.cuda.empty_cache()

    for lay in [s for s in args.layouts.split(",") if s]:
        cfg_par = "cfg" in lay
        ulysses = world // 2 if (cfg_par and "ulysses" in lay) else (world if "ulysses" in lay else 1)
        if ulysses * (2 if cfg_par else 1) != world:
            continue
        try:
            layout = parallel.configure(ulysses, cfg_par, dev)
            m = model
            if ulysses > 1:  # a fresh model, sharded before its blocks are compiled (as the pipeline does)
                m = build(scn, dev)
                m.set_attention(choice[0])
            parallel.shard_model(m, layout)
            inner = make(m)
            backend = parallel.CFGParallelDiT(inner, layout) if cfg_par else inner
            name = "+".join((["cfg-parallel"] if cfg_par else []) + ([f"ulysses-{ulysses}"] if ulysses > 1 else []))
            record(name, world, lambda: backend.forward(x2, t2, both), ulysses, backend)
            del backend, inner, m
        except Exception as e:
            if rank == 0:
                rows.append({"variant": lay, "gpus": world, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
                print(rows[-1], flush=True)
        dist.barrier()
        torch.cuda.empty_cache()

    if rank == 0:
        base = next(r["step_s"] for r in rows if r["variant"] == "1 GPU")
        for r in rows:
            if "step_s" in r:
                r["speedup_vs_1gpu"] = base / r["step_s"]
        table = markdown_table(rows, ["variant", "gpus", "attention", "backend", "compiled", "graph", "step_s", "speedup_vs_1gpu", "peak_mem_gib_per_rank",
                                      "rel_l2_vs_1gpu", "error"])
        meta = {"device": f"{world} × {device_description(dev)}", "scenario": scn.name, "tokens": cond.num_tokens,
                "git": code_revision(), "date": time.strftime("%Y-%m-%d %H:%M"), "dtype": str(model.dtype),
                "shapes": {"height": scn.height, "width": scn.width, "infer_frames": scn.infer_frames, "clip": scn.clip,
                           "batch": 2},
                "steps": {"timed": "one CFG step (the batch-2 call) per repeat", "repeat": args.repeat,
                          "recipe_steps": scn.steps},
                "command": f"torchrun --nproc_per_node {world} -m benchmarks.multi_gpu " + " ".join(sys.argv[1:] if argv is None else argv),
                "notes": "random 14B weights (bf16), same on every rank; one CFG step = the batch-2 call; CUDA events, "
                         "median of repeats after a warm-up/capture call; NCCL, NVLink multicast off"}
        out = results_dir(args.out, dev, f"-x{world}")
        write_results(out / f"multi_gpu_{scn.name}.json", rows, meta, table)
        print(table)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
