"""``python -m nmfx`` / ``nmfx``: ``demo`` (train dense vs N:M on the built-in digits, then compare
inference speed), ``inspect`` (sparsify a model spec — any transformers architecture, a config file, a
torchvision model or a factory — and print the report and the rewritten graphs) and ``bench``
(per-layer inference speed on this machine). Options are validated before any work starts."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from typing import Any, Callable, Optional

import torch
from torch import nn

__all__ = ["main", "build_spec", "train_digits"]

_TRANSFORMERS = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64)),
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256)),
    "bert": ("BertForSequenceClassification", "BertConfig", dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                                                 num_attention_heads=4, vocab_size=256)),
    "t5": ("T5ForConditionalGeneration", "T5Config", dict(num_layers=2, d_model=64, d_ff=128, num_heads=4, d_kv=16, vocab_size=256)),
    "vit": ("ViTForImageClassification", "ViTConfig", dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                                           num_attention_heads=4, intermediate_size=128, num_labels=10)),
}
#: Small sizes for any other transformers architecture (applied to the keys its config has).
_SMALL = {"num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "num_decoder_layers": 2, "hidden_size": 64,
          "n_embd": 64, "d_model": 64, "intermediate_size": 128, "n_inner": 128, "d_ff": 128, "ffn_dim": 128,
          "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
          "d_kv": 16, "vocab_size": 256}
#: Model heads tried, in order, for an architecture named without a class.
_AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForImageClassification",
                 "AutoModelForSequenceClassification", "AutoModel")
_DESCRIPTION = """nmfx: N:M structured sparsity as torch.fx passes.
  demo     train a small ViT on the built-in digits, dense vs N:M, and compare inference speed
  inspect  sparsify a model spec; print the report and the rewritten graphs
  bench    per-layer inference speed on this machine"""


def build_spec(spec: str, overrides: Optional[dict[str, Any]] = None) -> tuple[nn.Module, Any]:
    """(model with random weights, example inputs or None) for ``transformers:NAME`` (any architecture
    name transformers knows, small by default, or a local config file/directory), ``torchvision:NAME``,
    ``nmfx:tinyvit`` or ``package.module:factory`` (importable from the current directory).
    ``overrides`` sets transformers config fields (``{"hidden_size": 128}``)."""
    source, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"model spec {spec!r}: expected SOURCE:NAME, e.g. transformers:gpt2, transformers:mistral, "
                         "torchvision:vit_b_16, nmfx:tinyvit or mypackage.models:make_model")
    if overrides and source != "transformers":
        raise ValueError(f"--config sets transformers config fields; {spec!r} is not a transformers spec")
    if source == "transformers":
        return _build_transformers(name, overrides or {}), None
    if source == "torchvision":
        models = importlib.import_module("torchvision.models")
        model = models.get_model(name, weights=None)
        return model, torch.randn(1, 3, 224, 224)
    if source == "nmfx" and name == "tinyvit":
        from nmfx.examples import TinyViT
        return TinyViT(), torch.randn(2, 1, 8, 8)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # the console script, unlike python -m, does not put it there
    try:
        factory: Callable[[], nn.Module] = getattr(importlib.import_module(source), name)
    except ModuleNotFoundError as error:
        raise ValueError(f"model spec {spec!r}: cannot import {source!r} ({error}); run from the directory that "
                         "holds it or install it") from error
    except AttributeError as error:
        raise ValueError(f"model spec {spec!r}: {source} has no {name!r}") from error
    return factory(), None


def _build_transformers(name: str, overrides: dict[str, Any]) -> nn.Module:
    """A transformers model with random weights: a built-in small config, any architecture name
    (``AutoConfig.for_model`` with small sizes), or a local config.json / directory."""
    transformers = importlib.import_module("transformers")
    transformers.logging.set_verbosity_error()
    if name in _TRANSFORMERS:
        model_cls, config_cls, config = _TRANSFORMERS[name]
        return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**config, **overrides}))
    if os.path.exists(name):
        config = transformers.AutoConfig.from_pretrained(name)
        sizes: dict[str, Any] = {}
    else:
        try:
            config = transformers.AutoConfig.for_model(name)
        except ValueError as error:
            raise ValueError(f"unknown transformers architecture {name!r} (not a model type transformers "
                             f"{transformers.__version__} knows, nor a config file or directory); built-in small "
                             f"configs: {', '.join(_TRANSFORMERS)}") from error
        sizes = {key: value for key, value in _SMALL.items() if key in config.to_dict()}
    unknown = sorted(key for key in overrides if key not in config.to_dict())
    if unknown:  # configs accept any keyword silently; a typo would change nothing
        raise ValueError(f"--config {unknown[0]}: {type(config).__name__} has no such field")
    for key, value in {**sizes, **overrides}.items():
        setattr(config, key, value)
    classes = [getattr(transformers, arch) for arch in (config.architectures or []) if hasattr(transformers, arch)]
    classes += [getattr(transformers, auto) for auto in _AUTO_CLASSES]
    for cls in classes:
        try:
            return cls(config) if not cls.__name__.startswith("Auto") else cls.from_config(config)
        except (ValueError, KeyError):
            continue
    raise ValueError(f"no transformers model class builds a {type(config).__name__}")


def _config_overrides(pairs: Optional[list[str]]) -> dict[str, Any]:
    """``["hidden_size=128", "tie_word_embeddings=false"]`` -> typed values (JSON where it parses)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--config takes KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _check_training_options(pattern: str, method: str, **options: Any) -> None:
    """Fail before any work when the pattern or method (and its options) cannot be used."""
    import nmfx

    target = nmfx.Pattern.parse(pattern)
    nmfx.resolve_method(method, **options).patterns(target)


