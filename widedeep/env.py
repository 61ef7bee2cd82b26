"""The environment a run or benchmark ran in, as a flat JSON-serialisable dict."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import subprocess
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# glibc's mallopt parameters, and the largest mmap threshold it accepts on 64-bit Linux.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX = -1, -3, 32 * 2**20
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")  # glibc's own knobs
_retained: bool | None = None  # None until retain_freed_memory() has run


def retain_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS.

    The batched engine allocates and frees the same few tensors of a few hundred KB to a few
    MB every step. By default glibc hands such blocks back to the OS on free (mmap'd blocks,
    and the top of the heap above its trim threshold), so every step pays page faults to
    touch fresh pages again: on the 2-core dev VM that cost more than the arithmetic for 64
    lecture nets. Blocks up to 32 MiB now come from the heap and stay there (the process
    keeps its peak footprint; larger blocks are still mmap'd and returned). Does nothing off
    glibc or when the user set MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ themselves.
    Returns whether the setting is in effect; idempotent.
    """
    global _retained
    if _retained is None:
        _retained = False
        user_set = any(k in os.environ for k in _MALLOC_ENV)
        name = ctypes.util.find_library("c")
        if platform.libc_ver()[0] == "glibc" and name and not user_set:
            libc = ctypes.CDLL(name)
            _retained = bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
                             and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _retained


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd,
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(device: torch.device | None = None) -> dict:
    """torch version, threads, CPU model and count, CUDA device name if any, Python, OS, and
    what the batched engine's process-wide settings were (None: not used yet)."""
    from widedeep import fused  # batched engine module: imports this one

    cuda = torch.cuda.is_available()
    use_cuda = device is not None and device.type == "cuda"
    return {
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "malloc_retains_freed": bool(_retained),
        "fused_step": fused.status(),
        "fused_lanes": fused.lanes(),
        "cuda_available": cuda,
        "cuda_device": torch.cuda.get_device_name(device if use_cuda else 0) if cuda else None,
    }
