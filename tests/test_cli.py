"""python -m nmfx: demo, inspect and bench end to end (subprocesses, as a user runs them)."""

import subprocess
import sys

import pytest


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "nmfx", *args], capture_output=True, text=True, timeout=timeout)


def test_demo_trains_dense_and_sparse_and_compares_speed():
    done = _run("demo", "--steps", "30", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "dense" in out and "1:8 sdgf" in out and "test acc" in out
    assert "blocks.0.q.weight" in out and "sparsified" in out  # the per-layer report
    assert "Inference, 256 test images" in out and "4096x4096" in out


def test_inspect_transformers_gpt2_with_dot(tmp_path):
    pytest.importorskip("transformers")
    dot = tmp_path / "g.dot"
    done = _run("inspect", "transformers:gpt2", "--pattern", "1:8", "--dot", str(dot))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "transformer.h.0.mlp.c_fc.weight" in done.stdout and "tied to transformer.wte.weight" in done.stdout
    assert "nmfx_ops_masked_linear(" in done.stdout
    text = dot.read_text()
    assert text.count("digraph nmfx") == 6 and "palegreen" in text


def test_inspect_builtin_and_factory_specs():
    done = _run("inspect", "nmfx:tinyvit", "--pattern", "2:4", "--exclude", "mlp.*")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "excluded by 'mlp.*'" in done.stdout and "blocks.0.q.weight" in done.stdout
    done = _run("inspect", "nmfx.examples:TinyViT")
    assert done.returncode == 0 and "analysis graph: fx.symbolic_trace" in done.stdout


@pytest.mark.parametrize("spec,message", [("gpt2", "expected SOURCE:NAME"), ("transformers:bloom", "built-in small configs"),
                                          ("nmfx:tinyvit --pattern 1:0", "invalid N:M pattern")])
def test_bad_specs_exit_2_with_a_message(spec, message):
    done = _run("inspect", *spec.split())
    assert done.returncode == 2 and message in done.stderr


def test_bench_runs():
    done = _run("bench", "--size", "256", "--patterns", "1:8", "--batches", "1", "--dtypes", "float32")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "x dense" in done.stdout and "1:8" in done.stdout
