"""nmfx.to_dense: an nmfx model folded back into a plain model of the original architecture."""

import pytest
import torch
from torch import fx, nn

import nmfx
from nmfx.examples import TinyViT
from nmfx.state import NMState


def _vit(seed: int = 0) -> TinyViT:
    torch.manual_seed(seed)
    return TinyViT(dim=32, depth=2).eval()


def _images() -> torch.Tensor:
    return torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _assert_plain(model: nn.Module) -> None:
    for name, module in model.named_modules():
        assert not isinstance(module, (NMState, fx.GraphModule)), name
        assert not type(module).__module__.startswith("nmfx.passes"), name
    assert not nmfx.is_sparsified(model) and not nmfx.states(model)


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_training_model_round_trips_keys_class_and_outputs():
    original = _vit()
    keys = list(original.state_dict().keys())
    model = nmfx.sparsify(original, "1:8", "ste")
    with torch.no_grad():  # weights moved by training away from the mask: the dense copy must fold it in
        for name in nmfx.states(model):
            model.get_parameter(name).add_(0.01)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense = nmfx.to_dense(model, into=TinyViT(dim=32, depth=2))
    _assert_plain(dense)
    assert type(dense) is TinyViT and list(dense.state_dict().keys()) == keys
    torch.testing.assert_close(dense(_images()), model(_images()))
    for name, state in nmfx.states(model).items():
        assert torch.equal(dense.get_parameter(name), model.get_parameter(name) * state.mask)
    _assert_same_state(model.state_dict(), before)  # the nmfx model is not changed


def test_inference_model_unpacks_into_a_meta_built_model():
    model = nmfx.prune(_vit(), "2:4", [_images()], "sparsegpt")
    inference = nmfx.to_inference(model, dtype=torch.bfloat16)
    with torch.device("meta"):
        fresh = TinyViT(dim=32, depth=2)
    dense = nmfx.to_dense(inference, into=fresh)
    _assert_plain(dense)
    assert dense.blocks[0].up.weight.dtype == torch.bfloat16 and not dense.training
    assert list(dense.state_dict().keys()) == list(_vit().state_dict().keys())
    x = _images().bfloat16()
    torch.testing.assert_close(dense(x), inference(x), rtol=2e-2, atol=2e-2)
    for name, state in nmfx.states(model).items():
        assert torch.equal(dense.get_parameter(name), (model.get_parameter(name) * state.mask).bfloat16())


def test_transformers_model_is_rebuilt_from_its_config():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    keys = list(model.state_dict().keys())
    ids = torch.randint(0, 64, (2, 16))
    nmfx.prune(model, "1:8", [{"input_ids": ids}], "wanda")
    for source in (model, nmfx.to_inference(model)):
        dense = nmfx.to_dense(source)
        _assert_plain(dense)
        assert type(dense) is transformers.GPT2LMHeadModel and list(dense.state_dict().keys()) == keys
        assert dense.lm_head.weight is dense.transformer.wte.weight  # ties kept
        torch.testing.assert_close(dense(ids).logits, model(ids).logits)


def test_multihead_attention_weights_are_folded():
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)).eval()
    model = make()
    keys = list(model.state_dict().keys())
    nmfx.sparsify(model, "2:4", "ste")
    assert "0.self_attn.in_proj_weight" in nmfx.states(model)
    x = torch.rand(2, 5, 16)
    for source in (model, nmfx.to_inference(model)):
        dense = nmfx.to_dense(source, into=make())
        _assert_plain(dense)
        assert type(dense[0].self_attn) is nn.MultiheadAttention and list(dense.state_dict().keys()) == keys
        torch.testing.assert_close(dense(x), model(x))


def test_unfinished_schedule_is_refused_unless_forced():
    model = nmfx.sparsify(_vit(), "2:4", "mdgf", total_steps=10)
    fresh = TinyViT(dim=32, depth=2)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="have not reached the hard 2:4 mask.*force=True"):
        nmfx.to_dense(model, into=fresh)
    _assert_same_state(fresh.state_dict(), before)
    with pytest.warns(UserWarning, match="force=True"):
        dense = nmfx.to_dense(model, into=fresh, force=True)
    for name, state in nmfx.states(model).items():
        weight = model.get_parameter(name)
        assert torch.equal(dense.get_parameter(name), weight * nmfx.nm_mask(weight, "2:4", dim=state.dim))


def test_wrong_into_is_refused_and_left_unchanged():
    model = nmfx.sparsify(_vit(), "2:4", "ste")
    for wrong, message in ((TinyViT(dim=64, depth=2), "vs"), (TinyViT(dim=32, depth=3), "only in into="),
                           (nmfx.sparsify(_vit(), "2:4", "ste"), "already sparsified")):
        before = {k: v.clone() for k, v in wrong.state_dict().items()}
        with pytest.raises(ValueError, match=message):
            nmfx.to_dense(model, into=wrong)
        _assert_same_state(wrong.state_dict(), before)
    with pytest.raises(ValueError, match="pass into="):
        nmfx.to_dense(model)
    with pytest.raises(ValueError, match="has not been sparsified"):
        nmfx.to_dense(_vit(), into=_vit())


def test_dense_copy_exports_without_nmfx_ops():
    """to_dense is the route to exporters: the exported graph holds only core ATen ops."""
    model = nmfx.to_inference(nmfx.prune(_vit(), "2:4", [_images()], "wanda"))
    dense = nmfx.to_dense(model, into=TinyViT(dim=32, depth=2))
    exported = torch.export.export(dense, (_images(),))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert targets and not any("nmfx" in t for t in targets)
    torch.testing.assert_close(exported.module()(_images()), model(_images()))


def test_onnx_export_of_the_dense_copy_runs_in_onnxruntime(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = nmfx.to_inference(nmfx.prune(_vit(), "2:4", [_images()], "wanda"))
    dense = nmfx.to_dense(model, into=TinyViT(dim=32, depth=2))
    path = tmp_path / "dense.onnx"
    torch.onnx.export(dense, (_images(),), str(path), dynamo=True)
    session = ort.InferenceSession(str(path))
    (out,) = session.run(None, {session.get_inputs()[0].name: _images().numpy()})
    torch.testing.assert_close(torch.from_numpy(out), model(_images()), rtol=1e-4, atol=1e-4)


def test_dense_copy_of_a_transformers_model_saves_and_loads_with_save_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 64, (2, 16))
    nmfx.prune(model, "2:4", [{"input_ids": ids}], "sparsegpt")
    nmfx.to_dense(model).save_pretrained(tmp_path)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    weight = loaded.transformer.h[0].mlp.c_fc.weight.detach()
    assert weight.T.reshape(weight.shape[1], -1, 4).ne(0).sum(-1).le(2).all()  # still 2:4 along the input


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("dynamo", [True, False])
def test_onnx_export_of_the_packed_model_is_refused_pointing_to_to_dense(tmp_path, dynamo):
    pytest.importorskip("onnx")
    if dynamo:
        pytest.importorskip("onnxscript")
    model = nmfx.to_inference(nmfx.prune(_vit(), "2:4", [_images()], "wanda"))
    path = tmp_path / "packed.onnx"
    with pytest.raises(Exception) as info:
        torch.onnx.export(model, (_images(),), str(path), dynamo=dynamo)
    assert not path.exists()
    chain, error = [], info.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    assert any("nmfx.to_dense(model)" in text for text in chain), chain[0][:500]
