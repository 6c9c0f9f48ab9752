"""Ulysses on NCCL, piece by piece (torchrun --nproc_per_node 2): all-to-all round trip, attention alone, one step
(eager and compiled) of a 2-layer full-width model at the real token count, each against one unsharded rank."""
import os

import torch
import torch.distributed as dist

from runtime import parallel
from runtime.config import DiTConfig
from runtime.models.attention import attention
from runtime.models.dit import build_dit, timestep_frequencies

rank = int(os.environ["RANK"])
dev = torch.device("cuda", rank)
torch.cuda.set_device(dev)
dist.init_process_group("nccl", device_id=dev)
lay = parallel.configure(2, False, dev)
torch.set_grad_enabled(False)
rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
sizes = (31680, 31680)
g = torch.Generator(device=dev).manual_seed(0)
q, k, v = (torch.randn(2, 63360, 5120, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
s0, s1 = (0, 31680) if rank == 0 else (31680, 63360)
x4 = q[:, s0:s1].reshape(2, 31680, 40, 128).contiguous()
rt = parallel.heads_to_seq(parallel.seq_to_heads(x4, "sp", list(sizes)), "sp", list(sizes))
full = attention(q, k, v, 40)[:, s0:s1]
part = attention(q[:, s0:s1].contiguous(), k[:, s0:s1].contiguous(), v[:, s0:s1].contiguous(), 40, "sdpa", ("sp", sizes))
print(rank, "roundtrip", rel(rt, x4), "attention", rel(part, full), flush=True)
cfg = DiTConfig(num_layers=2, audio_inject_layers=(1,))
model = build_dit(cfg, torch.bfloat16, dev)
h, w, f = 88, 128, 20
r = lambda *s: torch.randn(*s, generator=g, device=dev, dtype=torch.bfloat16)  # noqa: E731
cond = model.prepare(r(1, 40, cfg.text_dim), r(1, 16, 1, h, w), r(1, 16, 19, h, w), None,
                     r(1, cfg.audio_layers, cfg.audio_dim, 80), f)
x, t = r(1, 16, f, h, w), timestep_frequencies([500.0], cfg.freq_dim).to(dev)
caps = {}
hooks = [b.register_forward_hook(lambda m, a, o, i=i: caps.__setitem__(i, o.clone())) for i, b in enumerate(model.blocks)]
hooks += [model.blocks[0].register_forward_pre_hook(lambda m, a: caps.__setitem__("in", a[0].clone()))]
ref = model.step(x, t, *cond.as_tuple())
full = dict(caps)
parallel.shard_model(model, lay)
out = model.step(x, t, *cond.as_tuple())
n0, n1 = model.sp.bounds(63360)
for key in ("in", 0, 1):
    print(rank, "block", key, rel(caps[key], full[key][:, n0:n1]), flush=True)
print(rank, "step eager", rel(out, ref), flush=True)
dist.destroy_process_group()
