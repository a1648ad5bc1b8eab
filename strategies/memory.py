"""Give freed message buffers back to the OS in the process that holds Flower's state.

In a simulation one process holds every node's ``context.state``, Flower's message store and
the ServerApp; within a round it allocates and frees a copy of the front (several MB) per
client and message. glibc raises its mmap threshold each time such a block is freed, after
which blocks of that size come from heap arenas that seldom shrink: measured with DeiT-Tiny
and 100 clients a round, the process's resident memory grew to three times the bytes it held
alive (BENCHMARKS.md, "Scale with DeiT-Tiny clients"). A fixed threshold keeps every large
block in its own mapping, returned to the OS when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

M_MMAP_THRESHOLD = -3  # mallopt parameter, glibc's <malloc.h>
LARGE_BLOCK_BYTES = 1 << 20

log = logging.getLogger("adc_flwr")


def map_large_blocks(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """Serve blocks of ``threshold`` bytes and more from mmap, for the rest of the process.

    Returns False where the C library is not glibc (the setting is then left alone).
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, threshold))
    if not ok:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused; the allocator keeps its defaults")
    return ok
