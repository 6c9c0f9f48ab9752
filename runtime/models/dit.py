"""The Wan2.2-S2V diffusion transformer, written for export and graph capture.

Parameter names equal the official ``WanModel_S2V`` state dict (including the upstream spelling
``casual_audio_encoder``), so official shards load without renaming. The math follows the official
model; the form differs where export and speed need it:

* batched tensors instead of lists; first clip (no motion tokens) vs later clips is a matter of the
  static shape of ``extra`` tokens, not of Python branches on values;
* RoPE as real cos/sin tables built once per clip shape (``runtime.models.rope``);
* per-clip work (text MLP, audio encoder, reference/motion/pose embeddings) is split from the per-step
  work: ``prepare`` runs once per clip and CFG branch, ``step`` once per denoising step;
* the two-segment modulation (noisy tokens use timestep t, reference/motion tokens timestep 0) uses the
  static boundary L = frames·h·w instead of a host sync;
* precision islands as in the official autocast map: the residual stream, norms, modulation, the
  time embedding, the head and the audio encoder are float32; linear layers, convolutions and attention
  run in the parameter dtype (bf16 or fp16).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime import checkpoint as ckpt
from runtime.config import DiTConfig
from runtime.errors import CheckpointError, ConfigError
from runtime.kernels import fp8
from runtime.models.attention import FP8_ATTENTION, attention, resolve_attention
from runtime.models.rope import expand_rope, rope_inputs, s2v_token_groups

log = logging.getLogger(__name__)

# Parameters kept in float32 whatever the model dtype: the official code computes these modules under
# an fp32 autocast (or adds them to fp32 tensors), so holding them in fp32 is exact and avoids per-step casts.
FP32_PREFIXES = ("time_embedding.", "time_projection.", "head.", "casual_audio_encoder.")
FP32_SUFFIXES = (".modulation", ".norm3.weight", ".norm3.bias")


def keeps_fp32(name: str) -> bool:
    return name.startswith(FP32_PREFIXES) or name.endswith(FP32_SUFFIXES)


# --------------------------------------------------------------------------------------------- pieces
def layer_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm over the last dim, computed in float32."""
    return F.layer_norm(x.float(), (x.shape[-1],), weight, bias, eps)


