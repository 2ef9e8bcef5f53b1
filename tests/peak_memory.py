"""For tests that read a child process's peak resident memory (``process_memory.peak_usage``:
VmHWM, not ``ru_maxrss``, which a child inherits from the test process across exec)."""

import os


def fixed_mmap_threshold() -> dict:
    """The environment for a process whose peak resident memory is measured. glibc's malloc
    raises its mmap threshold each time a large block is freed; later blocks of that size then
    come from the heap and stay resident after they are freed, so the same run peaked anywhere
    from 46 to 123 MB above its start. With a fixed threshold every block over 1 MiB is handed
    back to the system when freed, and the peak counts only what was alive at once."""
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
