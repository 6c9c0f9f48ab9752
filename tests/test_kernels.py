"""Kernel choice and the FP8 tier on the CPU: scales against float64, the FP8 linear against F.linear, refusals."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime.errors import BackendUnavailable, ConfigError
from runtime.kernels import cudnn_sdpa, fa3, fa4, fp8
from runtime.models.attention import attention, resolve_attention


def test_weight_scales_per_output_channel():
    w = torch.randn(48, 64, dtype=torch.float64) * torch.logspace(-3, 1, 48, dtype=torch.float64)[:, None]
    w8, scale = fp8.weight_scales(w)
    assert w8.dtype == torch.float8_e4m3fn and scale.shape == (1, 48)
    torch.testing.assert_close(scale[0].double(), w.abs().amax(1) / 448, rtol=1e-6, atol=0)  # each row's max maps to 448
    assert w8.float().abs().amax(1).eq(448).all()
    back = w8.double() * scale[0, :, None].double()
    assert float((back - w).norm() / w.norm()) < 0.05       # e4m3: 3 mantissa bits, ≤ 1/16 relative per element


def test_row_and_tensor_quantisation_roundtrip():
    x = torch.randn(32, 64) * 5
    x8, s = fp8.quantize_rows(x)
    assert s.shape == (32, 1) and float((x8.float() * s - x).norm() / x.norm()) < 0.05
    t8, d = fp8.quantize_tensor(x)
    assert d.shape == (1,) and float(d) == pytest.approx(float(x.abs().max()) / 448)
    assert float((t8.float() * d - x).norm() / x.norm()) < 0.05


def test_head_quantisation_against_float64():
    """Per-(batch, head) scales for FlashAttention-3's FP8 forward: descale [B, H] = amax over (S, D) / 448."""
    x = torch.randn(2, 40, 6, 16, dtype=torch.float64) * torch.logspace(-2, 2, 6, dtype=torch.float64)[:, None]
    x8, d = fp8.quantize_heads(x)
    assert x8.dtype == torch.float8_e4m3fn and x8.shape == x.shape and d.shape == (2, 6) and d.dtype == torch.float32
    torch.testing.assert_close(d.double(), x.abs().amax(dim=(1, 3)) / 448, rtol=1e-6, atol=0)
    assert x8.float().abs().amax(dim=(1, 3)).eq(448).all()  # each head's max maps to 448
    back = x8.double() * d.double()[:, None, :, None]
    for b in range(2):
        for h in range(6):  # each head keeps its own relative precision despite a 10^4 spread of magnitudes
            ref = x[b, :, h]
            assert float((back[b, :, h] - ref).norm() / ref.norm()) < 0.05


def test_fa3_refused_on_cpu_and_fake_shapes():
    assert "CUDA" in fa3.available(torch.device("cpu"))  # a reason, not None
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(1, 64, 40, 3 * 128, dtype=torch.bfloat16)[..., :128]  # a fused-QKV view
        out = torch.ops.wan_s2v.fa3_attention(q, q, q)
        assert out.shape == (1, 64, 40, 128) and out.dtype == torch.bfloat16
        q8 = torch.empty(2, 64, 40, 128, dtype=torch.float8_e4m3fn)
        d = torch.empty(2, 40, dtype=torch.float32)
        out8 = torch.ops.wan_s2v.fa3_attention_fp8(q8, q8, q8, d, d, d)
        assert out8.shape == (2, 64, 40, 128) and out8.dtype == torch.bfloat16


@pytest.mark.parametrize("fast_accum", [True, False])
def test_fp8_linear_against_float(fast_accum):
    dev = "cuda" if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9 else "cpu"
    lin = nn.Linear(64, 48).to(torch.bfloat16).to(dev)
    x = torch.randn(2, 16, 64, dtype=torch.bfloat16, device=dev)
    ref = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    try:
        out = fp8.FP8Linear(lin, fast_accum)(x)
    except RuntimeError as err:
        if dev == "cpu" and "per-tensor" in str(err):  # torch < 2.12 on the CPU: only per-tensor scales in _scaled_mm
            pytest.skip(f"this torch's CPU _scaled_mm has no row-wise scales ({torch.__version__})")
        raise
    assert out.shape == (2, 16, 48) and out.dtype == torch.bfloat16
    assert float((out.double() - ref).norm() / ref.norm()) < 0.06