def train_digits(pattern: Optional[str], method: str, steps: int, seed: int = 0, progress: bool = True,
                 **method_options: Any) -> dict[str, Any]:
    """Train a TinyViT on the built-in digits, dense (``pattern=None``) or sparsified; returns metrics."""
    import nmfx
    from nmfx.examples import TinyViT, digits
    from tqdm.auto import tqdm

    x_train, y_train, x_test, y_test = digits(seed=seed)
    torch.manual_seed(seed)
    model = TinyViT()
    if pattern is not None:
        nmfx.sparsify(model, pattern, method, example_inputs=(x_train[:2],), total_steps=steps, **method_options)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    label = "dense" if pattern is None else f"{pattern} {method}"
    # disable=None: tqdm stays silent when stderr is not a terminal (CI logs, pipes)
    bar = tqdm(range(steps), desc=f"{label:>12}", disable=None if progress else True, leave=True, ncols=90)
    start = time.perf_counter()
    model.train()
    for _ in bar:
        idx = torch.randint(0, len(x_train), (64,), generator=g)
        loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if pattern is not None:
            nmfx.step(model)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        logits = model(x_test)
    return {"model": model, "loss": nn.functional.cross_entropy(logits, y_test).item(),
            "accuracy": (logits.argmax(-1) == y_test).float().mean().item(), "seconds": time.perf_counter() - start}


def _demo(args: argparse.Namespace) -> int:
    import nmfx

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    _check_training_options(args.pattern, args.method, total_steps=args.steps)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"nmfx demo: a small ViT on the built-in 8x8 digits ({args.steps} steps), dense vs {args.pattern} {args.method}\n")
    dense = train_digits(None, args.method, args.steps, progress=not args.quiet)
    sparse = train_digits(args.pattern, args.method, args.steps, progress=not args.quiet)
    print()
    print(f"{'model':<16}{'test loss':>10}{'test acc':>10}{'train s':>9}")
    for name, run in (("dense", dense), (f"{args.pattern} {args.method}", sparse)):
        print(f"{name:<16}{run['loss']:>10.3f}{run['accuracy']:>10.3f}{run['seconds']:>9.1f}")
    print()
    print(nmfx.report(sparse["model"]))
    gm = next(iter(nmfx.graphs(sparse["model"]).values()))
    print("\nRewritten graph of blocks.0 (first lines; see `python -m nmfx inspect nmfx:tinyvit`):")
    print("\n".join(gm.code.strip().splitlines()[:8]))
    _demo_inference_speed(dense["model"], sparse["model"], args.pattern)
    return 0


def _demo_inference_speed(dense: nn.Module, sparse: nn.Module, pattern: str) -> None:
    """Inference latency of the demo model dense vs packed, and of one 4096x4096 layer."""
    import nmfx
    from nmfx.bench import layer_rows, timeit
    from nmfx.examples import digits

    try:
        packed = nmfx.to_inference(sparse)
    except ValueError as error:  # e.g. a pattern with M > 32 cannot be packed
        print(f"\n(no inference comparison: {error})")
        return
    images = digits()[2][:256]
    with torch.no_grad():
        t_dense = timeit(lambda: dense(images), 3, 20, 1.0)
        t_packed = timeit(lambda: packed(images), 3, 20, 1.0)
        agree = (packed(images).argmax(-1) == sparse.eval()(images).argmax(-1)).float().mean().item()
    print(f"\nInference, 256 test images: dense {t_dense * 1e3:.1f} ms, nmfx {pattern} packed {t_packed * 1e3:.1f} ms "
          f"({t_dense / t_packed:.2f}x; predictions agree with the trained sparse model on {agree:.0%}).")
    print("Its layers are only 64 wide, so per-call overheads dominate; at realistic widths (one 4096x4096 layer):")
    for row in layer_rows(4096, [pattern], [1, 64], ["float32"], csr=False, budget_s=0.3, min_reps=3, max_reps=10):
        print(f"  batch {row['batch']:>3}: dense {row['dense_ms']:.2f} ms, nmfx {row['nmfx_ms']:.2f} ms "
              f"({row['speedup_vs_dense']:.1f}x)")
    print("Full per-layer table: python -m nmfx bench")


