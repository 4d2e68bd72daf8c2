"""nmfx.to_inference_from_checkpoint: a DCP checkpoint of a sparse run -> the inference model, rebuilt into
a model built on the meta device, equal to to_inference of the trained model; a bad checkpoint changes nothing."""

from __future__ import annotations

import pytest
import torch

import nmfx

transformers = pytest.importorskip("transformers")
dcp = pytest.importorskip("torch.distributed.checkpoint")
from torch.distributed.checkpoint.state_dict import get_model_state_dict  # noqa: E402

transformers.logging.set_verbosity_error()
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=96),
    "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=96, n_positions=32),
}
IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def _trained(arch: str, pattern="1:4", method="srste", steps=4):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[arch]())
    nmfx.sparsify(model, pattern, method, total_steps=steps)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        model(IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
        nmfx.step(model)
    return model.eval()


def _save(model, path):
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(path))


def _fresh(arch: str):
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(CONFIGS[arch]())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for arch in CONFIGS:
        model = _trained(arch)
        path = tmp_path_factory.mktemp(arch) / "ckpt"
        _save(model, path)
        out[arch] = (model, path)
    return out


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_rebuilt_model_equals_to_inference_of_the_trained_model(saved, arch):
    trained, path = saved[arch]
    expected = nmfx.to_inference(trained, backend="reference")
    fresh = _fresh(arch)
    assert nmfx.to_inference_from_checkpoint(path, fresh, backend="reference") is fresh
    assert nmfx.is_inference(fresh) and not any(t.is_meta for t in fresh.state_dict().values())
    assert fresh.state_dict().keys() == expected.state_dict().keys()
    for key, tensor in expected.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], tensor), key
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, expected(IDS).logits)
    assert [r.status for r in nmfx.report(fresh)] == [r.status for r in nmfx.report(expected)]


def test_bfloat16_and_the_cpu_kernel(saved):
    trained, path = saved["llama"]
    expected = nmfx.to_inference(trained, dtype=torch.bfloat16)
    fresh = nmfx.to_inference_from_checkpoint(path, _fresh("llama"), dtype=torch.bfloat16)
    assert fresh.model.layers[0].mlp.up_proj.weight_values.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, expected(IDS).logits)


def _snapshot(model):
    return {k: (v.device, v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()}, type(model)


def test_refusals_leave_the_model_untouched(saved, tmp_path):
    _, path = saved["llama"]
    fresh = _fresh("llama")
    before = _snapshot(fresh)

    def refused(match, where=path, model=fresh, **kwargs):
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            nmfx.to_inference_from_checkpoint(where, model, **kwargs)
        assert _snapshot(model) == before and not nmfx.is_sparsified(model)

    refused("no checkpoint directory", where=tmp_path / "nowhere")
    refused("no nmfx state under the prefix 'wrong.'", prefix="wrong.")
    refused("backend must be 'auto' or 'reference'", backend="semi_structured")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / ".metadata").write_bytes(b"\x80\x04not a pickle")
    refused("not a readable torch.distributed.checkpoint", where=tmp_path / "junk")
    wider = transformers.LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=96)
    with torch.device("meta"):
        other = transformers.AutoModelForCausalLM.from_config(wider)
    other_before = _snapshot(other)
    with pytest.raises(ValueError, match="is for a \\[64, 128\\] weight, the model's is \\[64, 256\\]"):
        nmfx.to_inference_from_checkpoint(path, other)
    assert _snapshot(other) == other_before


def test_a_run_before_its_hard_masks_is_refused(tmp_path):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS["llama"]())
    nmfx.sparsify(model, "1:4", "mdgf", total_steps=100)
    nmfx.step(model)
    _save(model, tmp_path / "early")
    with pytest.raises(ValueError, match="had not reached its hard 1:4 mask at step 1.*force=True"):
        nmfx.to_inference_from_checkpoint(tmp_path / "early", _fresh("llama"))


def test_a_corrupted_mask_is_refused(saved, tmp_path):
    trained, _ = saved["llama"]
    broken = {k: v.clone() for k, v in get_model_state_dict(trained).items()}
    key = next(k for k in broken if k.endswith("_nm.mask"))
    broken[key] = torch.ones_like(broken[key])  # every weight kept: not a 1:4 mask
    dcp.save({"model": broken}, checkpoint_id=str(tmp_path / "broken"))
    fresh = _fresh("llama")
    before = _snapshot(fresh)
    with pytest.raises(ValueError, match="is not a valid 1:4 mask"):
        nmfx.to_inference_from_checkpoint(tmp_path / "broken", fresh)
    assert _snapshot(fresh) == before