class RMSNorm(nn.Module):
    """Wan RMSNorm: normalise in float32, cast back, then scale by the gain in the input dtype.

    ``F.rms_norm`` on a bf16/fp16 input already computes in float32 and rounds once (bit-identical to the
    explicit ``x.float()`` form, without the float32 copy); export keeps the explicit casts so that a strongly
    typed TensorRT network sees an FP32 normalization."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.explicit_fp32 = False  # set by WanS2VDiT.set_export(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xin = x.float() if self.explicit_fp32 else x
        return F.rms_norm(xin, (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight


def rope_operand(cos: torch.Tensor, sin: torch.Tensor, fused: bool):
    """What ``apply_rope`` takes, built once per step: a complex64 table [S, D/2] for the fused eager path
    (3x fewer memory passes on CUDA), or the real (cos, sin) pair that exports to ONNX and that compiled blocks
    fuse with the q/k RMSNorm (inductor has no complex kernels: a complex multiply falls back to a separate
    aten kernel plus two conversion passes; benchmarks/NOTES.md has the cost)."""
    return torch.complex(cos, sin) if fused else (cos, sin)


def apply_rope(x: torch.Tensor, heads: int, rope) -> torch.Tensor:
    """Rotate interleaved (even, odd) channel pairs of each head in float32: (x0·c − x1·s, x0·s + x1·c).
    x: [B, S, H·D]; rope from ``rope_operand``."""
    b, s, hd = x.shape
    xr = x.float().view(b, s, heads, hd // heads // 2, 2)
    if isinstance(rope, torch.Tensor):
        return torch.view_as_real(torch.view_as_complex(xr) * rope[None, :, None, :]).view(b, s, hd).to(x.dtype)
    cos, sin = rope
    x0, x1 = xr[..., 0], xr[..., 1]
    c, sn = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((x0 * c - x1 * sn, x0 * sn + x1 * c), dim=-1)
    return out.view(b, s, hd).to(x.dtype)


def modulate(xn: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, split: int, inplace: bool = True,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """xn·(1+scale)+shift with segment 0 for tokens [0, split) and segment 1 after. shift/scale: [B, 2, D].

    Computed in float32 (``xn`` is a float32 norm output). In eager mode the result is written in one pass,
    directly in ``out_dtype`` (the next linear layer's dtype, one rounding as autocast would do) or in place;
    export and compilation use the functional form (slice updates would become ScatterND nodes)."""
    if not inplace or torch.compiler.is_compiling():
        out = torch.cat([xn[:, :split] * (1 + scale[:, 0:1]) + shift[:, 0:1],
                         xn[:, split:] * (1 + scale[:, 1:2]) + shift[:, 1:2]], dim=1)
        return out if out_dtype is None else out.to(out_dtype)
    out = xn if out_dtype is None else torch.empty(xn.shape, dtype=out_dtype, device=xn.device)
    for seg, src, dst in ((0, xn[:, :split], out[:, :split]), (1, xn[:, split:], out[:, split:])):
        torch.addcmul(shift[:, seg:seg + 1], src, 1 + scale[:, seg:seg + 1], out=dst)
    return out


def add_gated(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor, split: int, inplace: bool = True) -> torch.Tensor:
    """x + y·gate per segment in float32 (the official fp32 autocast region); in place on ``x`` unless exporting."""
    if not inplace:
        return x + torch.cat([y[:, :split] * g[:, 0:1], y[:, split:] * g[:, 1:2]], dim=1)
    x[:, :split].addcmul_(y[:, :split], g[:, 0:1])
    x[:, split:].addcmul_(y[:, split:], g[:, 1:2])
    return x


def act_dtype(layer: nn.Module) -> torch.dtype:
    """The activation dtype a layer computes in: its parameter dtype, or ``act_dtype`` for FP8 layers."""
    return getattr(layer, "act_dtype", None) or layer.weight.dtype


def _in(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Cast an activation to a layer's compute dtype (what autocast does at every linear/conv)."""
    return x.to(act_dtype(layer))


def _qkv_state_dict(module, state, prefix, _meta):
    """Fused model → the checkpoint's q/k/v keys (views of the fused tensors)."""
    if getattr(module, "qkv", None) is None or prefix + "qkv.weight" not in state:
        return
    w, b = state.pop(prefix + "qkv.weight"), state.pop(prefix + "qkv.bias")
    d = w.shape[0] // 3
    for i, n in enumerate("qkv"):
        state[f"{prefix}{n}.weight"], state[f"{prefix}{n}.bias"] = w[i * d:(i + 1) * d], b[i * d:(i + 1) * d]


def _qkv_load(module, state, prefix, *_):
    """Checkpoint q/k/v keys → the fused tensors of an already fused model."""
    if getattr(module, "qkv", None) is None or prefix + "q.weight" not in state:
        return
    for kind in ("weight", "bias"):
        state[f"{prefix}qkv.{kind}"] = torch.cat([state.pop(f"{prefix}{n}.{kind}") for n in "qkv"])


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.qkv: nn.Module | None = None   # set by fuse_qkv: one GEMM instead of three

    def fuse_qkv(self) -> None:
        """Concatenate the q/k/v weights into one [3·D, D] linear (one GEMM instead of three). The state dict
        still reads and writes the checkpoint's q/k/v keys (hooks below), so checkpoints are unchanged."""
        if self.qkv is not None or self.q.weight.is_meta:
            return
        d = self.q.out_features
        w = torch.cat([self.q.weight, self.k.weight, self.v.weight])
        b = torch.cat([self.q.bias, self.k.bias, self.v.bias])
        with torch.device("meta"):
            self.qkv = nn.Linear(d, 3 * d)
        self.qkv.weight, self.qkv.bias = nn.Parameter(w, requires_grad=False), nn.Parameter(b, requires_grad=False)
        self.q = self.k = self.v = None
        if not getattr(self, "_qkv_hooks", False):
            self._register_state_dict_hook(_qkv_state_dict)
            self._register_load_state_dict_pre_hook(_qkv_load, with_module=True)
            self._qkv_hooks = True

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv is None:
            x = _in(x, self.q)
            return self.q(x), self.k(x), self.v(x)
        qkv = self.qkv(_in(x, self.qkv))
        d = qkv.shape[-1] // 3  # slices, not chunk(): chunk exports as SplitToSequence, which TensorRT rejects
        return qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]

    def forward(self, x: torch.Tensor, rope, impl: str, ulysses: tuple[str, tuple[int, ...]] | None = None) -> torch.Tensor:
        """``ulysses`` = (process-group name, tokens per rank) under sequence parallelism. It is an argument, not
        a module attribute: compiled blocks guard on arguments, while module attributes are assumed constant
        (a block compiled before sharding would keep running its unsharded graph)."""
        q, k, v = self._qkv(x)
        q = apply_rope(self.norm_q(q), self.heads, rope)
        k = apply_rope(self.norm_k(k), self.heads, rope)
        return self.o(_in(attention(q, k, v, self.heads, impl, ulysses), self.o))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor, impl: str) -> torch.Tensor:
        q = self.norm_q(self.q(_in(x, self.q)))
        context = _in(context, self.k)
        k = self.norm_k(self.k(context))
        # short key sequences (512 text tokens, 5 audio tokens): PyTorch's SDPA, whatever the self-attention uses
        out = attention(q, k.to(q.dtype), self.v(context).to(q.dtype), self.heads, "onnx" if impl == "onnx" else "sdpa")
        return self.o(_in(out, self.o))


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.dim
        self.eps = cfg.eps
        self.self_attn = SelfAttention(d, cfg.num_heads, cfg.eps)
        self.norm3 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(d, cfg.num_heads, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.zeros(1, 6, d))

    def forward(self, x: torch.Tensor, e: torch.Tensor, split: int, context: torch.Tensor, rope, impl: str,
                ulysses: tuple[str, tuple[int, ...]] | None = None, inplace: bool = True) -> torch.Tensor:
        """``inplace``: segment updates written in place (eager/compiled PyTorch) or functional (export)."""
        # e: [B, 6, 2, D] fp32 (six modulation vectors for the two segments)
        m = self.modulation.float().unsqueeze(2) + e
        ip = inplace
        dt = act_dtype(self.ffn[0])
        y = self.self_attn(modulate(layer_norm(x, self.eps), m[:, 0], m[:, 1], split, ip, dt), rope, impl, ulysses)
        x = add_gated(x, y, m[:, 2], split, ip)
        y = self.cross_attn(layer_norm(x, self.eps, self.norm3.weight, self.norm3.bias), context, impl)
        x = x.add_(y) if ip else x + y
        y = self.ffn(modulate(layer_norm(x, self.eps), m[:, 3], m[:, 4], split, ip, dt))
        return add_gated(x, y, m[:, 5], split, ip)


