"""cuDNN fused attention called directly through ``nvidia-cudnn-frontend`` (module ``cudnn``).

Works on the model's own layout: q/k/v [B, S, H, D] (a free view of [B, S, H·D]), passed to cuDNN as the
logical BHSD tensor with BSHD strides, so nothing is transposed or copied. One execution plan is built per
(shape, strides, dtype) and reused; a plan build costs tens of milliseconds, once per clip shape.

Two graphs:
- ``sdpa``: bf16/fp16 in and out, fp32 softmax (exact tier);
- ``sdpa_fp8``: e4m3 q/k/v with per-tensor descales (device tensors: no host sync), probabilities quantised
  with a fixed power-of-two scale (they lie in [0, 1]), e4m3 output in v's scale (Hopper has no bf16 output).
"""
from __future__ import annotations

import math
import threading

import torch

_lock = threading.Lock()
_handles: dict[int, object] = {}
_plans: dict[tuple, "_Plan"] = {}
P_SCALE = 256.0  # softmax probabilities are in [0, 1]: 256·p stays below e4m3's 448 and keeps small p normal


def available(device: torch.device | None = None, fp8: bool = False) -> str | None:
    """None when usable, else the reason it is not."""
    from runtime.kernels import cuda_capability

    major, why = cuda_capability(device)
    if why:
        return why
    if major < 8:
        return "cuDNN fused attention needs compute capability 8.0 or newer"
    if fp8 and major < 9:
        return "cuDNN FP8 attention needs compute capability 9.0 (Hopper) or newer"
    try:
        _cudnn()
    except Exception as err:  # ImportError, or a cuDNN the frontend cannot load
        return f"nvidia-cudnn-frontend unavailable ({type(err).__name__}: {err})"
    return None


def _cudnn():
    torch.backends.cudnn.version()  # make sure torch's libcudnn is loaded before the frontend looks for it
    import cudnn

    return cudnn


def _handle(device: torch.device):
    cudnn = _cudnn()
    idx = device.index if device.index is not None else torch.cuda.current_device()
    h = _handles.get(idx)
    if h is None:
        with torch.cuda.device(idx):
            h = _handles[idx] = cudnn.create_handle()
    cudnn.set_stream(handle=h, stream=torch.cuda.current_stream(device).cuda_stream)
    return h


def _bhsd(t: torch.Tensor) -> tuple[list[int], list[int]]:
    """[B, S, H, D] tensor → (BHSD dims, matching strides)."""
    b, s, h, d = t.shape
    sb, ss, sh, sd = t.stride()
    return [b, h, s, d], [sb, sh, ss, sd]


class _Plan:
    def __init__(self, graph, uids: dict[str, int], workspace: torch.Tensor, consts: dict[str, torch.Tensor]):
        self.graph, self.uids, self.workspace, self.consts = graph, uids, workspace, consts


def _key(kind: str, *ts: torch.Tensor) -> tuple:
    return (kind,) + tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in ts)


