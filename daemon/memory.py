"""Large buffers go back to the system when they are freed (#21.6).

A camera frame decoded at 6000x6000 is 108 MB (Pillow holds it as 144 MB of 16 MB blocks
while decoding), and a question, a caption and the watches each decode and resize frames
on the worker thread. glibc's malloc serves a request of at least M_MMAP_THRESHOLD bytes
with its own mmap, returned to the system at free(); below it, memory comes from the
heap or a thread's arena and stays in the process after free(). The threshold starts at
128 KiB but rises to the size of every mmapped block freed (up to 32 MiB on 64-bit), so
after the first large frame Pillow's 16 MB blocks and the resize's temporaries come from
the arenas and stay: four 6000x6000 frames left the daemon 650 MB larger for good.
Setting the threshold once turns that adjustment off (the Linux man page mallopt(3),
M_MMAP_THRESHOLD), so every block of `MMAP_THRESHOLD_BYTES` or more is returned when
freed. Small allocations, the model and the KV cache (allocated once) are not affected.

What the threshold does not cover: a thread's arena keeps the smaller blocks a decode
left free (zlib and line buffers: ~68 MB after four 6000x6000 PNGs, measured) while the
thread lives, and the worker thread lives as long as the daemon. `release_free_memory()`
(glibc's malloc_trim(0), which returns the free pages of every arena) is called by the
worker when it goes idle after decoding frames.

Elsewhere (musl, macOS) both do nothing and say so.
"""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3  # glibc malloc.h
MMAP_THRESHOLD_BYTES = 4 * 2**20  # a 1080p RGB frame is 6 MB: frames and their temporaries are returned


def return_large_frees(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Make malloc return blocks of `threshold` bytes or more to the system when freed;
    True when the C library took the setting (glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process already uses
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1


def release_free_memory() -> bool:
    """Return the free pages of every malloc arena to the system; True when done (glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    malloc_trim = getattr(libc, "malloc_trim", None)
    if malloc_trim is None:
        return False
    malloc_trim.argtypes = (ctypes.c_size_t,)
    malloc_trim.restype = ctypes.c_int
    malloc_trim(0)
    return True
