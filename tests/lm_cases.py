"""Shared by the tests that train small transformers LMs: fixed token ids and a few SGD steps with nmfx.step."""

import torch

import nmfx

#: Token ids for vocab-64 toy LMs (batch 2, 12 tokens).
IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))


def train_lm(model, steps: int, ids: torch.Tensor = IDS, lr: float = 0.5):
    """``steps`` SGD steps of the LM loss on ``ids``, each followed by ``nmfx.step``; returns ``model``."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        nmfx.step(model)
    return model
