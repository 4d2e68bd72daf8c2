"""Hugging Face integration: the ``Trainer`` callback, and ``save_pretrained`` / ``from_pretrained`` of
nmfx-sparsified ``transformers`` models.

    import nmfx
    from nmfx.integrations.hf import NMSparsityCallback

    model = nmfx.sparsify(model, "1:8", "sdgf", total_steps=training_args.max_steps)
    trainer = Trainer(model=model, args=training_args, train_dataset=ds)
    NMSparsityCallback.attach(trainer)        # first in line, so every logger sees the nmfx keys
    trainer.train()                           # or trainer.train(resume_from_checkpoint=True)

``nmfx.step(model)`` runs right after each optimizer step (``on_optimizer_step``: after gradient
accumulation, before the gradients are zeroed, so the gradient-norm diagnostics are available); at
logging steps the stats are merged into the Trainer's logs and ``state.log_history``. A model without nmfx
state is refused when training begins (it would train dense: sparsify it first, also before resuming).

Checkpoints. ``nmfx.sparsify`` gives a ``transformers`` model a ``save_pretrained`` (an instance
attribute; the class is unchanged) that writes

* under every sparsified weight's usual key, the *effective* weight ``W * (m + alpha (1 - m))`` that the
  model computes with, so a plain ``cls.from_pretrained(path)`` (or any other tool reading the files)
  gets the same function as the sparsified model -- as a dense model with zeros, without the nmfx
  training state (it lists the ``*_nm.*`` keys as unexpected);
* under ``<weight>_nm.pruned`` the dense weight's values at the pruned positions, and the nmfx state
  tensors (``_nm.mask``, ``step``, ``alpha``, ``srste_lambda``, ``config``);
* ``"nmfx"`` in ``config.json``: the pattern, the method config and the sparsified weights.

:func:`from_pretrained` restores the sparsified model exactly (dense weights, masks, schedule state);
so does ``Trainer(resume_from_checkpoint=...)``, whose ``load_state_dict`` rebuilds the dense weights in
nmfx's load hook. ``save_pretrained`` of an inference model (``nmfx.to_inference``) is refused: its
packed weights would load as random projections; use ``nmfx.save`` / ``nmfx.load`` (or ``nmfx.to_dense``
for a dense checkpoint).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Optional

import torch
from torch import nn
from transformers import TrainerCallback

import nmfx
from nmfx.config import SparsifyConfig, check_format_version, literal_glob
from nmfx.ops import effective_weight
from nmfx.refresh import require_refreshed
from nmfx.state import PRUNED_KEY, STATE_KEYS, STATE_SUFFIX, pruned_values

__all__ = ["NMSparsityCallback", "from_pretrained", "checkpoint_record", "RECORD_KEY", "RECORD_VERSION"]

#: The key of the nmfx record in ``config.json``.
RECORD_KEY = "nmfx"
#: Version of that record; bump on incompatible changes.
RECORD_VERSION = 2  # 2: the pattern may be per layer ([[glob, "N:M"], ...]); single-pattern records stay 1
_MISSING = object()
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")


class NMSparsityCallback(TrainerCallback):
    """Calls ``nmfx.step`` after every optimizer step and logs ``nmfx.stats`` (``per_layer`` adds one set of
    keys per sparsified weight)."""

    def __init__(self, per_layer: bool = False) -> None:
        self.per_layer = per_layer
        self._pending: dict[str, float] = {}

    @classmethod
    def attach(cls, trainer: Any, **kwargs: Any) -> "NMSparsityCallback":
        """Create the callback and put it first in ``trainer``'s callbacks (before the loggers)."""
        callback = cls(**kwargs)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """Refuse a model nmfx did not sparsify: the callback would step nothing and the run would train dense
        (a resumed nmfx checkpoint then loads only its effective weights, its nmfx state dropped)."""
        if model is None:
            raise ValueError("NMSparsityCallback needs the model in the callback arguments")
        if not nmfx.states(model):
            raise ValueError(f"NMSparsityCallback: the Trainer's {type(model).__name__} has no nmfx-sparsified "
                             "weights, so nothing would be sparsified and the run would train dense. Call "
                             "nmfx.sparsify(model, pattern, method, ...) before creating the Trainer; to resume a "
                             "run (resume_from_checkpoint), sparsify the freshly built model with the same "
                             "arguments as the run that wrote the checkpoint")

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("NMSparsityCallback needs the model in the callback arguments")
        upcoming = state.global_step + 1  # global_step is incremented after this event
        if _logs_at(args, upcoming):
            # the masks, alpha and gradients this optimizer step used; the step count is the Trainer's
            # (optimizer steps taken, this one included), not the count before nmfx.step below
            self._pending = nmfx.stats(model, per_layer=self.per_layer)
            if "nmfx/step" in self._pending:
                self._pending["nmfx/step"] = float(upcoming)
        nmfx.step(model)

    def on_log(self, args, state, control, logs: Optional[dict] = None, **kwargs):
        if self._pending and logs is not None and "loss" in logs:
            logs.update(self._pending)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(self._pending)
            self._pending = {}


