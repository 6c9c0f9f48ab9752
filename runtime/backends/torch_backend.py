"""PyTorch DiT backends: eager, compiled blocks, and compiled blocks replayed as a CUDA graph."""
from __future__ import annotations

import gc
import logging
from collections import OrderedDict

import torch

from runtime.backends.static_inputs import StaticInputs, shape_key
from runtime.errors import BackendUnavailable
from runtime.models.dit import ClipConditions, WanS2VDiT

log = logging.getLogger(__name__)


class TorchDiT:
    """Eager reference: ``forward(x, t_freq, cond) -> velocity`` (fp32)."""

    name = "torch"
    caches = True  # forward_residual / forward_skip for step caches (runtime.cache)

    def __init__(self, model: WanS2VDiT):
        self.model = model

    def forward(self, x: torch.Tensor, t_freq: torch.Tensor, cond: ClipConditions) -> torch.Tensor:
        return self.model.step(x, t_freq, *cond.as_tuple())

    # step caches (runtime.cache): a computed step that also returns its block residual, and a skipped one
    def forward_residual(self, x: torch.Tensor, t_freq: torch.Tensor, cond: ClipConditions
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.step_with_residual(x, t_freq, *cond.as_tuple())

    def forward_skip(self, x: torch.Tensor, t_freq: torch.Tensor, cond: ClipConditions, residual) -> torch.Tensor:
        return self.model.step_from_residual(x, t_freq, cond.pose, cond.extra, residual)


class CompiledDiT(TorchDiT):
    name = "torch-compile"

    def __init__(self, model: WanS2VDiT):
        super().__init__(model)
        model.compile_blocks()


class _Captured:
    """Static inputs and one CUDA graph for one input-shape key.

    The warm-up runs (compilation, lazy kernel and library initialisation) must happen outside the capture; they
    run on the real inputs of the call that meets the shape, so the last one's output is that call's result
    (``first``) and the warm-up costs no extra forward."""

    def __init__(self, step, x: torch.Tensor, t_freq: torch.Tensor, cond: ClipConditions, warmup: int, pool):
        # step: model.step (one output) or model.step_with_residual (velocity, residual); outputs kept as a tuple
        self.inputs = StaticInputs(x, t_freq, cond)
        args = self.inputs.tensors
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (and compilation) outside the capture
            for _ in range(max(warmup, 1)):
                out = _as_tuple(step(*args))
            self.first = tuple(o.clone() for o in out)
        torch.cuda.current_stream().wait_stream(side)
        for o in self.first:
            o.record_stream(torch.cuda.current_stream())
        del out
        self.graph = torch.cuda.CUDAGraph()
        # cuBLAS keeps a workspace per (handle, stream): made inside the capture and then forgotten, it is one more
        # of the pool's intermediates (freed with the pool) instead of a block that pins a dropped pool's segment
        _clear_cublas_workspaces()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = _as_tuple(step(*args))
        _clear_cublas_workspaces()


def _clear_cublas_workspaces() -> None:
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)  # private; what inductor's graph trees call
    if clear is not None:
        clear()


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


class GraphDiT(TorchDiT):
    """The step captured as a CUDA graph per (resolution, clip kind, batch), reused across clips and requests.

    Per call it copies x and t_freq into the captured buffers (a few MB) and replays; per clip it copies the
    clip conditions once. Blocks are compiled first (``compile=True``) so the graph replays fused kernels.
    A new shape costs its compilation, one forward on the real inputs (whose output is returned) and the capture.
    All graphs of a backend share one memory pool: a graph's activations (GBs at 704×1024) are reused by the next
    graph instead of each holding its own. That is safe because replays never overlap and every output is copied
    out right after its replay (another graph's replay may then overwrite it). A server that meets many
    resolutions still keeps each graph's outputs and static inputs: when a new capture runs out of memory, the
    graphs of other shapes are dropped and it is retried once (they are captured again when their shape returns)."""

    name = "torch-graph"

    def __init__(self, model: WanS2VDiT, compile: bool = True, warmup: int = 1):
        if not torch.cuda.is_available() or model.patch_embedding.weight.device.type != "cuda":
            raise BackendUnavailable("backend torch-graph needs the model on a CUDA device; use --backend torch on the CPU")
        super().__init__(model)
        if compile:
            model.compile_blocks()
        self.warmup = warmup
        self.graphs: OrderedDict[tuple, _Captured] = OrderedDict()  # least recently used first
        self.pool = torch.cuda.graph_pool_handle()

    def drop_graphs(self) -> None:
        """Drops every captured graph and returns their memory to the device (captured again on their next call)."""
        self.graphs.clear()
        self.pool = torch.cuda.graph_pool_handle()  # the old pool is freed with its last graph
        gc.collect()
        torch.cuda.empty_cache()

    def forward(self, x: torch.Tensor, t_freq: torch.Tensor, cond: ClipConditions) -> torch.Tensor:
        return self._replay(self.model.step, x, t_freq, cond)[0]

    def forward_residual(self, x: torch.Tensor, t_freq: torch.Tensor, cond: ClipConditions
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """A graph of its own per shape (the step that also returns its residual); a skipped step (inherited
        ``forward_skip``) runs only the embeddings and the head, eagerly, and replays nothing."""
        return self._replay(self.model.step_with_residual, x, t_freq, cond)

    def _replay(self, step, x: torch.Tensor, t_freq: torch.Tensor, cond: ClipConditions) -> tuple[torch.Tensor, ...]:
        key = (step.__name__,) + shape_key(x, t_freq, cond)
        cap = self.graphs.get(key)
        if cap is None:  # the warm-up before the capture computed this call's output
            cap = self._capture(key, step, x, t_freq, cond)
            first, cap.first = cap.first, None
            return first
        self.graphs.move_to_end(key)
        cap.inputs.load(x, t_freq, cond)
        cap.graph.replay()
        return tuple(o.clone() for o in cap.out)  # the captured outputs are overwritten by the next replay

    def _capture(self, key: tuple, step, x: torch.Tensor, t_freq: torch.Tensor, cond: ClipConditions) -> _Captured:
        try:
            cap = _Captured(step, x, t_freq, cond, self.warmup, self.pool)
        except torch.cuda.OutOfMemoryError:
            if not self.graphs:
                raise
            cap = None  # retried below, outside this handler: its traceback holds the failed capture's memory
        if cap is None:
            log.warning("CUDA graph for a new shape ran out of GPU memory; dropping the %d graph(s) of other shapes "
                        "and capturing again", len(self.graphs))
            self.drop_graphs()
            cap = _Captured(step, x, t_freq, cond, self.warmup, self.pool)
        self.graphs[key] = cap
        return cap
