"""benchmarks/bench_e2e.py --quick: the baseline is the plain transformers model holding the same masked
weights (no nmfx code), both sides produce the same greedy tokens, and every row has its byte-ratio limit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_compares_against_the_plain_model(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "e2e.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_e2e.py"), "--quick", "--output", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["machine"]["simd_flags"] is not None and result["kernel_isa"]
    memory = [r for r in result["rows"] if r["mode"] == "memory"]
    assert {r["dtype"] for r in memory} == {"float32", "bfloat16"}
    for row in memory:  # each side loaded as deployed, in a fresh process
        assert row["plain_rss_bytes"] > 0 and row["nmfx_rss_bytes"] > 0
        assert row["plain_peak_bytes"] >= row["plain_rss_bytes"] and row["nmfx_peak_bytes"] >= row["nmfx_rss_bytes"]
    rows = [r for r in result["rows"] if r["mode"] != "memory"]
    assert {(r["dtype"], r["mode"]) for r in rows} == {(d, m) for d in ("float32", "bfloat16") for m in ("decode", "prefill")}
    for row in rows:
        assert row["plain_ms"] > 0 and row["nmfx_ms"] > 0
        assert row["nmfx_weight_bytes"] < row["plain_weight_bytes"]
        assert row["byte_ratio_limit_head_sparse"] > row["byte_ratio_limit_head_dense"] > 1.0
    fp32_decode = [r for r in rows if r["dtype"] == "float32" and r["mode"] == "decode"]
    assert all(r["same_greedy_tokens"] for r in fp32_decode)  # the same function, computed two ways
    assert all(r["argmax_agreement"] >= 0.9 for r in rows if r["mode"] == "prefill")


def test_the_baseline_holds_the_masked_weights_and_no_nmfx_code():
    transformers = pytest.importorskip("transformers")
    import torch

    import nmfx

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_e2e
    finally:
        sys.path.pop(0)
    name, kwargs = bench_e2e.configs(quick=True)["llama-tiny"]
    plain, sparse = bench_e2e.build(name, kwargs, "1:8")
    assert not nmfx.is_sparsified(plain) and not nmfx.states(plain)
    assert not any(isinstance(m, torch.fx.GraphModule) for m in plain.modules())
    for weight, state in nmfx.states(sparse).items():
        assert torch.equal(plain.get_parameter(weight), sparse.get_parameter(weight) * state.mask)
    ids = torch.randint(0, kwargs["vocab_size"], (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, sparse.eval()(ids).logits)
