"""Sparse fine-tuning of a small transformers model with the Hugging Face ``Trainer``.

    pip install -e ".[hf]"
    python examples/hf_trainer.py --pattern 1:8 --method mdgf --steps 300 --output-dir runs/bert
    python examples/hf_trainer.py --pattern 1:8 --method mdgf --steps 300 --output-dir runs/bert --resume

A BERT classifier (random weights, small config) learns whether token 7 occurs more often than token 3
in a random sequence (generated data, no download). ``nmfx.sparsify`` runs before the ``Trainer`` is
built; ``NMSparsityCallback.attach`` steps the schedules once per optimizer step and adds nmfx's stats
to the Trainer's logs. To fine-tune a pretrained checkpoint sparsely, load it first
(``from_pretrained``), then sparsify.

Checkpoints: the Trainer saves one every ``--save-steps`` (safetensors: the effective weights, the
pruned values and the nmfx state); ``--resume`` continues from the latest one exactly as if training had
not stopped. At the end the model is saved with ``save_pretrained`` and loaded back, still sparsified,
with ``nmfx.integrations.hf.from_pretrained``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import transformers

import nmfx
from nmfx.integrations.hf import NMSparsityCallback, from_pretrained


class CountingTask(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int, length: int = 24, vocab: int = 64):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)
        self.labels = ((self.ids == 7).sum(1) > (self.ids == 3).sum(1)).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", default="1:8")
    parser.add_argument("--method", default="mdgf")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--save-steps", type=int, default=100)
    parser.add_argument("--output-dir", default=None, help="checkpoint directory (default: a temporary one)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=256, num_labels=2, max_position_embeddings=64)
    model = transformers.BertForSequenceClassification(config)
    nmfx.sparsify(model, args.pattern, args.method, total_steps=args.steps)
    print(nmfx.report(model))
    with tempfile.TemporaryDirectory() as scratch:
        out = args.output_dir or scratch
        training = transformers.TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=32, learning_rate=1e-3,
            logging_steps=50, report_to=[], save_strategy="steps", save_steps=args.save_steps,
            use_cpu=not torch.cuda.is_available())
        trainer = transformers.Trainer(model=model, args=training, train_dataset=CountingTask(4096, 0),
                                       eval_dataset=CountingTask(512, 1),
                                       compute_metrics=lambda p: {"accuracy": (p.predictions.argmax(-1) == p.label_ids).mean()})
        NMSparsityCallback.attach(trainer)
        trainer.train(resume_from_checkpoint=True if args.resume else None)
        for entry in trainer.state.log_history:
            if "nmfx/sparsity" in entry:
                print(f"step {entry['step']:4d}  loss {entry['loss']:.3f}  alpha {entry['nmfx/alpha']:.2f}  "
                      f"sparsity {entry['nmfx/sparsity']:.3f}  flips {entry['nmfx/flip_rate']:.4f}")
        print("eval:", trainer.evaluate())
        final = os.path.join(out, "final")
        model.save_pretrained(final)
        restored = from_pretrained(transformers.BertForSequenceClassification, final)
        pairs = zip(restored.state_dict().values(), model.state_dict().values())
        same = all(torch.equal(a.cpu(), b.cpu()) for a, b in pairs)
        print(f"saved to {final}; reloaded with nmfx.integrations.hf.from_pretrained: identical state: {same}")


if __name__ == "__main__":
    main()
