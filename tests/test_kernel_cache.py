"""The C++ kernel cache (nmfx.kernels.cpu) cannot be hijacked or wedged.

Compiling the real kernels takes about a minute, so these tests never compile them: the cache logic
runs with ``cpu._compile`` replaced by a fake "build" that writes a tiny real Python extension (a few
lines of C compiled in a fraction of a second) and imports it. The one test that needs the real
library (a truncated copy must be rebuilt, not crash the process) copies the one the session already
built (``cpu.load()``, shared with the other kernel tests) and runs in a subprocess.
"""

import os
import platform
import re
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from nmfx.kernels import cpu

_CC = shutil.which("cc") or shutil.which("gcc")
needs_cc = pytest.mark.skipif(_CC is None, reason="no C compiler for the tiny test extension")


@pytest.fixture(scope="session")
def tiny_ext(tmp_path_factory):
    """tiny_ext(name, origin, marker=None) -> bytes of a Python extension module ``name`` whose
    ``origin`` attribute is ``origin`` and which, when imported, creates the file ``marker``."""
    out = tmp_path_factory.mktemp("tiny_ext")
    built: dict = {}

    def make(name: str, origin: str, marker: "Path | None" = None) -> bytes:
        key = (name, origin, str(marker))
        if key not in built:
            touch = f'FILE* f = fopen("{marker}", "w"); if (f) fclose(f);' if marker else ""
            src = out / f"{len(built)}.c"
            src.write_text(textwrap.dedent(f"""
                #include <Python.h>
                #include <stdio.h>
                static int exec_module(PyObject* m) {{
                    {touch}
                    return PyModule_AddStringConstant(m, "origin", "{origin}");
                }}
                static PyModuleDef_Slot slots[] = {{{{Py_mod_exec, exec_module}}, {{0, NULL}}}};
                static struct PyModuleDef def = {{PyModuleDef_HEAD_INIT, "{name}", NULL, 0, NULL, slots}};
                PyMODINIT_FUNC PyInit_{name}(void) {{ return PyModuleDef_Init(&def); }}
            """))
            so = out / f"{len(built)}.so"
            subprocess.run([_CC, "-shared", "-fPIC", "-O0", f"-I{sysconfig.get_paths()['include']}", str(src),
                            "-o", str(so)], check=True, capture_output=True)
            built[key] = so.read_bytes()
        return built[key]

    return make


@pytest.fixture
def cache(tmp_path, monkeypatch, tiny_ext):
    """A fresh cache root (NMFX_CACHE_DIR) and a fake build: ``cache.builds`` lists the names built."""

    class Cache:
        root = tmp_path / "cache"
        builds: list = []

        @property
        def kdir(self) -> Path:
            return self.root / "nm_linear_cpu"

    c = Cache()
    c.builds = []
    monkeypatch.setenv("NMFX_CACHE_DIR", str(c.root))
    monkeypatch.setattr(cpu, "_unsafe_warned", set())

    def fake_compile(name, cflags, ldflags, build_dir):
        c.builds.append(name)
        so = Path(build_dir) / f"{name}.so"
        so.write_bytes(tiny_ext(name, "fake-build"))
        return cpu._import_library(name, so)

    monkeypatch.setattr(cpu, "_compile", fake_compile)
    c.name = cpu._library_name(cpu.isa())[0]
    return c


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ------------------------------------------------------------------------------------------------
# Verification: only libraries nmfx built and recorded are loaded
# ------------------------------------------------------------------------------------------------
@needs_cc
@pytest.mark.parametrize("record", ["none", "other hash", "garbage"])
def test_planted_library_is_not_loaded(cache, tiny_ext, tmp_path, capsys, record):
    """A library planted at the cached name (no record, a record of another file, an unreadable record)
    is never imported: nmfx says why, rebuilds, and the next load uses the verified rebuild."""
    marker = tmp_path / "planted-code-ran"
    cpu._make_private_dirs(cache.kdir)
    # a new file renamed over it, as a swap would be: rewriting the loaded library's own inode in place
    # corrupts the pages this process has mapped and crashes it at exit
    swapped = cache.kdir / f"{cache.name}.so.swap"
    swapped.write_bytes(tiny_ext(cache.name, "planted", marker))
    os.replace(swapped, cache.kdir / f"{cache.name}.so")
    if record == "other hash":
        (cache.kdir / f"{cache.name}.json").write_text('{"sha256": "%s"}' % ("0" * 64))
    elif record == "garbage":
        (cache.kdir / f"{cache.name}.json").write_text("[not json")
    module, _ = cpu._load_or_build(cpu.isa())
    assert module.origin == "fake-build" and cache.builds == [cache.name]
    assert not marker.exists(), "the planted library's code ran"
    assert f"not loading the cached kernel library {cache.kdir / cache.name}.so" in capsys.readouterr().err
    again, _ = cpu._load_or_build(cpu.isa())  # a later process: verified, loaded without building
    assert again.origin == "fake-build" and cache.builds == [cache.name]