class CausalConv1d(nn.Module):
    """Conv1d with (kernel-1) frames of left padding that replicate the first frame."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.pad = kernel - 1
        self.conv = nn.Conv1d(cin, cout, kernel, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[..., :1].expand(-1, -1, self.pad), x], dim=-1)
        return self.conv(x)


class AudioConvEncoder(nn.Module):
    """Causal conv stack turning per-frame audio features into local tokens and a global vector."""

    def __init__(self, in_dim: int, dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.conv1_local = CausalConv1d(in_dim, dim // 4 * num_tokens)
        self.conv1_global = CausalConv1d(in_dim, dim // 4)
        self.conv2 = CausalConv1d(dim // 4, dim // 2, stride=2)
        self.conv3 = CausalConv1d(dim // 2, dim, stride=2)
        self.final_linear = nn.Linear(dim, dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, dim))

    @staticmethod
    def _norm_act(x: torch.Tensor) -> torch.Tensor:  # [N, C, T] -> LN over C, SiLU, back to [N, C, T]
        x = x.transpose(1, 2)
        return F.silu(F.layer_norm(x, (x.shape[-1],), eps=1e-6)).transpose(1, 2)

    def _tail(self, x: torch.Tensor) -> torch.Tensor:  # shared conv2/conv3 -> [N, T', dim]
        x = self._norm_act(self.conv2(self._norm_act(x)))
        return self._norm_act(self.conv3(x)).transpose(1, 2)

    def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feat [B, C_a, T] → (local [B, T', tokens+1, dim], global [B, T', dim])."""
        b, _, t = feat.shape
        n = self.num_tokens
        loc = self.conv1_local(feat)                                   # [B, n·c, T], channel = token·c + i
        loc = loc.view(b, n, -1, t).reshape(b * n, -1, t)
        loc = self._tail(loc)                                          # [B·n, T', dim]
        loc = loc.view(b, n, loc.shape[1], -1).transpose(1, 2)         # [B, T', n, dim]
        loc = torch.cat([loc, self.padding_tokens.expand(b, loc.shape[1], 1, -1)], dim=2)
        glob = self.final_linear(self._tail(self.conv1_global(feat)))  # [B, T', dim]
        return loc, glob


class CausalAudioEncoder(nn.Module):
    """Learned mix of the wav2vec2 hidden states followed by the causal conv encoder (all in fp32)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.weights = nn.Parameter(torch.full((1, cfg.audio_layers, 1, 1), 0.01))
        self.encoder = AudioConvEncoder(cfg.audio_dim, cfg.dim, cfg.num_audio_token)

    def forward(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The layer mix runs in the features' dtype, as in the official code: its fp32 autocast region casts
        # only the convolutions, so with bf16 features and weights the mix (silu, product, sums) is bf16.
        w = F.silu(self.weights.to(audio.dtype))
        feat = ((audio * w) / w.sum(dim=1, keepdim=True)).sum(dim=1)  # [B, C_a, T]
        return self.encoder(feat.float())


class AudioInjector(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        n = len(cfg.audio_inject_layers)
        self.injector = nn.ModuleList(CrossAttention(cfg.dim, cfg.num_heads, cfg.eps) for _ in range(n))
        self.injector_adain_layers = nn.ModuleList(AdaLayerNormLinear(cfg.dim) for _ in range(n))


class AdaLayerNormLinear(nn.Module):
    """SiLU → Linear producing (shift, scale) — the parameter layout of diffusers' AdaLayerNorm."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        ada = self.linear(_in(F.silu(temb), self.linear)).unsqueeze(1)
        d = ada.shape[-1] // 2
        return layer_norm(x, 1e-5) * (1 + ada[..., d:]) + ada[..., :d]  # (shift, scale) = halves, shift first


def audio_residual(adain: AdaLayerNormLinear, injector: CrossAttention, x: torch.Tensor, temb: torch.Tensor,
                   tokens: torch.Tensor, impl: str) -> torch.Tensor:
    """One audio injection's residual (AdaLN then cross-attention to the frame's audio tokens): a free function so
    one compiled graph serves every injection layer (the modules are arguments, their parameters graph inputs)."""
    return injector(adain(x, temb), tokens, impl)


