"""Persistent input buffers for backends that replay captured work (CUDA graphs, bound engine I/O).

Per step only ``x`` and ``t_freq`` change (a few MB); the clip conditions (hundreds of MB at 704×1024) are
copied in once per clip, when a different ``ClipConditions`` object arrives.
"""
from __future__ import annotations

import weakref

import torch

from runtime.models.dit import ClipConditions


def shape_key(x: torch.Tensor, t_freq: torch.Tensor, cond: ClipConditions) -> tuple:
    return tuple((tuple(t.shape), t.dtype) for t in (x, t_freq, *cond.as_tuple()))


class StaticInputs:
    """``tensors``: buffers in graph-input order (x, t_freq, *conditions), optionally in other dtypes."""

    def __init__(self, x: torch.Tensor, t_freq: torch.Tensor, cond: ClipConditions,
                 dtypes: list[torch.dtype] | None = None):
        src = (x, t_freq, *cond.as_tuple())
        dtypes = dtypes or [t.dtype for t in src]
        self.tensors = [t.to(dt).contiguous().clone() for t, dt in zip(src, dtypes)]
        # A weak reference, not an id() (a freed object's id can be reused) and not the object: holding it would
        # keep a finished clip's conditions (GBs at 704x1024) alive through the VAE decode and between requests.
        self.bound = weakref.ref(cond)

    def load(self, x: torch.Tensor, t_freq: torch.Tensor, cond: ClipConditions) -> None:
        self.tensors[0].copy_(x)
        self.tensors[1].copy_(t_freq)
        if self.bound() is not cond:  # new clip or CFG branch set (or the bound one freed): refresh once
            for dst, src in zip(self.tensors[2:], cond.as_tuple()):
                dst.copy_(src)
            self.bound = weakref.ref(cond)
