"""nmfx's C++ CPU kernels, built on first use.

``nm_linear(x, values, indices, bias, n, m, index_bits)`` computes ``x @ W^T + bias`` for a weight in
nmfx's packed format (see :mod:`nmfx.packed`); ``nm_mask(w, n, m)`` is the N:M mask of ``w`` along its
last dimension in one pass (what :func:`nmfx.pattern.nm_mask` uses on the CPU); ``available()`` says
whether the kernels could be built.

Build: ``torch.utils.cpp_extension.load`` compiles ``nm_linear_cpu.cpp`` and ``nm_mask_cpu.cpp`` once
(about a minute; a line on stderr says so), with ``-O3`` and explicit ISA flags for the host's best
supported instruction set (``avx512bf16``: ``avx512`` plus AVX512-BF16 dot products; ``avx512``:
F/BW/VL/DQ; ``avx2``: AVX2+FMA+F16C; ``scalar`` otherwise), chosen at runtime from ``/proc/cpuinfo``
(or torch's CPU capability). The build is cached in ``$NMFX_CACHE_DIR`` (default ``~/.cache/nmfx``)
under a directory keyed by the torch version, the ISA and a hash of the sources and flags, so
machines sharing a home directory but not an ISA never load each other's binaries.
``NMFX_CPU_ISA=avx512|avx2|scalar`` forces a lesser ISA (for testing).

If the build fails (no compiler, no ninja, ...), ``available()`` is False and :func:`load` warns once;
:mod:`nmfx.inference_ops` then falls back to the plain-torch reference and ``nm_mask`` to its
plain-torch version.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import sysconfig
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

__all__ = ["available", "load", "isa", "nm_linear", "nm_mask", "build_error", "cache_dir"]

_SOURCES = [Path(__file__).with_name(name) for name in ("nm_linear_cpu.cpp", "nm_mask_cpu.cpp")]
_ISA_FLAGS = {
    "avx512bf16": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "scalar": [],
}
_ISA_NEEDS = {
    "avx512bf16": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx2", "fma", "f16c"},
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"},
    "avx2": {"avx2", "fma", "f16c"},
}
_COMMON_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=fast"]

_lock = threading.Lock()
_module = None
_error: Optional[str] = None
_warned = False


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _detect_isa() -> str:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "scalar"
    flags = _cpu_flags()
    if flags:
        for name in ("avx512bf16", "avx512", "avx2"):
            if _ISA_NEEDS[name] <= flags:
                return name
        return "scalar"
    cap = torch.backends.cpu.get_cpu_capability().upper()  # no /proc/cpuinfo: trust torch's detection
    return "avx512" if cap.startswith("AVX512") else "avx2" if cap == "AVX2" else "scalar"


def isa() -> str:
    """The instruction set the kernel is (or would be) built for on this machine."""
    forced = os.environ.get("NMFX_CPU_ISA", "").strip().lower()
    best = _detect_isa()
    order = ["scalar", "avx2", "avx512", "avx512bf16"]
    if forced:
        if forced not in order:
            raise ValueError(f"NMFX_CPU_ISA must be one of {order}, got {forced!r}")
        if order.index(forced) > order.index(best):
            raise ValueError(f"NMFX_CPU_ISA={forced} but this CPU supports at most {best}")
        return forced
    return best


def cache_dir() -> Path:
    root = os.environ.get("NMFX_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "nmfx"


def _ensure_ninja_on_path() -> None:
    """cpp_extension runs ``ninja`` from PATH. The ``ninja`` wheel (a dependency) installs it beside
    the interpreter, which is not on PATH when a venv's python runs without the venv activated: add
    that one directory then."""
    if shutil.which("ninja") is None:
        scripts = sysconfig.get_path("scripts")
        if scripts and os.path.exists(os.path.join(scripts, "ninja")):
            os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")


def load():
    """Build (first time) and import the extension; None if that fails (warns once)."""
    global _module, _error, _warned
    if _module is not None or _error is not None:
        return _module
    with _lock:
        if _module is not None or _error is not None:
            return _module
        try:
            from torch.utils import cpp_extension

            target = isa()
            cflags = _COMMON_FLAGS + _ISA_FLAGS[target]
            digest = hashlib.sha256(b"".join(p.read_bytes() for p in _SOURCES) + " ".join(cflags).encode()).hexdigest()[:12]
            tag = f"torch{torch.__version__}-{platform.machine()}-{target}-{digest}".replace("+", "_")
            build = cache_dir() / "nm_linear_cpu" / tag
            build.mkdir(parents=True, exist_ok=True)
            _ensure_ninja_on_path()
            name = f"nmfx_nm_linear_cpu_{target}_{digest}"
            if not (build / f"{name}.so").exists():
                print(f"nmfx: compiling the C++ CPU kernels for {target} (once per machine and torch version, "
                      f"about a minute; cached in {build})", file=sys.stderr, flush=True)
            _module = cpp_extension.load(
                name=name,
                sources=[str(p) for p in _SOURCES],
                extra_cflags=cflags,
                extra_ldflags=["-fopenmp"],
                build_directory=str(build),
                verbose=False,
            )
        except Exception as exc:  # no compiler, no ninja, a compile error...: fall back, loudly once
            _error = f"{type(exc).__name__}: {exc}"
            if not _warned:
                _warned = True
                warnings.warn(
                    "nmfx: could not build the C++ CPU kernel for nm_linear (and nm_mask); falling back to "
                    f"the (slow) plain-torch reference. Reason: {_error[:2000]}",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return _module


def available() -> bool:
    """True when the C++ kernel is built (building it now if needed)."""
    return load() is not None


def build_error() -> Optional[str]:
    """Why the build failed, or None."""
    load()
    return _error


def nm_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bias: Optional[torch.Tensor],
    n: int,
    m: int,
    index_bits: int,
    path: int = 0,
) -> torch.Tensor:
    """``x @ W^T + bias`` with the C++ kernel (see ``nmfx.inference_ops`` for the argument layout).

    ``path``: 0 picks by batch size, 1 forces the gather (GEMV) path, 2 the batched path; for tests.
    Raises RuntimeError if the kernel is unavailable.
    """
    mod = load()
    if mod is None:
        raise RuntimeError(f"nmfx C++ CPU kernel unavailable: {_error}")
    return mod.nm_linear(x, values, indices, bias, int(n), int(m), int(index_bits), int(path))


def nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean N:M mask of a CPU tensor along its last dimension, by the C++ kernel (the rule of
    :func:`nmfx.pattern.nm_mask`). Raises RuntimeError if the kernel is unavailable."""
    mod = load()
    if mod is None:
        raise RuntimeError(f"nmfx C++ CPU kernel unavailable: {_error}")
    return mod.nm_mask(w, int(n), int(m))