def test_quantize_blocks_replaces_the_listed_linears():
    from runtime.tiny import tiny_dit

    model = tiny_dit(torch.bfloat16, "cpu")
    n = fp8.quantize_blocks(model)
    blk = model.blocks[0]
    assert n == len(model.blocks) * 4   # fused qkv, o, ffn up/down
    assert isinstance(blk.self_attn.qkv, fp8.FP8Linear) and isinstance(blk.ffn[2], fp8.FP8Linear)
    assert isinstance(blk.cross_attn.k, nn.Linear) and isinstance(blk.cross_attn.q, nn.Linear)  # kept (fp8.KEEP)
    assert blk.ffn[0].fast_accum
    assert fp8.quantize_blocks(model, ("cross_attn.q",), fast_accum=False) == len(model.blocks)
    assert isinstance(blk.cross_attn.q, fp8.FP8Linear) and not blk.cross_attn.q.fast_accum
    with pytest.raises(ValueError, match="not quantisable"):
        fp8.quantize_blocks(model, ("cross_attn.k",))


def test_fp8_refused_on_cpu():
    from runtime.tiny import tiny_dit

    assert "needs an NVIDIA Hopper" in fp8.unsupported_reason("cpu")
    with pytest.raises(ConfigError, match="--precision bf16"):
        tiny_dit(torch.bfloat16, "cpu").set_precision("fp8")


def test_attention_choice_on_cpu():
    dev = torch.device("cpu")
    assert resolve_attention("auto", dev, torch.float32) == "sdpa"
    for impl in ("cudnn", "fa4", "fa3", "fp8", "fa3-fp8"):
        with pytest.raises(BackendUnavailable, match="--attention auto or sdpa"):
            resolve_attention(impl, dev, torch.bfloat16)
    assert cudnn_sdpa.available(dev) and fa4.available(dev)  # reasons, not None


def test_auto_prefers_fa3_then_fa4_on_sm90_and_falls_back(monkeypatch):
    """``auto`` on a (faked) Hopper picks FlashAttention-3 when built (and its head_dim/dtype fit), else
    FlashAttention-4 when it loads, else PyTorch's SDPA, and SDPA on majors without a measured preference;
    bf16/fp16 only; never an FP8 kernel."""
    from runtime.kernels import fa3
    from runtime.models import attention as att

    cap = {"major": 9}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (cap["major"], 0))
    dev = torch.device("cuda")
    monkeypatch.setattr(fa4, "available", lambda device=None: None)
    monkeypatch.setattr(fa3, "available", lambda device=None: None)
    assert resolve_attention("auto", dev, torch.bfloat16) == "fa3"
    assert resolve_attention("auto", dev, torch.bfloat16, head_dim=128) == "fa3"
    assert resolve_attention("auto", dev, torch.bfloat16, head_dim=16) == "fa4"  # the FA3 build has head_dim 128 only
    assert resolve_attention("auto", dev, torch.float16, head_dim=128) == "fa4"  # ... and bf16 kernels only
    assert resolve_attention("auto", dev, torch.float32) == "sdpa"
    cap["major"] = 8
    assert resolve_attention("auto", dev, torch.bfloat16) == "sdpa"
    cap["major"] = 9
    monkeypatch.setattr(fa4, "available", lambda device=None: "flash-attn-4 unavailable (ModuleNotFoundError)")
    assert resolve_attention("auto", dev, torch.bfloat16, head_dim=128) == "fa3"
    assert resolve_attention("auto", dev, torch.bfloat16, head_dim=16) == "sdpa"
    for impl in ("fa3", "fa3-fp8"):
        with pytest.raises(BackendUnavailable, match="head_dim"):
            resolve_attention(impl, dev, torch.bfloat16, head_dim=16)
    assert resolve_attention("auto", dev, torch.float16, head_dim=128) == "sdpa"
    with pytest.raises(BackendUnavailable, match="bf16 kernels only"):
        resolve_attention("fa3", dev, torch.float16, head_dim=128)
    monkeypatch.setattr(fa3, "available", lambda device=None: "FlashAttention-3 unavailable (ModuleNotFoundError)")
    assert resolve_attention("auto", dev, torch.bfloat16) == "sdpa"
    monkeypatch.setattr(fa4, "available", lambda device=None: None)
    assert resolve_attention("auto", dev, torch.bfloat16) == "fa4"
    assert att.PREFERENCE[9] == ("fa3", "fa4")
    assert not set(att.FP8_ATTENTION) & {k for ks in att.PREFERENCE.values() for k in ks}


