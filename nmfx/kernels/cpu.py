"""nmfx's C++ CPU kernels, built on first use and cached.

``nm_linear(x, values, indices, bias, n, m, index_bits)`` computes ``x @ W^T + bias`` for a weight in
nmfx's packed format (see :mod:`nmfx.packed`); ``nm_mask(w, n, m)`` is the N:M mask of ``w`` along its
last dimension in one pass (what :func:`nmfx.pattern.nm_mask` uses on the CPU); ``available()`` says
whether the kernels could be built (building them if needed), ``build_error()`` why not, ``cached()``
whether they are loaded or verified in the cache (loading them then, never compiling: what ``nm_mask``
asks, so sparsify/training never starts the build; ``to_inference`` and the first ``nm_linear`` call do).
Loading the library also registers ``torch.ops.nmfx.nm_linear``'s C++ kernel for the CPU dispatch key
(and a C++ "no backward" autograd kernel), so eager calls of the op on CPU tensors run no Python.

Build: ``torch.utils.cpp_extension.load`` compiles ``nm_linear_cpu.cpp`` and ``nm_mask_cpu.cpp`` once
(about a minute; a line on stderr says so), with ``-O3`` and explicit ISA flags for the host's best
supported instruction set (``avx512bf16``: ``avx512`` plus AVX512-BF16 dot products; ``avx512``:
F/BW/VL/DQ; ``avx2``: AVX2+FMA+F16C; ``scalar`` otherwise), chosen at runtime from ``/proc/cpuinfo``
(or torch's CPU capability). ``NMFX_CPU_ISA=avx512|avx2|scalar`` forces a lesser ISA (for testing).
The kernels check their own arguments and never read outside their inputs (see the "Bounds" note in
``nm_linear_cpu.cpp``).

The cache (the library is native code that nmfx runs, so it is treated as untrusted until verified):

* Location: ``cache_dir()/nm_linear_cpu/`` with ``cache_dir()`` = ``$NMFX_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/nmfx``, else ``~/.cache/nmfx``.
* Modes: directories nmfx creates are chmod-ed 0700 (whatever the umask). The root and
  ``nm_linear_cpu/`` must be directories owned by the current user and not writable by group or
  others; otherwise nmfx warns once (naming the directory and the fix) and builds in a fresh private
  ``tempfile.mkdtemp`` directory, removed at exit, instead of reading the cache.
* Key: the library is ``nmfx_nm_linear_cpu_<isa>_<key>.so``, ``key`` a sha256 (first 16 hex digits)
  over the sources, the compiler (``$CXX`` or ``c++``: resolved path and ``--version`` output), the
  compile and link flags, torch's include paths, the Python version and extension suffix, the torch
  version and git hash, and the machine. Checkouts with different sources, or venvs with a different
  torch, get different files side by side instead of rebuilding each other's.
* Verification: after a successful build, ``<name>.json`` records the library's sha256. A cached
  library is imported only if its sha256 matches that record; a library without a record (planted),
  truncated or replaced is reported on stderr and rebuilt, never loaded.
* Atomic install: each build runs in a fresh temporary directory ``nm_linear_cpu/.build-<pid>@<host>-*``
  (so torch's own ``lock`` file there is never shared and never stale), then the library is moved to
  its final name with ``os.replace`` and the record written the same way: a killed build never leaves
  a half-written library at the final path, and processes that already mapped the old file keep it.
  Leftover build directories of dead processes (or older than a day) are removed by the next build.
* Lock: concurrent processes wait on an ``flock`` of ``<name>.lock`` (holding ``pid <pid> host
  <host>`` while held) so one builds and the others load its result. The operating system releases
  the lock when its holder dies, so a killed build never wedges later ones (the next builder says that
  it took it over); a holder alive but hung for more than 10 minutes is given up on with a message and
  the waiter builds separately.

If the build fails (no compiler, no ninja, ...), ``available()`` is False, ``build_error()`` says why
and :func:`load` warns once; :mod:`nmfx.inference_ops` then falls back to the plain-torch reference and
``nm_mask`` to its plain-torch version.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import platform
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Iterator, Optional

import torch

try:
    import fcntl
except ImportError:  # not POSIX: no build lock (installs stay atomic)
    fcntl = None  # type: ignore[assignment]

__all__ = ["available", "load", "loaded", "cached", "isa", "nm_linear", "nm_mask", "build_error", "cache_dir"]

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
_probed = False  # load(build=False) looked for a cached library once


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
    """The configured cache root: ``$NMFX_CACHE_DIR``, else ``$XDG_CACHE_HOME/nmfx``, else ``~/.cache/nmfx``."""
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


# ---------------------------------------------------------------------------------------------
# The cache: private directories, a key over everything that shapes the binary, verified libraries,
# a lock that dies with its holder, atomic installs.
# ---------------------------------------------------------------------------------------------
_KERNEL = "nm_linear_cpu"
_LOCK_WAIT_S = 600.0  # longest wait for another process's build before building separately
_unsafe_warned: set = set()
_loaded_library: Optional[Path] = None  # the file the extension was loaded from
_private_dirs: list = []


def _say(msg: str) -> None:
    print(f"nmfx: {msg}", file=sys.stderr, flush=True)


def _unsafe_reason(path: Path) -> Optional[str]:
    """Why ``path`` may not hold libraries nmfx loads (None if it may): it must be a directory owned
    by this user and writable by nobody else."""
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"it is owned by uid {st.st_uid}, not by you (uid {os.getuid()})"
    writers = [who for who, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if st.st_mode & bit]
    if writers:
        return f"it is writable by {' and '.join(writers)} (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _make_private_dirs(path: Path) -> None:
    """``mkdir -p`` whose new directories are mode 0700 whatever the umask."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue  # another process made it; _unsafe_reason judges it
        os.chmod(d, 0o700)