@needs_cc
def test_replaced_library_with_a_matching_old_record_is_not_loaded(cache, tiny_ext, tmp_path):
    """A genuine build whose library was later swapped: the recorded sha256 no longer matches."""
    cpu._load_or_build(cpu.isa())
    marker = tmp_path / "swapped-code-ran"
    # a new file renamed over it, as a swap would be: rewriting the loaded library's own inode in place
    # corrupts the pages this process has mapped and crashes it at exit
    swapped = cache.kdir / f"{cache.name}.so.swap"
    swapped.write_bytes(tiny_ext(cache.name, "planted", marker))
    os.replace(swapped, cache.kdir / f"{cache.name}.so")
    assert cpu._load_or_build(cpu.isa())[0].origin == "fake-build"
    assert not marker.exists() and len(cache.builds) == 2


@needs_cc
def test_the_no_build_probe_never_imports_a_planted_library(cache, tiny_ext, tmp_path):
    """``cached()`` (what nm_mask, hence nmfx.sparsify, asks) loads only a verified library too: a planted one
    is not imported (its code never runs) and nothing is built."""
    marker = tmp_path / "planted-code-ran"
    cpu._make_private_dirs(cache.kdir)
    (cache.kdir / f"{cache.name}.so").write_bytes(tiny_ext(cache.name, "planted", marker))
    assert cpu._load_cached(cpu.isa()) is None
    assert not marker.exists() and cache.builds == []
    cpu._load_or_build(cpu.isa())  # a genuine, recorded build replaces it: now the probe loads that
    found = cpu._load_cached(cpu.isa())
    assert found is not None and found[0].origin == "fake-build" and not marker.exists()


@pytest.fixture(scope="session")
def real_library(tmp_path_factory):
    """A verified copy of the real kernel library this session built (or found) in its cache."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if not cpu.available():
            pytest.skip(f"nmfx C++ CPU kernel could not be built: {cpu.build_error()}")
    lib = cpu._loaded_library
    assert lib is not None and cpu._verify(lib, lib.with_suffix(".json")) is None
    keep = tmp_path_factory.mktemp("real_library")
    shutil.copy2(lib, keep / lib.name)
    shutil.copy2(lib.with_suffix(".json"), keep / lib.with_suffix(".json").name)
    return keep / lib.name


_SUBPROCESS_LOAD = """
import shutil, sys, torch
from pathlib import Path
from nmfx.kernels import cpu
from nmfx.inference_ops import nm_linear_reference
GOOD, ALLOW_BUILD = Path(sys.argv[1]), sys.argv[2] == "1"
builds = []
def fake_compile(name, cflags, ldflags, build_dir):  # a "rebuild" that restores the good library
    assert ALLOW_BUILD, "must not build: a verified library is cached"
    builds.append(name)
    shutil.copyfile(GOOD, Path(build_dir) / f"{name}.so")
    return cpu._import_library(name, Path(build_dir) / f"{name}.so")
