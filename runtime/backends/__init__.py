"""DiT backends behind one interface: ``backend.forward(x, t_freq, cond) -> velocity`` (fp32).

``backend.model`` is the PyTorch ``WanS2VDiT``; per-clip conditioning (``model.prepare``) always runs in
PyTorch, only the per-step transformer call is delegated.
"""
from __future__ import annotations

from runtime.errors import BackendUnavailable

BACKENDS = ("torch",)


def make_backend(name: str, model):
    if name == "torch":
        from runtime.sampler import TorchDiT

        return TorchDiT(model)
    raise BackendUnavailable(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
