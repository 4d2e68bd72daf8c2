"""Hugging Face ``Trainer`` integration: advance nmfx schedules and log ``nmfx.stats``.

    import nmfx
    from nmfx.integrations.hf import NMSparsityCallback

    model = nmfx.sparsify(model, "1:8", "sdgf", total_steps=training_args.max_steps)
    trainer = Trainer(model=model, args=training_args, train_dataset=ds)
    NMSparsityCallback.attach(trainer)        # first in line, so every logger sees the nmfx keys
    trainer.train()

``nmfx.step(model)`` runs right after each optimizer step (``on_optimizer_step``: after gradient
accumulation, before the gradients are zeroed, so the gradient-norm diagnostics are available); at
logging steps the stats are merged into the Trainer's logs and ``state.log_history``.
"""

from __future__ import annotations

from typing import Any, Optional

from transformers import TrainerCallback

import nmfx

__all__ = ["NMSparsityCallback"]


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

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("NMSparsityCallback needs the model in the callback arguments")
        upcoming = state.global_step + 1  # global_step is incremented after this event
        if _logs_at(args, upcoming):
            self._pending = nmfx.stats(model, per_layer=self.per_layer)
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
