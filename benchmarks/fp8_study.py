"""``python -m benchmarks.fp8_study``: which FP8 pieces cost how much accuracy (rel-L2 of one forward vs BF16).

Random 14B weights at a scenario's shapes; one BF16 eager forward (SDPA) is the reference; each configuration
quantises a subset of the block linears (``runtime.kernels.fp8.QUANTISED`` names) and/or runs FP8 self-attention
(cuDNN, per-tensor scales, softmax scale ``P``) over the same weights and inputs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import device_description, markdown_table, results_dir, write_results

ALL = ("self_attn.qkv", "self_attn.o", "cross_attn.q", "cross_attn.o", "ffn.0", "ffn.2")
CONFIGS = {  # name: (linears, fast_accum, attention, softmax scale P); names hold no commas (--configs splits on them)
    "fp8 linears (all)": (ALL, False, "sdpa", None),
    "fp8 linears (all) fast accumulation": (ALL, True, "sdpa", None),
    "fp8 self_attn.qkv + o": (("self_attn.qkv", "self_attn.o"), False, "sdpa", None),
    "fp8 cross_attn.q + o": (("cross_attn.q", "cross_attn.o"), False, "sdpa", None),
    "fp8 ffn.0 + ffn.2": (("ffn.0", "ffn.2"), False, "sdpa", None),
    "fp8 linears but ffn.2": (tuple(n for n in ALL if n != "ffn.2"), False, "sdpa", None),
    "fp8 attention (P 256)": ((), False, "fp8", 256.0),
    "fp8 attention (P 448)": ((), False, "fp8", 448.0),
    "fp8 linears (all) + attention (P 256)": (ALL, False, "fp8", 256.0),
}


def main(argv=None) -> int:
    from benchmarks.run import SCENARIOS, build, clip_conditions, rel_l2
    from runtime.backends import make_backend
    from runtime.kernels import cudnn_sdpa, fp8
    from runtime.models.dit import from_state_dict, timestep_frequencies

    ap = argparse.ArgumentParser(prog="python -m benchmarks.fp8_study", description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default="later-704x1024-80f", choices=sorted(SCENARIOS))
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma list of: " + ", ".join(CONFIGS))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    scn = SCENARIOS[args.scenario]
    dev = torch.device("cuda")
    torch.set_grad_enabled(False)
    base = build(scn, dev)
    cfg, state = base.cfg, base.state_dict()
    x, cond, _, _ = clip_conditions(base, scn, dev, torch.bfloat16)
    t_freq = timestep_frequencies([500.0], cfg.freq_dim).to(dev)
    ref = make_backend("torch", base).forward(x, t_freq, cond).float()
    del base
    rows = []
    for name in args.configs.split(","):
        linears, fast, attn, p = CONFIGS[name]
        t0 = time.perf_counter()
        model = from_state_dict(cfg, state)
        if linears:
            fp8.quantize_blocks(model, linears, fast_accum=fast)
        if p is not None:
            cudnn_sdpa.P_SCALE = p
            cudnn_sdpa._plans.clear()
        model.set_attention(attn)
        out = make_backend("torch", model).forward(x, t_freq, cond).float()
        rows.append({"config": name, "linears": ",".join(linears) or "-", "attention": attn, "p_scale": p,
                     "fast_accum": fast, "rel_l2_vs_bf16": rel_l2(out, ref), "seconds": time.perf_counter() - t0})
        print(rows[-1], flush=True)
        del model, out
        torch.cuda.empty_cache()
    table = markdown_table(rows, ["config", "attention", "rel_l2_vs_bf16"])
    meta = {"device": device_description(dev), "scenario": scn.name, "tokens": cond.num_tokens,
            "command": "python -m benchmarks.fp8_study " + " ".join(sys.argv[1:] if argv is None else argv),
            "notes": "eager forwards, random 14B weights (bf16), timestep 500; rel-L2 of the velocity vs the bf16 SDPA "
                     "forward; 'seconds' includes building the configuration"}
    out = results_dir(args.out, dev)
    write_results(out / f"fp8_study_{scn.name}.json", rows, meta, table)
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
