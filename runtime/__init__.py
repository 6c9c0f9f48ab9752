"""wan-s2v-trt runtime: load the official Wan2.2-S2V-14B checkpoint and generate talking videos fast."""
from __future__ import annotations

__all__ = ["S2VPipeline"]


def __getattr__(name: str):
    # Lazy: importing the package must stay cheap (the CLI parses flags before loading torch models).
    if name == "S2VPipeline":
        from runtime.pipeline import S2VPipeline

        return S2VPipeline
    raise AttributeError(name)
