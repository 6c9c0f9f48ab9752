"""Block offload (``--offload blocks[:N]``): the DiT's transformer blocks live in host memory and are streamed to the
GPU one or two blocks ahead of their use, so a GPU smaller than the 14B model's weights can run it.

Layout: the non-block parts (embeddings, head, audio encoder and injectors) and the first ``N`` blocks stay on the
GPU; every other block stays in (pinned) host memory. ``prefetch + 1`` staging slots on the GPU, each a copy of
one block's module, are reused round-robin: while block ``i`` computes from one slot, block ``i + 1`` (and
``i + 2`` with ``prefetch=2``) is copied into another on a side stream. The slots' tensors never move, so compiled
blocks see the same parameter addresses every step and the memory used is fixed.

Ordering is the job of a *timeline* (``CudaTimeline`` on a GPU, ``HostTimeline`` without one), which the
streamer asks for four things: issue a copy into a slot once that slot's previous user has finished, make the
compute wait for a copy, mark the end of a block's compute, and wait for everything. Tests pass a recording
timeline and check the order of these events on the CPU.

LoRA merges and FP8 quantisation happen on the host copy before it is pinned (``S2VPipeline`` orders it), so the
streamed bytes are the merged weights (each merged on the GPU where there is one: the bits of a resident merge), and
for FP8 the e4m3 weights and their scales (about two thirds of a bf16 block: the cross-attention stays bf16).
CUDA graphs are refused: a captured graph would replay the copies' addresses but not the copies themselves.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.nn as nn

from runtime.errors import ConfigError

log = logging.getLogger(__name__)

OFFLOAD_HELP = ("stream the DiT's blocks from host memory: 'blocks' streams all of them, 'blocks:N' keeps the first N "
                "on the GPU (default none: everything resident); each block is copied one block ahead of its use")
MAX_PREFETCH = 2


@dataclass(frozen=True)
class OffloadSpec:
    """``none``, ``blocks`` (every block streamed) or ``blocks:N`` (the first N blocks resident)."""

    mode: str = "none"
    resident: int = 0       # blocks kept on the GPU
    prefetch: int = 1       # blocks copied ahead of their use (prefetch + 1 staging slots)

    @property
    def enabled(self) -> bool:
        return self.mode == "blocks"

    def __str__(self) -> str:
        return "none" if not self.enabled else ("blocks" if self.resident == 0 else f"blocks:{self.resident}")

    @classmethod
    def parse(cls, value, name: str = "offload") -> "OffloadSpec":
        """None, an ``OffloadSpec``, or the flag's string; ``name`` is how an error names the option."""
        if value is None:
            return cls()
        if isinstance(value, OffloadSpec):
            spec = value
        elif isinstance(value, str):
            head, sep, tail = value.strip().partition(":")
            if head == "none" and not sep:
                return cls()
            if head != "blocks":
                raise ConfigError(f"{name} {value!r}: expected none, blocks or blocks:N (N = blocks kept on the GPU)")
            if sep and not tail.isdigit():
                raise ConfigError(f"{name} {value!r}: N in blocks:N must be a whole number of blocks, e.g. blocks:8")
            spec = cls("blocks", int(tail) if sep else 0)
        else:
            raise ConfigError(f"{name} of type {type(value).__name__}; pass 'none', 'blocks' or 'blocks:N'")
        if spec.mode not in ("none", "blocks"):
            raise ConfigError(f"{name} mode {spec.mode!r}: expected none or blocks")
        if not 1 <= spec.prefetch <= MAX_PREFETCH:
            raise ConfigError(f"{name} prefetch {spec.prefetch}: copy 1 or {MAX_PREFETCH} blocks ahead")
        return spec

    def check(self, num_layers: int, name: str = "offload") -> None:
        if self.enabled and not 0 <= self.resident < num_layers:
            raise ConfigError(f"{name} blocks:{self.resident}: this DiT has {num_layers} blocks, so keep 0 to "
                              f"{num_layers - 1} of them on the GPU (or use {name} none: all resident)")


# --------------------------------------------------------------------------------------------- timelines
class HostTimeline:
    """No GPU: a copy is complete when issued, and there is nothing to wait for (CPU runs and tests)."""

    def copy(self, block: int, slot: int, dst: list[torch.Tensor], src: list[torch.Tensor], after):
        for d, s in zip(dst, src):
            d.copy_(s)
        return None

    def wait(self, block: int, slot: int, ready) -> None:
        pass

    def done(self, block: int, slot: int):
        return None

    def drain(self) -> None:
        pass


