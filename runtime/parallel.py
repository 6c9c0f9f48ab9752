"""Multi-GPU inference on the model, from outside it: CFG parallel and Ulysses (``runtime.distributed`` holds the
process groups and collectives).

- **CFG parallel** (``CFGParallelDiT``): the batch-2 CFG call of each step is split by branch; each rank group
  runs its branch, and one all-gather hands both velocities to every rank, which then takes the same solver
  step (so every rank holds the same latents without further communication).
- **Ulysses** (``shard_model``): each rank keeps a contiguous slice of the token sequence through the blocks;
  around self-attention q/k/v are exchanged with an all-to-all (this rank's tokens of all heads ↔ all tokens
  of this rank's heads: ``heads / U`` heads each, so U must divide the 40 heads). Everything else is per token
  (norms, modulation, FFN, text cross-attention, frame-local audio injection with per-rank RoPE rows), and the
  head's outputs are gathered once per step.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from runtime.distributed import (Layout, SeqShard, check_sizes, configure, group, heads_to_seq, init,  # noqa: F401
                                 is_main, seq_to_heads, shutdown, split_sizes)
from runtime.models.dit import ClipConditions, WanS2VDiT


def shard_model(model: WanS2VDiT, layout: Layout) -> None:
    """Make ``model`` compute this rank's slice of the sequence (no-op without Ulysses).

    (The split reaches the compiled blocks as an argument: the first GPU run kept it in a module attribute, which
    compiled blocks do not guard on, so blocks compiled before sharding ran unsharded attention.)"""
    if layout.ulysses == 1:
        return
    check_sizes(layout.ulysses, layout.cfg_parallel, layout.world, model.cfg.num_heads)
    model.set_sequence_shard(SeqShard(layout.sp_rank, layout.ulysses))


# --------------------------------------------------------------------------------------------- CFG parallel
class CFGParallelDiT:
    """Backend wrapper: the batch-2 CFG call runs one branch per rank group; one all-gather joins them."""

    def __init__(self, inner, layout: Layout):
        self.inner, self.layout = inner, layout
        self.model = inner.model
        self.name = f"{inner.name}+cfg-parallel"
        self._cache: tuple[object, object] | None = None  # (batch-2 conditions, this branch's slice)

    def _mine(self, cond: ClipConditions) -> ClipConditions:
        if self._cache is None or self._cache[0] is not cond:
            # same object per clip: replaying backends copy conditions once per clip
            self._cache = (cond, cond.branch(self.layout.cfg_index))
        return self._cache[1]

    def forward(self, x: torch.Tensor, t_freq: torch.Tensor, cond) -> torch.Tensor:
        if x.shape[0] != 2:
            return self.inner.forward(x, t_freq, cond)
        i = self.layout.cfg_index
        return self._gather(self.inner.forward(x[i:i + 1], t_freq[i:i + 1], self._mine(cond)))

    # step caches: each rank keeps its own branch's residual (opaque to the sampler); velocities are gathered as usual
    def forward_residual(self, x: torch.Tensor, t_freq: torch.Tensor, cond):
        if x.shape[0] != 2:
            return self.inner.forward_residual(x, t_freq, cond)
        i = self.layout.cfg_index
        v, residual = self.inner.forward_residual(x[i:i + 1], t_freq[i:i + 1], self._mine(cond))
        return self._gather(v), residual

    def forward_skip(self, x: torch.Tensor, t_freq: torch.Tensor, cond, residual) -> torch.Tensor:
        if x.shape[0] != 2:
            return self.inner.forward_skip(x, t_freq, cond, residual)
        i = self.layout.cfg_index
        return self._gather(self.inner.forward_skip(x[i:i + 1], t_freq[i:i + 1], self._mine(cond), residual))

    @property
    def caches(self) -> bool:
        return hasattr(self.inner, "forward_residual")

    @staticmethod
    def _gather(v: torch.Tensor) -> torch.Tensor:
        v = v.contiguous()
        parts = [torch.empty_like(v) for _ in range(2)]
        dist.all_gather(parts, v, group=group("cfg"))
        return torch.cat(parts)
