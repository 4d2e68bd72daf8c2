"""Machine facts recorded with every benchmark figure (CPU model, SIMD flags, threads, torch)."""

from __future__ import annotations

import platform
import re

import torch

_FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def machine_info() -> dict:
    """CPU model and the SIMD flags that matter for these kernels, as read from /proc/cpuinfo."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = open("/proc/cpuinfo").read()
        found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        model = found.group(1).strip() if found else model
        line = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        flags = set(line.group(1).split()) if line else set()
    except OSError:
        pass
    return {"cpu": model, "flags": [f for f in _FLAGS_OF_INTEREST if f in flags], "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def describe(info: dict) -> str:
    return f"{info['cpu']} | {info['threads']} threads | flags: {' '.join(info['flags']) or 'none'} | torch {info['torch']}"
