"""Test helper: write a DiT in the official checkpoint layout (config.json + safetensors shards + index)."""
from benchmarks.official_layout import save_dit

__all__ = ["save_dit"]