cpu._compile = fake_compile
assert cpu.available(), cpu.build_error()
x, v, i = torch.randn(3, 64), torch.randn(5, 8), torch.randint(0, 8, (5, 8), dtype=torch.uint8)
assert torch.allclose(cpu.nm_linear(x, v, i, None, 1, 8, 8), nm_linear_reference(x, v, i, None, 1, 8, 8), atol=1e-5)
print("ok builds", len(builds))
"""


def test_truncated_library_is_rebuilt_not_a_crash(real_library, tmp_path):
    """The issue: a truncated cached .so killed every later process (SIGBUS). Now its sha256 fails,
    it is rebuilt and replaced atomically, and the next process loads the good one without building."""
    kdir = tmp_path / "cache" / "nm_linear_cpu"
    cpu._make_private_dirs(kdir)
    lib = kdir / real_library.name
    data = real_library.read_bytes()
    lib.write_bytes(data[: len(data) // 3])
    shutil.copy2(real_library.with_suffix(".json"), lib.with_suffix(".json"))
    env = {**os.environ, "NMFX_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-c", _SUBPROCESS_LOAD, str(real_library)]
    first = subprocess.run(cmd + ["1"], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and "ok builds 1" in first.stdout, first.stdout + first.stderr[-3000:]
    assert "does not match the recorded" in first.stderr
    assert lib.read_bytes() == data
    second = subprocess.run(cmd + ["0"], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "ok builds 0" in second.stdout, second.stdout + second.stderr[-3000:]


# ------------------------------------------------------------------------------------------------
# Directories: private, refused when others can write
# ------------------------------------------------------------------------------------------------
@needs_cc
def test_new_directories_and_files_are_private_under_umask_0(cache):
    old = os.umask(0)
    try:
        cpu._load_or_build(cpu.isa())
    finally:
        os.umask(old)
    assert _mode(cache.root) == 0o700 and _mode(cache.kdir) == 0o700
    assert _mode(cache.kdir / f"{cache.name}.so") == 0o700
    assert _mode(cache.kdir / f"{cache.name}.json") == 0o600
    assert _mode(cache.kdir / f"{cache.name}.lock") == 0o600
    assert not list(cache.kdir.glob(".build-*")), "the temporary build directory was left behind"


@needs_cc
@pytest.mark.parametrize("where", ["root", "kernel dir"])
@pytest.mark.parametrize("mode", [0o770, 0o707])
def test_writable_by_others_is_refused_with_one_warning(cache, tiny_ext, tmp_path, where, mode):
    """A cache directory others can write is not read (even a library with a matching record is
    ignored): nmfx warns once, naming it and the fix, and builds in a private temporary directory."""
    cpu._load_or_build(cpu.isa())  # a genuine, recorded build
    target = cache.root if where == "root" else cache.kdir
    os.chmod(target, mode)
    with pytest.warns(RuntimeWarning, match=rf"not using the kernel cache {re.escape(str(target))}: it is writable by "
                      rf".*chmod 700 {re.escape(str(target))}"):
        module, lib = cpu._load_or_build(cpu.isa())
    assert module.origin == "fake-build" and len(cache.builds) == 2
    private = lib.parent
    assert cache.root not in private.parents and _mode(private) == 0o700
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per directory
        cpu._load_or_build(cpu.isa())


@needs_cc
@pytest.mark.skipif(not hasattr(os, "getuid"), reason="no user ids on this platform")
def test_cache_owned_by_another_user_is_not_read(cache, monkeypatch):
    """A cache root owned by another user (seen here as this process running under another uid) is not read,
    even holding a recorded library: one warning naming the owner, a build in a private directory."""
    cpu._load_or_build(cpu.isa())  # a genuine, recorded build
    other = os.getuid() + 4242
    monkeypatch.setattr(os, "getuid", lambda: other)
    with pytest.warns(RuntimeWarning, match=rf"not using the kernel cache {re.escape(str(cache.root))}: it is owned by "
                      rf"uid \d+, not by you \(uid {other}\)"):
        module, lib = cpu._load_or_build(cpu.isa())
    assert module.origin == "fake-build" and len(cache.builds) == 2 and cache.root not in lib.parents


_PRIVATE_BUILD = """
import shutil, sys, warnings
from pathlib import Path
from nmfx.kernels import cpu
def fake_compile(name, cflags, ldflags, build_dir):
    shutil.copyfile(sys.argv[1], Path(build_dir) / f"{name}.so")
    return cpu._import_library(name, Path(build_dir) / f"{name}.so")
