"""python -m nmfx: demo, inspect and bench end to end (subprocesses, as a user runs them)."""

import os
import subprocess
import sys
import sysconfig
import time

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


@pytest.mark.parametrize("spec,message", [("gpt2", "expected SOURCE:NAME"), ("transformers:nosuchmodel", "unknown transformers architecture"),
                                          ("nmfx:tinyvit --pattern 1:0", "invalid N:M pattern")])
def test_bad_specs_exit_2_with_a_message(spec, message):
    done = _run("inspect", *spec.split())
    assert done.returncode == 2 and message in done.stderr


def test_bench_runs():
    done = _run("bench", "--size", "256", "--patterns", "1:8", "--batches", "1", "--dtypes", "float32")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "x dense" in done.stdout and "1:8" in done.stdout


def test_version_and_plain_help():
    done = _run("--version")
    assert done.returncode == 0 and done.stdout.startswith("nmfx ") and "torch" in done.stdout
    done = _run("--help")
    assert done.returncode == 0 and "``" not in done.stdout and "inspect" in done.stdout


@pytest.mark.parametrize("args,message", [(("demo", "--method", "sdfg"), "unknown method 'sdfg'"),
                                          (("demo", "--pattern", "3:2"), "pattern"),
                                          (("demo", "--steps", "0"), "--steps must be >= 1"),
                                          (("inspect", "nmfx:tinyvit", "--method", "mdgf", "--decay"), "unrecognized")])
def test_bad_options_fail_before_any_training(args, message):
    start = time.perf_counter()
    done = _run(*args)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert "test acc" not in done.stdout and time.perf_counter() - start < 60


def test_inspect_any_transformers_architecture_with_overrides(tmp_path):
    transformers = pytest.importorskip("transformers")
    done = _run("inspect", "transformers:mistral", "--config", "num_hidden_layers=1", "--pattern", "2:4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "model.layers.0.mlp.down_proj.weight" in done.stdout and "model.layers.1." not in done.stdout
    assert "with method sdgf" in done.stdout  # inspect's default method is sparsify's
    done = _run("inspect", "transformers:mistral", "--config", "no_such_field=3")
    assert done.returncode == 2 and "no_such_field" in done.stderr
    config = transformers.Qwen2Config(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=64)
    config.save_pretrained(tmp_path)
    done = _run("inspect", f"transformers:{tmp_path}")
    assert done.returncode == 0 and "model.layers.0.mlp.up_proj.weight" in done.stdout, done.stderr[-3000:]


def test_console_script_imports_factories_from_the_current_directory(tmp_path):
    script = os.path.join(sysconfig.get_path("scripts"), "nmfx")
    if not os.path.exists(script):
        pytest.skip("the nmfx console script is not installed in this environment")
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16), torch.nn.Linear(16, 2))\n")
    done = subprocess.run([script, "inspect", "my_models:make", "--pattern", "1:4"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "0.weight" in done.stdout and "sparsified" in done.stdout
    done = subprocess.run([script, "inspect", "not_here:make"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 2 and "cannot import 'not_here'" in done.stderr
