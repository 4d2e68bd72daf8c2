"""``nmfx.stats(model)``: a flat dict of training diagnostics for any logger.

Per sparsified weight ``<name>`` and overall (``nmfx/...``):

* ``sparsity``: the *effective* sparsity — the fraction of the weight the forward really zeroes: the
  mask's sparsity when ``alpha == 0``, and 0 while ``alpha > 0`` (MDGF decay, any dense warm-up, the
  ``dense`` method), where pruned weights still contribute ``alpha * W``;
* ``mask_sparsity``: the fraction the current N_t:M_t mask marks as pruned (``1 - N_t/M_t``), whatever alpha;
* ``alpha``, ``n``, ``m``: the MDGF decay and the N_t:M_t of the mask at the current step;
* ``flip_rate``: fraction of mask entries that changed at the last refresh;
* ``grad_norm_pruned`` / ``grad_norm_kept``: L2 norm of the gradient on the dense weight over the
  pruned / kept entries — the paper's diagnostic (large, noisy gradients reaching pruned weights at
  high sparsity make masks flip chaotically). Present when ``.grad`` is set (call it between
  ``backward()`` and ``zero_grad()``).

All numbers are gathered into one tensor and read with a single ``tolist()`` (one device sync).
Under FSDP2 the gradients (and the masks, where each rank stores only its shard) are sharded DTensors
and are gathered: call ``stats`` on every rank.
"""

from __future__ import annotations

import torch
from torch import nn

from nmfx.accessors import states

__all__ = ["stats"]


def stats(model: nn.Module, per_layer: bool = True, prefix: str = "nmfx/") -> dict[str, float]:
    """Diagnostics of every sparsified weight, plus totals; see the module docstring for the keys."""

    names, rows, sizes = [], [], []
    for name, state in states(model).items():
        owner_name = name.rpartition(".")[0]
        weight = (model.get_submodule(owner_name) if owner_name else model).get_parameter(state.param_name)
        mask = state.full_mask()  # FSDP2 with sharded masks: gathered (a collective, like the gradients')
        kept = mask.sum()
        row = [1.0 - kept / mask.numel(), state.alpha.float(), state.last_flip_rate, float("nan"), float("nan")]
        grad = weight.grad
        if grad is not None and hasattr(grad, "full_tensor"):
            grad = grad.full_tensor()  # FSDP2: a collective, hence "call on every rank"
        if grad is not None and grad.shape == mask.shape:
            squared = grad.detach().float().square()
            kept_sq = torch.where(mask, squared, 0.0).sum()
            row[3:] = [squared.sum() - kept_sq, kept_sq]
        rows.append(torch.stack([torch.as_tensor(v, dtype=torch.float32, device=mask.device) for v in row]))
        names.append((name, state))
        sizes.append(mask.numel())
    if not rows:
        return {}
    values = torch.stack(rows).cpu().tolist()
    out: dict[str, float] = {}
    total = float(sum(sizes))
    pruned_sq = kept_sq = 0.0
    have_grad = False
    for (name, state), (sparsity, alpha, flips, g_pruned, g_kept), size in zip(names, values, sizes):
        pattern = state.schedule.pattern
        if per_layer:
            out.update({f"{prefix}{name}/sparsity": _effective(sparsity, alpha),
                        f"{prefix}{name}/mask_sparsity": sparsity, f"{prefix}{name}/alpha": alpha,
                        f"{prefix}{name}/n": float(pattern.n), f"{prefix}{name}/m": float(pattern.m),
                        f"{prefix}{name}/flip_rate": flips})
        if g_pruned == g_pruned:  # not NaN: a gradient was present
            have_grad = True
            pruned_sq += g_pruned
            kept_sq += g_kept
            if per_layer:
                out[f"{prefix}{name}/grad_norm_pruned"] = max(g_pruned, 0.0) ** 0.5
                out[f"{prefix}{name}/grad_norm_kept"] = g_kept ** 0.5
    out[f"{prefix}sparsity"] = sum(_effective(v[0], v[1]) * s for v, s in zip(values, sizes)) / total
    out[f"{prefix}mask_sparsity"] = sum(v[0] * s for v, s in zip(values, sizes)) / total
    out[f"{prefix}flip_rate"] = sum(v[2] * s for v, s in zip(values, sizes)) / total
    out[f"{prefix}alpha"] = values[0][1]
    out[f"{prefix}step"] = float(names[0][1].step)
    if have_grad:
        out[f"{prefix}grad_norm_pruned"] = max(pruned_sq, 0.0) ** 0.5
        out[f"{prefix}grad_norm_kept"] = kept_sq ** 0.5
    return out


def _effective(mask_sparsity: float, alpha: float) -> float:
    """The fraction of weights the forward zeroes: none while pruned weights still count ``alpha * W``."""
    return mask_sparsity if alpha == 0.0 else 0.0