class FramePacker(nn.Module):
    """Motion history → tokens: newest latent at full res, next 2 at 1/2, oldest 16 at 1/4 resolution."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d, c = cfg.dim, cfg.in_dim
        self.buckets = cfg.zip_frame_buckets
        self.proj = nn.Conv3d(c, d, (1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(c, d, (2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(c, d, (4, 8, 8), stride=(4, 8, 8))

    def forward(self, motion: torch.Tensor) -> torch.Tensor:
        """motion [B, C, T_m, h, w] (any T_m) → [B, tokens, D]."""
        total = sum(self.buckets)
        t_m = motion.shape[2]
        if t_m >= total:
            buf = motion[:, :, t_m - total:]
        else:  # right-aligned in a zero buffer, as the official packer does for short histories
            buf = F.pad(motion, (0, 0, 0, 0, total - t_m, 0))
        n_post, n_2x, n_4x = self.buckets
        old, mid, new = buf[:, :, :n_4x], buf[:, :, n_4x:n_4x + n_2x], buf[:, :, n_4x + n_2x:]
        toks = [conv(_in(z, conv)).flatten(2).transpose(1, 2)
                for conv, z in ((self.proj, new), (self.proj_2x, mid), (self.proj_4x, old))]
        return torch.cat(toks, dim=1)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, cfg.out_dim * 4)
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        m = self.modulation.float() + e.unsqueeze(1)  # [B, 2, D]: shift, scale
        return F.linear(layer_norm(x, self.eps) * (1 + m[:, 1:2]) + m[:, 0:1], self.head.weight.float(), self.head.bias.float())


# --------------------------------------------------------------------------------------------- inputs
@dataclass
class ClipConditions:
    """Per-clip, per-CFG-branch tensors that stay fixed over all denoising steps of a clip.

    Every shape is a function of (batch, latent frames F, patch grid gh × gw, extra tokens E), so a graph
    exported with those as dynamic axes accepts any clip shape."""

    context: torch.Tensor       # [B, text_len, D]   text_embedding of the zero-padded prompt embedding
    audio_tokens: torch.Tensor  # [B, F, tokens+1, D] local audio tokens per latent frame
    audio_global: torch.Tensor  # [B, F, D]          global audio vector per latent frame (fp32)
    pose: torch.Tensor          # [B, F, gh, gw, D]  cond_encoder(pose) (cond-type embedding 0 added per step)
    extra: torch.Tensor         # [B, E, D]          reference (+ motion) tokens incl. their cond-type embedding
    rope_t: torch.Tensor        # [F, n_t, 2]        fp32 (cos, sin) per temporal position
    rope_h: torch.Tensor        # [gh, n_h, 2]
    rope_w: torch.Tensor        # [gw, n_w, 2]
    rope_extra: torch.Tensor    # [E, head_dim/2, 2] fp32 (cos, sin) of the extra tokens

    BATCHED = ("context", "audio_tokens", "audio_global", "pose", "extra")

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    @staticmethod
    def names() -> tuple[str, ...]:
        return tuple(f.name for f in fields(ClipConditions))

    def branch(self, i: int) -> "ClipConditions":
        """Batch entry ``i`` of stacked CFG branches (``cat``'s inverse for one branch; RoPE tables shared)."""
        return ClipConditions(**{n: (getattr(self, n)[i:i + 1] if n in self.BATCHED else getattr(self, n))
                                 for n in self.names()})

    @staticmethod
    def cat(items: list["ClipConditions"]) -> "ClipConditions":
        """Stack CFG branches along the batch (the RoPE tables are shared)."""
        first = items[0]
        return ClipConditions(**{n: (torch.cat([getattr(c, n) for c in items]) if n in ClipConditions.BATCHED
                                     else getattr(first, n)) for n in ClipConditions.names()})

    @property
    def num_tokens(self) -> int:
        _, f, gh, gw, _ = self.pose.shape
        return f * gh * gw + self.extra.shape[1]


def timestep_frequencies(t: torch.Tensor | float | list[float], dim: int) -> torch.Tensor:
    """Sinusoidal timestep features [N, dim] (cos first), computed in float64 and cast to float32."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64).div(half))
    arg = torch.outer(t.cpu(), freqs)
    return torch.cat([arg.cos(), arg.sin()], dim=1).float()


@dataclass
class _StepState:
    """One step's block input and what the blocks and the head need besides it (``WanS2VDiT._embed``)."""

    h: torch.Tensor         # [B, end − start, D] fp32: this rank's slice of the residual stream
    e: torch.Tensor         # [2B, D] time embeddings (t, then 0)
    e_blocks: torch.Tensor  # [B, 6, 2, D] block modulation for the two segments
    shape: tuple[int, int, int, int, int, int]  # b, f, lat_h, lat_w, gh, gw
    split: int              # noisy tokens in the whole sequence (f·gh·gw)
    length: int             # tokens in the whole sequence
    start: int              # this rank's slice [start, end)
    end: int
    local_split: int        # noisy tokens in this rank's slice


# --------------------------------------------------------------------------------------------- model
class WanS2VDiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.attention_impl = "sdpa"  # self-attention kernel: see set_attention / set_export
        self.exporting = False        # the export form (set_export): functional updates, explicit fp32 casts
        self.sp = None                # sequence-parallel shard (set_sequence_shard) or None
        self.precision = "native"     # the parameter dtype; "fp8" after set_precision("fp8")
        self.compiled = False         # blocks and audio_residual compiled (compile_blocks)
        self.block_source = None      # runtime.offload.BlockStreamer when blocks stream from host memory, else None
        self.audio_residual = audio_residual
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.cond_encoder = nn.Conv3d(cfg.cond_dim, d, cfg.patch_size, stride=cfg.patch_size)
        self.casual_audio_encoder = CausalAudioEncoder(cfg)
        self.audio_injector = AudioInjector(cfg)
        self.trainable_cond_mask = nn.Embedding(3, d)
        self.frame_packer = FramePacker(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def set_attention(self, impl: str) -> str:
        """Choose the self-attention kernel: ``auto`` (the fastest exact kernel available on this device), or one
        of ``IMPLEMENTATIONS``; returns the kernel chosen. A named kernel that cannot run here raises
        ``BackendUnavailable`` with the reason. FP8 attention (``fp8``, ``fa3-fp8``) is only ever named, never
        picked: it adds far more error than the FP8 linears (``runtime.kernels.fp8``), so it is logged when chosen."""
        weight = self.patch_embedding.weight
        self.attention_impl = resolve_attention(impl, weight.device, weight.dtype, self.cfg.head_dim)
        if self.attention_impl in FP8_ATTENTION:
            log.warning("attention %s: FP8 q/k/v/P is lossy (benchmarks/NOTES.md has its error on random 14B weights); "
                        "check it on your inputs with python -m runtime.quality", impl)
        return self.attention_impl

    def compile_blocks(self, options: dict | None = None) -> None:
        """``torch.compile`` each transformer block (fusing norm/modulation/RoPE/gating elementwise work) and the
        audio injection residual, and switch RoPE to its real (cos, sin) form, which fuses into the compiled blocks.

        With nn-module inlining the parameters are graph inputs, so all blocks share one compiled graph per shape.
        Sequence-parallel (Ulysses) ranks compile too (their split is an argument the graphs guard on).
        ``options``: inductor settings for this compilation (``torch.compile(options=...)``)."""
        cfg = torch._dynamo.config
        for knob in ("recompile_limit", "cache_size_limit"):  # renamed across torch versions
            if hasattr(cfg, knob):
                setattr(cfg, knob, max(getattr(cfg, knob), 64))
        for block in self._block_modules():
            if not hasattr(block.forward, "_torchdynamo_orig_callable"):
                block.forward = torch.compile(block.forward, dynamic=False, fullgraph=True, options=options)
        if not self.compiled:
            # the audio injections' LayerNorm/modulation/casts over the noisy tokens fuse into one pass per layer
            self.audio_residual = torch.compile(self.audio_residual, dynamic=False, fullgraph=True, options=options)
        self.compiled = True

    def uncompile_blocks(self) -> None:
        """Undo ``compile_blocks`` (the compiled callables are instance attributes over the class methods)."""
        for block in self._block_modules():
            block.__dict__.pop("forward", None)
        self.audio_residual = audio_residual
        self.compiled = False

    def _block_modules(self) -> list[nn.Module]:
        """Every module that runs as a block: the blocks and, under block offload, the GPU slots they stream through."""
        return [*self.blocks, *getattr(self.block_source, "slots", ())]

    def set_sequence_shard(self, shard) -> None:
        """Compute one rank's slice of the token sequence (``runtime.distributed.SeqShard``; None: all of it). The
        split reaches the compiled blocks as an argument, which they guard on (a module attribute would not be)."""
        self.sp = shard

    def _refuse_if_streaming(self, what: str) -> None:
        # The streamer's slots and pinned host copies were built from the blocks as they were at attach: changing
        # the blocks now would leave the slots computing with the old structure or bytes.
        if self.block_source is not None:
            raise ConfigError(f"{what} after block offload is attached would not reach the blocks it streams; call it "
                              "before runtime.offload.attach (S2VPipeline does: LoRA, FP8 and fused QKV come first)")

    def fuse_qkv(self) -> None:
        """One QKV GEMM per block (weights concatenated; checkpoint keys unchanged)."""
        if any(block.self_attn.qkv is None for block in self.blocks):
            self._refuse_if_streaming("fuse_qkv()")
        for block in self.blocks:
            block.self_attn.fuse_qkv()

    def set_precision(self, precision: str) -> None:
        """``fp8``: the block linears of ``fp8.QUANTISED`` in FP8 e4m3 (Hopper+; ``runtime.kernels.fp8``); attention
        stays as chosen by ``set_attention`` (bf16 unless an FP8 kernel is named). Irreversible for this model object (the BF16 block weights are replaced)."""
        if precision == self.precision or (precision in ("bf16", "fp16") and self.precision == "native"):
            return
        if precision != "fp8":
            raise ValueError(f"cannot switch a {self.precision} model to {precision}; load it again")
        self._refuse_if_streaming(f"set_precision({precision!r})")

        why = fp8.unsupported_reason(self.patch_embedding.weight.device)
        if why:
            raise ConfigError(why)
        if self.dtype != torch.bfloat16:
            raise ConfigError(f"--precision fp8 quantises a bf16 model; this one is {self.dtype}: load it in bf16")
        fp8.quantize_blocks(self)
        self.precision = "fp8"

    def set_export(self, enabled: bool) -> None:
        """Export form: ONNX ``Attention`` nodes, functional segment updates, explicit FP32 casts around norms.
        The math is the same as the PyTorch form (``sdpa`` attention, in-place updates)."""
        self.attention_impl = "onnx" if enabled else "sdpa"
        self.exporting = enabled
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.explicit_fp32 = enabled

    # ----------------------------------------------------------------- per clip
    def prepare(self, context: torch.Tensor, ref_latents: torch.Tensor, motion_latents: torch.Tensor | None,
                cond_states: torch.Tensor | None, audio_input: torch.Tensor, frames: int, motion_frames: int = 73
                ) -> ClipConditions:
        """Everything that is constant over the denoising steps of one clip.

        context: [B, L_text ≤ text_len, text_dim] (zero-padded here to text_len, as official);
        ref_latents: [B, C, 1, h, w]; motion_latents: [B, C, T_m, h, w] or None for a clip without motion
        tokens (first clip); cond_states: [B, C, frames, h, w] pose latents or None (all zeros: only the
        cond_encoder bias remains); audio_input: [B, layers, C_a, 4·frames] this clip's audio features;
        motion_frames: pixel frames of history (73), whose audio is replaced by the first frame repeated.
        """
        cfg = self.cfg
        b, _, _, lat_h, lat_w = ref_latents.shape
        dt = self.dtype
        if context.shape[1] > cfg.text_len:
            raise ValueError(f"context has {context.shape[1]} tokens, more than text_len={cfg.text_len}")
        ctx = F.pad(context.to(dt), (0, 0, 0, cfg.text_len - context.shape[1]))
        ctx = self.text_embedding(ctx)

        lat_motion = (motion_frames + 3) // 4
        audio = torch.cat([audio_input[..., :1].expand(-1, -1, -1, motion_frames), audio_input], dim=-1)
        loc, glob = self.casual_audio_encoder(audio)
        loc, glob = loc[:, lat_motion:], glob[:, lat_motion:]
        if loc.shape[1] != frames:
            raise ValueError(f"audio_input gives {loc.shape[1]} latent frames, expected {frames}: pass 4·frames audio frames")

        ph, pw = cfg.patch_size[1], cfg.patch_size[2]
        grid = (frames, lat_h // ph, lat_w // pw)
        if cond_states is None:
            pose = self.cond_encoder.bias.to(dt).view(1, 1, 1, 1, -1).expand(b, *grid, -1)
        else:
            pose = self.cond_encoder(_in(cond_states, self.cond_encoder)).permute(0, 2, 3, 4, 1)
        mask = self.trainable_cond_mask.weight.to(dt)
        # the noisy tokens' mask embedding is added in ``step``: the official sum is (patch + pose) + mask

        extra = [self.patch_embedding(_in(ref_latents, self.patch_embedding)).flatten(2).transpose(1, 2) + mask[1]]
        if motion_latents is not None:
            extra.append(self.frame_packer(motion_latents) + mask[2])
        groups = s2v_token_groups(cfg, frames, lat_h, lat_w, motion=motion_latents is not None)
        rope = rope_inputs(cfg, groups, device=ref_latents.device)
        return ClipConditions(ctx, loc.to(dt), glob, pose, torch.cat(extra, dim=1), *rope)

    # ----------------------------------------------------------------- per step
    def step(self, x: torch.Tensor, t_freq: torch.Tensor, context: torch.Tensor, audio_tokens: torch.Tensor,
             audio_global: torch.Tensor, pose: torch.Tensor, extra: torch.Tensor, rope_t: torch.Tensor,
             rope_h: torch.Tensor, rope_w: torch.Tensor, rope_extra: torch.Tensor) -> torch.Tensor:
        """One DiT evaluation. x: [B, C, F, h, w] noisy latent; t_freq: [B, freq_dim] from
        ``timestep_frequencies``; the rest from ``prepare``. Returns the velocity [B, C_out, F, h, w] in fp32.

        Under sequence parallelism (``self.sp``, set by ``runtime.parallel``) each rank keeps its own slice of
        the token sequence through the blocks and the ranks exchange heads around self-attention (Ulysses);
        the per-token work (norms, modulation, FFN, cross-attention, frame-local audio injection) needs no
        communication, and the head's outputs are gathered once at the end."""
        s = self._embed(x, t_freq, pose, extra)
        h = self._blocks(s, context, audio_tokens, audio_global, rope_t, rope_h, rope_w, rope_extra)
        return self._head(s, h)

    def step_with_residual(self, x: torch.Tensor, t_freq: torch.Tensor, context: torch.Tensor,
                           audio_tokens: torch.Tensor, audio_global: torch.Tensor, pose: torch.Tensor,
                           extra: torch.Tensor, rope_t: torch.Tensor, rope_h: torch.Tensor, rope_w: torch.Tensor,
                           rope_extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``step`` (the same velocity, bit for bit) and the block stack's residual ``blocks(h) − h`` over this
        rank's noisy tokens [B, L_noisy_local, D] fp32: what a step cache reuses (``step_from_residual``). Only
        the noisy tokens are kept because the head reads only them."""
        s = self._embed(x, t_freq, pose, extra)
        h_in = s.h[:, :s.local_split].clone()  # the blocks update the residual stream in place
        h = self._blocks(s, context, audio_tokens, audio_global, rope_t, rope_h, rope_w, rope_extra)
        return self._head(s, h), h[:, :s.local_split] - h_in

    def step_from_residual(self, x: torch.Tensor, t_freq: torch.Tensor, pose: torch.Tensor, extra: torch.Tensor,
                           residual: torch.Tensor) -> torch.Tensor:
        """A step whose block stack is replaced by a cached residual: the velocity of ``head(h + residual)``,
        with h this step's block input (patch and time embeddings as in ``step``); no block runs."""
        s = self._embed(x, t_freq, pose, extra)
        return self._head(s, s.h[:, :s.local_split] + residual)

    def _embed(self, x: torch.Tensor, t_freq: torch.Tensor, pose: torch.Tensor, extra: torch.Tensor) -> "_StepState":
        """The block input (this rank's slice of the fp32 residual stream) and the time modulation vectors."""
        cfg = self.cfg
        b, _, f, lat_h, lat_w = x.shape
        gh, gw = lat_h // cfg.patch_size[1], lat_w // cfg.patch_size[2]
        split = f * gh * gw

        mask0 = self.trainable_cond_mask.weight[0].to(pose.dtype)
        tokens = (self.patch_embedding(_in(x, self.patch_embedding)).flatten(2).transpose(1, 2) + pose.flatten(1, 3)) + mask0
        h = torch.cat([tokens, extra], dim=1)

        # timestep t for the noisy tokens, timestep 0 for reference/motion tokens (zero_timestep)
        t0 = torch.cat([torch.ones_like(t_freq[:, : cfg.freq_dim // 2]), torch.zeros_like(t_freq[:, cfg.freq_dim // 2:])], 1)
        e = F.linear(F.silu(F.linear(torch.cat([t_freq, t0]).float(), *self._fp32(self.time_embedding[0]))),
                     *self._fp32(self.time_embedding[2]))                        # [2B, D]
        e0 = F.linear(F.silu(e), *self._fp32(self.time_projection[1])).unflatten(1, (6, cfg.dim))
        e_blocks = torch.stack([e0[:b], e0[b:]], dim=2)                           # [B, 6, 2, D]

        length = h.shape[1]
        start, end = (0, length) if self.sp is None else self.sp.bounds(length)
        if self.sp is not None:
            h = h[:, start:end]
        h = h.float().contiguous()  # the residual stream: fp32, owned here (blocks update it in place)
        local_split = min(max(split - start, 0), end - start)
        return _StepState(h, e, e_blocks, (b, f, lat_h, lat_w, gh, gw), split, length, start, end, local_split)

    def _blocks(self, s: "_StepState", context: torch.Tensor, audio_tokens: torch.Tensor, audio_global: torch.Tensor,
                rope_t: torch.Tensor, rope_h: torch.Tensor, rope_w: torch.Tensor, rope_extra: torch.Tensor) -> torch.Tensor:
        """The block stack (with the audio injections after the layers of ``inject_map``) over ``s.h``."""
        cos, sin = expand_rope(rope_t, rope_h, rope_w, rope_extra)
        ulysses = None if self.sp is None else self.sp.spec(s.length)
        if self.sp is not None:
            cos, sin = cos[s.start:s.end], sin[s.start:s.end]
        rope = rope_operand(cos, sin, fused=not self.exporting and s.h.is_cuda and not self.compiled)
        h, inject, f = s.h, self.cfg.inject_map, s.shape[1]
        blocks = self.blocks if self.block_source is None else self.block_source.stream()
        for i, block in enumerate(blocks):
            h = block(h, s.e_blocks, s.local_split, context, rope, self.attention_impl, ulysses, not self.exporting)
            if i in inject:
                h = self._inject_audio(h, inject[i], audio_tokens, audio_global, s.start, s.local_split, s.split // f)
        return h

    def _head(self, s: "_StepState", h: torch.Tensor) -> torch.Tensor:
        """Head over this rank's noisy tokens, gathered across ranks, unpatchified to [B, C_out, F, h, w]."""
        b, f, lat_h, lat_w, gh, gw = s.shape
        out = self.head(h[:, :s.local_split], s.e[:b])                            # [B, L_local, 4·C]
        if self.sp is not None:
            out = self.sp.gather_tokens(out, s.split)
        c = self.cfg.out_dim
        out = out.view(b, f, gh, gw, 1, 2, 2, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, c, f, lat_h, lat_w)

    @staticmethod
    def _fp32(layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        return layer.weight.float(), layer.bias.float()

    def _inject_audio(self, h: torch.Tensor, j: int, audio_tokens: torch.Tensor, audio_global: torch.Tensor,
                      start: int, split: int, per_frame: int) -> torch.Tensor:
        """Frame-local audio cross-attention on the noisy tokens (no gate); reference/motion tokens untouched.

        ``h`` holds tokens [start, start + len) of the sequence and ``split`` of them are noisy. Each noisy token
        attends only to its own frame's audio tokens, so a slice that starts or ends inside a frame is padded to
        whole frames (the padding rows are computed and dropped; rows never mix)."""
        b, _, d = h.shape
        if split == 0:
            return h
        f0, f1 = start // per_frame, -(-(start + split) // per_frame)
        lead = start - f0 * per_frame
        x = h[:, :split]
        pad = (f1 - f0) * per_frame - split - lead
        if lead or pad:
            x = F.pad(x, (0, 0, lead, pad))
        n = f1 - f0
        x = x.reshape(b * n, per_frame, d)
        inj = self.audio_injector
        r = self.audio_residual(inj.injector_adain_layers[j], inj.injector[j], x, audio_global[:, f0:f1].reshape(b * n, d),
                                audio_tokens[:, f0:f1].reshape(b * n, -1, d), self.attention_impl)
        r = r.reshape(b, n * per_frame, d)[:, lead:lead + split]
        if self.exporting:
            return torch.cat([h[:, :split] + r, h[:, split:]], dim=1)
        h[:, :split] += r
        return h

    # ----------------------------------------------------------------- official-style call
    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor, ref_latents: torch.Tensor,
                motion_latents: torch.Tensor | None, cond_states: torch.Tensor | None, audio_input: torch.Tensor,
                motion_frames: int = 73) -> torch.Tensor:
        """Convenience: ``prepare`` + ``step`` for one call (``motion_latents=None`` = first clip)."""
        cond = self.prepare(context, ref_latents, motion_latents, cond_states, audio_input, x.shape[2], motion_frames)
        t_freq = timestep_frequencies(t, self.cfg.freq_dim).to(x.device).expand(x.shape[0], -1)
        return self.step(x, t_freq, *cond.as_tuple())


# --------------------------------------------------------------------------------------------- loading
def build_dit(cfg: DiTConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
              seed: int | None = 0, std: float = 0.02) -> WanS2VDiT:
    """A randomly initialised model (tests, the built-in tiny model, full-size speed runs).

    Built on the meta device and filled tensor by tensor in the target dtype, so a 14B bf16 model never
    exists in float32 (which would need 65 GB). Values are drawn in float32 and then rounded, so the same
    seed gives the same weights in every dtype (on one device: CUDA and CPU generators differ)."""
    with torch.device("meta"):
        model = WanS2VDiT(cfg)
    gen = torch.Generator(device=device)
    gen.manual_seed(0 if seed is None else seed)
    state = {}
    for name, p in model.state_dict().items():
        t = torch.empty(p.shape, dtype=torch.float32, device=device)
        if name.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight")):
            t.fill_(1.0)
        elif name.endswith(".weights"):
            t.fill_(0.01)
        else:
            t.normal_(0.0, std, generator=gen)
        # fp32-held parameters are rounded through the model dtype, as if loaded from a checkpoint in that dtype
        state[name] = t.to(dtype).float() if keeps_fp32(name) else t.to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.fuse_qkv()
    return model.eval().requires_grad_(False)


def load_dit(path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
             config: DiTConfig | None = None) -> WanS2VDiT:
    """Load the DiT from the official folder or a single ``.safetensors`` file (strict, memory-mapped).

    dtype None keeps the checkpoint's dtype (bf16 for the official shards); the fp32 islands
    (``keeps_fp32``) are held in float32 either way.
    """
    path = Path(path)
    if path.is_dir():
        cfg = config or DiTConfig.from_json(path / ckpt.DIT_CONFIG)
        files = ckpt.dit_weight_files(path)
    elif path.suffix == ".safetensors":
        cfg = config or DiTConfig.from_json(path.with_name(ckpt.DIT_CONFIG))
        files = ckpt.single_file_map(path)
    else:
        raise CheckpointError(f"{path}: not a checkpoint folder or .safetensors file; pass the Wan2.2-S2V-14B folder (CLI: --ckpt_dir)")
    with torch.device("meta"):
        model = WanS2VDiT(cfg)
    ckpt.assign_strict(model, ckpt.iter_tensors(files), str(path),
                       lambda name: torch.float32 if keeps_fp32(name) else dtype, device)
    round_fp32_islands(model, dtype)
    model.fuse_qkv()
    return model.eval().requires_grad_(False)


def round_fp32_islands(model: WanS2VDiT, dtype: torch.dtype | None) -> None:
    """Round the fp32-held parameters through ``dtype`` (bf16/fp16): the official code loads every parameter in
    the model dtype and computes these modules in fp32 from those rounded values."""
    if dtype in (None, torch.float32):
        return
    for name, p in model.named_parameters():
        if keeps_fp32(name):
            p.data = p.data.to(dtype).float()


def from_state_dict(cfg: DiTConfig, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> WanS2VDiT:
    """A model over the tensors of an official state dict (shared, not copied, where dtypes agree)."""
    with torch.device("meta"):
        model = WanS2VDiT(cfg)
    state = {k: (v.float() if keeps_fp32(k) else (v if dtype is None else v.to(dtype))) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    round_fp32_islands(model, dtype or next(v.dtype for k, v in state.items() if not keeps_fp32(k)))
    model.fuse_qkv()
    return model.eval().requires_grad_(False)