def _kernel_dir() -> tuple[Path, bool]:
    """(directory for the kernel libraries, whether it is the shared cache). The shared cache is
    ``cache_dir()/nm_linear_cpu`` when it and its root are private; otherwise warn once, naming the
    directory and the fix, and use a fresh private directory (mkdtemp, 0700, removed at exit)."""
    root = cache_dir()
    kdir = root / _KERNEL
    reason, where = None, root
    try:
        for where in (root, kdir):  # the root is judged before anything is created inside it
            _make_private_dirs(where)
            reason = _unsafe_reason(where)
            if reason is not None:
                break
    except OSError as exc:
        reason = f"it cannot be used ({exc})"
    if reason is None:
        return kdir, True
    if str(where) not in _unsafe_warned:
        _unsafe_warned.add(str(where))
        warnings.warn(
            f"nmfx: not using the kernel cache {where}: {reason}. nmfx runs the native code it finds there, so "
            f"it must be a directory owned by you that no one else can write. Fix: `chmod 700 {where}` (as its "
            "owner), or set NMFX_CACHE_DIR to a directory only you can write. Building the C++ kernels in a "
            "private temporary directory instead (not reused by later processes).",
            RuntimeWarning,
            stacklevel=4,
        )
    private = Path(tempfile.mkdtemp(prefix="nmfx-kernels-"))
    _private_dirs.append(private)
    if len(_private_dirs) == 1:
        atexit.register(lambda: [shutil.rmtree(d, ignore_errors=True) for d in _private_dirs])
    return private, False


def _compiler_identity() -> str:
    """The C++ compiler cpp_extension will run (``$CXX`` or ``c++``): its resolved path and ``--version``."""
    cxx = os.environ.get("CXX", "c++")
    path = shutil.which(cxx) or cxx
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
        version = f"rc={done.returncode} {done.stdout}{done.stderr}"
    except (OSError, subprocess.SubprocessError) as exc:
        version = f"unavailable: {exc}"
    return f"{path} -> {os.path.realpath(path)}\n{version}"


