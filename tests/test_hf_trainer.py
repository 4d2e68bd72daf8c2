"""The Hugging Face Trainer callback: nmfx.step once per optimizer step, stats in the Trainer's logs."""

from pathlib import Path

import pytest
import torch

import nmfx


def test_every_nmfx_package_ships_in_the_wheel():
    """pyproject lists packages explicitly: one left out (nmfx.integrations was) is missing from a non-editable
    install, so ``from nmfx.integrations.hf import NMSparsityCallback`` fails there."""
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    dirs = {name: root / path for name, path in setuptools["package-dir"].items()}
    found = {".".join(("nmfx", *init.parent.relative_to(dirs["nmfx"]).parts))
             for init in dirs["nmfx"].rglob("__init__.py")}
    assert "nmfx.integrations" in found and found <= listed, sorted(found - listed)


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
    assert all(entry["nmfx/step"] == entry["step"] for entry in logged)  # the Trainer's step, not one behind
    assert all(entry["nmfx/mask_sparsity"] == pytest.approx(7 / 8) for entry in logged)
    # effective sparsity: none while alpha > 0 (pruned weights still count alpha * W), the mask's once alpha = 0
    assert all(entry["nmfx/sparsity"] == (7 / 8 if entry["nmfx/alpha"] == 0 else 0.0) for entry in logged)
    assert logged[0]["nmfx/sparsity"] == 0.0 and logged[-1]["nmfx/sparsity"] == pytest.approx(7 / 8)
    assert logged[0]["nmfx/alpha"] > logged[-1]["nmfx/alpha"]
    assert all(entry["nmfx/grad_norm_pruned"] > 0 for entry in logged)
    for name, state in states.items():
        assert torch.equal(state.mask, nmfx.nm_mask(model.get_parameter(name), "1:8"))


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=48, length=16, vocab=64):
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _sparse_gpt2(seed):
    """A tiny float64 GPT-2 (no dropout), sparsified with SDGF over 8 steps (stages 7:8 -> 4:8 -> 2:8 -> 1:8)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0,
                                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return nmfx.sparsify(transformers.GPT2LMHeadModel(config).double(), "1:8", "sdgf", total_steps=8)


def _lm_trainer(model, out, **kwargs):
    from nmfx.integrations.hf import NMSparsityCallback

    transformers.logging.set_verbosity_error()
    options = dict(output_dir=str(out), max_steps=8, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                   use_cpu=True, save_strategy="steps", save_steps=3, logging_steps=100)
    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**{**options, **kwargs}),
                                   train_dataset=_Tokens())
    NMSparsityCallback.attach(trainer)
    return trainer


def test_trainer_resume_is_bit_exact(tmp_path):
    """8 steps straight vs 3 steps, a checkpoint (safetensors, optimizer, scheduler, RNG), a new Trainer and
    model (another init) resumed to 8: every weight, mask and schedule buffer identical."""
    straight = _sparse_gpt2(seed=0)
    _lm_trainer(straight, tmp_path / "run").train()
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert (checkpoint / "model.safetensors").exists() and (checkpoint / "optimizer.pt").exists()
    resumed = _sparse_gpt2(seed=1)
    _lm_trainer(resumed, tmp_path / "resumed").train(resume_from_checkpoint=str(checkpoint))
    expected = straight.state_dict()
    assert all(int(s.step) == 8 for s in nmfx.states(resumed).values())
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, expected[key]), key


@pytest.fixture(scope="module")
def save_only_run(tmp_path_factory):
    """A sparsified model trained 3 steps by a Trainer with save_only_model=True, and its checkpoint."""
    out = tmp_path_factory.mktemp("save_only")
    model = _sparse_gpt2(seed=0)
    _lm_trainer(model, out, max_steps=3, save_only_model=True).train()
    checkpoint = out / "checkpoint-3"
    assert not (checkpoint / "optimizer.pt").exists()
    return model, checkpoint


def test_save_only_model_checkpoint_restores_the_sparsified_model(save_only_run):
    """save_only_model=True writes no optimizer / RNG state (transformers: such checkpoints are for
    from_pretrained, not for resuming); nmfx.integrations.hf.from_pretrained restores the model exactly."""
    from nmfx.integrations.hf import from_pretrained

    model, checkpoint = save_only_run
    restored = from_pretrained(transformers.GPT2LMHeadModel, checkpoint)
    expected = model.state_dict()
    assert all(int(s.step) == 3 for s in nmfx.states(restored).values())
    for key, value in restored.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_save_only_model_resume_continues_the_nmfx_state(save_only_run, tmp_path):
    """Resuming from a save_only_model checkpoint restarts the optimizer (transformers), but the weights and the
    nmfx schedule come from the checkpoint: the schedules end at step 8, not at the 5 steps this run takes."""
    model, checkpoint = save_only_run
    resumed = _sparse_gpt2(seed=1)
    trainer = _lm_trainer(resumed, tmp_path, save_strategy="no")
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 8
    states = nmfx.states(resumed)
    assert states and all(int(s.step) == 8 for s in states.values())
    for name, state in states.items():
        assert torch.equal(state.mask, nmfx.nm_mask(resumed.get_parameter(name), state.schedule.pattern, dim=state.dim))


def test_callback_refuses_a_model_nmfx_did_not_sparsify(save_only_run, tmp_path):
    """Resuming an nmfx checkpoint into a model that was not sparsified used to train dense silently (the
    effective weights load, the nmfx state is dropped, the callback steps nothing): now the callback refuses,
    naming the fix, and the fix (sparsify first) resumes."""
    _, checkpoint = save_only_run
    torch.manual_seed(1)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0,
                                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    dense = transformers.GPT2LMHeadModel(config).double()
    trainer = _lm_trainer(dense, tmp_path / "dense", save_strategy="no")
    with pytest.raises(ValueError, match=r"no nmfx-sparsified weights.*Call nmfx\.sparsify\(model"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 3  # refused before any training step
    nmfx.sparsify(dense, "1:8", "sdgf", total_steps=8)  # the advice: sparsify as the run that wrote it, resume
    _lm_trainer(dense, tmp_path / "sparse", save_strategy="no").train(resume_from_checkpoint=str(checkpoint))
    assert all(int(s.step) == 8 for s in nmfx.states(dense).values())
