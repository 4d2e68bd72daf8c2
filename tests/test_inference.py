"""nmfx.to_inference, nmfx.save / nmfx.load: packed inference graphs that match the trained model,
compile with fullgraph, export, run as an AOTInductor package in a fresh process, and round-trip
through safetensors files; bad files are refused whole."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import nmfx
from nmfx.examples import TinyViT
from nmfx.layers import NMLinear

X = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _trained_vit(pattern="1:8", method="ste", **options):
    torch.manual_seed(0)
    model = nmfx.sparsify(TinyViT(), pattern, method, example_inputs=(X[:2],), **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(options.get("total_steps", 2)):
        model(X).square().mean().backward()
        opt.step()
        opt.zero_grad()
        nmfx.step(model)
    return model.eval()


@pytest.fixture(scope="module")
def vit():
    return _trained_vit()


@pytest.fixture(scope="module")
def vit_inference(vit):
    return nmfx.to_inference(vit, backend="reference")


def test_matches_trained_model_and_drops_dense_weights(vit, vit_inference):
    with torch.no_grad():
        torch.testing.assert_close(vit_inference(X), vit(X), rtol=1e-5, atol=1e-6)
    keys = set(vit_inference.state_dict())
    assert "blocks.0.q.weight" not in keys and "blocks.0.q.weight_nm.mask" not in keys
    assert {"blocks.0.q.weight_values", "blocks.0.q.weight_indices", "head.weight"} <= keys
    assert not vit_inference.training
    packed = [m for m in vit_inference.modules() if isinstance(m, NMLinear)]
    assert packed and not any(p.requires_grad for m in packed for p in m.parameters())
    assert vit_inference.head.weight.requires_grad  # the rest keep their flags, as the plain model has them
    report = nmfx.report(vit_inference)
    assert len([r for r in report if r.status == "packed"]) == 12 and "packed for inference" in report.header
    gm = nmfx.graphs(vit_inference)["blocks.0"]
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), NMLinear)]
    assert len(calls) == 6 and all(n.meta["nmfx"].status == "packed" for n in calls) and "masked_linear" not in gm.code
    assert type(vit_inference.blocks[0].q) is NMLinear and not hasattr(vit_inference.blocks[0].q, "weight")
    assert "blocks.0.q.weight" in nmfx.masks(vit) and vit.training is False  # the trained model is untouched


def test_cpu_backend_matches_reference(vit_inference):
    """A layer's backend can be switched between the device's kernel ("auto") and the reference; nothing else."""
    from nmfx.kernels import cpu

    if not cpu.available():
        pytest.skip("the C++ kernel could not be built here")
    fast = copy.deepcopy(vit_inference)
    layers = [m for m in fast.modules() if isinstance(m, NMLinear)]
    assert len(layers) == 12 and {m.backend for m in layers} == {"reference"}
    for layer in layers:
        layer.backend = "auto"
    with torch.no_grad():
        torch.testing.assert_close(fast(X), vit_inference(X), rtol=1e-5, atol=1e-5)
    for bad in ("cpu", "triton", "gpu"):
        with pytest.raises(ValueError, match="backend must be 'auto'"):
            layers[0].backend = bad
    assert layers[0].backend == "auto"


def test_explicit_kernel_requests_are_checked_at_lowering(vit, vit_inference, monkeypatch):
    """backend="cpu" / "triton" lower to the same device-dispatched op, after checking that this kernel is the
    one that will run: a CPU model cannot ask for Triton, and "cpu" without a C++ build is an error, not a
    silent fallback. The model is left as it was."""
    from nmfx.kernels import cpu

    before = copy.deepcopy(vit.state_dict())
    with pytest.raises(RuntimeError, match="backend='triton'.*cpu"):
        nmfx.to_inference(vit, backend="triton")
    monkeypatch.setattr(cpu, "available", lambda: False)
    monkeypatch.setattr(cpu, "build_error", lambda: "c++ exited with 1 (test)")
    with pytest.raises(RuntimeError, match=r"backend='cpu'.*c\+\+ exited with 1 \(test\).*backend='reference'"):
        nmfx.to_inference(vit, backend="cpu")
    after = vit.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    monkeypatch.undo()
    if cpu.available():
        lowered = nmfx.to_inference(vit, backend="cpu")
        assert {m.backend for m in lowered.modules() if isinstance(m, NMLinear)} == {"auto"}
        with torch.no_grad():
            torch.testing.assert_close(lowered(X), vit_inference(X), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_low_precision(vit, dtype, tol):
    inference = nmfx.to_inference(vit, dtype=dtype, backend="reference")
    assert inference.blocks[0].q.weight_values.dtype == dtype
    with torch.no_grad():
        torch.testing.assert_close(inference(X.to(dtype)).float(), vit(X), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_compile_fullgraph_and_export(vit, vit_inference, backend):
    """Both lowerings compile without graph breaks and export as one op per layer: nm_linear (whose kernel is
    picked from the device when the program runs) or nm_linear_reference; no kernel name in the arguments."""
    inference = vit_inference if backend == "reference" else nmfx.to_inference(vit)
    op = torch.ops.nmfx.nm_linear_reference.default if backend == "reference" else torch.ops.nmfx.nm_linear.default
    torch._dynamo.reset()
    compiled = torch.compile(inference, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(X), vit(X), rtol=1e-5, atol=1e-6)
    exported = torch.export.export(inference, (X,))
    nodes = [n for n in exported.graph.nodes if n.target is op]
    assert len(nodes) == 12 and all(len(n.args) == 7 for n in nodes)
    torch.testing.assert_close(exported.module()(X), vit(X).detach(), rtol=1e-5, atol=1e-6)


def test_aoti_package_runs_in_a_fresh_process(vit, tmp_path):
    exported = torch.export.export(nmfx.to_inference(vit), (X,))  # nm_linear: the C++ kernel in the new process
    package = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "vit.pt2"))
    torch.save({"x": X, "expected": vit(X).detach()}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch, nmfx
        io = torch.load({str(tmp_path / 'io.pt')!r})
        runner = torch._inductor.aoti_load_package({package!r})
        torch.testing.assert_close(runner(io["x"]), io["expected"], rtol=1e-5, atol=1e-6)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_transposed_conv1d_and_attention_modules():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64,
                                                                n_positions=16))
    nmfx.sparsify(gpt2, "1:8", "ste")
    ids = torch.randint(0, 64, (2, 8))
    inference = nmfx.to_inference(gpt2, backend="reference")
    with torch.no_grad():
        torch.testing.assert_close(inference(ids).logits, gpt2.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    assert inference.generate(ids[:1, :3], max_new_tokens=3, do_sample=False).shape == (1, 6)

    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 2, 64, batch_first=True, dropout=0.0), 2)
    nmfx.sparsify(encoder, "1:4", "ste")
    x = torch.randn(2, 5, 32)
    inference = nmfx.to_inference(encoder, backend="reference")
    assert type(inference.layers[0].self_attn) is nn.MultiheadAttention  # masks folded into dense weights
    with torch.no_grad():
        torch.testing.assert_close(inference(x), encoder.eval()(x), rtol=1e-5, atol=1e-5)


def test_unfinished_schedule_refused_unless_forced():
    model = _trained_vit("1:8", "mdgf", total_steps=4)  # trained for 4 of 4 steps: hard
    nmfx.to_inference(model)
    torch.manual_seed(0)
    early = nmfx.sparsify(TinyViT(), "1:8", "mdgf", total_steps=100, example_inputs=(X[:2],))
    with pytest.raises(ValueError, match="not reached the hard 1:8 mask.*force=True"):
        nmfx.to_inference(early)
    with pytest.warns(UserWarning, match="pruned to 1:8 before"):
        forced = nmfx.to_inference(early, force=True, backend="reference")
    dense_pruned = copy.deepcopy(early)
    with torch.no_grad():
        for name, state in nmfx.states(dense_pruned).items():
            state.mask.copy_(nmfx.nm_mask(dense_pruned.get_parameter(name), "1:8"))
            state.alpha.zero_()
        torch.testing.assert_close(forced(X), dense_pruned.eval()(X), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [dict(backend="gpu"), dict(pattern="1:64")])
def test_bad_lowering_requests(bad):
    torch.manual_seed(0)
    model = nmfx.sparsify(TinyViT(), bad.get("pattern", "1:8"), "ste", example_inputs=(X[:2],))
    with pytest.raises(ValueError):
        nmfx.to_inference(model, backend=bad.get("backend", "auto"))
    with pytest.raises(ValueError, match="sparsified by nmfx|not been sparsified"):
        nmfx.to_inference(TinyViT())


# -- files ---------------------------------------------------------------------------------------

def test_save_load_round_trip_on_meta_device(vit, tmp_path):
    inference = nmfx.to_inference(vit, dtype=torch.float16, backend="reference")
    path = tmp_path / "vit.safetensors"
    nmfx.save(inference, path)
    with torch.device("meta"):
        fresh = TinyViT()
    loaded = nmfx.load(path, fresh, backend="reference")
    assert loaded is fresh and not any(t.is_meta for t in loaded.state_dict().values())
    with torch.no_grad():
        assert torch.equal(loaded(X.half()), inference(X.half()))
    for key, value in inference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_file_size_of_sparsified_weights(tmp_path):
    """1:8 fp16: packed values + 3-bit indices take <= 20 % of the dense weights' bytes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512, bias=False), nn.ReLU(), nn.Linear(512, 512, bias=False),
                          nn.ReLU(), nn.Linear(512, 2, bias=False))
    nmfx.sparsify(model, "1:8", "ste", include=["0.weight", "2.weight"])
    dense_bytes = 2 * 512 * 512 * 2
    inference = nmfx.to_inference(model, dtype=torch.float16)
    path = tmp_path / "m.safetensors"
    nmfx.save(inference, path)
    packed = sum(t.numel() * t.element_size() for k, t in inference.state_dict().items() if k.startswith(("0.", "2.")))
    assert packed <= 0.20 * dense_bytes
    assert os.path.getsize(path) <= 0.20 * dense_bytes + 512 * 2 * 2 + 16_384  # + the head + header