def _logs_at(args, step: int) -> bool:
    strategy = str(getattr(args.logging_strategy, "value", args.logging_strategy))
    if strategy != "steps":
        return strategy != "no"
    every = args.logging_steps
    if isinstance(every, float) and every < 1:
        return True
    return (step == 1 and args.logging_first_step) or step % int(every) == 0


# -- save_pretrained / from_pretrained ---------------------------------------------------------------
def checkpoint_record(model: nn.Module) -> dict[str, Any]:
    """The ``"nmfx"`` entry ``save_pretrained`` writes into ``config.json``: what :func:`from_pretrained`
    needs to sparsify a freshly loaded model the same way."""
    found = nmfx.api.record(model)
    return {
        "nmfx_version": nmfx.__version__,
        "format_version": RECORD_VERSION if found.config.per_layer else 1,  # 2: per-layer patterns
        "pattern": found.config.pattern_value(),
        "method": found.method.to_dict(),
        "sparsified": sorted(nmfx.states(model)),
        "layout": "effective",  # weight keys hold W_eff; <weight>_nm.pruned the dense values where pruned
    }


class NMSavePretrained:
    """``model.save_pretrained`` of an nmfx-sparsified ``transformers`` model (installed by
    ``nmfx.sparsify``): the class's ``save_pretrained`` with the effective weights, the pruned values and
    the nmfx record (see the module docstring). Refuses inference models."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: Any, is_main_process: bool = True, state_dict: Optional[dict] = None,
                 *args: Any, **kwargs: Any) -> None:
        model = self.model
        if nmfx.is_inference(model):
            raise ValueError("save_pretrained cannot write an nmfx inference model (nmfx.to_inference): transformers "
                             "would load its packed layers as random dense weights. Save it with "
                             "nmfx.save(model, path) and load it with nmfx.load(path, fresh_model); for a dense "
                             "checkpoint that transformers loads, nmfx.to_dense(model).save_pretrained(path)")
        state_dict = effective_state_dict(model, model.state_dict() if state_dict is None else dict(state_dict))
        config = model.config
        previous = config.__dict__.get(RECORD_KEY, _MISSING)
        setattr(config, RECORD_KEY, checkpoint_record(model))
        try:
            type(model).save_pretrained(model, save_directory, is_main_process, state_dict, *args, **kwargs)
        finally:
            if previous is _MISSING:
                delattr(config, RECORD_KEY)
            else:
                setattr(config, RECORD_KEY, previous)


def effective_state_dict(model: nn.Module, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` (a sparsified model's) with every sparsified weight replaced by its effective weight
    and its dense values at the pruned positions added as ``<weight>_nm.pruned``."""
    require_refreshed(model, "save_pretrained")  # masks never computed would save garbage effective weights
    out = dict(state_dict)
    for name in nmfx.states(model):
        if name not in state_dict:
            continue
        mask_key, alpha_key = (f"{name}{STATE_SUFFIX}.{key}" for key in ("mask", "alpha"))
        if mask_key not in state_dict or alpha_key not in state_dict:
            raise ValueError(f"the state_dict to save holds {name} but not its nmfx mask and alpha; pass the "
                             "whole model.state_dict()")
        weight = _full(state_dict[name]).detach()
        # under FSDP2 the weight and its mask are DTensor shards: both are gathered (a collective: every rank)
        mask, alpha = _full(state_dict[mask_key]).to(weight.device), state_dict[alpha_key].to(weight.device)
        out[name] = effective_weight(weight, mask, alpha)
        out[f"{name}{STATE_SUFFIX}.{PRUNED_KEY}"] = pruned_values(weight, mask)
    return out


def install_save_pretrained(model: nn.Module) -> None:
    """Give ``model`` (a ``transformers`` model that ``nmfx.sparsify`` just rewrote) the nmfx
    ``save_pretrained``; warn if it was loaded from an nmfx checkpoint without nmfx."""
    if RECORD_KEY in getattr(model.config, "__dict__", {}):
        warnings.warn("nmfx.sparsify: this model's config has an 'nmfx' record: it was saved sparsified and loaded "
                      "with a plain from_pretrained, which loads the effective (already masked) weights and drops "
                      "the dense weights and the schedule state. To continue that training run, load it with "
                      "nmfx.integrations.hf.from_pretrained(cls, path) instead.", stacklevel=3)
        delattr(model.config, RECORD_KEY)
    object.__setattr__(model, "save_pretrained", NMSavePretrained(model))


