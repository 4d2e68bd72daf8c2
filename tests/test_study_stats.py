"""The study's significance tests (benchmarks/study_stats.py): Holm's correction, the paired t-test against
hand-computed values, the win/trend rule, and a run over the committed study JSON."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

pytest.importorskip("scipy")
ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("study_stats", ROOT / "benchmarks" / "study_stats.py")
study_stats = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study_stats)


def test_holm_matches_the_step_down_definition():
    assert study_stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert study_stats.holm([0.5, 0.9]) == [1.0, 1.0]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=30))
def test_holm_is_monotone_and_never_below_the_raw_p(p_values):
    adjusted = study_stats.holm(p_values)
    assert all(a >= p - 1e-15 and a <= 1.0 for a, p in zip(adjusted, p_values))
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    assert all(adjusted[order[i]] <= adjusted[order[i + 1]] for i in range(len(order) - 1))


def test_paired_t_by_hand():
    diffs = [0.1, 0.2, 0.3]  # mean 0.2, sd 0.1, se 0.1/sqrt(3), t = 2*sqrt(3) = 3.4641 with 2 dof
    out = study_stats.paired_test(diffs)
    assert out["mean"] == pytest.approx(0.2) and out["sd"] == pytest.approx(0.1)
    assert out["p_t"] == pytest.approx(0.07418, abs=1e-4)  # 2 * P(T_2 > 3.4641)
    half = 4.302653 * 0.1 / math.sqrt(3)  # t_{0.975, 2}
    assert out["ci95"] == pytest.approx([0.2 - half, 0.2 + half], abs=1e-6)
    assert out["p_wilcoxon"] == pytest.approx(0.25)  # the smallest exact p with 3 pairs


def _run(task, method, variant, pattern, seed, metric, budget="steps"):
    return {"task": task, "method": method, "variant": variant, "pattern": pattern, "seed": seed, "metric": metric,
            "metric_name": "accuracy" if task == "vision" else "perplexity", "budget": budget}


def test_cells_orient_differences_and_a_win_needs_enough_seeds():
    runs = []
    for seed in range(6):
        runs += [_run("vision", "srste", None, "1:8", seed, 0.5), _run("vision", "mdgf", "linear", "1:8", seed, 0.6 + seed * 1e-3),
                 _run("lm", "srste", None, "1:8", seed, 10.0), _run("lm", "mdgf", "linear", "1:8", seed, 9.0 + seed * 1e-3)]
    cells = study_stats.cells(runs)
    assert {c["task"]: c["mean"] > 0 for c in cells} == {"vision": True, "lm": True}  # lower perplexity is better
    assert all(study_stats.verdict(c, 0.05, 5) == "**win**" for c in cells)
    three = study_stats.cells([r for r in runs if r["seed"] < 3])
    assert all(study_stats.verdict(c, 0.05, 5).startswith("trend, better") for c in three)


def test_committed_study_json_makes_no_claim_it_cannot_support(tmp_path):
    out = tmp_path / "stats"
    assert study_stats.main([str(ROOT / "benchmarks" / "results" / "accuracy.json"), "--out", str(out)]) == 0
    cells = [c for c in json.loads((tmp_path / "stats.json").read_text())["cells"] if c["budget"] != "design"]
    assert cells and all(c["n"] == 3 for c in cells)
    assert not any(c["verdict"] in ("win", "loss") for c in cells)  # 3 seeds: trends at most


def _design_run(method, variant, seed, metric, pattern="1:16", init=None, lr=3e-3):
    return {"task": "vision", "method": method, "variant": variant, "pattern": pattern, "seed": seed, "metric": metric,
            "metric_name": "accuracy", "budget": "steps", "steps": 1000, "lr": lr, "init": init, "config": "design"}


def test_design_cells_pair_within_a_setting_and_share_one_holm_family():
    runs = []
    for seed in range(5):
        runs += [_design_run("srste", None, seed, 0.90 + seed * 1e-3), _design_run("srste", "warmup50", seed, 0.95),
                 _design_run("mdgf", "linear", seed, 0.95 + (seed % 2) * 1e-3),
                 _design_run("srste", None, seed, 0.5, init="dense-pretrain"),  # another setting: never paired across
                 _design_run("mdgf", "linear", seed, 0.5, init="dense-pretrain"),
                 # a legacy record with the same recipe must not mix in
                 dict(_design_run("mdgf", "linear", seed, 0.1), config="default", steps=250)]
    cells = [c for c in study_stats.cells(runs) if c["budget"] == "design"]
    got = {(c["init"], c["method"], c["variant"], tuple(c["vs"])): c for c in cells}
    assert set(got) == {(None, "srste", "warmup50", ("srste", None)), (None, "mdgf", "linear", ("srste", None)),
                        (None, "mdgf", "linear", ("srste", "warmup50")),
                        ("dense-pretrain", "mdgf", "linear", ("srste", None))}
    control = got[(None, "mdgf", "linear", ("srste", "warmup50"))]
    assert control["mean"] == pytest.approx(0.0004) and control["n"] == 5
    assert got[("dense-pretrain", "mdgf", "linear", ("srste", None))]["mean"] == 0.0
    raw = [c["p_t"] for c in cells]
    assert [c["p_holm"] for c in cells] == pytest.approx(study_stats.holm(raw))  # one family
    assert study_stats.verdict(got[(None, "mdgf", "linear", ("srste", None))], 0.05, 5) == "**win**"
    assert study_stats.verdict(control, 0.05, 5) == "no evidence"
    assert "Controlled study" in study_stats.markdown(study_stats.cells(runs), 0.05, 5)


def test_writeup_block_is_replaced_and_a_missing_block_is_an_error(tmp_path):
    runs = [_design_run(m, v, seed, 0.9 + seed * 1e-3 * (m == "mdgf")) for seed in range(5)
            for m, v in (("srste", None), ("mdgf", "linear"))]
    data = tmp_path / "runs.json"
    data.write_text(json.dumps(runs))
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- BEGIN GENERATED: stats -->\nold\n<!-- END GENERATED: stats -->\noutro\n")
    assert study_stats.main([str(data), "--out", str(tmp_path / "s"), "--writeup", str(doc)]) == 0
    text = doc.read_text()
    assert "old" not in text and "Controlled study" in text and text.startswith("intro") and text.endswith("outro\n")
    doc.write_text("no block here\n")
    with pytest.raises(SystemExit, match="no .* block"):
        study_stats.main([str(data), "--out", str(tmp_path / "s"), "--writeup", str(doc)])


def test_training_loss_analysis_is_lower_is_better_and_design_only():
    runs = []
    for seed in range(5):
        for m, v, loss in (("srste", None, 0.05), ("mdgf", "linear", 0.01)):
            runs.append(dict(_design_run(m, v, seed, 0.9), loss_end=loss + seed * 1e-4 * (m == "mdgf")))
        runs.append(dict(_design_run("mdgf", "linear", seed, 0.5), config="default", loss_end=9.0))
    cells = study_stats.cells(runs, "loss_end")
    assert [(c["budget"], c["method"]) for c in cells] == [("design", "mdgf")]
    assert cells[0]["mean"] > 0.039 and study_stats.verdict(cells[0], 0.05, 5) == "**win**"  # lower loss = better
    assert "final training loss" in study_stats.markdown(cells, 0.05, 5, "loss_end")
