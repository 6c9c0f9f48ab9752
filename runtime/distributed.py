"""Process groups and the collectives of multi-GPU inference (``torch.distributed``, launched with ``torchrun``).

A leaf module: it imports no model code, so the attention layers can call the Ulysses all-to-all ops and
``runtime.parallel`` (which works on the model from outside) can build on it without an import cycle.

World = ``ulysses`` × (2 if ``cfg_parallel`` else 1) ranks, laid out CFG-major: ranks [c·U, (c+1)·U) form the
sequence-parallel group ``"sp"`` of CFG branch c (0 = conditional, 1 = unconditional); ranks {s, s + U} form the
CFG group ``"cfg"``. The collectives are registered as custom ops so compiled blocks and CUDA graphs keep them as
single calls. The same code runs on the CPU with the gloo backend.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from runtime.errors import ConfigError

log = logging.getLogger(__name__)
_GROUPS: dict[str, "dist.ProcessGroup"] = {}
# The groups of each layout built so far, by (ulysses, cfg_parallel): a process that switches layouts per request
# (a serve worker of several ranks) reuses them instead of creating communicators on every switch.
_BUILT: dict[tuple[int, bool], dict[str, "dist.ProcessGroup"]] = {}


# --------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    """This process's place in the world."""

    rank: int
    world: int
    ulysses: int
    cfg_parallel: bool
    device: torch.device

    @property
    def cfg_index(self) -> int:      # 0: conditional branch, 1: unconditional (when cfg_parallel)
        return self.rank // self.ulysses

    @property
    def sp_rank(self) -> int:
        return self.rank % self.ulysses

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def check_sizes(ulysses: int, cfg_parallel: bool, world: int, heads: int | None = None) -> None:
    """Refuse layouts that cannot work, naming the fix."""
    if ulysses < 1:
        raise ConfigError(f"--ulysses_size {ulysses}: must be ≥ 1")
    need = ulysses * (2 if cfg_parallel else 1)
    if world != need:
        launch = f"torchrun --nproc_per_node {need}"
        raise ConfigError(f"{world} process(es) but --ulysses_size {ulysses}{' with --cfg_parallel' if cfg_parallel else ''} "
                          f"needs {need}: launch with `{launch} -m runtime.generate ...`")
    if heads is not None and heads % ulysses:
        ok = [u for u in range(1, heads + 1) if heads % u == 0]
        raise ConfigError(f"--ulysses_size {ulysses} does not divide the model's {heads} attention heads; use one of {ok}")


