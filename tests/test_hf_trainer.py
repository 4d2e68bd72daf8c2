"""The Hugging Face Trainer callback: nmfx.step once per optimizer step, stats in the Trainer's logs."""

import pytest
import torch

import nmfx

transformers = pytest.importorskip("transformers")


class _Sequences(torch.utils.data.Dataset):
    """Label: does token 7 occur more often than token 3 (generated, fixed seed)."""

    def __init__(self, n=64, length=8, vocab=32):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)
        self.labels = ((self.ids == 7).sum(1) > (self.ids == 3).sum(1)).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def test_trainer_callback_steps_and_logs(tmp_path):
    from nmfx.integrations.hf import NMSparsityCallback

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    nmfx.sparsify(model, "1:8", "mdgf", total_steps=6)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8,
                                          gradient_accumulation_steps=2, logging_steps=2, report_to=[],
                                          save_strategy="no", use_cpu=True, learning_rate=1e-3)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Sequences())
    NMSparsityCallback.attach(trainer)
    trainer.train()
    states = nmfx.states(model)
    assert states and all(int(s.step) == 6 for s in states.values())  # once per optimizer step, not per micro-batch
    logged = [entry for entry in trainer.state.log_history if "nmfx/sparsity" in entry]
    assert [entry["step"] for entry in logged] == [2, 4, 6]
    assert all(entry["nmfx/mask_sparsity"] == pytest.approx(7 / 8) for entry in logged)
    # effective sparsity: none while alpha > 0 (pruned weights still count alpha * W), the mask's once alpha = 0
    assert all(entry["nmfx/sparsity"] == (7 / 8 if entry["nmfx/alpha"] == 0 else 0.0) for entry in logged)
    assert logged[0]["nmfx/sparsity"] == 0.0 and logged[-1]["nmfx/sparsity"] == pytest.approx(7 / 8)
    assert logged[0]["nmfx/alpha"] > logged[-1]["nmfx/alpha"]
    assert all(entry["nmfx/grad_norm_pruned"] > 0 for entry in logged)
    for name, state in states.items():
        assert torch.equal(state.mask, nmfx.nm_mask(model.get_parameter(name), "1:8"))
