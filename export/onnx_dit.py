"""The S2V DiT step → FP16 ONNX with dynamic (batch, frames, height, width, extra tokens) axes.

One graph serves first and later clips: the number of reference/motion tokens ``E`` is a dynamic axis of
``extra``/``rope_extra`` (first clip: E = one latent frame of reference tokens; later clips: + frame-pack
motion tokens). A single graph means one engine and one weight copy on the GPU; the two clip kinds become
two TensorRT optimization profiles (or one profile spanning both) of the same engine.

Precision: the checkpoint is BF16. Linear/conv weights become FP16 after an explicit range audit
(``fp16_audit``); everything the official code computes in FP32 stays FP32 in the graph through explicit
casts (residual stream, LayerNorm/RMSNorm statistics, modulation, time embedding, head, audio encoder).
Attention exports as one opset-23 ``Attention`` node in the 3-D layout (q/kv_num_heads set).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from runtime.models.dit import ClipConditions, WanS2VDiT, keeps_fp32, timestep_frequencies

FP16_MAX = 65504.0
INPUT_NAMES = ("x", "t_freq") + ClipConditions.names()
FP16_INPUTS = frozenset({"context", "audio_tokens", "pose", "extra"})  # per-clip activations in the compute dtype


def graph_inputs(tensors) -> tuple[torch.Tensor, ...]:
    """Step inputs (``INPUT_NAMES`` order) in the exported graph's dtypes: FP16 activations, FP32 for the rest."""
    return tuple(t.half() if n in FP16_INPUTS else t.float() for n, t in zip(INPUT_NAMES, tensors))
OUTPUT_NAMES = ("velocity",)


class DiTStep(nn.Module):
    """``WanS2VDiT.step`` as a module with positional tensor inputs (the ONNX/engine signature)."""

    def __init__(self, model: WanS2VDiT):
        super().__init__()
        self.model = model

    def forward(self, x, t_freq, context, audio_tokens, audio_global, pose, extra, rope_t, rope_h, rope_w, rope_extra):
        return self.model.step(x, t_freq, context, audio_tokens, audio_global, pose, extra, rope_t, rope_h, rope_w,
                               rope_extra)


# ------------------------------------------------------------------------------------------ FP16 audit
@dataclass
class FP16Report:
    """What the BF16 → FP16 conversion would lose, and what is kept in FP32 because of it."""

    weights_over_range: dict[str, float] = field(default_factory=dict)   # name -> max |w| (> 65504)
    weights_underflow: dict[str, float] = field(default_factory=dict)    # name -> fraction of nonzeros < 2^-24
    activations: dict[str, float] = field(default_factory=dict)          # module -> max |output| seen
    keep_fp32: list[str] = field(default_factory=list)                   # modules computed in FP32 in the graph
    margin: float = 0.5

    def summary(self) -> str:
        hot = sorted(self.activations.items(), key=lambda kv: -kv[1])[:3]
        return (f"{len(self.weights_over_range)} weight tensors beyond the FP16 range, "
                f"{len(self.weights_underflow)} with >1% of values flushed to zero, "
                f"{len(self.keep_fp32)} modules kept in FP32; largest activations: "
                + ", ".join(f"{k}={v:.3g}" for k, v in hot))

    def to_dict(self) -> dict:
        return {"weights_over_range": self.weights_over_range, "weights_underflow": self.weights_underflow,
                "max_activation": max(self.activations.values(), default=0.0), "keep_fp32": self.keep_fp32,
                "activation_margin": self.margin, "summary": self.summary()}


@torch.no_grad()
def fp16_audit(model: WanS2VDiT, x: torch.Tensor, t_freq: torch.Tensor, cond: ClipConditions,
               margin: float = 0.5) -> FP16Report:
    """Check every low-precision weight and every linear/conv output (on one real forward) against FP16.

    A module whose output magnitude reaches ``margin × 65504`` (or whose weights do not fit) is listed in
    ``keep_fp32``; ``to_fp16`` then leaves it in FP32, and the graph computes it in FP32 with explicit casts.
    """
    rep = FP16Report(margin=margin)
    tiny = torch.finfo(torch.float16).tiny * 2**-10  # smallest FP16 subnormal, 2^-24
    for name, p in model.named_parameters():
        if keeps_fp32(name):
            continue
        amax = float(p.detach().abs().max())
        if amax > FP16_MAX:
            rep.weights_over_range[name] = amax
        nz = p[p != 0]
        if nz.numel():
            frac = float((nz.abs() < tiny).float().mean())
            if frac > 0.01:
                rep.weights_underflow[name] = frac
    hooks = []

    def record(name):
        def hook(_module, _inp, out):
            rep.activations[name] = max(rep.activations.get(name, 0.0), float(out.detach().abs().max()))
        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv3d, nn.Conv1d)) and not keeps_fp32(name + ".weight"):
            hooks.append(mod.register_forward_hook(record(name)))
    try:
        model.step(x, t_freq, *cond.as_tuple())
    finally:
        for h in hooks:
            h.remove()
    over = {n.rsplit(".", 1)[0] for n in rep.weights_over_range}
    over |= {n for n, v in rep.activations.items() if v >= margin * FP16_MAX}
    rep.keep_fp32 = sorted(over)
    return rep


