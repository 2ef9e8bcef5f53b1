"""How much memory this process holds and may still take (CPU: /proc and cgroups; GPU: the
allocator), sizes written by users, and handing freed heap pages back to the system."""

from __future__ import annotations

import ctypes
import math
import os
import re
import sys

import torch

from .errors import PrunekitError

MiB = 2**20


SIZE_FORMS = "a size like 16G, 1.5GiB or 500MB (K, M, G, T: powers of 1024; B or iB optional)"
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([KMGT])(?:i?B)?)?\s*", re.IGNORECASE)


def parse_memory(value) -> int:
    """Bytes from a size with its unit: a number, decimals allowed, then K, M, G or T (powers of
    1024), B or iB after it optional, any case ("16G", "1.5GB", "2GiB", "500mb"); or a number of
    bytes of at least 1 MiB: an int, or a float or string whose value is a whole number ("3000000000",
    "3000000000.0" as old versions recorded it, 3e9, "1.5e9"); "500" meant as 500 MB is refused.
    Raises PrunekitError naming the accepted forms otherwise (zero, negative, "1.5", NaN)."""
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match and match[2]:
        size = int(float(match[1]) * 1024 ** ("KMGT".index(match[2].upper()) + 1))
        if size < 1:
            raise PrunekitError(f"max_memory must be {SIZE_FORMS}, above zero, got {value!r}")
        return size
    size = _whole_bytes(value)
    if size is not None and size >= MiB:
        return size
    if size is not None or isinstance(value, float) or match or _is_number(value):
        raise PrunekitError(f"max_memory must be {SIZE_FORMS}, got {value!r} (a number without a unit is "
                            "a whole number of bytes, 1M at least)")
    raise PrunekitError(f"max_memory must be {SIZE_FORMS}, got {value!r}")


def _whole_bytes(value) -> int | None:
    """``value`` as a whole number of bytes (an int; a float or a string of one, "3e9", with no
    fraction), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    number = value if isinstance(value, float) else _as_float(value)
    if number is None or not math.isfinite(number) or not number.is_integer():
        return None
    return int(number)


def _as_float(value) -> float | None:
    if not isinstance(value, str) or "_" in value:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _is_number(value) -> bool:
    return _as_float(value) is not None


def default_limit(device: torch.device) -> int:
    """What this process may still grow to: what it holds now plus the memory available to it,
    less a margin of 5 % of the available memory and at least 512 MB."""
    available = available_memory(device)
    return current_usage(device) + available - max(512 * MiB, available // 20)


def available_memory(device: torch.device) -> int:
    """Bytes still available: on a GPU its free memory; on the CPU MemAvailable of
    /proc/meminfo, or less if a cgroup (v2 or v1) limits this process."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    candidates = [_meminfo_available()]
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2**60:
            candidates.append(max(0, limit - usage))
    return min(c for c in candidates if c is not None)


def current_usage(device: torch.device) -> int:
    """Bytes this process holds now: its resident set (CPU) or allocated tensors (GPU)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_usage() -> int:
    """Bytes this process has held resident at most so far: VmHWM of /proc/self/status on Linux.
    Not ``ru_maxrss``, which on Linux keeps the resident size of the process that launched this
    one across exec (a 1.5 GB Python parent: a fresh child's ru_maxrss read 1,510 MB, its VmHWM
    9 MB); elsewhere ru_maxrss (macOS: bytes)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def release_freed_memory() -> None:
    """Hand the pages malloc keeps after ``free`` back to the system (glibc's ``malloc_trim``).

    The gradient phase allocates and frees many blocks under glibc's mmap threshold (which it
    raises up to 32 MB as large blocks are freed); their pages stay in the process, resident,
    while the solver's p-long arrays (above the threshold) are mapped anew beside them: ResNet-50
    (n = 8) entered FALCON holding 0.9 GB of such pages. A no-op where there is no glibc."""
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = False
        if sys.platform.startswith("linux"):
            try:
                _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):
                pass
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None                  # absent, or "max" (no limit)