def _build_key(cflags: list[str], ldflags: list[str], sources: list[Path] = _SOURCES) -> str:
    """sha256 over everything that shapes the library: the sources, the compiler (path and
    ``--version``), the flags, torch's include paths, the Python and torch versions, the machine."""
    from torch.utils import cpp_extension

    h = hashlib.sha256()
    parts = [p.read_bytes() for p in sources] + [
        _compiler_identity(),
        " ".join(cflags),
        " ".join(ldflags),
        "\n".join(cpp_extension.include_paths()),
        sys.version,
        sysconfig.get_config_var("EXT_SUFFIX") or "",
        torch.__version__,
        str(torch.version.git_version),
        platform.machine(),
    ]
    for part in parts:
        data = part if isinstance(part, bytes) else part.encode()
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verify(lib: Path, record: Path) -> Optional[str]:
    """Why ``lib`` must not be loaded (None if its sha256 matches the record written by its build)."""
    try:
        rec = json.loads(record.read_text())
    except FileNotFoundError:
        return "it has no build record (nmfx loads only libraries it built and recorded)"
    except (OSError, ValueError) as exc:
        return f"its build record is unreadable ({exc})"
    if not isinstance(rec, dict) or not isinstance(rec.get("sha256"), str):
        return "its build record is malformed"
    actual = _sha256(lib)
    if actual != rec["sha256"]:
        return f"its sha256 {actual[:16]}... does not match the recorded {rec['sha256'][:16]}... (truncated or replaced)"
    return None