class CudaTimeline:
    """Copies on a side stream, each after the slot's previous compute (an event); the compute stream waits on
    each copy's event before its block runs."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def copy(self, block: int, slot: int, dst: list[torch.Tensor], src: list[torch.Tensor], after):
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)   # the slot's previous block has finished reading it
            for d, s in zip(dst, src):
                d.copy_(s, non_blocking=True)   # pinned host memory: an asynchronous DMA
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return ready

    def wait(self, block: int, slot: int, ready) -> None:
        torch.cuda.current_stream(self.device).wait_event(ready)

    def done(self, block: int, slot: int):
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def drain(self) -> None:
        torch.cuda.synchronize(self.device)


def default_timeline(device: torch.device):
    return CudaTimeline(device) if device.type == "cuda" else HostTimeline()


# --------------------------------------------------------------------------------------------- the streamer
def block_tensors(block: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """A block's parameters and buffers in a fixed order (what is copied into a slot)."""
    return list(block.named_parameters()) + [(n, b) for n, b in block.named_buffers() if b is not None]


def tensor_bytes(block: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for _, t in block_tensors(block))


class BlockStreamer:
    """Runs ``model.blocks`` with blocks ``resident..`` streamed from host memory through fixed GPU slots.

    ``attach`` builds it and sets ``model.block_source``, which ``WanS2VDiT._blocks`` iterates instead of
    ``model.blocks``. ``stream()`` yields, for each block in order, the module to run: the resident block itself or
    the slot its weights were copied into."""

    def __init__(self, model: nn.Module, device: torch.device, spec: OffloadSpec, timeline=None):
        blocks = list(model.blocks)
        spec.check(len(blocks))
        self.device, self.spec = device, spec
        self.timeline = timeline if timeline is not None else default_timeline(device)
        self.blocks = blocks
        self.streamed = list(range(spec.resident, len(blocks)))
        self.position = {b: p for p, b in enumerate(self.streamed)}
        self.num_slots = min(spec.prefetch + 1, len(self.streamed))
        self.prefetch = spec.prefetch
        self.host = {i: [t for _, t in block_tensors(blocks[i])] for i in self.streamed}
        template = blocks[self.streamed[0]]
        names = [(n, t.shape, t.dtype) for n, t in block_tensors(template)]
        for i in self.streamed:
            if [(n, t.shape, t.dtype) for n, t in block_tensors(blocks[i])] != names:
                raise ConfigError(f"block {i} differs in structure from block {self.streamed[0]}: blocks streamed "
                                  "through shared slots must all have the same parameters")
        self.slots = [self._slot(template) for _ in range(self.num_slots)]
        self.slot_tensors = [[t for _, t in block_tensors(s)] for s in self.slots]
        self.ready: list = [None] * self.num_slots   # each slot's last copy
        self.free: list = [None] * self.num_slots    # each slot's last compute: the next copy into it waits for it
        self._open = False

    def _slot(self, template: nn.Module) -> nn.Module:
        # The template's tensors go straight to the device through deepcopy's memo: a plain deepcopy would clone
        # each host tensor first and, for a buffer (FP8 weights and scales) that is a view into a pinned arena,
        # the whole arena (Tensor.__deepcopy__ copies the storage).
        # (copy=True: on the CPU ``to`` would return the template's own tensors, which the slot then overwrites)
        memo = {id(t): (nn.Parameter(t.detach().to(self.device, copy=True), t.requires_grad)
                        if isinstance(t, nn.Parameter) else t.to(self.device, copy=True))
                for _, t in block_tensors(template)}
        slot = copy.deepcopy(template, memo)
        slot.__dict__.pop("forward", None)  # a compiled forward is bound to the template; slots compile their own
        return slot.to(self.device)

    @property
    def block_bytes(self) -> int:
        """Bytes copied per streamed block (FP8 blocks: e4m3 weights and their scales)."""
        return tensor_bytes(self.blocks[self.streamed[0]])

    @property
    def slot_bytes(self) -> int:
        return self.num_slots * self.block_bytes

    def stream(self):
        """The modules to run, block by block, for one pass over the stack."""
        if self._open:           # the previous pass stopped midway (an error): let every slot's work finish
            self.timeline.drain()
        self._open = True
        issued = 0

        def issue_until(end: int) -> None:
            nonlocal issued
            while issued < min(end, len(self.streamed)):
                block, slot = self.streamed[issued], issued % self.num_slots
                self.ready[slot] = self.timeline.copy(block, slot, self.slot_tensors[slot], self.host[block],
                                                      self.free[slot])
                issued += 1

        try:
            issue_until(self.prefetch)  # the first streamed blocks copy while the resident ones compute
            for i, block in enumerate(self.blocks):
                p = self.position.get(i)
                if p is None:
                    yield block
                    continue
                issue_until(p + 1 + self.prefetch)   # the next blocks' copies before this block's compute
                slot = p % self.num_slots
                self.timeline.wait(i, slot, self.ready[slot])
                yield self.slots[slot]
                self.free[slot] = self.timeline.done(i, slot)
        except GeneratorExit:
            # Abandoned midway (an error in a block, e.g. out of memory): copies issued for blocks that will not run
            # are still in flight on the side stream. Were the pipeline dropped now (a benchmark row, a caller
            # recovering from the error), the allocator would hand the slots' memory to new tensors that those
            # copies then overwrite. The pass is over: wait for them here.
            self.timeline.drain()
            self._open = False
            raise
        self._open = False