def from_pretrained(cls: type, path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Load a model saved by an nmfx-sparsified model's ``save_pretrained`` as that sparsified model:
    dense weights, masks and schedule state restored exactly, so training continues (or ``to_inference``
    lowers) as if it had never stopped.

    Args:
        cls: the ``transformers`` model class (e.g. ``AutoModelForCausalLM`` or ``GPT2LMHeadModel``).
        path: the directory (or hub id) written by ``save_pretrained``.
        **kwargs: passed to ``cls.from_pretrained`` (``dtype``, ``device_map``...; hub options also
            locate the weight files).

    Raises:
        ValueError: ``config.json`` has no valid ``"nmfx"`` record (not saved by a sparsified model), or
            the weight files lack or contradict the nmfx state (the check of ``load_state_dict``).
    """
    model = cls.from_pretrained(path, **kwargs)
    record = _parse_record(model.config.__dict__.pop(RECORD_KEY, None), path)
    names = record["sparsified"]
    nmfx.sparsify(model, record["pattern"], record["method"], include=[literal_glob(name) for name in names])
    rebuilt = sorted(nmfx.states(model))
    if rebuilt != names:
        raise ValueError(f"{os.fspath(path)}: sparsifying {cls.__name__} as recorded gives other weights than the "
                         f"checkpoint's: only in the checkpoint {sorted(set(names) - set(rebuilt))[:5]}, only in the "
                         f"model {sorted(set(rebuilt) - set(names))[:5]}")
    wanted = set(names) | {f"{name}{STATE_SUFFIX}.{key}" for name in names for key in STATE_KEYS + (PRUNED_KEY,)}
    tensors = _read_tensors(path, wanted, kwargs)
    if names and not any(key.startswith(f"{names[0]}{STATE_SUFFIX}.") for key in tensors):
        raise ValueError(f"{os.fspath(path)}: config.json has an nmfx record but the weights hold no nmfx state (saved "
                         "again by a model loaded without nmfx?); load it with from_pretrained and nmfx.sparsify it")
    model.load_state_dict(tensors, strict=False)  # nmfx's hook checks everything first, then rebuilds W
    return model


def _parse_record(record: Any, path: Any) -> dict[str, Any]:
    where = f"{os.fspath(path)}: config.json"
    if record is None:
        raise ValueError(f"{where} has no 'nmfx' record, so it was not saved by an nmfx-sparsified model; load it with "
                         "cls.from_pretrained and call nmfx.sparsify")
    if not isinstance(record, dict):
        raise ValueError(f"{where}: 'nmfx' must be an object, got {type(record).__name__}")
    version = check_format_version(record.get("format_version"), RECORD_VERSION, f"{where}: the nmfx record")
    try:
        config = SparsifyConfig.build(record.get("pattern") if version > 1 else str(record.get("pattern")),
                                      record.get("method") if isinstance(record.get("method"), dict) else "?")
        pattern, method = config.pattern_value(), config.method
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: invalid nmfx pattern or method ({error})") from None
    names = record.get("sparsified")
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names) or names != sorted(set(names)):
        raise ValueError(f"{where}: nmfx.sparsified must be a sorted list of distinct weight names")
    if record.get("layout") != "effective":
        raise ValueError(f"{where}: nmfx.layout {record.get('layout')!r:.40} is not 'effective'")
    return {"pattern": pattern, "method": method, "sparsified": names}


def _read_tensors(path: Any, wanted: set[str], kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The ``wanted`` tensors present in the checkpoint's safetensors file(s)."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    hub = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
    variant = kwargs.get("variant")
    single = f"model.{variant}.safetensors" if variant else "model.safetensors"
    index = f"model.{variant}.safetensors.index.json" if variant else "model.safetensors.index.json"
    found = cached_file(path, single, _raise_exceptions_for_missing_entries=False, **hub)
    if found is not None:
        files = {found: None}
    else:
        index_file = cached_file(path, index, _raise_exceptions_for_missing_entries=False, **hub)
        if index_file is None:
            raise ValueError(f"{os.fspath(path)}: no {single} or {index} (nmfx checkpoints are safetensors)")
        with open(index_file, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map", {})
        files = {}
        for key, shard in weight_map.items():
            if key in wanted and isinstance(shard, str):
                files.setdefault(cached_file(path, shard, **hub), set()).add(key)
    tensors = {}
    for file, keys in files.items():
        with safe_open(file, framework="pt") as f:
            chosen = wanted if keys is None else keys
            tensors.update({key: f.get_tensor(key) for key in f.keys() if key in chosen})
    return tensors


def _full(tensor: Any) -> Any:
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else tensor
