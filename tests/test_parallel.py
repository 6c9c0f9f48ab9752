"""Multi-process inference on the CPU (gloo): Ulysses sequence parallel and CFG parallel equal one process."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from runtime import parallel
from runtime.errors import ConfigError
from tests.conftest import free_port


def _inputs(model, clip: str, batch: int = 1):
    from tests.conftest import step_inputs

    # 3 latent frames of 4×8 patches: frame boundaries fall inside rank slices
    return step_inputs(model, 3, 8, 16, motion=clip == "later", batch=batch, seed=1, pose=False, t=500.0)


def _worker(rank: int, world: int, port: int, ulysses: int, cfg_parallel: bool, clip: str, q, compiled: bool = False,
            compile_after: bool = False):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        from runtime.backends.torch_backend import TorchDiT
        from runtime.tiny import tiny_dit

        layout = parallel.init(ulysses, cfg_parallel, device="cpu")
        model = tiny_dit(torch.float32, "cpu")
        x, t, cond = _inputs(model, clip, batch=2 if cfg_parallel else 1)
        if compiled:  # compile and run unsharded first, as a server that shards a warm model would
            from runtime.backends.torch_backend import CompiledDiT

            backend = CompiledDiT(model)
            with torch.no_grad():
                backend.forward(x[:1], t[:1], cond)
        parallel.shard_model(model, layout)
        if compile_after:  # the pipeline's order: shard, then the compiled backend
            from runtime.backends.torch_backend import CompiledDiT

            backend = CompiledDiT(model)
        else:
            backend = TorchDiT(model)
        if cfg_parallel:
            backend = parallel.CFGParallelDiT(backend, layout)
        with torch.no_grad():
            out = backend.forward(x, t, cond)
        if rank == 0:
            q.put(out.numpy().copy())  # by value: the worker exits before the parent reads
        dist.barrier()
    finally:
        parallel.shutdown()


def _run(world: int, ulysses: int, cfg_parallel: bool, clip: str, compiled: bool = False,
         compile_after: bool = False) -> torch.Tensor:
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(world, free_port(), ulysses, cfg_parallel, clip, q, compiled, compile_after),
                       nprocs=world,
                       start_method="spawn", join=True)
    return torch.from_numpy(q.get())


def _reference(clip: str, batch: int) -> torch.Tensor:
    from runtime.tiny import tiny_dit

    model = tiny_dit(torch.float32, "cpu")
    x, t, cond = _inputs(model, clip, batch)
    with torch.no_grad():
        return model.step(x, t, *cond.as_tuple())


@pytest.mark.slow
@pytest.mark.parametrize("clip", ["first", "later"])
def test_ulysses_two_ranks_equal_one_process(clip):
    ref = _reference(clip, 1)
    out = _run(2, 2, False, clip)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_ulysses_after_compiling_unsharded():
    """Blocks compiled before sharding must not keep their unsharded graph (the first H200 run did: rel-L2 0.33)."""
    ref = _reference("first", 1)
    out = _run(2, 2, False, "first", compiled=True)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_ulysses_ranks_with_compiled_blocks():
    """Sharded, then compiled (what the pipeline does on every rank now): equal to one process."""
    ref = _reference("later", 1)
    out = _run(2, 2, False, "later", compile_after=True)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_ulysses_four_ranks_and_cfg_parallel():
    ref = _reference("later", 2)
    out = _run(4, 2, True, "later")     # 2 CFG branches × Ulysses-2
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_layout_errors_name_the_fix():
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node 4"):
        parallel.check_sizes(2, True, 2)
    with pytest.raises(ConfigError, match=r"does not divide the model's 40 attention heads; use one of \[1, 2, 4, 5, 8, 10"):
        parallel.check_sizes(3, False, 3, heads=40)


def test_split_sizes():
    assert parallel.split_sizes(10, 4) == [3, 3, 2, 2]
    assert sum(parallel.split_sizes(63360, 8)) == 63360
