"""Smoke test of the accuracy study (benchmarks/accuracy.py --quick): every cell is there, training
works (losses fall, dense beats chance), FLOPs are counted consistently, every sparse run ends at its
target pattern; and of the controlled study (--design --quick): the matched warm-up costs what MDGF costs,
GMP ends at the target, fine-tuning starts from the dense model, and a second invocation resumes (runs
nothing). The plot checks skip only when matplotlib (the ``study`` extra) is missing."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPARSE = [("srste", None), ("mdgf", "linear"), ("mdgf", "exponential"), ("sdgf", "stepwise"), ("sdgf", "geometric")]
PATTERNS = ["2:4", "1:16"]  # the --quick configuration
TASKS = ["vision", "lm"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("accuracy")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--quick", "--no-progress",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads((out / "accuracy.json").read_text())
    return out, records, proc.stdout


def _main(records):
    return [r for r in records if r["budget"] == "steps"]


def test_every_cell_is_there_once(study):
    _, records, _ = study
    expected = {(t, "dense", None, None, 0) for t in TASKS}
    expected |= {(t, m, v, p, 0) for t in TASKS for m, v in SPARSE for p in PATTERNS}
    cells = [(r["task"], r["method"], r["variant"], r["pattern"], r["seed"]) for r in _main(records)]
    assert sorted(cells, key=str) == sorted(expected, key=str)
    for r in records:
        for key in ("task", "method", "variant", "pattern", "seed", "steps", "metric", "metric_name", "train_flops", "wall_s"):
            assert key in r
        assert r["metric_name"] == {"vision": "accuracy", "lm": "perplexity"}[r["task"]]
        assert r["wall_s"] > 0


def test_same_step_budget_and_iso_flops_runs(study):
    _, records, _ = study
    for task in TASKS:
        assert len({r["steps"] for r in _main(records) if r["task"] == task}) == 1
        iso = [r for r in records if r["task"] == task and r["budget"] == "flops"]
        assert iso, "the costlier recipes are re-run at SR-STE's FLOPs"
        for r in iso:
            srste = next(s for s in _main(records) if s["task"] == task and s["method"] == "srste"
                         and s["pattern"] == r["pattern"] and s["seed"] == r["seed"])
            assert r["train_flops"] <= srste["train_flops"] * (1 + 1e-9)
            assert r["steps"] < srste["steps"]


def test_losses_decrease(study):
    _, records, _ = study
    for r in _main(records):
        assert r["loss_end"] < r["loss_start"], (r["task"], r["method"], r["variant"], r["pattern"])


def test_dense_beats_chance(study):
    _, records, _ = study
    dense = {r["task"]: r["metric"] for r in _main(records) if r["method"] == "dense"}
    assert dense["vision"] > 0.3  # 10 classes: chance is 0.1
    assert dense["lm"] < 64  # bytes: chance perplexity is 256


def test_flops_counting(study):
    _, records, _ = study
    for r in records:
        assert r["train_flops"] > 0 and r["train_flops_dense_wgrad"] >= r["train_flops"] * (1 - 1e-12)
        # The FLOPs counted from nmfx.stats during the run match the method's schedule.
        assert r["train_flops"] == pytest.approx(r["predicted_flops"], rel=1e-9)
    main = _main(records)
    for task in TASKS:
        dense = next(r for r in main if r["task"] == task and r["method"] == "dense")
        for p in PATTERNS:
            cell = {(r["method"], r["variant"]): r["train_flops"] for r in main if r["task"] == task and r["pattern"] == p}
            hard = cell[("srste", None)]
            assert cell[("mdgf", "linear")] >= hard and cell[("mdgf", "exponential")] >= hard
            assert cell[("sdgf", "stepwise")] >= hard
            # dense cost while alpha > 0 (the first half of the run by default), sparse cost after
            assert hard < cell[("mdgf", "linear")] < dense["train_flops"]
            assert all(dense["train_flops"] >= f * (1 - 1e-12) for f in cell.values())
            assert hard < dense["train_flops"]


def test_sparse_runs_end_at_the_target_pattern(study):
    _, records, _ = study
    for r in records:
        if r["method"] != "dense":
            assert r["final_sparsity"] == pytest.approx(r["target_sparsity"], abs=1e-6)
            assert r["final_alpha"] == 0.0
            assert r["sparsified"] == {"vision": 6, "lm": 6}[r["task"]]  # every block projection (1 block)
        assert r["diag"] and r["curve"][-1][2] == r["metric"]


def test_tables_written(study):
    out, _, stdout = study
    table = (out / "accuracy.md").read_text()
    for text in ("dense (reference)", "mdgf (exponential)", "sdgf (geometric)", "equal training FLOPs", "1:16 (94%)"):
        assert text in table
    assert "dense (reference)" in stdout


def test_plots_written(study):
    out, _, _ = study
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib (the 'study' extra) is not installed")
    for name in ("accuracy_vs_sparsity.png", "diagnostics_1x16.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _run_study(out, *extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--quick", "--no-progress",
                           "--out", str(out), *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "accuracy.json").read_text()), proc.stdout


@pytest.fixture(scope="module")
def design(tmp_path_factory):
    out = tmp_path_factory.mktemp("design")
    records, stdout = _run_study(out, "--design", "--tiers", "1", "2", "4")
    return out, records, stdout


def test_design_arms_and_the_matched_warmup(design):
    _, records, _ = design
    got = {(r["method"], r["variant"], r["pattern"], r.get("init")) for r in records}
    assert got == {("dense", None, None, None), ("srste", None, "1:8", None), ("srste", "warmup50", "1:8", None),
                   ("mdgf", "linear", "1:8", None), ("sdgf", "stepwise", "1:8", None), ("gmp", None, "1:8", None),
                   ("dense", None, None, "dense-pretrain"), ("srste", None, "1:8", "dense-pretrain"),
                   ("ste", None, "1:8", "dense-pretrain"), ("mdgf", "linear", "1:8", "dense-pretrain"),
                   ("sdgf", "stepwise", "1:8", "dense-pretrain"), ("gmp", None, "1:8", "dense-pretrain")}
    scratch = {(r["method"], r["variant"]): r for r in records if r.get("init") is None}
    # The control gets MDGF-linear's dense time: the same training FLOPs, the hard mask from the same step.
    assert scratch[("srste", "warmup50")]["train_flops"] == pytest.approx(scratch[("mdgf", "linear")]["train_flops"])
    assert scratch[("srste", "warmup50")]["options"] == {"dense_steps": 0.5}
    assert scratch[("srste", None)]["train_flops"] < scratch[("gmp", None)]["train_flops"] < scratch[("dense", None)]["train_flops"]
    for r in records:
        assert r["cpu"] and r["config"].startswith("design")
        if r["method"] != "dense":
            assert r["final_sparsity"] == pytest.approx(r["target_sparsity"]) and r["final_alpha"] == 0.0


def test_design_fine_tune_starts_from_the_dense_model(design):
    _, records, _ = design
    tuned = [r for r in records if r.get("init") == "dense-pretrain"]
    assert tuned and all(r["lr"] == 1e-3 and r["steps"] == 20 for r in tuned)
    assert len({r["init_metric"] for r in tuned}) == 1 and tuned[0]["init_metric"] > 0.1  # one pretrained model
    # Starting from a trained model, the fine-tune's first losses are far below a fresh model's.
    fresh = next(r for r in records if r["method"] == "dense" and r.get("init") is None)
    dense_tuned = next(r for r in tuned if r["method"] == "dense")
    assert dense_tuned["loss_start"] < fresh["loss_start"]


def test_design_resumes_without_rerunning(design):
    out, records, _ = design
    again, stdout = _run_study(out, "--design", "--tiers", "1", "2", "4")
    assert f"{len(records)} already in" in stdout and "0 to run" in stdout
    assert [r["finished"] for r in again] == [r["finished"] for r in records]
    table = (out / "accuracy.md").read_text()
    assert "SR-STE + dense warm-up 50 %" in table and "fine-tuning the dense model" in table
