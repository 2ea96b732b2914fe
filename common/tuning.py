"""Process tuning for the data path: message buffers reused, not mapped afresh each time.

libzmq allocates each received message in its I/O thread and the application frees it in another,
so its buffers come from a per-thread malloc arena. glibc gives memory above its trim threshold
back to the kernel (``madvise``) whenever the top of such an arena is free, and serves requests
above its mmap threshold (128 KiB at first; a 4D Camera sector is 162 KiB) with a fresh mapping:
either way the next message faults its pages in again, about forty per sector, at the rate the
detector sends. Fixed thresholds well above one message keep the freed buffers for the next ones.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Final

# mallopt(3) parameters (malloc.h).
M_TRIM_THRESHOLD: Final = -1
M_MMAP_THRESHOLD: Final = -3
# Larger than any message the data path carries (the gateway's bound on a sector is far below).
MMAP_THRESHOLD: Final = 32 * 1024 * 1024
TRIM_THRESHOLD: Final = 4 * MMAP_THRESHOLD


def keep_message_buffers() -> bool:
    """Fix glibc's thresholds so message buffers are reused; False where the C library has no
    ``mallopt`` (not glibc): nothing is changed there."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