def test_fp8_model_keeps_exact_attention_unless_fp8_is_named(monkeypatch, caplog):
    """``--precision fp8`` quantises linears only: the attention stays what it was and ``auto`` resolves as on a
    bf16 model (here the CPU: SDPA); an FP8 kernel runs only when named, and is logged."""
    import runtime.models.dit as dit_mod
    from runtime.tiny import tiny_dit

    model = tiny_dit(torch.bfloat16, "cpu")
    monkeypatch.setattr(fp8, "unsupported_reason", lambda device: None)  # let the CPU pass the Hopper check
    model.set_precision("fp8")
    assert model.precision == "fp8" and isinstance(model.blocks[0].ffn[0], fp8.FP8Linear)
    assert model.attention_impl == "sdpa"
    assert model.set_attention("auto") == "sdpa"
    with pytest.raises(BackendUnavailable, match="attention kernel 'fp8' cannot run here"):
        model.set_attention("fp8")
    seen = {}

    def fake_resolve(impl, device, dtype, head_dim=None):
        seen.update(impl=impl, dtype=dtype, head_dim=head_dim)
        return impl

    monkeypatch.setattr(dit_mod, "resolve_attention", fake_resolve)
    with caplog.at_level("WARNING", logger="runtime.models.dit"):
        assert model.set_attention("fa3-fp8") == "fa3-fp8"
    assert seen == {"impl": "fa3-fp8", "dtype": torch.bfloat16, "head_dim": model.cfg.head_dim}
    assert "FP8 q/k/v/P is lossy" in caplog.text


def test_sdpa_path_equals_float64_reference():
    q, k, v = (torch.randn(2, 10, 4 * 8, dtype=torch.float64) for _ in range(3))
    out = attention(q, k, v, 4)
    qh, kh, vh = (t.view(2, 10, 4, 8).transpose(1, 2) for t in (q, k, v))
    ref = torch.softmax(qh @ kh.transpose(-1, -2) / 8 ** 0.5, -1) @ vh
    torch.testing.assert_close(out, ref.transpose(1, 2).reshape(2, 10, 32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuDNN/FA4/FP8 kernels need a GPU (checked on the H200)")
@pytest.mark.parametrize("impl,tol", [("cudnn", 1e-2), ("fa4", 1e-2), ("fa3", 1e-2), ("fp8", 0.1), ("fa3-fp8", 0.1)])
def test_gpu_kernels_equal_sdpa(impl, tol):
    dev = torch.device("cuda")
    why = __import__("runtime.models.attention", fromlist=["x"]).unavailable_reason(impl, dev)
    if why:
        pytest.skip(why)
    q, k, v = (torch.randn(1, 1000, 8 * 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
    ref = attention(q, k, v, 8, "sdpa").float()
    out = attention(q, k, v, 8, impl).float()
    assert float((out - ref).norm() / ref.norm()) < tol
