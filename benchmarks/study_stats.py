"""Paired significance tests for the accuracy study, from its JSON (no training).

    python benchmarks/study_stats.py                                   # benchmarks/results/accuracy.json
    python benchmarks/study_stats.py a.json --out benchmarks/results/accuracy_stats

For every (budget, task, pattern, recipe) cell the recipe is compared with SR-STE run on the same seeds
(``budget="steps"``: the same number of steps; ``"flops"``: the recipe shortened to SR-STE's FLOPs). The
per-seed differences are oriented so that positive means *the recipe is better* (accuracy: recipe −
SR-STE; perplexity: SR-STE − recipe). Each cell gets the mean difference, a 95 % t confidence interval,
the exact two-sided paired t-test p-value (and Wilcoxon's signed-rank p where it exists), and Holm's
step-down correction across every cell of the same budget. A cell is a **win** or a **loss** only when its
Holm-corrected p is below ``--alpha`` (0.05) *and* it has at least ``--min-seeds`` (5) seeds; otherwise it is
a trend at most. With 3 seeds a paired test
has 2 degrees of freedom and Wilcoxon's smallest possible p is 0.25, so only large, consistent effects can
pass.

The controlled study's runs (``accuracy.py --design``, records whose ``config`` starts with "design") form
their own family: within every setting (task, steps, lr, from scratch or from the dense model) each recipe is
compared with SR-STE, and the control pairs of :data:`DESIGN_PAIRS` are compared directly (MDGF-linear vs
SR-STE with the matched dense warm-ups, GMP vs the same, the decay-fraction ablation vs the default...).
Holm runs across every comparison of that family at once.

Writes ``<out>.json`` (every cell) and ``<out>.md`` (the tables) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import defaultdict
from typing import Any, Iterable, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_JSON = os.path.join(HERE, "results", "accuracy.json")
DEFAULT_OUT = os.path.join(HERE, "results", "accuracy_stats")
BASELINE = ("srste", None)
PATTERN_ORDER = ["2:4", "1:4", "2:8", "1:8", "1:16", "1:32"]
#: Direct comparisons in the controlled study, (recipe, baseline), besides every recipe vs SR-STE.
DESIGN_PAIRS = (
    (("mdgf", "linear"), ("srste", "warmup50")),  # equal alpha>0 time and FLOPs: gradual vs sudden
    (("mdgf", "linear"), ("srste", "warmup25")),  # equal integral of alpha
    (("gmp", None), ("srste", "warmup50")),
    (("mdgf", "linear"), ("gmp", None)),
    (("sdgf", "stepwise"), ("srste", "warmup50")),
    (("ste", "warmup50"), ("ste", None)),
    (("mdgf", "linear-f25"), ("mdgf", "linear")),
    (("mdgf", "linear-f75"), ("mdgf", "linear")),
    # Added after seeing the first runs (stated in ACCURACY.md): equal alpha>0 time and FLOPs at 25 %.
    (("mdgf", "linear-f25"), ("srste", "warmup25")),
    # Tiers 7-10, fixed before their runs: the paper's iso-FLOPs test (SR-STE given MDGF-linear's training
    # FLOPs in more steps), the other MDGF decay, and SDGF combined with mask decay vs each of its parts.
    (("mdgf", "linear"), ("srste", "iso-mdgf")),
    (("mdgf", "exponential"), ("mdgf", "linear")),
    (("sdgf", "stepwise+mdgf"), ("sdgf", "stepwise")),
    (("sdgf", "stepwise+mdgf"), ("mdgf", "linear")),
)


def is_design(run: dict[str, Any]) -> bool:
    """Whether a record belongs to the controlled study (``accuracy.py --design``)."""
    return str(run.get("config", "")).startswith("design")


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as the input; monotone, capped at 1)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def paired_test(differences: Sequence[float]) -> dict[str, Any]:
    """Mean, sample SD, 95 % t CI, exact two-sided paired t-test p and Wilcoxon p of per-seed differences."""
    from scipy import stats as sps

    n = len(differences)
    mean = sum(differences) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1)) if n > 1 else float("nan")
    se = sd / math.sqrt(n) if n > 1 else float("nan")
    if n < 2:
        p_t, half = float("nan"), float("nan")
    elif sd == 0.0:
        p_t, half = (1.0 if mean == 0.0 else 0.0), 0.0
    else:
        t = mean / se
        p_t = float(2 * sps.t.sf(abs(t), n - 1))
        half = float(sps.t.ppf(0.975, n - 1) * se)
    nonzero = [d for d in differences if d != 0.0]
    p_w = float(sps.wilcoxon(nonzero, method="exact").pvalue) if len(nonzero) >= 1 else 1.0
    return {"n": n, "mean": mean, "sd": sd, "ci95": [mean - half, mean + half], "p_t": p_t, "p_wilcoxon": p_w}


def _key(run: dict[str, Any]) -> tuple:
    variant = run.get("variant")
    return run["budget"], run["task"], run["pattern"], run["method"], variant if variant is None else str(variant)


def cells(runs: Iterable[dict[str, Any]], field: str = "metric") -> list[dict[str, Any]]:
    """One dict per (budget, task, pattern, recipe) compared with SR-STE at equal steps on shared seeds, and
    the controlled study's comparisons (:func:`design_cells`); ``field`` as there (``"loss_end"`` leaves
    out the first study)."""
    runs = list(runs)
    metric: dict[tuple, dict[int, float]] = defaultdict(dict)
    higher_better: dict[str, bool] = {}
    for run in runs:
        if run.get("pattern") is None or is_design(run):
            continue
        metric[_key(run)][run["seed"]] = run["metric"]
        higher_better[run["task"]] = run["metric_name"] == "accuracy"
    out = []
    for key, by_seed in metric.items():
        budget, task, pattern, method, variant = key
        if (method, variant) == BASELINE:
            continue
        baseline = metric.get(("steps", task, pattern) + BASELINE, {})
        seeds = sorted(set(by_seed) & set(baseline))
        if len(seeds) < 2:
            continue
        sign = 1.0 if higher_better[task] else -1.0
        diffs = [sign * (by_seed[s] - baseline[s]) for s in seeds]
        out.append({"budget": budget, "task": task, "pattern": pattern, "method": method, "variant": variant,
                    "seeds": seeds, "differences": diffs, **paired_test(diffs)})
    if field != "metric":  # the secondary analysis (training loss) covers the controlled study only
        out = []
    out += design_cells(runs, field)
    for budget in {c["budget"] for c in out}:
        family = [c for c in out if c["budget"] == budget]
        for cell, p in zip(family, holm([c["p_t"] for c in family])):
            cell["p_holm"] = p
    out.sort(key=lambda c: (c["budget"] != "steps", c["budget"] == "design", c.get("init") or "", c.get("steps", 0),
                            c.get("lr", 0), c["task"], PATTERN_ORDER.index(c["pattern"])
                            if c["pattern"] in PATTERN_ORDER else 99, str(c.get("vs")), c["method"], str(c["variant"])))
    return out


def _setting(run: dict[str, Any]) -> tuple:
    """(task, step budget, lr, init): an iso-FLOPs run counts under the budget it was sized from."""
    return run["task"], run.get("nominal_steps") or run["steps"], run["lr"], run.get("init") or ""


def design_cells(runs: Iterable[dict[str, Any]], key: str = "metric") -> list[dict[str, Any]]:
    """The controlled study's comparisons (budget "design"): every recipe vs SR-STE, and DESIGN_PAIRS,
    within each setting and pattern, paired on shared seeds. ``key``: the record field compared --
    ``"metric"`` (test accuracy / validation perplexity) or ``"loss_end"`` (the mean training loss over the
    last 10 % of steps; lower is better)."""
    metric: dict[tuple, dict[int, float]] = defaultdict(dict)
    higher_better: dict[str, bool] = {}
    for run in runs:
        if is_design(run) and run.get("pattern") is not None:
            metric[_setting(run) + (run["pattern"], run["method"], run["variant"])][run["seed"]] = run[key]
            higher_better[run["task"]] = key == "metric" and run["metric_name"] == "accuracy"
    out = []
    groups = sorted({key[:5] for key in metric}, key=str)
    for group in groups:
        recipes = {key[5:] for key in metric if key[:5] == group}
        pairs = [(r, BASELINE) for r in sorted(recipes, key=str) if r != BASELINE]
        pairs += [pair for pair in DESIGN_PAIRS if pair not in pairs]
        for recipe, base in pairs:
            if recipe not in recipes or base not in recipes:
                continue
            mine, theirs = metric[group + recipe], metric[group + base]
            seeds = sorted(set(mine) & set(theirs))
            if len(seeds) < 2:
                continue
            task, steps, lr, init, pattern = group
            sign = 1.0 if higher_better[task] else -1.0
            diffs = [sign * (mine[s] - theirs[s]) for s in seeds]
            out.append({"budget": "design", "task": task, "steps": steps, "lr": lr, "init": init or None,
                        "pattern": pattern, "method": recipe[0], "variant": recipe[1], "vs": list(base),
                        "seeds": seeds, "differences": diffs, **paired_test(diffs)})
    return out


def verdict(cell: dict[str, Any], alpha: float, min_seeds: int) -> str:
    """win / loss only when Holm-significant on enough seeds; else what the data allows saying."""
    direction = "better" if cell["mean"] > 0 else "worse"
    if cell["p_holm"] < alpha:
        if cell["n"] >= min_seeds:
            return "**win**" if cell["mean"] > 0 else "**loss**"
        return f"trend, {direction} (Holm p < {alpha} but only {cell['n']} < {min_seeds} seeds)"
    if cell["p_t"] < alpha:
        return f"trend, {direction} (not significant after Holm)"
    return "no evidence"


def markdown(all_cells: list[dict[str, Any]], alpha: float, min_seeds: int, key: str = "metric") -> str:
    lines = []
    for budget in ("steps", "flops"):
        family = [c for c in all_cells if c["budget"] == budget]
        if not family:
            continue
        title = "equal steps" if budget == "steps" else "equal training FLOPs (recipe shortened to SR-STE's FLOPs)"
        lines += [f"**vs SR-STE, {title}** — {len(family)} cells, Holm-corrected within this table; difference "
                  "> 0 means the recipe is better (vision: test accuracy as a fraction; LM: validation perplexity)", "",
                  "| task | pattern | recipe | seeds | mean diff | 95 % CI | p (paired t) | p (Holm) | p (Wilcoxon) | verdict |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for c in family:
            recipe = f"{c['method']} {c['variant']}" if c["variant"] else c["method"]
            lo, hi = c["ci95"]
            lines.append(f"| {c['task']} | {c['pattern']} | {recipe} | {c['n']} | {c['mean']:+.3f} | "
                         f"[{lo:+.3f}, {hi:+.3f}] | {c['p_t']:.3f} | {c['p_holm']:.3f} | {c['p_wilcoxon']:.3f} | "
                         f"{verdict(c, alpha, min_seeds)} |")
        lines.append("")
    family = [c for c in all_cells if c["budget"] == "design"]
    if family:
        what = ("test accuracy as a fraction" if key == "metric" else
                "final training loss, the mean over the last 10 % of steps: > 0 means a lower loss")
        lines += [f"**Controlled study (accuracy.py --design){'' if key == 'metric' else ', final training loss'}** — "
                  f"{len(family)} comparisons, Holm-corrected together; difference > 0 means the recipe is better "
                  f"than the one it is compared with ({what}); 95 % CI: t interval of the mean paired difference", "",
                  "| setting | pattern | recipe | vs | seeds | mean diff | 95 % CI | p (paired t) | p (Holm) | "
                  "p (Wilcoxon) | verdict |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for c in family:
            setting = (f"{c['task']}, {'fine-tune of dense, ' if c['init'] else ''}{c['steps']} steps, lr {c['lr']:g}")
            lo, hi = c["ci95"]
            lines.append(f"| {setting} | {c['pattern']} | {_name(c['method'], c['variant'])} | {_name(*c['vs'])} | "
                         f"{c['n']} | {c['mean']:+.4f} | [{lo:+.4f}, {hi:+.4f}] | {c['p_t']:.4f} | {c['p_holm']:.3f} | "
                         f"{c['p_wilcoxon']:.3f} | {verdict(c, alpha, min_seeds)} |")
        lines.append("")
    return "\n".join(lines)


def _name(method: str, variant: Any) -> str:
    return f"{method} {variant}" if variant else method


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="*", default=[DEFAULT_JSON], help="accuracy.json files (records are merged)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="writes OUT.json and OUT.md")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--min-seeds", type=int, default=5, help="fewer seeds than this never make a win or loss")
    parser.add_argument("--metric", default="metric", choices=["metric", "loss_end"],
                        help="compare the runs' metric (default) or, for the controlled study only, their final "
                             "training loss (loss_end: mean over the last 10 %% of steps, lower is better)")
    parser.add_argument("--writeup", default=None,
                        help="also replace the 'stats' generated block of this file (e.g. benchmarks/ACCURACY.md) "
                             "with the controlled study's table")
    args = parser.parse_args(argv)
    runs = []
    for path in args.json:
        with open(path) as f:
            loaded = json.load(f)
        runs += loaded["runs"] if isinstance(loaded, dict) else loaded
    all_cells = cells(runs, args.metric)
    if not all_cells:
        raise SystemExit("no cell has SR-STE and a recipe on at least two shared seeds")
    text = markdown(all_cells, args.alpha, args.min_seeds, args.metric)
    for cell in all_cells:
        cell["verdict"] = verdict(cell, args.alpha, args.min_seeds).replace("**", "")
    print(text)
    with open(args.out + ".json", "w") as f:
        json.dump({"alpha": args.alpha, "min_seeds": args.min_seeds, "correction": "holm (per budget)",
                   "test": "paired t, two-sided", "compared": args.metric,
                   "cells": all_cells}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    if args.writeup:
        design = markdown([c for c in all_cells if c["budget"] == "design"], args.alpha, args.min_seeds, args.metric)
        _replace_block(args.writeup, "stats" if args.metric == "metric" else "stats_loss",
                       design or "(no controlled-study runs yet)")
    return 0


def _replace_block(path: str, key: str, body: str) -> None:
    """Replace the text between ``<!-- BEGIN GENERATED: key -->`` and its END marker in ``path``."""
    begin, end = f"<!-- BEGIN GENERATED: {key} -->", f"<!-- END GENERATED: {key} -->"
    with open(path) as f:
        text = f.read()
    if begin not in text or end not in text:
        raise SystemExit(f"{path} has no '{begin}' ... '{end}' block to replace")
    pre, rest = text.split(begin, 1)
    post = rest.split(end, 1)[1]
    with open(path, "w") as f:
        f.write(f"{pre}{begin}\n{body.strip()}\n{end}{post}")


if __name__ == "__main__":
    raise SystemExit(main())
