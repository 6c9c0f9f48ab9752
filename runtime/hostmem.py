"""Host-memory policy for long runs: freed large buffers go back to the operating system at once.

glibc serves large allocations with mmap (returned to the OS on free) until the first large free, after which
it raises its threshold and serves them from the heap, where freed blocks stay mapped and fragment. Clip after
clip of decoded video and VAE activations then ratchet the peak RSS upwards; pinning the threshold keeps the
peak flat in the audio length (the measurements are in ``benchmarks/NOTES.md``).
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3                 # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 128 * 1024     # glibc's own starting value, kept fixed


def release_large_frees() -> bool:
    """Pin glibc's mmap threshold; True when applied (False off glibc, where there is nothing to tune)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
