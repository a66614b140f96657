"""Peak growth of this process's resident set over a block of CPU work (the CPU benchmarks' memory figure).

With `use_mmap_above(libc, 128 KiB)` glibc serves every larger allocation with mmap, so freed buffers
leave the resident set at once (torch's CPU allocator caches nothing); `libc.malloc_trim(0)` returns
the rest before the baseline (VmRSS in /proc/self/status) is read; writing 5 to /proc/self/clear_refs
resets the kernel's high-water mark, so VmHWM − baseline after the block is what the block held at
its peak.
"""

from __future__ import annotations

import contextlib

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def status_kib(field: str) -> int:
    """A `/proc/self/status` field in KiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def use_mmap_above(libc, threshold_bytes: int = 128 * 1024) -> None:
    """glibc: allocations of at least `threshold_bytes` are mmapped (and unmapped when freed)."""
    libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes)


@contextlib.contextmanager
def peak_rss_growth(libc):
    """`with peak_rss_growth(libc) as peak:` ... then `peak["bytes"]`: the block's peak resident-set
    growth above the trimmed resident set at its start."""
    libc.malloc_trim(0)
    base = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the resident-set high-water mark
    peak: dict[str, int] = {}
    yield peak
    peak["bytes"] = (status_kib("VmHWM") - base) * 1024