def init(ulysses: int = 1, cfg_parallel: bool = False, device: str | torch.device | None = None) -> Layout | None:
    """Join the torchrun world (NCCL on CUDA, gloo on the CPU) and build the groups; None for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and ulysses == 1 and not cfg_parallel:
        return None
    check_sizes(ulysses, cfg_parallel, world)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return configure(ulysses, cfg_parallel, device)


def configure(ulysses: int, cfg_parallel: bool, device: torch.device) -> Layout:
    """Build the groups of one layout over the initialised world (callable again for another layout; a layout's
    groups are built once, so every rank must call it with the same layouts in the same order)."""
    world = dist.get_world_size()
    check_sizes(ulysses, cfg_parallel, world)
    rank = dist.get_rank()
    layout = Layout(rank, world, ulysses, cfg_parallel, device)
    groups = _BUILT.get((ulysses, cfg_parallel))
    if groups is None:
        groups = {}
        branches = 2 if cfg_parallel else 1
        for c in range(branches):  # every rank creates every group, in the same order
            g = dist.new_group(list(range(c * ulysses, (c + 1) * ulysses)))
            if layout.cfg_index == c:
                groups["sp"] = g
        if cfg_parallel:
            for s in range(ulysses):
                g = dist.new_group([s, s + ulysses])
                if layout.sp_rank == s:
                    groups["cfg"] = g
        _BUILT[(ulysses, cfg_parallel)] = groups
    _GROUPS.clear()
    _GROUPS.update(groups)
    return layout


def is_main() -> bool:
    """True on rank 0, or without torch.distributed."""
    return not dist.is_initialized() or dist.get_rank() == 0


def shutdown() -> None:
    _GROUPS.clear()
    _BUILT.clear()
    if dist.is_initialized():
        dist.destroy_process_group()


def group(name: str):
    return _GROUPS[name]


# --------------------------------------------------------------------------------------------- Ulysses
def split_sizes(n: int, parts: int) -> list[int]:
    """Contiguous chunk lengths of ``n`` tokens over ``parts`` ranks (differ by at most one)."""
    q, r = divmod(n, parts)
    return [q + (i < r) for i in range(parts)]


class SeqShard:
    """This rank's contiguous slice of the token sequence (``WanS2VDiT.set_sequence_shard``)."""

    def __init__(self, rank: int, world: int, group_name: str = "sp"):
        self.rank, self.world, self.group_name = rank, world, group_name
        self.total = 0

    def bounds(self, n: int) -> tuple[int, int]:
        """[start, end) of this rank's tokens in a sequence of ``n``."""
        sizes = split_sizes(n, self.world)
        self.total = n
        start = sum(sizes[:self.rank])
        return start, start + sizes[self.rank]

    def spec(self, n: int) -> tuple[str, tuple[int, ...]]:
        """What the self-attention layers take: (group name, tokens per rank)."""
        return self.group_name, tuple(split_sizes(n, self.world))

    def gather_tokens(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """This rank's rows of the first ``n`` tokens [B, n_r, C] → all ``n`` rows, on every rank."""
        counts, start = [], 0
        for size in split_sizes(self.total, self.world):
            counts.append(max(0, min(n, start + size) - start))
            start += size
        width = max(counts)
        padded = torch.nn.functional.pad(x, (0, 0, 0, width - x.shape[1])).contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=group(self.group_name))
        return torch.cat([p[:, :c] for p, c in zip(parts, counts)], dim=1)


def _a2a(send: torch.Tensor, recv: torch.Tensor, out_splits: list[int], in_splits: list[int], name: str) -> None:
    dist.all_to_all_single(recv, send, output_split_sizes=out_splits, input_split_sizes=in_splits, group=group(name))


@torch.library.custom_op("wan_s2v::seq_to_heads", mutates_args=())
def seq_to_heads(x: torch.Tensor, group_name: str, sizes: list[int]) -> torch.Tensor:
    """[B, S_r, H, D] (this rank's tokens, all heads) → [B, S, H/U, D] (all tokens, this rank's heads)."""
    b, s_r, h, d = x.shape
    u = len(sizes)
    send = x.view(b, s_r, u, h // u, d).permute(2, 1, 0, 3, 4).reshape(u * s_r, b, h // u, d).contiguous()
    recv = x.new_empty(sum(sizes), b, h // u, d)
    _a2a(send, recv, list(sizes), [s_r] * u, group_name)
    return recv.permute(1, 0, 2, 3).contiguous()


@seq_to_heads.register_fake
def _(x, group_name, sizes):
    b, _, h, d = x.shape
    return x.new_empty(b, sum(sizes), h // len(sizes), d)


@torch.library.custom_op("wan_s2v::heads_to_seq", mutates_args=())
def heads_to_seq(x: torch.Tensor, group_name: str, sizes: list[int]) -> torch.Tensor:
    """Inverse of ``seq_to_heads``: [B, S, H/U, D] → [B, S_r, H, D]."""
    b, s, hu, d = x.shape
    u = len(sizes)
    s_r = sizes[dist.get_rank(group(group_name))]
    send = x.permute(1, 0, 2, 3).contiguous()
    recv = x.new_empty(u * s_r, b, hu, d)
    _a2a(send, recv, [s_r] * u, list(sizes), group_name)
    return recv.view(u, s_r, b, hu, d).permute(2, 1, 0, 3, 4).reshape(b, s_r, u * hu, d)


@heads_to_seq.register_fake
def _(x, group_name, sizes):
    b, _, hu, d = x.shape
    s_r = sizes[dist.get_rank(group(group_name))]
    return x.new_empty(b, s_r, hu * len(sizes), d)