def test_tied_weights_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    model = nmfx.to_inference(nmfx.sparsify(transformers.GPT2LMHeadModel(config), "1:8", "ste"))
    nmfx.save(model, tmp_path / "g.safetensors")
    with torch.device("meta"):
        fresh = transformers.GPT2LMHeadModel(config)
    loaded = nmfx.load(tmp_path / "g.safetensors", fresh)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def _saved(vit, tmp_path):
    path = tmp_path / "vit.safetensors"
    nmfx.save(nmfx.to_inference(vit, backend="reference"), path)
    return path


def _fresh_untouched():
    torch.manual_seed(1)
    model = TinyViT()
    return model, copy.deepcopy(model.state_dict())


def test_truncated_file_refused(vit, tmp_path):
    path = _saved(vit, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted|corrupted or truncated"):
        nmfx.load(path, TinyViT())


def test_corrupted_header_refused(vit, tmp_path):
    path = _saved(vit, tmp_path)
    path.write_bytes(b"\x00" * 8 + path.read_bytes()[8:])
    with pytest.raises(ValueError):
        nmfx.load(path, TinyViT())


def _rewrite_header(path, change):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["nmfx"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(header)
    save_file(tensors, str(path), metadata={"nmfx": json.dumps(header)})


def test_newer_format_refused(vit, tmp_path):
    path = _saved(vit, tmp_path)
    _rewrite_header(path, lambda h: h.update(format_version=99))
    with pytest.raises(ValueError, match="format 99.*upgrade nmfx"):
        nmfx.load(path, TinyViT())


def test_mismatched_architecture_refused_whole(vit, tmp_path):
    path = _saved(vit, tmp_path)
    torch.manual_seed(1)
    wider = TinyViT(dim=32, heads=2)
    before = copy.deepcopy(wider.state_dict())
    with pytest.raises(ValueError, match="does not fit this model; nothing was loaded"):
        nmfx.load(path, wider)
    assert not hasattr(wider.blocks[0].q, "weight_values") or all(
        torch.equal(v, before[k]) for k, v in wider.state_dict().items() if k in before)


def test_file_without_nmfx_header_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not written by nmfx.save"):
        nmfx.load(tmp_path / "plain.safetensors", TinyViT())


def test_save_requires_an_inference_model(vit, tmp_path):
    with pytest.raises(ValueError, match="to_inference"):
        nmfx.save(vit, tmp_path / "x.safetensors")


def test_semi_structured_falls_back_per_layer_with_a_reason(vit):
    inference = nmfx.to_inference(vit, backend="semi_structured")
    rows = [r for r in nmfx.report(inference) if r.status == "packed"]
    assert rows and all(r.op == "nm_linear" and "not semi-structured: needs a CUDA tensor" in r.reason for r in rows)
    with torch.no_grad():
        torch.testing.assert_close(inference(X), vit(X), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="needs an sm80+ GPU")
def test_semi_structured_on_gpu(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 8))
    nmfx.sparsify(model, "1:8", "ste", include=["0.weight", "2.weight"])
    model = model.cuda().half().eval()
    x = torch.randn(64, 128, device="cuda", dtype=torch.half)
    inference = nmfx.to_inference(model, backend="semi_structured")
    assert [r.op for r in nmfx.report(inference) if r.status == "packed"] == ["semi_structured"] * 2
    with torch.no_grad():
        torch.testing.assert_close(inference(x), model(x), rtol=2e-2, atol=2e-2)
    auto = nmfx.to_inference(model, backend="auto")
    assert {r.op for r in nmfx.report(auto) if r.status == "packed"} == {"semi_structured"}
    with pytest.raises(ValueError, match="semi-structured"):
        nmfx.save(inference, tmp_path / "semi.safetensors")