def _build(kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> _Plan:
    cudnn = _cudnn()
    dt = cudnn.data_type
    io = {torch.bfloat16: dt.BFLOAT16, torch.float16: dt.HALF, torch.float8_e4m3fn: dt.FP8_E4M3}
    handle = _handle(q.device)
    g = cudnn.pygraph(io_data_type=io[q.dtype], intermediate_data_type=dt.FLOAT, compute_data_type=dt.FLOAT,
                      handle=handle)
    uid = iter(range(1, 100))
    uids: dict[str, int] = {}

    def tensor(name, dims, strides, dtype):
        uids[name] = next(uid)
        return g.tensor(name=name, dim=dims, stride=strides, data_type=dtype, uid=uids[name])

    tq, tk, tv = (tensor(n, *_bhsd(t), io[t.dtype]) for n, t in (("q", q), ("k", k), ("v", v)))
    scale = 1.0 / math.sqrt(q.shape[-1])
    consts: dict[str, torch.Tensor] = {}
    if kind == "fp8":
        one = lambda: [1, 1, 1, 1]  # noqa: E731
        sc = {n: tensor(n, one(), one(), dt.FLOAT) for n in ("descale_q", "descale_k", "descale_v", "descale_s",
                                                              "scale_s", "scale_o")}
        o, _, amax_s, amax_o = g.sdpa_fp8(q=tq, k=tk, v=tv, descale_q=sc["descale_q"], descale_k=sc["descale_k"],
                                          descale_v=sc["descale_v"], descale_s=sc["descale_s"], scale_s=sc["scale_s"],
                                          scale_o=sc["scale_o"], generate_stats=False, attn_scale=scale,
                                          use_causal_mask=False)
        for name, t in (("amax_s", amax_s), ("amax_o", amax_o)):
            uids[name] = next(uid)
            t.set_uid(uids[name]).set_output(True).set_dim(one()).set_stride(one()).set_data_type(dt.FLOAT)
            consts[name] = torch.empty(1, 1, 1, 1, device=q.device, dtype=torch.float32)
        f32 = lambda x: torch.full((1, 1, 1, 1), x, device=q.device, dtype=torch.float32)  # noqa: E731
        consts.update(scale_s=f32(P_SCALE), descale_s=f32(1.0 / P_SCALE))
    else:
        o, _ = g.sdpa(name="sdpa", q=tq, k=tk, v=tv, generate_stats=False, attn_scale=scale, use_causal_mask=False)
    uids["o"] = next(uid)
    dims, strides = _bhsd(out)
    o.set_uid(uids["o"]).set_output(True).set_dim(dims).set_stride(strides).set_data_type(
        {torch.bfloat16: dt.BFLOAT16, torch.float16: dt.HALF, torch.float8_e4m3fn: dt.FP8_E4M3}[out.dtype])
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    ws = torch.empty(max(1, g.get_workspace_size()), device=q.device, dtype=torch.uint8)
    return _Plan(g, uids, ws, consts)


def _run(kind: str, q, k, v, out, scales: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    key = _key(kind, q, k, v, out)
    plan = _plans.get(key)
    if plan is None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("cuDNN attention plan missing during CUDA-graph capture: run the step once before capturing")
        with _lock:
            plan = _plans.get(key) or _plans.setdefault(key, _build(kind, q, k, v, out))
    pack = {plan.uids["q"]: q, plan.uids["k"]: k, plan.uids["v"]: v, plan.uids["o"]: out}
    for name, t in {**plan.consts, **(scales or {})}.items():
        pack[plan.uids[name]] = t
    plan.graph.execute(pack, plan.workspace, handle=_handle(q.device))
    return out


@torch.library.custom_op("wan_s2v::cudnn_sdpa", mutates_args=())
def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ/√D) v; q [B, Sq, H, D], k/v [B, Sk, H, D] (any strides with D contiguous) → [B, Sq, H, D]."""
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    return _run("bf16", q, k, v, out)


@sdpa.register_fake
def _(q, k, v):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


@torch.library.custom_op("wan_s2v::cudnn_sdpa_fp8", mutates_args=())
def sdpa_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, descale_q: torch.Tensor, descale_k: torch.Tensor,
             descale_v: torch.Tensor) -> torch.Tensor:
    """FP8 attention: e4m3 q/k/v [B, S, H, D] with fp32 descales (x ≈ x8 · descale) → e4m3 [B, Sq, H, D] in the
    scale of v (o ≈ o8 · descale_v). Hopper's cuDNN writes FP8 output only (bf16 output is Blackwell-only); each
    output row is a convex combination of v's rows, so v's scale cannot overflow."""
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=torch.float8_e4m3fn, device=q.device)
    as4 = lambda t: t.reshape(1, 1, 1, 1)  # noqa: E731
    return _run("fp8", q, k, v, out, {"descale_q": as4(descale_q), "descale_k": as4(descale_k),
                                      "descale_v": as4(descale_v), "scale_o": as4(1.0 / descale_v)})


@sdpa_fp8.register_fake
def _(q, k, v, descale_q, descale_k, descale_v):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],), dtype=torch.float8_e4m3fn)
