"""The C allocator, as the loops that stream a model layer by layer need it (no torch here)."""

from __future__ import annotations

import functools


@functools.cache
def _malloc_trim():
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim  # glibc's, through the symbols the process already has
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand the memory freed so far back to the kernel (glibc's malloc_trim; a no-op elsewhere). glibc keeps freed
    blocks below its mmap threshold, which it raises as large tensors are freed, so a loop that drops one layer
    and reads the next grows by what fragments: the streamed 4-bit export of the 1.1B shape kept 397 MiB between
    layers with a trim after each, and grew to 1,385 MiB over 20 layers without (sampled after each layer, issue
    32). A call takes milliseconds."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