def _import_library(name: str, lib: Path):
    """Import the extension module ``name`` from the file ``lib``."""
    loader = importlib.machinery.ExtensionFileLoader(name, str(lib))
    spec = importlib.util.spec_from_file_location(name, str(lib), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _load_verified(name: str, lib: Path, record: Path, say: bool = True):
    """The cached library imported if it exists and is verified, else None (saying why, if it exists)."""
    if not lib.exists():
        return None
    reason = _verify(lib, record)
    if reason is not None:
        if say:
            _say(f"not loading the cached kernel library {lib}: {reason}; rebuilding it")
        return None
    return _import_library(name, lib)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` while building (yields True), so concurrent processes
    build once. The kernel drops the lock when its holder dies, so a killed build never wedges later
    ones; a lock still held after ``_LOCK_WAIT_S`` (a hung build) is given up on with a message and
    the caller builds separately (yields False). The file holds the holder's pid and host while held,
    and is emptied on release: a pid found in it on acquiring is a build that died, and is reported."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if fcntl is None:  # no flock (not POSIX): the atomic install below keeps concurrent builds safe
            yield False
            return
        deadline = time.monotonic() + _LOCK_WAIT_S
        waiting = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    waiting = True
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                    _say(f"waiting for {holder} to finish building the kernels (lock {path}; at most {_LOCK_WAIT_S:.0f} s)")
                if time.monotonic() >= deadline:
                    _say(f"gave up waiting for the build lock {path} after {_LOCK_WAIT_S:.0f} s (a hung build?); "
                         "building separately")
                    yield False
                    return
                time.sleep(0.2)
        stale = os.pread(fd, 200, 0).decode(errors="replace").split()  # ["pid", "<pid>", "host", "<host>"]
        if stale:
            pid = stale[1] if len(stale) > 1 else "?"
            state = "no longer running" if pid.isdigit() and not _pid_alive(int(pid)) else "its lock was released"
            _say(f"a previous kernel build (pid {pid}) did not finish ({state}); taking over its lock {path}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} host {platform.node()}\n".encode(), 0)
        try:
            yield True
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _sweep_dead_builds(kdir: Path) -> None:
    """Remove temporary build directories left by builds that died (their pid, on this host, is gone)
    or that are more than a day old."""
    host = platform.node()
    for entry in kdir.glob(".build-*"):
        try:
            pid, _, rest = entry.name[len(".build-"):].partition("@")
            dead = rest.rsplit("-", 1)[0] == host and pid.isdigit() and not _pid_alive(int(pid))
            if dead or time.time() - entry.stat().st_mtime > 86400:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue


def _compile(name: str, cflags: list[str], ldflags: list[str], build_dir: Path):
    """Compile and import the extension ``name`` into ``build_dir`` (leaving ``build_dir/name.so``)."""
    from torch.utils import cpp_extension

    return cpp_extension.load(
        name=name,
        sources=[str(p) for p in _SOURCES],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        build_directory=str(build_dir),
        verbose=False,
    )


def _build_and_install(name: str, cflags: list[str], ldflags: list[str], kdir: Path, lib: Path, record: Path):
    """Build in a fresh temporary directory inside ``kdir``, then move the library to ``lib`` with an
    atomic rename and write its record (sha256); a build killed midway leaves nothing at ``lib``."""
    _sweep_dead_builds(kdir)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{os.getpid()}@{platform.node()}-", dir=kdir))
    try:
        _say(f"compiling the C++ CPU kernels for {isa()} (once per machine, compiler and torch version, "
             f"about a minute; cached in {kdir})")
        module = _compile(name, cflags, ldflags, tmp)
        built = tmp / f"{name}.so"
        digest = _sha256(built)
        os.chmod(built, 0o700)
        os.replace(built, lib)
        part = tmp / "record.json"
        part.write_text(json.dumps({"sha256": digest, "library": lib.name, "torch": torch.__version__}))
        os.chmod(part, 0o600)
        os.replace(part, record)
        return module
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _library_name(target: str) -> tuple[str, list[str], list[str]]:
    """(module and file name, compile flags, link flags) of the extension for ISA ``target``."""
    cflags = _COMMON_FLAGS + _ISA_FLAGS[target]
    ldflags = ["-fopenmp"]
    return f"nmfx_nm_linear_cpu_{target}_{_build_key(cflags, ldflags)[:16]}", cflags, ldflags


def _load_cached(target: str) -> Optional[tuple]:
    """(the extension for ISA ``target``, its file) if a verified library for it is in the shared
    cache, else None; never builds (an unverifiable file is left for the next build to replace)."""
    name, _, _ = _library_name(target)
    kdir, shared = _kernel_dir()
    lib, record = kdir / f"{name}.so", kdir / f"{name}.json"
    module = _load_verified(name, lib, record, say=False) if shared else None
    return None if module is None else (module, lib)


def _load_or_build(target: str) -> tuple:
    """(the extension for ISA ``target``, the library file it came from): a verified cached library, or
    a fresh build installed in the cache."""
    name, cflags, ldflags = _library_name(target)
    kdir, shared = _kernel_dir()
    lib, record = kdir / f"{name}.so", kdir / f"{name}.json"
    if not shared:
        return _build_and_install(name, cflags, ldflags, kdir, lib, record), lib
    module = _load_verified(name, lib, record)
    if module is None:
        with _build_lock(kdir / f"{name}.lock"):
            module = _load_verified(name, lib, record, say=False)  # built by the process we waited for?
            if module is None:
                module = _build_and_install(name, cflags, ldflags, kdir, lib, record)
    return module, lib


def load(build: bool = True):
    """The extension, building it first if needed (about a minute, once per machine); None if that
    fails (warns once). With ``build=False`` a verified library already in the cache is loaded, but
    nothing is compiled: None then means "not built yet" (looked up once per process), and a later
    ``load()`` still builds. Loading the library also registers ``torch.ops.nmfx.nm_linear``'s C++ CPU
    kernel."""
    return _load(build)


def cached() -> bool:
    """True when the extension is loaded, or a verified library for it is in the cache (it is loaded
    then); never compiles. For callers that should not start the minute-long build (``nm_mask``)."""
    return _load(False) is not None


def _load(build: bool):
    global _module, _error, _warned, _loaded_library, _probed
    if _module is not None or _error is not None or (not build and _probed):
        return _module
    with _lock:
        if _module is not None or _error is not None or (not build and _probed):
            return _module
        try:
            _ensure_ninja_on_path()
            if build:
                _module, _loaded_library = _load_or_build(isa())
            else:
                _probed = True
                found = _load_cached(isa())
                if found is not None:
                    _module, _loaded_library = found
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


def loaded() -> bool:
    """True when the extension is already loaded in this process (never builds or reads the cache)."""
    return _module is not None


def available() -> bool:
    """True when the C++ kernel is built (building it now if needed)."""
    return load() is not None


def build_error() -> Optional[str]:
    """Why the build failed, or None."""
    load()
    return _error


def nm_linear(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: Optional[torch.Tensor], n: int, m: int,
              index_bits: int, path: int = 0) -> torch.Tensor:
    """``x @ W^T + bias`` with the C++ kernel (the argument layout: ``nmfx.kernels.nm_linear_args``).

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
