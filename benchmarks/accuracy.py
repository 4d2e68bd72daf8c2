"""The paper's claim, measured: dense vs SR-STE vs MDGF vs SDGF at 2:4 ... 1:32, on two small tasks.

Tasks
  vision  TinyViT (nmfx.examples, width 128) on the built-in 8x8 digits; metric: test accuracy.
  lm      a decoder-only byte-level transformer (defined here; causal SDPA; its blocks trace with
          torch.fx) on the Python standard library's own source (a fixed, sorted list of the top-level
          ``*.py`` files next to ``os.py``, read up to a fixed number of characters, split 90/10 into
          train/validation); metric: validation perplexity (chance = 256).

Grid: patterns 2:4, 1:4, 1:8, 1:16, 1:32 x methods srste, mdgf (linear / exponential decay), sdgf
(stepwise / geometric schedule), plus dense once per seed (the reference row), for several seeds, all
with the same step budget. Every run goes through the public API only: ``nmfx.sparsify(model, pattern,
method, total_steps=<run length>, **variant)``, ``nmfx.step`` after every optimizer step, ``nmfx.stats``
for the FLOP accounting and the diagnostics -- nothing else of nmfx's defaults is changed.

Training FLOPs (per run, ``train_flops``): per step 3 x the forward FLOPs (forward + backward), where
the forward FLOPs are 2 x MACs of every linear / conv layer (torch's FlopCounterMode on the dense model)
plus attention (QK^T and AV, 4*B*T^2*d per block, counted in full also when causal). The FLOPs of the
sparsified block projections are scaled per step by what nmfx.stats says the step uses: dense while
the pruned weights still take part in the forward (alpha > 0: dense warm-up, the dense baseline, MDGF's
decay), N_t/M_t of them while the mask is hard (SR-STE, SDGF's stages, MDGF once alpha = 0) -- the
paper's counting, which assumes a sparse kernel for all three GEMMs of a layer. ``train_flops_dense_wgrad``
is the stricter count in which the weight-gradient GEMM stays dense (STE-style methods need the full
dense gradient); both are recorded.

Equal FLOPs: for every (task, pattern) the budget is SR-STE's training FLOPs at the step budget (the
cheapest sparse recipe). Every recipe that costs more is also run with a shorter ``total_steps`` whose
FLOPs fit that budget (its whole schedule and LR schedule fitted to the shorter run, as a user with
that budget would do); ``budget: "flops"`` marks those records. Recipes at or under the budget (SR-STE,
SDGF geometric, whose stages keep the density N/M) reuse their equal-steps run.

    python benchmarks/accuracy.py                  # default study (246 runs; ~37 min estimated, 1 thread)
    python benchmarks/accuracy.py --quick          # smoke configuration (< 3 min), writes to --out
    python benchmarks/accuracy.py --design --tiers 1 2 3   # the controlled study (vision, 5 seeds, 1,000 steps)
    python benchmarks/accuracy.py --design --quick --out /tmp/d   # its smoke configuration

The controlled study (``--design``, :func:`design_arms`) adds the arms a skeptic asks for: SR-STE / STE with
a dense warm-up matched to MDGF-linear's dense time, gradual magnitude pruning (``method="gmp"``), MDGF's
decay-fraction ablation, dense-pretrain -> sparse fine-tune, a learning-rate sweep, 1:32. Runs already in
OUT/accuracy.json (same task, method, variant, pattern, seed, steps, budget, options, lr, init) are skipped
and the JSON is rewritten after every run, so a study can be stopped and resumed; ``--max-runs`` caps one
invocation. ``benchmarks/study_stats.py`` tests the comparisons (paired t, Holm, 95 % CIs).
    python benchmarks/accuracy.py --device cuda --scale 4    # wider models, 4x steps, on a GPU
    python benchmarks/accuracy.py --from-json a.json b.json  # no training: rebuild tables / plots / write-up

On CPU it runs 1 thread unless --threads says otherwise (2 spinning OpenMP threads on a shared 2-core
machine made runs 10-30x slower). See benchmarks/ACCURACY.md for the configuration and the findings.

Outputs (under --out, default benchmarks/results/): accuracy.json (one record per run), accuracy.md
(the tables), accuracy_vs_sparsity.png and diagnostics_1x16.png (needs matplotlib: pip install -e
".[study]"); and, unless --quick or --no-writeup, the generated sections of benchmarks/ACCURACY.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

# On a shared machine OpenMP's spin-waiting threads turn a contended core into 10-30x slower steps
# (measured here: 1.4 s -> 20-48 s for the same run); passive waiting and 1 thread (the CPU default,
# see --threads) avoid that. Only takes effect if torch is not imported yet.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import nmfx
from nmfx.examples import Block, TinyViT, digits
from nmfx.bench import machine_info

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"
WRITEUP = HERE / "ACCURACY.md"

ALL_PATTERNS = ("2:4", "1:4", "1:8", "1:16", "1:32")
#: (method, variant, options): the variants are the paper's; every other option is nmfx's default.
RECIPES = (
    ("dense", None, {}),
    ("srste", None, {}),
    ("mdgf", "linear", {"decay": "linear"}),
    ("mdgf", "exponential", {"decay": "exponential"}),
    ("sdgf", "stepwise", {"schedule": "stepwise"}),
    ("sdgf", "geometric", {"schedule": "geometric"}),
)
SPARSE_RECIPES = RECIPES[1:]
#: Block projections every run must have sparsified (checked against nmfx.report for every run).
PROJECTIONS = re.compile(r"^blocks\.\d+\.(q|k|v|o|up|down)\.weight$")


# ----------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class StudyConfig:
    name: str
    seeds: int
    patterns: tuple[str, ...]
    vision: dict[str, Any]
    lm: dict[str, Any]
    tasks: tuple[str, ...] = ("vision", "lm")


# Widths are multiples of 128 because SDGF's geometric schedule for 1:16 / 1:32 uses 8:128 / 4:128
# masks: every block projection's input width must divide by 128, or nmfx (rightly) skips it.
DEFAULT = StudyConfig(
    name="default", seeds=3, patterns=ALL_PATTERNS,
    vision=dict(dim=128, depth=2, heads=4, steps=250, batch=32, lr=3e-3, weight_decay=0.01),
    lm=dict(dim=128, depth=2, heads=4, context=64, steps=250, batch=8, lr=3e-3, weight_decay=0.01,
            corpus_chars=1_000_000, val_windows=64),
)
QUICK = StudyConfig(
    name="quick", seeds=1, patterns=("2:4", "1:16"),
    vision=dict(dim=128, depth=1, heads=4, steps=120, batch=32, lr=3e-3, weight_decay=0.01),
    lm=dict(dim=128, depth=1, heads=4, context=32, steps=60, batch=8, lr=3e-3, weight_decay=0.01,
            corpus_chars=200_000, val_windows=32),
)


#: The controlled study (``--design``): vision only, 5 seeds, 1,000 steps, the arms of :func:`design_arms`.
DESIGN = StudyConfig(
    name="design", seeds=5, patterns=("1:8", "1:16"), tasks=("vision",),
    vision=dict(DEFAULT.vision, steps=1000), lm=dict(DEFAULT.lm, steps=1000),
)
DESIGN_QUICK = StudyConfig(
    name="design-quick", seeds=1, patterns=("1:8",), tasks=("vision",),
    vision=dict(QUICK.vision, steps=40), lm=dict(QUICK.lm, steps=40),
)
#: The one pattern the ablations (tiers 3-4) run at.
ABLATION_PATTERN = "1:16"
#: MDGF-linear's default decays over this fraction of the sparse phase (nmfx.methods._DECAY_FRACTION): a
#: dense warm-up of this fraction gives SR-STE / STE the same steps with the pruned weights in the forward
#: (alpha > 0) and the same training FLOPs as MDGF-linear (paper counting).
MDGF_DECAY_FRACTION = 0.5


#: The dense-pretrain -> sparse-fine-tune setting: the dense model trained for the task's steps, then each
#: recipe fine-tunes it for this fraction of them at :data:`FINETUNE_LR` (warm-up + cosine as every run).
FINETUNE_FRACTION = 0.5
FINETUNE_LR = 1e-3
#: Upper bound on an iso-FLOPs run's length, in multiples of the study's steps.
ISO_MAX_FACTOR = 8
#: The learning-rate sweep (tier 6) around the task's lr (3e-3), at :data:`ABLATION_PATTERN`.
LR_SWEEP = (1e-3, 1e-2)


@dataclasses.dataclass(frozen=True)
class Arm:
    """One arm of the controlled study: a recipe, where it runs, and its tier (the order of the runs)."""

    tier: int
    method: str
    variant: Optional[str]
    options: dict
    patterns: Optional[tuple[str, ...]] = None  # None: every pattern of the configuration
    lr: Optional[float] = None  # None: the task's lr
    init: Optional[str] = None  # "dense-pretrain": fine-tune the cached dense model of the same seed
    #: (method, options): train for as many steps as that recipe's training FLOPs at the study's steps (the
    #: paper's iso-FLOPs direction: the cheaper baseline gets more steps)
    flops_of: Optional[tuple[str, dict]] = None


def design_arms(steps: int, ablation: str = ABLATION_PATTERN, extra: str = "1:32") -> list[Arm]:
    """The arms of the controlled study, by tier.

    1 the core comparison and its confound control; 2 the gradual-magnitude-pruning baseline; 3 ablations at
    ``ablation`` (the other way to match the dense time; MDGF's decay fraction); 4 dense-pretrain -> sparse
    fine-tune at ``ablation``; 5 the STE controls; 6 a learning-rate sweep of SR-STE and MDGF-linear at
    ``ablation``; 7 tiers 1-2 at ``extra`` (1:32); 8 the other decay recipes; 9 the paper's iso-FLOPs
    direction (SR-STE trained for more steps, to MDGF-linear's training FLOPs); 10 SDGF stepwise combined with
    MDGF-linear's mask decay. (Tiers 7-10 were added after tiers 1-6 were analysed; their comparisons were
    fixed before their runs.) The matched warm-ups:

    * ``warmup50``: ``dense_steps = 0.5 * steps``, the steps at which MDGF-linear (default) still has
      alpha > 0 -- equal steps with the pruned weights in the forward, equal training FLOPs (paper counting),
      and the hard target mask from the same step on;
    * ``warmup25``: ``dense_steps = 0.25 * steps`` = the sum of MDGF-linear's alpha over the run (its
      dense-equivalent time, integral of alpha dt = 0.5 * 0.5 * steps).
    """
    half, quarter = MDGF_DECAY_FRACTION, MDGF_DECAY_FRACTION / 2
    at, ft = (ablation,), "dense-pretrain"
    core = [
        ("srste", None, {}), ("srste", "warmup50", {"dense_steps": half}), ("mdgf", "linear", {"decay": "linear"}),
        ("sdgf", "stepwise", {"schedule": "stepwise"}),
    ]
    arms = [Arm(1, m, v, o) for m, v, o in core] + [Arm(2, "gmp", None, {})]
    arms += [
        Arm(3, "srste", "warmup25", {"dense_steps": quarter}, at),
        Arm(3, "mdgf", "linear-f25", {"decay": "linear", "decay_coef": 1 / (0.25 * steps)}, at),
        Arm(3, "mdgf", "linear-f75", {"decay": "linear", "decay_coef": 1 / (0.75 * steps)}, at),
        Arm(5, "ste", None, {}, at),
        Arm(5, "ste", "warmup50", {"dense_steps": half}, at),
        Arm(8, "mdgf", "exponential", {"decay": "exponential"}, at),
        Arm(8, "sdgf", "geometric", {"schedule": "geometric"}, at),
    ]
    arms += [Arm(4, m, v, o, at, FINETUNE_LR, ft) for m, v, o in
             [("dense", None, {}), ("srste", None, {}), ("ste", None, {}), ("mdgf", "linear", {"decay": "linear"}),
              ("sdgf", "stepwise", {"schedule": "stepwise"}), ("gmp", None, {})]]
    arms += [Arm(6, m, v, o, at, lr) for lr in LR_SWEEP for m, v, o in core if v != "warmup50" and m != "sdgf"]
    arms += [Arm(7, m, v, o, (extra,)) for m, v, o in core] + [Arm(7, "gmp", None, {}, (extra,))]
    arms += [Arm(9, "srste", "iso-mdgf", {}, flops_of=("mdgf", {"decay": "linear"})),
             Arm(10, "sdgf", "stepwise+mdgf", {"schedule": "stepwise", "decay": "linear"})]
    return arms


def plan_design(config: StudyConfig, tasks: dict[str, Any], fwds: dict[str, tuple],
                tiers: tuple[int, ...]) -> list[RunSpec]:
    """The controlled study's runs, tier by tier, seed by seed (a run cut short leaves balanced cells)."""
    specs: list[RunSpec] = []
    ablation = ABLATION_PATTERN if ABLATION_PATTERN in config.patterns else config.patterns[-1]
    for tier in sorted(tiers):
        for name in config.tasks:
            steps = tasks[name].cfg["steps"]
            arms = [arm for arm in design_arms(steps, ablation) if arm.tier == tier]
            for seed in range(config.seeds):
                if tier == 1:
                    specs.append(RunSpec(name, "dense", None, {}, None, seed, steps, config=config.name))
                for arm in arms:
                    run_steps = round(FINETUNE_FRACTION * steps) if arm.init else steps
                    for pattern in arm.patterns or config.patterns:
                        budget, flops_budget = "steps", None
                        if arm.flops_of is not None:
                            budget, flops_budget = "flops", predicted_flops(fwds[name], arm.flops_of[0],
                                                                            arm.flops_of[1], pattern, steps)
                            run_steps = iso_steps(fwds[name], arm.method, arm.options, pattern, flops_budget,
                                                  ISO_MAX_FACTOR * steps)
                        specs.append(RunSpec(name, arm.method, arm.variant, dict(arm.options),
                                             None if arm.method == "dense" else pattern, seed, run_steps,
                                             budget, flops_budget, lr=arm.lr, init=arm.init, config=config.name,
                                             nominal_steps=steps))
    return specs