cpu._compile = fake_compile
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    module, lib = cpu._load_or_build(cpu.isa())
assert module.origin == "fake-build" and lib.exists() and len(caught) == 1, caught
print("built in", lib.parent)
"""


@needs_cc
def test_private_build_directory_is_removed_at_exit(cache, tiny_ext, tmp_path):
    """The fallback for an unsafe cache builds in a private temporary directory, gone when the process exits."""
    cpu._make_private_dirs(cache.kdir)
    os.chmod(cache.root, 0o777)
    library = tmp_path / "tiny.so"
    library.write_bytes(tiny_ext(cache.name, "fake-build"))
    env = {**os.environ, "NMFX_CACHE_DIR": str(cache.root)}
    done = subprocess.run([sys.executable, "-c", _PRIVATE_BUILD, str(library)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    private = Path(done.stdout.split("built in ", 1)[1].strip())
    assert cache.root not in private.parents and not private.exists()


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="needs root to chown")
def test_directory_owned_by_another_user_is_refused(tmp_path):
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, 4242, -1)
    assert "owned by uid 4242" in cpu._unsafe_reason(d)


# ------------------------------------------------------------------------------------------------
# Atomic installs and locks: nothing half-written, nothing wedged
# ------------------------------------------------------------------------------------------------
@needs_cc
def test_failed_build_leaves_nothing_at_the_final_path(cache, monkeypatch):
    def dies_midway(name, cflags, ldflags, build_dir):
        (Path(build_dir) / f"{name}.so").write_bytes(b"\x7fELF half")
        raise RuntimeError("compiler killed")

    monkeypatch.setattr(cpu, "_compile", dies_midway)
    with pytest.raises(RuntimeError, match="compiler killed"):
        cpu._load_or_build(cpu.isa())
    assert not (cache.kdir / f"{cache.name}.so").exists() and not list(cache.kdir.glob(".build-*"))


@needs_cc
def test_dead_builds_directories_are_swept(cache):
    """A build killed by SIGKILL leaves its temporary directory (with torch's ``lock`` file in it): the
    next build removes it, and is not blocked by it."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    cpu._make_private_dirs(cache.kdir)
    left = cache.kdir / f".build-{dead.pid}@{platform.node()}-x1"
    left.mkdir()
    (left / "lock").write_text("")
    cpu._load_or_build(cpu.isa())
    assert not left.exists() and cache.builds == [cache.name]


_HOLD_LOCK = """
import sys, time
from pathlib import Path
from nmfx.kernels import cpu
with cpu._build_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


def _holder(lock: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(lock)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_of_a_killed_builder_is_taken_over_at_once(tmp_path, capsys):
    """The builder is SIGKILLed while holding the lock: the next process gets it immediately and says so."""
    lock = tmp_path / "x.lock"
    proc = _holder(lock)
    assert f"pid {proc.pid}" in lock.read_text()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    start = time.monotonic()
    with cpu._build_lock(lock) as held:
        assert held and f"pid {os.getpid()}" in lock.read_text()
    assert time.monotonic() - start < 5
    assert f"build (pid {proc.pid}) did not finish (no longer running)" in capsys.readouterr().err
    assert lock.read_text() == ""  # released cleanly: no stale owner for the next one


def test_hung_builder_is_given_up_on_after_the_bound(tmp_path, capsys, monkeypatch):
    """A holder alive but stuck: the waiter stops after _LOCK_WAIT_S and builds separately."""
    lock = tmp_path / "x.lock"
    proc = _holder(lock)
    try:
        monkeypatch.setattr(cpu, "_LOCK_WAIT_S", 1.0)
        start = time.monotonic()
        with cpu._build_lock(lock) as held:
            assert held is False
        assert 0.9 <= time.monotonic() - start < 10
        err = capsys.readouterr().err
        assert f"waiting for pid {proc.pid}" in err and "gave up waiting" in err
    finally:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------------------------------------
# The key: everything that shapes the binary
# ------------------------------------------------------------------------------------------------
def test_key_covers_sources_flags_and_compiler(tmp_path, monkeypatch):
    a, b = tmp_path / "a.cpp", tmp_path / "b.cpp"
    a.write_text("int f() { return 1; }\n")
    b.write_text("int g() { return 2; }\n")
    base = cpu._build_key(["-O3"], ["-fopenmp"], [a, b])
    assert cpu._build_key(["-O3"], ["-fopenmp"], [a, b]) == base  # deterministic
    assert cpu._build_key(["-O2"], ["-fopenmp"], [a, b]) != base
    assert cpu._build_key(["-O3"], [], [a, b]) != base
    assert cpu._build_key(["-O3"], ["-fopenmp"], [b, a]) != base
    b.write_text("int g() { return 3; }\n")  # another checkout's source
    assert cpu._build_key(["-O3"], ["-fopenmp"], [a, b]) != base
    b.write_text("int g() { return 2; }\n")
    monkeypatch.setenv("CXX", "/bin/false")  # another compiler
    assert cpu._build_key(["-O3"], ["-fopenmp"], [a, b]) != base
    monkeypatch.delenv("CXX")
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")  # another venv's torch
    assert cpu._build_key(["-O3"], ["-fopenmp"], [a, b]) != base
    monkeypatch.undo()
    assert cpu._build_key(["-O3"], ["-fopenmp"], [a, b]) == base
    from torch.utils import cpp_extension

    for target, name, value in [
        (cpp_extension, "include_paths", lambda *args, **kwargs: ["/another/venv/include"]),  # another venv's headers
        (sys, "version", "3.99.0 (another interpreter)"),
        (torch.version, "git_version", "0" * 40),  # another torch build of the same version
        (platform, "machine", lambda: "another-arch"),
    ]:
        monkeypatch.setattr(target, name, value)
        assert cpu._build_key(["-O3"], ["-fopenmp"], [a, b]) != base, name
        monkeypatch.undo()
    monkeypatch.setattr(sysconfig, "get_config_var", lambda key: ".other-abi.so" if key == "EXT_SUFFIX" else None)
    assert cpu._build_key(["-O3"], ["-fopenmp"], [a, b]) != base