def to_fp16(model: WanS2VDiT, keep_fp32: list[str] | tuple[str, ...] = ()) -> WanS2VDiT:
    """Cast the low-precision parameters to FP16 in place, except the FP32 islands and ``keep_fp32`` modules."""
    keep = tuple(k + "." for k in keep_fp32)
    for name, p in model.named_parameters():
        if keeps_fp32(name) or name.startswith(keep):
            p.data = p.data.float()
        else:
            p.data = p.data.to(torch.float16)
    return model


# ------------------------------------------------------------------------------------------ inputs
def example_inputs(model: WanS2VDiT, frames: int, lat_h: int, lat_w: int, motion: bool, batch: int = 1,
                   text_tokens: int = 7, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random but realistic step inputs (through ``prepare``), on the model's device."""
    cfg = model.cfg
    dev = model.patch_embedding.weight.device
    g = torch.Generator(device=dev).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=dev)  # noqa: E731
    conds = []
    for _ in range(batch):
        conds.append(model.prepare(r(1, text_tokens, cfg.text_dim), r(1, 16, 1, lat_h, lat_w),
                                   r(1, 16, 19, lat_h, lat_w) if motion else None, r(1, 16, frames, lat_h, lat_w),
                                   r(1, cfg.audio_layers, cfg.audio_dim, 4 * frames), frames))
    cond = ClipConditions.cat(conds)
    x = r(batch, cfg.in_dim, frames, lat_h, lat_w)
    t_freq = timestep_frequencies([700.0] * batch, cfg.freq_dim).to(dev)
    return (x, t_freq, *cond.as_tuple())


def dynamic_shapes(max_frames: int = 32, max_grid: int = 96, max_extra: int = 16384):
    from torch.export import Dim

    b = Dim("batch", min=1, max=2)
    f = Dim("frames", min=1, max=max_frames)
    gh, gw = Dim("grid_h", min=2, max=max_grid), Dim("grid_w", min=2, max=max_grid)
    e = Dim("extra", min=1, max=max_extra)
    return {
        "x": {0: b, 2: f, 3: 2 * gh, 4: 2 * gw}, "t_freq": {0: b}, "context": {0: b},
        "audio_tokens": {0: b, 1: f}, "audio_global": {0: b, 1: f}, "pose": {0: b, 1: f, 2: gh, 3: gw},
        "extra": {0: b, 1: e}, "rope_t": {0: f}, "rope_h": {0: gh}, "rope_w": {0: gw}, "rope_extra": {0: e},
    }


# ------------------------------------------------------------------------------------------ export
def export_dit(model: WanS2VDiT, path: str | Path, example: tuple[torch.Tensor, ...], dynamic: bool = True,
               opset: int = 23) -> dict:
    """Export ``model.step`` (already in its export precision) to ``path`` atomically; returns stats.

    Weights above 2 GB go to ``<name>.data`` next to the graph (ONNX external data)."""
    import onnx

    from export.files import staged

    path = Path(path)
    model.set_export(True)
    t0 = time.perf_counter()
    try:
        kwargs = dict(input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES), opset_version=opset,
                      dynamo=True, external_data=True, optimize=False)
        if dynamic:
            kwargs["dynamic_shapes"] = dynamic_shapes()
        with torch.no_grad():
            prog = torch.onnx.export(DiTStep(model), example, **kwargs)
        with staged(path) as tmp:  # graph + its external data, renamed into place together
            prog.save(str(tmp), external_data=True)
    finally:
        model.set_export(False)
    export_s = time.perf_counter() - t0
    graph = onnx.load(str(path), load_external_data=False)
    size = sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith(path.name))
    return {"export_s": round(export_s, 2), "onnx_bytes": size, "nodes": len(graph.graph.node), "opset": opset}