# ----------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------
class ByteLM(nn.Module):
    """A small decoder-only byte-level language model (vocab 256, learned positions, untied head).

    The token embedding keeps PyTorch's N(0, 1) init: with GPT-2's 0.02 the bytes drown in the random
    block outputs early on, and at these short budgets a 1:16 model then beats the dense one."""

    def __init__(self, dim: int = 128, depth: int = 2, heads: int = 4, context: int = 64, vocab: int = 256):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(1, context, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, causal=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab)
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.tok(tokens) + self.pos[:, : tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


def stdlib_corpus(chars: int) -> tuple[bytes, dict[str, Any]]:
    """The first ``chars`` characters of the sorted top-level ``*.py`` files of this Python's stdlib."""
    root = os.path.dirname(os.__file__)
    parts, total, used = [], 0, []
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        take = text[: chars - total]
        parts.append(take)
        used.append(os.path.basename(path))
        total += len(take)
        if total >= chars:
            break
    data = "".join(parts).encode("utf-8", errors="replace")
    info = {"root": root, "files": len(used), "first": used[0] if used else None, "last": used[-1] if used else None,
            "chars": total, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()[:16],
            "python": platform.python_version()}
    return data, info


class VisionTask:
    name, metric_name, higher_is_better = "vision", "accuracy", True

    def __init__(self, cfg: dict[str, Any], device: str):
        self.cfg, self.device = cfg, device
        x, y, xt, yt = digits(seed=0)  # one fixed train/test split for every seed
        self.x, self.y, self.xt, self.yt = (t.to(device) for t in (x, y, xt, yt))
        self.chance = 0.1
        self.info = {"data": "nmfx.examples.digits(seed=0)", "train": len(x), "test": len(xt)}

    def model(self) -> nn.Module:
        c = self.cfg
        return TinyViT(dim=c["dim"], depth=c["depth"], heads=c["heads"]).to(self.device)

    def example(self) -> Tensor:
        return self.x[:2]

    def batch(self, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, len(self.x), (self.cfg["batch"],), generator=gen).to(self.device)
        return self.x[idx], self.y[idx]

    def loss(self, model: nn.Module, batch) -> Tensor:
        return F.cross_entropy(model(batch[0]), batch[1])

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        was = model.training
        model.eval()
        acc = (model(self.xt).argmax(-1) == self.yt).float().mean().item()
        model.train(was)
        return acc


class LMTask:
    name, metric_name, higher_is_better = "lm", "perplexity", False

    def __init__(self, cfg: dict[str, Any], device: str):
        self.cfg, self.device = cfg, device
        data, self.info = stdlib_corpus(cfg["corpus_chars"])
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        split = int(len(tokens) * 0.9)
        self.train, self.val = tokens[:split], tokens[split:]
        ctx = cfg["context"]
        n = min(cfg["val_windows"], (len(self.val) - 1) // ctx)
        stride = (len(self.val) - 1 - ctx) // max(1, n - 1) if n > 1 else 0
        starts = torch.arange(n) * stride
        windows = torch.stack([self.val[s: s + ctx + 1] for s in starts.tolist()])
        self.val_x, self.val_y = windows[:, :-1].to(device), windows[:, 1:].to(device)
        self.chance = 256.0
        self.info.update(train_tokens=len(self.train), val_tokens=len(self.val), val_windows=n, context=ctx)

    def model(self) -> nn.Module:
        c = self.cfg
        return ByteLM(dim=c["dim"], depth=c["depth"], heads=c["heads"], context=c["context"]).to(self.device)

    def example(self) -> Tensor:
        return self.val_x[:2]

    def batch(self, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        ctx = self.cfg["context"]
        starts = torch.randint(0, len(self.train) - ctx - 1, (self.cfg["batch"],), generator=gen)
        rows = torch.stack([self.train[s: s + ctx + 1] for s in starts.tolist()]).to(self.device)
        return rows[:, :-1], rows[:, 1:]

    def loss(self, model: nn.Module, batch) -> Tensor:
        logits = model(batch[0])
        return F.cross_entropy(logits.flatten(0, 1), batch[1].flatten())

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        was = model.training
        model.eval()
        losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum")
                  for x, y in zip(self.val_x.split(16), self.val_y.split(16))]
        ppl = math.exp((torch.stack(losses).sum() / self.val_y.numel()).item())
        model.train(was)
        return ppl


TASKS = {"vision": VisionTask, "lm": LMTask}


# ----------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------
class _CountAttention(torch.overrides.TorchFunctionMode):
    """Counts SDPA FLOPs (QK^T and AV: 2 * 2*B*H*Tq*Tk*hd), which FlopCounterMode misses on CPU."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            q, k = args[0], args[1]
            self.flops += 4 * q.shape[:-2].numel() * q.shape[-2] * k.shape[-2] * q.shape[-1]
        return func(*args, **(kwargs or {}))


def forward_flops(task, model: nn.Module) -> tuple[float, float]:
    """(FLOPs of the block projections, all other FLOPs) of one forward of a training batch."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = task.batch(torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as counter, _CountAttention() as attention:
        model(batch[0])
    per_module = counter.get_flop_counts()
    root = type(model).__name__
    projections = sum(sum(per_module.get(f"{root}.{name.rpartition('.')[0]}", {}).values())
                      for name, _ in model.named_parameters() if PROJECTIONS.match(name))
    return float(projections), float(counter.get_total_flops() - projections + attention.flops)


def step_flops(fwd: tuple[float, float], alpha: float, density: float) -> tuple[float, float]:
    """(paper counting, dense-weight-gradient counting) training FLOPs of one step."""
    proj, other = fwd
    d = 1.0 if alpha > 0 else density
    return 3 * (other + proj * d), 3 * other + proj * (2 * d + 1)


def predicted_flops(fwd, method: str, options: dict, pattern: str, steps: int) -> float:
    """Training FLOPs of a run, from the method's schedule (nmfx.resolve_method(...).state_at)."""
    config = nmfx.resolve_method(method, total_steps=steps, **options)
    total = 0.0
    for t in range(steps):
        s = config.state_at(t, pattern)
        total += step_flops(fwd, s.alpha, s.pattern.n / s.pattern.m)[0]
    return total


def iso_steps(fwd, method: str, options: dict, pattern: str, budget: float, steps: int) -> int:
    """The longest run (<= steps) of this recipe whose training FLOPs fit the budget."""
    lo, hi = 1, steps
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if predicted_flops(fwd, method, options, pattern, mid) <= budget * (1 + 1e-9):
            lo = mid
        else:
            hi = mid - 1
    return lo


# ----------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunSpec:
    task: str
    method: str
    variant: Optional[str]
    options: dict
    pattern: Optional[str]  # None for dense (the mask it tracks is irrelevant)
    seed: int
    steps: int
    budget: str = "steps"  # "steps" (the shared step budget) or "flops" (shortened to SR-STE's FLOPs)
    flops_budget: Optional[float] = None
    lr: Optional[float] = None  # None: the task's lr
    init: Optional[str] = None  # None: from scratch; "dense-pretrain": from the cached dense model of this seed
    config: str = ""  # the study configuration that planned the run (recorded; design runs say "design")
    nominal_steps: Optional[int] = None  # design: the setting's step budget (an iso-FLOPs run trains longer)

    @property
    def key(self) -> str:
        """What makes a run unique (runs with this key already in the JSON are skipped)."""
        return run_key(self.task, self.method, self.variant, self.pattern, self.seed, self.steps, self.budget,
                       self.options, self.lr, self.init)

    @property
    def label(self) -> str:
        name = self.method + (f"-{self.variant}" if self.variant else "")
        return (f"{self.task} {self.pattern or 'dense'} {name} s{self.seed}" + (" iso" if self.budget == "flops" else "")
                + (f" lr={self.lr:g}" if self.lr is not None else "") + (f" from {self.init}" if self.init else ""))


_PRETRAINED: dict[tuple, tuple[dict, float]] = {}


def pretrained_dense(task, seed: int) -> tuple[dict, float]:
    """(state_dict, metric) of the plain dense model trained for the task's steps from ``seed`` (no nmfx; the
    dense recipe's lr, schedule and batches). Computed once per process and kept in memory."""
    c = task.cfg
    key = (task.name, seed, json.dumps(c, sort_keys=True))
    if key not in _PRETRAINED:
        torch.manual_seed(seed)
        model = task.model()
        opt = torch.optim.AdamW(model.parameters(), lr=c["lr"], weight_decay=c["weight_decay"])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(t, c["steps"]))
        gen = torch.Generator().manual_seed(1000 + seed)
        model.train()
        for _ in range(c["steps"]):
            opt.zero_grad(set_to_none=True)
            task.loss(model, task.batch(gen)).backward()
            opt.step()
            sched.step()
        _PRETRAINED[key] = ({k: v.detach().clone() for k, v in model.state_dict().items()}, task.evaluate(model))
    return _PRETRAINED[key]


def run_one(spec: RunSpec, task, fwd, diag_points: int = 100, curve_points: int = 4) -> dict[str, Any]:
    c = task.cfg
    init_metric = None
    if spec.init is not None:
        if spec.init != "dense-pretrain":
            raise ValueError(f"{spec.label}: unknown init {spec.init!r} (expected None or 'dense-pretrain')")
        state, init_metric = pretrained_dense(task, spec.seed)
    torch.manual_seed(spec.seed)
    model = task.model()
    if spec.init is not None:
        model.load_state_dict(state)
    pattern = spec.pattern or "2:4"  # dense: nmfx tracks a mask of some pattern; it never touches the weights
    start = time.perf_counter()
    nmfx.sparsify(model, pattern, spec.method, example_inputs=(task.example(),), total_steps=spec.steps, **spec.options)
    expected = {name for name, _ in model.named_parameters() if PROJECTIONS.match(name)}
    sparsified = {row.name for row in nmfx.report(model) if row.status == "sparsified"}
    if not expected or sparsified != expected:
        raise RuntimeError(f"{spec.label}: nmfx sparsified {sorted(sparsified)}, expected every block projection "
                           f"{sorted(expected)}\n{nmfx.report(model)}")
    lr = spec.lr if spec.lr is not None else c["lr"]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=c["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(t, spec.steps))
    gen = torch.Generator().manual_seed(1000 + spec.seed + (4000 if spec.init else 0))  # fine-tune: fresh batches
    diag_every = max(1, spec.steps // diag_points)
    curve_at = {max(1, round(spec.steps * (i + 1) / curve_points)) for i in range(curve_points)}
    losses, diag, curve = [], [], []
    flops = flops_wgrad = 0.0
    model.train()
    for t in range(spec.steps):
        opt.zero_grad(set_to_none=True)
        now = nmfx.stats(model, per_layer=False)  # what this step's forward uses (no grads: cheap)
        f, fw = step_flops(fwd, now["nmfx/alpha"], 1.0 - now["nmfx/mask_sparsity"])
        flops += f
        flops_wgrad += fw
        loss = task.loss(model, task.batch(gen))
        loss.backward()
        if t % diag_every == 0 or t == spec.steps - 1:
            s = nmfx.stats(model, per_layer=False)
            kept = s.get("nmfx/grad_norm_kept", float("nan"))
            ratio = s.get("nmfx/grad_norm_pruned", float("nan")) / kept if kept else float("nan")
            diag.append([t, ratio, s["nmfx/flip_rate"], s["nmfx/alpha"], s["nmfx/mask_sparsity"]])
        opt.step()
        sched.step()
        nmfx.step(model)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        if t + 1 in curve_at and t + 1 < spec.steps:
            s = nmfx.stats(model, per_layer=False)
            curve.append([t + 1, flops, task.evaluate(model), s["nmfx/alpha"], s["nmfx/mask_sparsity"]])
    metric = task.evaluate(model)
    end = nmfx.stats(model, per_layer=False)
    curve.append([spec.steps, flops, metric, end["nmfx/alpha"], end["nmfx/mask_sparsity"]])
    wall = time.perf_counter() - start
    k = max(1, len(losses) // 10)
    proj, other = fwd
    return {
        "task": spec.task, "method": spec.method, "variant": spec.variant, "pattern": spec.pattern,
        "seed": spec.seed, "steps": spec.steps, "budget": spec.budget, "metric": metric,
        "metric_name": task.metric_name, "train_flops": flops, "wall_s": wall,
        "train_flops_dense_wgrad": flops_wgrad,
        "dense_flops_per_step": 3 * (proj + other), "projection_flops_share": proj / (proj + other),
        "predicted_flops": predicted_flops(fwd, spec.method, spec.options, pattern, spec.steps),
        "flops_budget": spec.flops_budget,
        "target_sparsity": None if spec.pattern is None else 1 - _density(spec.pattern),
        "final_sparsity": end["nmfx/sparsity"] if spec.method != "dense" else 0.0, "final_alpha": end["nmfx/alpha"],
        "loss_start": statistics.fmean(losses[:k]), "loss_end": statistics.fmean(losses[-k:]),
        "final_train_loss": losses[-1], "losses_every": max(1, len(losses) // 50),
        "losses": losses[:: max(1, len(losses) // 50)],
        "curve": curve, "diag": diag, "diag_fields": ["step", "grad_norm_pruned/kept", "flip_rate", "alpha", "sparsity"],
        "options": spec.options, "sparsified": len(sparsified),
        "model": {k_: v for k_, v in c.items() if k_ in ("dim", "depth", "heads", "context")},
        "batch": c["batch"], "lr": lr, "data": task.info, "init": spec.init, "init_metric": init_metric,
        "nominal_steps": spec.nominal_steps if spec.nominal_steps is not None else spec.steps,
    }


def run_key(task: str, method: str, variant: Optional[str], pattern: Optional[str], seed: int, steps: int,
            budget: str, options: dict, lr: Optional[float], init: Optional[str] = None) -> str:
    """The identity of a run: task, method, variant, pattern, seed, steps, budget, nmfx options, lr, init."""
    return json.dumps([task, method, variant, pattern, seed, steps, budget, options,
                       None if lr is None else float(lr), init], sort_keys=True)


def record_key(record: dict, default_lr: Optional[float] = None) -> str:
    """:func:`run_key` of a record in accuracy.json (its lr counts as "the task's" when it is the default)."""
    lr = record.get("lr")
    return run_key(record["task"], record["method"], record["variant"], record["pattern"], record["seed"],
                   record["steps"], record["budget"], record.get("options", {}),
                   None if lr is None or lr == default_lr else lr, record.get("init"))


def lr_factor(step: int, steps: int, warmup: float = 0.1) -> float:
    """Linear warm-up over 10 % of the run (from 1/25), then cosine to 0 -- also for very short runs."""
    warm = max(1, round(warmup * steps))
    if step < warm:
        return (1 + 24 * step / warm) / 25
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))


def _density(pattern: str) -> float:
    n, m = pattern.split(":")
    return int(n) / int(m)


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------
def plan_runs(config: StudyConfig, tasks: dict[str, Any], fwds: dict[str, tuple]) -> list[RunSpec]:
    specs: list[RunSpec] = []
    for name in config.tasks:
        steps = tasks[name].cfg["steps"]
        for seed in range(config.seeds):
            specs.append(RunSpec(name, "dense", None, {}, None, seed, steps))
            for pattern in config.patterns:
                for method, variant, options in SPARSE_RECIPES:
                    specs.append(RunSpec(name, method, variant, dict(options), pattern, seed, steps))
        # Equal FLOPs: shorten every recipe that costs more than SR-STE at the same pattern.
        for pattern in config.patterns:
            budget = predicted_flops(fwds[name], "srste", {}, pattern, steps)
            for method, variant, options in SPARSE_RECIPES:
                if predicted_flops(fwds[name], method, options, pattern, steps) <= budget * 1.001:
                    continue
                short = iso_steps(fwds[name], method, options, pattern, budget, steps)
                for seed in range(config.seeds):
                    specs.append(RunSpec(name, method, variant, dict(options), pattern, seed, short, "flops", budget))
    return specs


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------
def _recipe_name(method: str, variant: Optional[str]) -> str:
    return method + (f" ({variant})" if variant else "")


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    if not values:
        return float("nan"), float("nan"), 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0), len(values)


def _fmt(values: list[float], metric_name: str) -> str:
    mean, std, n = _mean_std(values)
    if n == 0:
        return "–"
    digits = 3 if metric_name == "accuracy" else 2
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def _cell(records, task, method, variant, pattern, budget="steps", key="metric"):
    return [r[key] for r in records if r["task"] == task and r["method"] == method and r["variant"] == variant
            and r["pattern"] == pattern and r["budget"] == budget]


def _iso_cell(records, task, method, variant, pattern):
    """Equal-FLOPs values: the shortened run if there is one, else the equal-steps run (it fits)."""
    return _cell(records, task, method, variant, pattern, "flops") or _cell(records, task, method, variant, pattern)


def tables(records: list[dict]) -> str:
    out = []
    task_names = [t for t in TASKS if any(r["task"] == t for r in records)]
    for task in task_names:
        rs = [r for r in records if r["task"] == task]
        metric_name = rs[0]["metric_name"]
        better = "higher" if metric_name == "accuracy" else "lower"
        patterns = [p for p in ALL_PATTERNS if any(r["pattern"] == p for r in rs)]
        seeds = sorted({r["seed"] for r in rs})
        steps = sorted({r["steps"] for r in rs if r["budget"] == "steps"})
        head = "| recipe | " + " | ".join(f"{p} ({1 - _density(p):.0%})" for p in patterns) + " |"
        sep = "| --- |" + " --- |" * len(patterns)
        out.append(f"### {task}: {metric_name} ({better} is better), mean ± std over {len(seeds)} seed(s), "
                   f"{'/'.join(map(str, steps))} steps each\n")
        out += [head, sep]
        dense = _cell(rs, task, "dense", None, None)
        out.append("| dense (reference) | " + " | ".join(_fmt(dense, metric_name) for _ in patterns) + " |")
        for method, variant, _ in SPARSE_RECIPES:
            out.append(f"| {_recipe_name(method, variant)} | "
                       + " | ".join(_fmt(_cell(rs, task, method, variant, p), metric_name) for p in patterns) + " |")
        # Differences to SR-STE (paired by seed), in the direction "positive = the recipe is better".
        out.append(f"\n**{task}: difference to SR-STE at equal steps** (paired by seed; positive = better than "
                   "SR-STE; ✓ / ✗ where |mean| > 2 standard errors, ~ otherwise)\n")
        out += [head, sep]
        for method, variant, _ in SPARSE_RECIPES[1:]:
            out.append(f"| {_recipe_name(method, variant)} | "
                       + " | ".join(_delta(rs, task, method, variant, p, "steps") for p in patterns) + " |")
        # Equal FLOPs.
        out.append(f"\n**{task}: at equal training FLOPs** (SR-STE's; the costlier recipes re-run with fewer steps, "
                   "steps in brackets)\n")
        out += [head, sep]
        for method, variant, _ in SPARSE_RECIPES:
            cells = []
            for p in patterns:
                vals = _iso_cell(rs, task, method, variant, p)
                st = sorted({r["steps"] for r in rs if r["method"] == method and r["variant"] == variant
                             and r["pattern"] == p and r["budget"] == "flops"})
                cells.append(_fmt(vals, metric_name) + (f" [{st[0]}]" if st else ""))
            out.append(f"| {_recipe_name(method, variant)} | " + " | ".join(cells) + " |")
        out.append(f"\n**{task}: difference to SR-STE at equal FLOPs** (as above)\n")
        out += [head, sep]
        for method, variant, _ in SPARSE_RECIPES[1:]:
            out.append(f"| {_recipe_name(method, variant)} | "
                       + " | ".join(_delta(rs, task, method, variant, p, "iso") for p in patterns) + " |")
        # FLOPs and time.
        out.append(f"\n**{task}: training FLOPs relative to dense** (paper counting; in brackets: weight-gradient "
                   "GEMM kept dense) and mean wall time per run\n")
        out += [head, sep]
        dense_flops = statistics.fmean(_cell(rs, task, "dense", None, None, key="train_flops") or [float("nan")])
        for method, variant, _ in RECIPES:
            cells = []
            for p in patterns:
                pp = None if method == "dense" else p
                fl = _cell(rs, task, method, variant, pp, key="train_flops")
                fw = _cell(rs, task, method, variant, pp, key="train_flops_dense_wgrad")
                wall = _cell(rs, task, method, variant, pp, key="wall_s")
                cells.append(f"{statistics.fmean(fl) / dense_flops:.2f}× ({statistics.fmean(fw) / dense_flops:.2f}×), "
                             f"{statistics.fmean(wall):.1f} s" if fl else "–")
            out.append(f"| {_recipe_name(method, variant)} | " + " | ".join(cells) + " |")
        noise = [_mean_std(_cell(rs, task, m, v, p))[1] for m, v, _ in SPARSE_RECIPES for p in patterns]
        noise = [x for x in noise if x == x and len(seeds) > 1]
        if noise:
            out.append(f"\nSeed-to-seed noise ({task}): median std of a cell {statistics.median(noise):.4g}, "
                       f"max {max(noise):.4g} {metric_name}.")
        out.append("")
    return "\n".join(out)


def _delta(rs, task, method, variant, pattern, budget) -> str:
    mine = {r["seed"]: r["metric"] for r in rs if r in _records_of(rs, task, method, variant, pattern, budget)}
    base = {r["seed"]: r["metric"] for r in rs if r in _records_of(rs, task, "srste", None, pattern, budget)}
    seeds = sorted(set(mine) & set(base))
    if not seeds:
        return "–"
    sign = 1.0 if rs[0]["metric_name"] == "accuracy" else -1.0
    diffs = [sign * (mine[s] - base[s]) for s in seeds]
    mean, std, n = _mean_std(diffs)
    digits = 3 if rs[0]["metric_name"] == "accuracy" else 2
    if n < 2:
        return f"{mean:+.{digits}f}"
    se = std / math.sqrt(n)
    mark = "✓" if mean > 2 * se else ("✗" if mean < -2 * se else "~")
    return f"{mean:+.{digits}f} ± {se:.{digits}f} {mark}"


def _records_of(rs, task, method, variant, pattern, budget):
    def match(r, b):
        return (r["task"] == task and r["method"] == method and r["variant"] == variant
                and r["pattern"] == pattern and r["budget"] == b)
    if budget == "iso":
        found = [r for r in rs if match(r, "flops")]
        return found or [r for r in rs if match(r, "steps")]
    return [r for r in rs if match(r, budget)]


def is_design(record: dict) -> bool:
    """Whether a record belongs to the controlled study (``--design``) rather than the default grid."""
    return str(record.get("config", "")).startswith("design")


#: Row order and labels of the controlled study's tables (variants not listed sort after these).
DESIGN_ROWS = (
    ("dense", None, "dense (reference)"),
    ("srste", None, "SR-STE"),
    ("srste", "warmup50", "SR-STE + dense warm-up 50 % (MDGF-linear's alpha > 0 time; equal FLOPs)"),
    ("srste", "warmup25", "SR-STE + dense warm-up 25 % (= sum of MDGF-linear's alpha)"),
    ("srste", "iso-mdgf", "SR-STE trained longer, to MDGF-linear's training FLOPs (paper's iso-FLOPs)"),
    ("ste", None, "STE"),
    ("ste", "warmup50", "STE + dense warm-up 50 %"),
    ("gmp", None, "GMP (cubic, kept per group M -> N over 50 %)"),
    ("mdgf", "linear", "MDGF linear (decay over 50 %, default)"),
    ("mdgf", "linear-f25", "MDGF linear, decay over 25 %"),
    ("mdgf", "linear-f75", "MDGF linear, decay over 75 %"),
    ("mdgf", "exponential", "MDGF exponential (default)"),
    ("sdgf", "stepwise", "SDGF stepwise (default)"),
    ("sdgf", "geometric", "SDGF geometric"),
    ("sdgf", "stepwise+mdgf", "SDGF stepwise + MDGF-linear mask decay (sdgf decay='linear')"),
)


def _design_label(method: str, variant: Optional[str]) -> str:
    for m, v, label in DESIGN_ROWS:
        if (m, v) == (method, variant):
            return label
    return _recipe_name(method, variant)


def _design_recipes(rs: list[dict]) -> list[tuple[str, Optional[str]]]:
    present = {(r["method"], r["variant"]) for r in rs}
    known = [(m, v) for m, v, _ in DESIGN_ROWS if (m, v) in present]
    return known + sorted(present - set(known), key=str)


def design_tables(records: list[dict]) -> str:
    """Mean, standard deviation and seed count of every arm of the controlled study, and its FLOPs."""
    out = []
    for task in [t for t in TASKS if any(r["task"] == t for r in records)]:
        def setting_of(r: dict) -> tuple:
            return r.get("init") or "", r.get("nominal_steps") or r["steps"], r["lr"]
        for init, steps, lr in sorted({setting_of(r) for r in records if r["task"] == task}):
            rl = [r for r in records if r["task"] == task and setting_of(r) == (init, steps, lr)]
            metric_name = rl[0]["metric_name"]
            patterns = [p for p in ALL_PATTERNS if any(r["pattern"] == p for r in rl)]
            digits = 3 if metric_name == "accuracy" else 2
            head = "| recipe | " + " | ".join(f"{p} ({1 - _density(p):.0%})" for p in patterns) + " |"
            sep = "| --- |" + " --- |" * len(patterns)
            setting = f"fine-tuning the dense model ({init}), " if init else "from scratch, "
            out.append(f"### {task}, {setting}{steps} steps, lr {lr:g}: {metric_name} "
                       f"({'higher' if metric_name == 'accuracy' else 'lower'} is better), mean ± sample std "
                       "[seeds]\n")
            out += [head, sep]
            dense_flops = [r["train_flops"] for r in rl if r["method"] == "dense"]
            flop_rows = []
            for method, variant in _design_recipes(rl):
                cells, fcells = [], []
                for p in patterns:
                    pp = None if method == "dense" else p
                    cell = [r for r in rl if r["method"] == method and r["variant"] == variant and r["pattern"] == pp]
                    mean, std, n = _mean_std([r["metric"] for r in cell])
                    cells.append(f"{mean:.{digits}f} ± {std:.{digits}f} [{n}]" if n else "–")
                    if cell and dense_flops:
                        fcells.append(f"{statistics.fmean(r['train_flops'] for r in cell) / statistics.fmean(dense_flops):.2f}×, "
                                      f"{statistics.fmean(r['wall_s'] for r in cell):.0f} s")
                    else:
                        fcells.append("–")
                out.append(f"| {_design_label(method, variant)} | " + " | ".join(cells) + " |")
                flop_rows.append(f"| {_design_label(method, variant)} | " + " | ".join(fcells) + " |")
            out.append(f"\n**Training FLOPs relative to dense (paper counting) and mean wall time per run** "
                       f"({task}, {steps} steps; wall times are on a shared machine)\n")
            out += [head, sep] + flop_rows + [""]
            out += _trajectory(rl, patterns, digits)
    return "\n".join(out)


def _trajectory(rl: list[dict], patterns: list[str], digits: int) -> list[str]:
    """Mean metric at the evaluation checkpoints (the records' ``curve``), per recipe and pattern."""
    out = []
    for p in patterns:
        rows = []
        for method, variant in _design_recipes(rl):
            cell = [r for r in rl if r["method"] == method and r["variant"] == variant
                    and r["pattern"] == (None if method == "dense" else p)]
            if not cell:
                continue
            points = sorted({c[0] for r in cell for c in r["curve"]})
            means = [statistics.fmean(c[2] for r in cell for c in r["curve"] if c[0] == t) for t in points]
            rows.append((method, variant, points, means))
        if not rows:
            continue
        points = rows[0][2]
        out.append(f"**{p}: mean {rl[0]['metric_name']} at the evaluation checkpoints** (step: value)\n")
        out.append("| recipe | " + " | ".join(f"step {t}" for t in points) + " |")
        out.append("| --- |" + " --- |" * len(points))
        for method, variant, pts, means in rows:
            if pts == points:
                out.append(f"| {_design_label(method, variant)} | " + " | ".join(f"{m:.{digits}f}" for m in means) + " |")
        out.append("")
    return out


def plot_design(records: list[dict], out: Path) -> list[Path]:
    """accuracy_design.png: every seed of every arm of the controlled study, per pattern."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plots (pip install -e \".[study]\")")
        return []
    def group(r: dict) -> tuple:
        return r["task"], r["steps"], r["lr"], r.get("init") or ""

    groups = sorted({group(r) for r in records}, key=str)
    panels = [(g, p) for g in groups for p in ALL_PATTERNS
              if any(group(r) == g and r["pattern"] == p for r in records)]
    if not panels:
        return []
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 5.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, ((task, steps, lr, init), pattern) in zip(axes.flat, panels):
        rs = [r for r in records if group(r) == (task, steps, lr, init) and r["pattern"] in (None, pattern)]
        recipes = _design_recipes(rs)
        for i, (method, variant) in enumerate(recipes):
            vals = [r["metric"] for r in rs if r["method"] == method and r["variant"] == variant
                    and r["pattern"] == (None if method == "dense" else pattern)]
            if not vals:
                continue
            ax.scatter([i] * len(vals), vals, s=14, color="tab:blue", alpha=0.6)
            mean, std, n = _mean_std(vals)
            ax.errorbar([i + 0.18], [mean], yerr=[std], color="black", marker="_", ms=12, capsize=3)
        ax.set_xticks(range(len(recipes)), [_recipe_name(m, v) for m, v in recipes], rotation=60, ha="right", fontsize=8)
        ax.set_title(f"{task} {pattern}, {'fine-tune, ' if init else ''}{steps} steps, lr {lr:g}\n(dots: seeds; "
                     "bar: mean ± std)", fontsize=9)
        ax.set_ylabel("test accuracy" if rs[0]["metric_name"] == "accuracy" else "validation perplexity")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "accuracy_design.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------
_STYLE = {("srste", None): ("tab:red", "o"), ("mdgf", "linear"): ("tab:blue", "s"),
          ("mdgf", "exponential"): ("tab:cyan", "D"), ("sdgf", "stepwise"): ("tab:green", "^"),
          ("sdgf", "geometric"): ("tab:olive", "v")}


def plot(records: list[dict], out: Path, diag_task: str = "lm") -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plots (pip install -e \".[study]\")")
        return []
    written = []
    task_names = [t for t in TASKS if any(r["task"] == t for r in records)]
    has_iso = any(r["budget"] == "flops" for r in records)
    rows = 2 if has_iso else 1
    fig, axes = plt.subplots(rows, len(task_names), figsize=(6.2 * len(task_names), 4.4 * rows), squeeze=False)
    for col, task in enumerate(task_names):
        rs = [r for r in records if r["task"] == task]
        patterns = [p for p in ALL_PATTERNS if any(r["pattern"] == p for r in rs)]
        xs = [1 - _density(p) for p in patterns]
        for row in range(rows):
            ax = axes[row][col]
            dense = _mean_std(_cell(rs, task, "dense", None, None))
            ax.axhline(dense[0], color="black", lw=1, ls="--", label="dense")
            if dense[2] > 1:
                ax.axhspan(dense[0] - dense[1], dense[0] + dense[1], color="black", alpha=0.08)
            for i, (method, variant, _) in enumerate(SPARSE_RECIPES):
                get = _cell if row == 0 else _iso_cell
                stats_ = [_mean_std(get(rs, task, method, variant, p)) for p in patterns]
                color, marker = _STYLE[(method, variant)]
                offset = (i - 2) * 0.004  # keep error bars apart
                ax.errorbar([x + offset for x in xs], [s[0] for s in stats_], yerr=[s[1] for s in stats_],
                            color=color, marker=marker, capsize=3, lw=1.2, ms=5, label=_recipe_name(method, variant))
            ax.set_xticks(xs, [f"{p}\n{x:.0%}" for p, x in zip(patterns, xs)])
            ax.set_xlabel("pattern / sparsity of the block projections")
            metric_name = rs[0]["metric_name"]
            ax.set_ylabel(f"{'test accuracy' if metric_name == 'accuracy' else 'validation perplexity'} "
                          f"({'higher' if metric_name == 'accuracy' else 'lower'} is better)")
            if metric_name == "perplexity":
                ax.set_yscale("log")
            seeds = len({r['seed'] for r in rs})
            ax.set_title(f"{task}: {'equal steps' if row == 0 else 'equal training FLOPs (SR-STE budget)'} "
                         f"(mean ± std, {seeds} seed{'s' * (seeds > 1)})", fontsize=10)
            ax.grid(alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "accuracy_vs_sparsity.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    # Diagnostics at 1:16, first task that has it, lowest seed.
    target = [r for r in records if r["pattern"] == "1:16" and r["budget"] == "steps" and r["method"] != "dense"]
    if not target:
        print("no 1:16 runs: skipping diagnostics_1x16.png")
        return written
    have = [t for t in task_names if any(r["task"] == t for r in target)]
    task = diag_task if diag_task in have else have[0]
    seed = min(r["seed"] for r in target if r["task"] == task)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.2))
    for r in target:
        if r["task"] != task or r["seed"] != seed:
            continue
        color, _ = _STYLE[(r["method"], r["variant"])]
        label = _recipe_name(r["method"], r["variant"])
        steps = [d[0] for d in r["diag"]]
        axes[0].plot(steps, [d[1] for d in r["diag"]], color=color, lw=1.2, label=label)
        # Per entry: the pruned set is s/(1-s) times larger than the kept one (15x at 1:16).
        axes[1].plot(steps, [d[1] * math.sqrt((1 - d[4]) / d[4]) if 0 < d[4] < 1 else float("nan") for d in r["diag"]],
                     color=color, lw=1.2, label=label)
        axes[2].plot(steps, [max(d[2], 1e-6) for d in r["diag"]], color=color, lw=1.2, label=label)
    axes[0].set_ylabel("‖grad on pruned‖ / ‖grad on kept‖ (nmfx.stats)")
    axes[1].set_ylabel("per-entry RMS ratio, pruned / kept")
    axes[2].set_ylabel("mask flip rate at the last refresh")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"nmfx.stats diagnostics at 1:16 ({task}, seed {seed}; logged every "
                 f"{max(1, target[0]['steps'] // 100)} steps)", fontsize=10)
    fig.tight_layout()
    path = out / "diagnostics_1x16.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


# ----------------------------------------------------------------------------------------------
# Write-up
# ----------------------------------------------------------------------------------------------
def update_writeup(path: Path, blocks: dict[str, str]) -> None:
    """Replace the generated blocks of ACCURACY.md (the prose around them is hand-written)."""
    if not path.exists():
        print(f"{path} does not exist: not updating it")
        return
    text = path.read_text()
    for key, body in blocks.items():
        if not body:
            continue
        begin, end = f"<!-- BEGIN GENERATED: {key} -->", f"<!-- END GENERATED: {key} -->"
        if begin in text and end in text:
            pre, rest = text.split(begin, 1)
            _, post = rest.split(end, 1)
            text = f"{pre}{begin}\n{body.strip()}\n{end}{post}"
    path.write_text(text)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def build_config(args: argparse.Namespace) -> StudyConfig:
    if args.design:
        base = DESIGN_QUICK if args.quick else DESIGN
    else:
        base = QUICK if args.quick else DEFAULT
    vision, lm = dict(base.vision), dict(base.lm)
    for cfg in (vision, lm):
        cfg["dim"] = int(cfg["dim"] * args.scale)
        cfg["steps"] = int(round(cfg["steps"] * args.scale))
        if args.steps:
            cfg["steps"] = args.steps
    config = dataclasses.replace(base, vision=vision, lm=lm)
    if args.seeds:
        config = dataclasses.replace(config, seeds=args.seeds)
    if args.patterns:
        config = dataclasses.replace(config, patterns=tuple(args.patterns))
    if args.tasks:
        config = dataclasses.replace(config, tasks=tuple(args.tasks))
    name = base.name + ("" if args.scale == 1 else f"-scale{args.scale:g}")
    custom = [f"--{k} {v}" for k, v in (("seeds", args.seeds), ("steps", args.steps)) if v]
    if args.patterns:
        custom.append("--patterns " + " ".join(args.patterns))
    if args.tasks:
        custom.append("--tasks " + " ".join(args.tasks))
    return dataclasses.replace(config, name=name + (f" ({' '.join(custom)})" if custom else ""))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke configuration: 1 seed, 2:4 and 1:16, one-block models, 120 / 60 steps "
                        "(with --design: 1 seed, 1:8, 40 steps)")
    parser.add_argument("--design", action="store_true",
                        help="the controlled study: vision, 5 seeds, 1,000 steps, 1:8 and 1:16, the arms of design_arms()")
    parser.add_argument("--tiers", type=int, nargs="+", default=list(range(1, 11)),
                        help="with --design: which tiers of arms to run (1 core + matched warm-up, 2 GMP, 3 ablations, "
                             "4 dense-pretrain -> fine-tune, 5 STE controls, 6 lr sweep, 7 1:32, 8 other decay recipes, "
                             "9 SR-STE at MDGF's FLOPs, 10 SDGF + MDGF)")
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs (resume later)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply model width and steps (e.g. 4 on a GPU)")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS))
    parser.add_argument("--seeds", type=int, help="number of seeds (0..N-1)")
    parser.add_argument("--patterns", nargs="+", choices=list(ALL_PATTERNS))
    parser.add_argument("--steps", type=int, help="override the step budget of every task")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default on CPU: 1 -- these models are too small to gain much from "
                             "2 threads, and 2 threads collapse when another process shares the cores)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--fresh", action="store_true",
                        help="ignore OUT/accuracy.json (default: keep its runs and skip the planned runs it already has)")
    parser.add_argument("--writeup", type=Path, default=None,
                        help=f"update the generated sections of this write-up (default: {WRITEUP} unless --quick)")
    parser.add_argument("--no-writeup", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--diag-task", default="lm", choices=list(TASKS), help="task of diagnostics_1x16.png (seed 0)")
    parser.add_argument("--from-json", type=Path, nargs="+", metavar="JSON",
                        help="train nothing: rebuild the tables, plots (and write-up) from these accuracy.json files")
    args = parser.parse_args(argv)
    from tqdm.auto import tqdm

    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        records = [r for path in args.from_json for r in json.loads(path.read_text())]
        return _write_outputs(args, records, _provenance(records, "regenerated with --from-json"))
    config = build_config(args)
    started = time.perf_counter()
    tasks = {name: TASKS[name](getattr(config, name), args.device) for name in config.tasks}
    fwds = {name: forward_flops(task, task.model()) for name, task in tasks.items()}
    specs = plan_design(config, tasks, fwds, tuple(args.tiers)) if args.design else plan_runs(config, tasks, fwds)
    path = args.out / "accuracy.json"
    records = [] if args.fresh or not path.exists() else json.loads(path.read_text())
    done = {record_key(r, tasks[r["task"]].cfg["lr"] if r["task"] in tasks else None) for r in records}
    todo = [spec for spec in specs if spec.key not in done]
    if args.max_runs is not None:
        todo = todo[: args.max_runs]
    print(f"accuracy study '{config.name}': {len(specs)} runs planned, {len(specs) - len(todo)} already in {path}, "
          f"{len(todo)} to run ({', '.join(config.tasks)}; patterns {' '.join(config.patterns)}; {config.seeds} seed(s); "
          f"steps {', '.join(n + '=' + str(t.cfg['steps']) for n, t in tasks.items())}) on {args.device}, "
          f"{torch.get_num_threads()} threads", flush=True)
    machine = machine_info()
    bar = tqdm(todo, desc="runs", disable=args.no_progress, ncols=100)
    for spec in bar:
        bar.set_postfix_str(spec.label)
        rec = run_one(spec, tasks[spec.task], fwds[spec.task])
        rec.update(config=config.name, device=args.device, threads=torch.get_num_threads(), torch=torch.__version__,
                   cpu=machine["cpu"], finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        records.append(rec)
        _save_json(path, records)  # after every run: an interrupted study resumes from here
        if args.no_progress:
            print(f"done {spec.label} ({rec['wall_s']:.1f} s): {rec['metric_name']} {rec['metric']:.4f}", flush=True)
    total = time.perf_counter() - started
    print(f"{len(todo)} runs in {total / 60:.1f} min", flush=True)
    return _write_outputs(args, records, _provenance(records), total)


def _provenance(records: list[dict], note: str = "") -> str:
    """Which runs (grouped by configuration) the numbers come from, on which CPU."""
    runs: dict[str, list[dict]] = {}
    for r in records:
        runs.setdefault(r.get("config", "?"), []).append(r)
    cpus = sorted({r["cpu"] for r in records if r.get("cpu")}) or [_cpu_name()]
    return ("Numbers from " + "; ".join(
        f"the run `{name}` ({len(rs)} runs, tasks {', '.join(sorted({r['task'] for r in rs}))}, "
        f"{sum(r['wall_s'] for r in rs) / 60:.1f} min of training on {rs[0].get('device', '?')}, "
        f"{rs[0].get('threads', '?')} thread(s), torch {rs[0].get('torch', '?')})" for name, rs in runs.items())
        + f", on {' / '.join(cpus)}" + (f"; {note}." if note else "."))


def _save_json(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(records, indent=1))
    os.replace(tmp, path)


def _write_outputs(args: argparse.Namespace, records: list[dict], provenance: str, total: Optional[float] = None) -> int:
    _save_json(args.out / "accuracy.json", records)
    legacy = [r for r in records if not is_design(r)]
    design = [r for r in records if is_design(r)]
    table_md = tables(legacy) if legacy else ""
    design_md = design_tables(design) if design else ""
    (args.out / "accuracy.md").write_text(f"# Accuracy study\n\n{provenance}\n\n"
                                         + (f"## Controlled study (--design)\n\n{design_md}\n\n" if design_md else "")
                                         + (f"## Default study\n\n{table_md}\n" if table_md else ""))
    print()
    print(design_md or table_md)
    written = plot(legacy, args.out, args.diag_task) if legacy else []
    written += plot_design(design, args.out) if design else []
    for path in written:
        print(f"wrote {path}")
    print(f"wrote {args.out / 'accuracy.json'} and {args.out / 'accuracy.md'} ({len(records)} runs"
          + (f", {total:.0f} s)" if total is not None else ")"))
    writeup = args.writeup or (None if args.quick else WRITEUP)
    if writeup and not args.no_writeup:
        update_writeup(writeup, {"provenance": provenance, "tables": table_md, "design": design_md})
        print(f"updated the generated sections of {writeup}")
    return 0


def _cpu_name() -> str:
    return machine_info()["cpu"]


if __name__ == "__main__":
    sys.exit(main())