PIN_ARENA_BYTES = 2**30  # pinned host memory comes in arenas of this size: a power of two (see PinnedArenas)
PIN_ALIGN = 512         # where each tensor starts in its arena: a multiple of every element size, DMA-friendly


class PinnedArenas:
    """Page-locked host memory for the streamed blocks, packed: tensors are copied into shared arenas of
    ``PIN_ARENA_BYTES`` and become views into them.

    ``Tensor.pin_memory()`` per tensor goes through PyTorch's pinned allocator, which rounds every allocation up to
    a power of two: the 14B blocks' 141 MB FFN and 157 MB QKV weights would take 256 MiB each, ~1.6x the blocks'
    bytes page-locked, and the freed rounded sizes stay cached by the allocator for the life of the process.
    Arenas are already a power of two, so each costs exactly its size; packing wastes at most the tail of each.
    ``pin=False`` packs into ordinary memory (what the CPU tests check)."""

    def __init__(self, pin: bool = True, arena_bytes: int = PIN_ARENA_BYTES):
        self.pin, self.arena_bytes = pin, arena_bytes
        self.arena: torch.Tensor | None = None
        self.used = 0
        self.arenas = 0

    def place(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of host tensor ``t`` in an arena (contiguous; ``t`` itself where already pinned or empty)."""
        if t.device.type != "cpu" or (self.pin and t.is_pinned()) or t.numel() == 0:
            return t
        n = t.numel() * t.element_size()
        if n > self.arena_bytes:  # larger than an arena: its own (rounded) allocation
            return t.pin_memory() if self.pin else t.contiguous().clone()
        start = -(-self.used // PIN_ALIGN) * PIN_ALIGN
        if self.arena is None or start + n > self.arena_bytes:
            self.arena = torch.empty(self.arena_bytes, dtype=torch.uint8, pin_memory=self.pin)
            self.arenas += 1
            start = 0
        out = self.arena[start:start + n].view(t.dtype).view(t.shape)
        out.copy_(t)
        self.used = start + n
        return out


def _pin(block: nn.Module, arenas: PinnedArenas) -> None:
    """Page-lock a host block's tensors (once, at attach: every later copy of it reads them asynchronously)."""
    block._apply(arenas.place)


def attach(model: nn.Module, device: torch.device, spec: OffloadSpec, timeline=None) -> BlockStreamer:
    """Put ``model`` (held on the host) into the offload layout on ``device`` and return its streamer: the non-block
    parts and the first ``spec.resident`` blocks move to the device, the other blocks stay on the host (pinned when
    the device is a GPU) and run through the streamer's slots. LoRA merges and FP8 quantisation must come first."""
    device = torch.device(device)
    for name, child in model.named_children():
        if name != "blocks":
            child.to(device)
    for name, p in model.named_parameters(recurse=False):
        p.data = p.data.to(device)
    arenas = None  # no GPU: nothing copies asynchronously, nothing is pinned
    if device.type == "cuda":
        total = sum(tensor_bytes(b) for b in list(model.blocks)[spec.resident:])
        arenas = PinnedArenas(arena_bytes=min(PIN_ARENA_BYTES, 1 << max(total - 1, 1).bit_length()))  # small models
    for i, block in enumerate(model.blocks):
        if i < spec.resident:
            block.to(device)
        else:
            block.to("cpu")
            if arenas is not None:
                _pin(block, arenas)  # asynchronous copies need page-locked memory
    streamer = BlockStreamer(model, device, spec, timeline)
    model.block_source = streamer
    log.info("offload %s: %d blocks streamed from host memory (%.2f GiB each, %d GPU slots%s)", spec,
             len(streamer.streamed), streamer.block_bytes / 2**30, streamer.num_slots,
             "" if arenas is None else f", {arenas.arenas * arenas.arena_bytes / 2**30:g} GiB pinned")
    return streamer


class _Blocks:
    """What ``runtime.kernels.fp8.quantize_blocks`` reads of a model: its ``blocks``."""

    def __init__(self, blocks):
        self.blocks = blocks


def quantize_on_host(model: nn.Module, device: torch.device, check: bool = True) -> None:
    """FP8 block linears for a model whose blocks live on the host: each block is quantised on ``device`` (the
    same kernels, hence the same bits, as a resident model's ``set_precision("fp8")``) and its e4m3 weights and
    scales come back to the host. ``check=False`` skips the device checks (a CPU test of the host layout)."""
    from runtime.kernels import fp8

    if model.precision == "fp8":
        return
    if check:
        why = fp8.unsupported_reason(device)
        if why:
            raise ConfigError(why)
    if model.dtype != torch.bfloat16:
        raise ConfigError(f"--precision fp8 quantises a bf16 model; this one is {model.dtype}: load it in bf16")
    for block in model.blocks:
        home = next(block.parameters()).device
        block.to(device)
        fp8.quantize_blocks(_Blocks([block]))
        block.to(home)
    model.precision = "fp8"
