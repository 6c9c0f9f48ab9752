"""The official ``WanModel_S2V`` (a checkout of Wan-Video/Wan2.2) as a benchmark peer, on the same weights.

Only the model files are imported (the ``wan`` package's ``__init__`` pulls in every pipeline and its
dependencies). Its ``flash_attention`` is routed by ``use_attention``: ``"sdpa"`` (default) runs the official
SDPA fallback, as users without flash_attn run it; ``"fa3"`` runs the official ``flash_attention`` itself (its
packing, casts and output conversion) with FlashAttention-3's varlen call answered by the FA3 build the runtime
uses (``runtime.kernels.fa3``: the dense kernel, which for one sequence per call is what varlen computes), so
the official model and ours can be compared at the same attention kernel. The model is built on the meta device and given a state dict (no 14B float32 initialisation); the
RoPE table it keeps outside its parameters is taken from a small official instance with the same head size.
"""
from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import torch


_ATTENTION = {"kind": "sdpa"}


def use_attention(kind: str) -> None:
    """Route the official model's attention: "sdpa" (its fallback) or "fa3" (its FA3 path on our FA3 build)."""
    if kind not in ("sdpa", "fa3"):
        raise ValueError(f"official attention {kind!r}: use sdpa or fa3")
    if kind == "fa3":
        from runtime.kernels import fa3

        why = fa3.available()
        if why:
            raise RuntimeError(why)
    _ATTENTION["kind"] = kind


class _FA3Varlen:
    """Stands in for the ``flash_attn_interface`` module the official code imports for FlashAttention-3."""

    @staticmethod
    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q=None, seqused_k=None, max_seqlen_q=None,
                               max_seqlen_k=None, softmax_scale=None, causal=False, deterministic=False):
        from runtime.kernels import fa3

        # b sequences whose packed length is b × the longest are all full length (known from shapes, no sync):
        # the dense kernel over [b, L, H, D] computes what varlen does (the audio injector packs one per frame)
        b = cu_seqlens_q.shape[0] - 1
        if (q.shape[0] != b * max_seqlen_q or k.shape[0] != b * max_seqlen_k or cu_seqlens_k.shape[0] - 1 != b
                or causal or seqused_q is not None or seqused_k is not None):
            raise NotImplementedError("the FA3 stand-in runs full-length non-causal sequences only")
        out = fa3.fwd(q.unflatten(0, (b, max_seqlen_q)), k.unflatten(0, (b, max_seqlen_k)),
                      v.unflatten(0, (b, max_seqlen_k)), softmax_scale=softmax_scale)
        return (out.flatten(0, 1),)


def _import_official(repo: Path):
    wan = repo / "wan"
    if not (wan / "modules" / "s2v" / "model_s2v.py").is_file():
        raise FileNotFoundError(f"{repo}: not a Wan2.2 checkout (wan/modules/s2v/model_s2v.py missing); "
                                "pass --official-repo pointing at the folder that holds wan/")
    for name, path in (("wan", wan), ("wan.modules", wan / "modules"), ("wan.modules.s2v", wan / "modules" / "s2v"),
                       ("wan.distributed", wan / "distributed")):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(path)]
            sys.modules[name] = pkg
    import wan.modules.attention as attn
    import wan.modules.model as base
    import wan.modules.s2v.model_s2v as s2v

    def routed(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None, causal=False,
               window_size=(-1, -1), deterministic=False, dtype=torch.bfloat16, version=None):
        if _ATTENTION["kind"] == "fa3":
            attn.flash_attn_interface, attn.FLASH_ATTN_3_AVAILABLE = _FA3Varlen, True
            return attn.flash_attention(q, k, v, q_lens, k_lens, dropout_p, softmax_scale, q_scale, causal,
                                        window_size, deterministic, dtype, 3)
        if not q.is_cuda:  # CPU checks run the official model in float32 (its default casts to bf16)
            dtype = q.dtype
        attn.FLASH_ATTN_2_AVAILABLE = False
        return attn.attention(q, k, v, q_lens, k_lens, dropout_p, softmax_scale, q_scale, causal, window_size,
                              deterministic, dtype)

    base.flash_attention = routed
    s2v.flash_attention = routed
    return s2v.WanModel_S2V


def build_official(repo: str | Path, cfg, state: dict[str, torch.Tensor]):
    """The official model over ``state`` (tensors shared, not copied), in eval mode."""
    cls = _import_official(Path(repo))
    kwargs = cfg.to_official_dict()
    with torch.device("meta"):
        model = cls(**kwargs)
    model.load_state_dict(state, strict=True, assign=True)
    # Plain tensor attributes (the RoPE table, the frame-pack buckets) were made on the meta device: take them
    # from a small instance with the same head size, whose constructor computes them for real.
    small = cls(**{**kwargs, "dim": 2 * cfg.head_dim, "num_heads": 2, "num_layers": 1, "ffn_dim": 64,
                   "audio_inject_layers": [0], "text_dim": 8, "audio_dim": 8})
    for name, mod in model.named_modules():
        twin = small.get_submodule(re.sub(r"\.\d+(?=\.|$)", ".0", name)) if name else small
        for attr, val in list(vars(mod).items()):
            if isinstance(val, torch.Tensor) and not isinstance(val, torch.nn.Parameter) and val.is_meta:
                setattr(mod, attr, getattr(twin, attr))
    return model.eval().requires_grad_(False)


def official_forward(model, x, t: float, context, ref, motion, audio, first_clip: bool, motion_frames: int = 73):
    """One official call for batch 1 (x [1, C, F, h, w] etc.), under the bf16 autocast of the official pipeline.
    ``motion`` None means a first clip (the official call still takes a motion tensor and drops it)."""
    lat_motion = (motion_frames + 3) // 4
    c, f, h, w = x.shape[1:]
    if motion is None:
        motion = torch.zeros(1, c, lat_motion, h, w, device=x.device, dtype=x.dtype)
    pose = torch.zeros(c, f, h, w, device=x.device, dtype=x.dtype)  # no pose video: cond_encoder sees zeros
    tt = torch.tensor([t], device=x.device, dtype=torch.float32)
    with torch.amp.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
        out = model([x[0]], t=tt, context=[context[0]], seq_len=None, ref_latents=[ref[0]], motion_latents=[motion[0]],
                    cond_states=[pose], audio_input=audio, motion_frames=[motion_frames, lat_motion],
                    drop_motion_frames=first_clip)
    return out[0][None]