def _bench(args: argparse.Namespace) -> int:
    from nmfx.bench import LAYER_HEADER, describe, format_layer_row, layer_rows, machine_info

    torch.set_num_threads(args.threads)
    print(f"machine: {describe(machine_info())}")
    print(f"one {args.size}x{args.size} layer, y = x @ W.T: nmfx nm_linear (backend {args.backend}) vs dense "
          "F.linear vs torch CSR, same masked weight, same run\n")
    print(LAYER_HEADER)
    print("-" * len(LAYER_HEADER))
    for row in layer_rows(args.size, args.patterns.split(","), [int(b) for b in args.batches.split(",")],
                          args.dtypes.split(","), backend=args.backend, budget_s=0.5):
        print(format_layer_row(row), flush=True)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import nmfx

    options = {"total_steps": args.total_steps}
    _check_training_options(args.pattern, args.method, **options)
    model, example_inputs = build_spec(args.spec, _config_overrides(args.config))
    nmfx.sparsify(model, args.pattern, args.method, example_inputs=example_inputs,
                  include=args.include, exclude=args.exclude, **options)
    print(nmfx.report(model))
    graphs = nmfx.graphs(model)
    for name, gm in list(graphs.items())[: args.graphs]:
        print(f"\n# {name} ({type(gm).__name__})\n{gm.code.strip()}")
    if len(graphs) > args.graphs:
        print(f"\n... {len(graphs) - args.graphs} more rewritten graphs (--graphs N to show more)")
    if args.dot:
        with open(args.dot, "w") as f:
            for name, gm in graphs.items():
                f.write(f"// {name}\n{nmfx.to_dot(gm)}\n")
        print(f"\nwrote Graphviz source of {len(graphs)} graphs to {args.dot}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    import nmfx

    parser = argparse.ArgumentParser(prog="python -m nmfx", description=_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"nmfx {nmfx.__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small ViT on digits, dense vs N:M sparse")
    demo.add_argument("--pattern", default="1:8")
    demo.add_argument("--method", default="sdgf")
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(run=_demo)
    inspect = sub.add_parser("inspect", help="sparsify a model spec; print the report and rewritten graphs")
    inspect.add_argument("spec", help="transformers:NAME (gpt2, llama, mistral, ...: any architecture, small by default; "
                         "or a config.json path), torchvision:NAME, nmfx:tinyvit or pkg.module:factory")
    inspect.add_argument("--config", action="append", metavar="KEY=VALUE",
                         help="set a transformers config field, e.g. --config hidden_size=256 (repeatable)")
    inspect.add_argument("--pattern", default="1:8")
    inspect.add_argument("--method", default="sdgf", help="as nmfx.sparsify's method= (default sdgf, as sparsify)")
    inspect.add_argument("--total-steps", type=int, default=1000, help="the schedule's length (total_steps=)")
    inspect.add_argument("--include", action="append")
    inspect.add_argument("--exclude", action="append")
    inspect.add_argument("--graphs", type=int, default=1, help="how many rewritten graphs to print")
    inspect.add_argument("--dot", help="write the rewritten graphs as Graphviz source to this file")
    inspect.set_defaults(run=_inspect)
    bench = sub.add_parser("bench", help="per-layer inference speed on this machine: nmfx vs dense vs CSR")
    bench.add_argument("--size", type=int, default=4096)
    bench.add_argument("--patterns", default="2:4,1:8,1:16")
    bench.add_argument("--batches", default="1,8,64,256")
    bench.add_argument("--dtypes", default="float32,bfloat16")
    bench.add_argument("--backend", default="auto", choices=("auto", "reference"),
                       help="auto: nmfx::nm_linear (the C++ kernel on the CPU); reference: the plain-torch oracle")
    bench.add_argument("--threads", type=int, default=torch.get_num_threads())
    bench.set_defaults(run=_bench)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
