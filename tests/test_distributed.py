"""DDP and FSDP2 (gloo, CPU, 2 processes): masks identical on every rank, weights equal to a
single-process run on the same global batch, and masks that follow the sharded parameters through
steps and a resume (the FSDP2 failure mode seen in other tools: a mask tied to the pre-sharding
parameter, or never refreshed)."""

import gc
import os
import socket
import sys
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import nmfx

WORLD = 2
STEPS = 4
PATTERN, METHOD, OPTIONS = "1:4", "mdgf", {"total_steps": 6}


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    return nmfx.sparsify(model, PATTERN, METHOD, **OPTIONS)


def _batch(step: int) -> torch.Tensor:
    return torch.randn(16, 16, generator=torch.Generator().manual_seed(100 + step))


def _train(model, opt, steps, rank=0, world=1, start=0):
    for step in range(start, start + steps):
        x = _batch(step).chunk(world)[rank]
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        nmfx.step(model)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in (model[0], model[2], model[4]):
        fully_shard(layer)
    return fully_shard(model)


def _mask_storage(model) -> dict:
    """``{weight: (mask elements this rank stores, mask elements)}``."""
    return {name: (state.mask.to_local().numel() if hasattr(state.mask, "to_local") else state.mask.numel(),
                   state.mask.numel()) for name, state in nmfx.states(model).items()}


def _run(rank: int, mode: str, out: str) -> None:
    model = _model()
    wrapped = nn.parallel.DistributedDataParallel(model) if mode == "ddp" else _shard(model)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    _train(wrapped, opt, STEPS, rank, WORLD)
    masks = {k: v.clone() for k, v in nmfx.masks(model).items()}
    weights = {k: _full(v.detach()).clone() for k, v in model.named_parameters()}
    # Masks must be the N:M mask of the *current, full* weights on every rank.
    follows = all(torch.equal(masks[k], nmfx.nm_mask(weights[k], nmfx.states(model)[k].schedule.pattern))
                  for k in masks)
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, masks)
    same_on_ranks = all(all(torch.equal(g[k], masks[k]) for k in masks) for g in gathered)
    resumed_ok = None
    if mode == "fsdp2":
        checkpoint = {k: v for k, v in model.state_dict().items()}
        fresh = _model()
        _shard(fresh)
        fresh.load_state_dict(checkpoint)
        opt_fresh = torch.optim.SGD(fresh.parameters(), lr=0.1)
        opt_cont = torch.optim.SGD(model.parameters(), lr=0.1)
        _train(model, opt_cont, 2, rank, WORLD, start=STEPS)
        _train(fresh, opt_fresh, 2, rank, WORLD, start=STEPS)
        resumed_ok = all(torch.equal(a, b) for a, b in zip(nmfx.masks(model).values(), nmfx.masks(fresh).values()))
        resumed_ok &= all(torch.equal(_full(a.detach()), _full(b.detach()))
                          for a, b in zip(model.parameters(), fresh.parameters()))
        resumed_ok &= all(torch.equal(m, nmfx.nm_mask(_full(model.get_parameter(k)), "1:4")) for k, m in nmfx.masks(model).items())
    storage = {"trained": _mask_storage(model), "resumed": _mask_storage(fresh)} if mode == "fsdp2" else None
    if rank == 0:
        torch.save({"masks": masks, "weights": weights, "follows": follows, "same": same_on_ranks,
                    "resumed": resumed_ok, "storage": storage}, out)


# -- the large-model flow (issue 14): meta device, sparsify, fully_shard, to_empty, load, refresh --------------
FLOW_STEPS, FLOW_MORE = 3, 2  # steps before the DCP checkpoint, and after it


def _llama_config():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                    bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _dense_llama_state() -> dict:
    """The 'pretrained' dense checkpoint (float64: the 2-rank run then matches the 1-process run closely)."""
    import transformers

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(_llama_config()).to(torch.float64).state_dict()


def _meta_llama() -> nn.Module:
    import transformers

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(_llama_config()).to(torch.float64)
    return nmfx.sparsify(model, "1:8", "sdgf", total_steps=8)


def _materialize(model: nn.Module) -> None:
    """to_empty, then the rotary frequencies (non-persistent buffers: in no checkpoint) computed again."""
    model.to_empty(device="cpu")
    rotary = model.model.rotary_emb
    with torch.no_grad():
        for name, buffer in type(rotary)(model.config).named_buffers():
            getattr(rotary, name).copy_(buffer)


def _shard_llama(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def _lm_batch(step: int) -> torch.Tensor:
    return torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(200 + step))


def _train_lm(model, opt, steps, start, rank=0, world=1):
    for step in range(start, start + steps):
        ids = _lm_batch(step).chunk(world)[rank]
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        nmfx.step(model)


def _lm_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)


def _run_meta_flow(rank: int, out: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                         set_state_dict)

    def build():
        model = _shard_llama(_meta_llama())
        _materialize(model)
        return model, _lm_optimizer(model)

    model, opt = build()
    full = _dense_llama_state() if rank == 0 else {}  # only rank 0 reads the dense checkpoint
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    refused_before_refresh = False
    try:
        nmfx.step(model)
    except RuntimeError as error:
        refused_before_refresh = "nmfx.refresh(model)" in str(error)
    nmfx.refresh(model)
    _train_lm(model, opt, FLOW_STEPS, 0, rank, WORLD)
    checkpoint = os.path.join(os.path.dirname(out), "dcp")
    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=checkpoint)
    _train_lm(model, opt, FLOW_MORE, FLOW_STEPS, rank, WORLD)

    resumed, opt_resumed = build()
    model_state, optim_state = get_state_dict(resumed, opt_resumed)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(resumed, opt_resumed, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _train_lm(resumed, opt_resumed, FLOW_MORE, FLOW_STEPS, rank, WORLD)

    masks = {k: v.clone() for k, v in nmfx.masks(model).items()}
    weights = {k: _full(v.detach()).clone() for k, v in model.named_parameters()}
    found = nmfx.states(model)
    follows = all(torch.equal(masks[k], nmfx.nm_mask(weights[k], found[k].schedule.pattern, dim=found[k].dim))
                  for k in masks)
    resumed_same = all(torch.equal(a, b) for a, b in zip(nmfx.masks(model).values(), nmfx.masks(resumed).values()))
    resumed_same &= all(torch.equal(_full(a.detach()), _full(b.detach()))
                        for a, b in zip(model.parameters(), resumed.parameters()))
    resumed_same &= all(int(a.step) == int(b.step) == FLOW_STEPS + FLOW_MORE
                        for a, b in zip(found.values(), nmfx.states(resumed).values()))
    shard_local = _shard_local_masks(model)
    storage = {"trained": _mask_storage(model), "resumed": _mask_storage(resumed)}
    if rank == 0:
        torch.save({"masks": masks, "weights": weights, "follows": follows, "resumed": resumed_same,
                    "refused": refused_before_refresh, "shard_local": shard_local, "storage": storage}, out)


def _shard_local_masks(model) -> dict:
    """Every Llama weight is FSDP2-sharded on dim 0 and grouped along dim 1: its mask is computed from the
    local shard and gathered as bytes, equal to the mask of the gathered weight. A weight sharded along its
    groups with shards that split a group takes the gathered-weight path."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from nmfx.state import _gathered_mask, _shard_local

    found = nmfx.states(model)
    weights = {name: model.get_parameter(name) for name in found}
    local = all(_shard_local(weights[name], state.schedule.pattern, state.dim) for name, state in found.items())
    same = all(torch.equal(_gathered_mask(weights[name], nmfx.Pattern(1, 8), state.dim),
                           nmfx.nm_mask(weights[name].full_tensor(), "1:8", dim=state.dim))
               for name, state in found.items())
    mesh = next(iter(weights.values())).device_mesh
    split = distribute_tensor(torch.randn(24, 8), mesh, [Shard(0)])  # shards of 12 rows: groups of 8 split
    whole = distribute_tensor(torch.randn(32, 8), mesh, [Shard(0)])  # shards of 16 rows: they do not
    return {"all local": local, "same masks": same, "split refused": not _shard_local(split, nmfx.Pattern(1, 8), 0),
            "whole taken": _shard_local(whole, nmfx.Pattern(1, 8), 0)
            and torch.equal(_gathered_mask(whole, nmfx.Pattern(1, 8), 0), nmfx.nm_mask(whole.full_tensor(), "1:8", 0))}


# -- sharded mask storage where groups run along the sharded dim ------------------------------------------
SPLIT_PATTERN, SPLIT_METHOD, SPLIT_OPTIONS = "1:16", "sdgf", {"total_steps": STEPS}  # hard masks at the last step


def _split_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    return nmfx.sparsify(model, SPLIT_PATTERN, SPLIT_METHOD, **SPLIT_OPTIONS)


def _shard_columns(model):
    """FSDP2 sharding each weight along its input dim (the groups' dim): 8 of layer 0's 16 columns per rank
    split its groups of 16 (its mask must stay whole), 16 of layer 2's 32 do not (its mask is sharded)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, shard_placement_fn=lambda p: Shard(p.dim() - 1))
    return fully_shard(model, shard_placement_fn=lambda p: Shard(p.dim() - 1))


def _run_sharded(rank: int, out: str) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         set_model_state_dict)

    model = _shard_columns(_split_model())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), STEPS, rank, WORLD)
    whole_warned = [str(w.message) for w in caught if "stays whole" in str(w.message)]
    stats, report = nmfx.stats(model), [(row.name, row.density) for row in nmfx.report(model)]
    masks = {k: v.clone() for k, v in nmfx.masks(model).items()}
    weights = {k: _full(v.detach()).clone() for k, v in model.named_parameters()}
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=os.path.join(os.path.dirname(out), "dcp"))

    # One rank's shard of a sharded mask corrupted: every rank refuses the checkpoint, and nothing is loaded.
    corrupt = {k: v.clone() for k, v in model.state_dict().items()}
    if rank == 1:
        corrupt["2.weight_nm.mask"].to_local()[0].fill_(True)
    try:
        model.load_state_dict(corrupt)
        refusal = ""
    except ValueError as error:
        refusal = str(error)
    unchanged = all(torch.equal(masks[k], v) for k, v in nmfx.masks(model).items())

    # A whole (gathered) state dict loads into a fresh sharded model, whose masks are then sharded again.
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    fresh = _shard_columns(_split_model())
    set_model_state_dict(fresh, full, options=StateDictOptions(full_state_dict=True))
    reloaded = all(torch.equal(masks[k], v) for k, v in nmfx.masks(fresh).items())

    # Between forward and backward autograd keeps a sharded mask's shard, not the gathered mask; saved-tensor
    # hooks of the user's (here: a recorder) still see everything else.
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, tuple(t.shape))) or t, lambda t: t):
        loss = model(_batch(0).chunk(WORLD)[rank]).square().mean()
    loss.backward()
    kept = {"bool": sorted({shape for dtype, shape in saved if dtype == torch.bool}),
            "float": any(dtype == torch.float32 for dtype, _ in saved)}
    grads = {k: _full(p.grad).clone() for k, p in model.named_parameters()}
    model.zero_grad()
    from torch.utils.checkpoint import checkpoint  # activation checkpointing: the same gradients

    checkpoint(model, _batch(0).chunk(WORLD)[rank], use_reentrant=False).square().mean().backward()
    kept["checkpointed"] = all(torch.equal(_full(p.grad), grads[k]) for k, p in model.named_parameters())
    if rank == 0:
        torch.save({"masks": masks, "weights": weights, "stats": stats, "report": report, "warned": whole_warned,
                    "refusal": refusal, "unchanged": unchanged, "reloaded": reloaded, "kept": kept,
                    "storage": {"trained": _mask_storage(model), "reloaded": _mask_storage(fresh)}}, out)


def _uneven_model() -> nn.Module:
    """Row counts that FSDP2's dim-0 sharding splits unevenly (3 rows: 2 + 1) and leaves a rank empty (1: 1 + 0),
    under gmp (masks that only ever lose weights: the monotone refresh, shard by shard)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 3), nn.ReLU(), nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 1))
    return nmfx.sparsify(model, "1:4", "gmp", include=["0", "4"], total_steps=3)


def _run_uneven(rank: int, out: str) -> None:
    model = _shard(_uneven_model())
    _train(model, torch.optim.SGD(model.parameters(), lr=0.1), STEPS, rank, WORLD)
    local = {name: tuple(state.mask.to_local().shape) for name, state in nmfx.states(model).items()}
    masks = {k: v.clone() for k, v in nmfx.masks(model).items()}
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, local)
    if rank == 0:
        torch.save({"masks": masks, "local": gathered}, out)


def _worker(rank: int, mode: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        runs = {"meta_flow": _run_meta_flow, "sharded": _run_sharded, "uneven": _run_uneven}
        runs.get(mode, lambda r, o: _run(r, mode, o))(rank, out)
        # The models (and FSDP2's device mesh) die here, while the process group is alive: a gloo
        # group that outlives them is torn down at interpreter exit instead, where its worker
        # threads can abort the process ("terminate called without an active exception").
        gc.collect()
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()
    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # success: skip interpreter finalization, the remaining place gloo can abort


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single_process():
    model = _model()
    _train(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), STEPS)
    return nmfx.masks(model), dict(model.named_parameters())


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_process_training_matches_single_process(mode, single_process):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pt")
        mp.start_processes(_worker, args=(mode, _free_port(), out), nprocs=WORLD, start_method="spawn")
        result = torch.load(out, weights_only=False)
    assert result["same"], "masks differ between ranks"
    assert result["follows"], "a mask is not the N:M mask of its (full) parameter"
    ref_masks, ref_weights = single_process
    for name, mask in result["masks"].items():
        assert torch.equal(mask, ref_masks[name]), name
    for name, weight in result["weights"].items():
        torch.testing.assert_close(weight, ref_weights[name].detach(), rtol=1e-5, atol=1e-6, msg=name)
    if mode == "fsdp2":
        assert result["resumed"], "resumed FSDP2 training diverged from the uninterrupted run"
        _assert_sharded(result["storage"], 2)  # the head (model[4]) stays dense


def _assert_sharded(storage: dict, count: int) -> None:
    """Each rank stores only its shard of every mask (all shapes here divide evenly by the world size)."""
    for run, masks in storage.items():
        assert len(masks) == count, run
        for name, (local, full) in masks.items():
            assert local * WORLD == full, f"{run}: {name} stores {local} of {full} mask elements per rank"


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_masks_sharded_along_the_groups_or_kept_whole_where_shards_split_them(tmp_path):
    """FSDP2 sharding the group dim: a mask whose groups of M are split by the shard boundary stays whole (with a
    warning), the other is sharded; training, nmfx.stats and nmfx.report equal one process; a checkpoint with one
    rank's shard corrupted is refused by every rank with nothing loaded; a gathered state dict loads into a fresh
    sharded model; autograd keeps mask shards, not gathered masks, from forward to backward; the run's DCP
    checkpoint deploys (to_inference_from_checkpoint) like to_inference of one process."""
    out = str(tmp_path / "rank0.pt")
    mp.start_processes(_worker, args=("sharded", _free_port(), out), nprocs=WORLD, start_method="spawn")
    result = torch.load(out, weights_only=False)
    reference = _split_model()
    _train(reference, torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9), STEPS)
    for name, mask in nmfx.masks(reference).items():
        assert torch.equal(result["masks"][name], mask), name
    for name, weight in reference.named_parameters():
        torch.testing.assert_close(result["weights"][name], weight.detach(), rtol=1e-5, atol=1e-6, msg=name)
    for run, storage in result["storage"].items():
        assert storage == {"0.weight": (512, 512), "2.weight": (256, 512)}, run
    assert len(result["warned"]) == 1 and "(32, 16)" in result["warned"][0], result["warned"]
    expected = nmfx.stats(reference)
    assert result["stats"].keys() == expected.keys()
    for key, value in expected.items():
        assert result["stats"][key] == pytest.approx(value, rel=1e-6), key
    assert result["report"] == [(row.name, row.density) for row in nmfx.report(reference)]
    assert "refusing to load" in result["refusal"] and "2.weight" in result["refusal"], result["refusal"]
    assert result["unchanged"] and result["reloaded"]
    # autograd kept layer 0's whole mask (it is not sharded), not layer 2's gathered (16, 32) one
    assert result["kept"] == {"bool": [(32, 16)], "float": True, "checkpointed": True}

    with torch.device("meta"):
        fresh = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    deployed = nmfx.to_inference_from_checkpoint(tmp_path / "dcp", fresh, backend="reference")
    expected_model = nmfx.to_inference(reference.eval(), backend="reference")
    got, want = deployed.state_dict(), expected_model.state_dict()
    assert got.keys() == want.keys() and any(key.endswith("weight_indices") for key in got)
    for key, value in want.items():
        if value.is_floating_point():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
        else:
            assert torch.equal(got[key], value), key


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_uneven_and_empty_mask_shards_train_like_one_process(tmp_path):
    out = str(tmp_path / "rank0.pt")
    mp.start_processes(_worker, args=("uneven", _free_port(), out), nprocs=WORLD, start_method="spawn")
    result = torch.load(out, weights_only=False)
    assert result["local"] == [{"0.weight": (2, 16), "4.weight": (1, 16)}, {"0.weight": (1, 16), "4.weight": (0, 16)}]
    reference = _uneven_model()
    _train(reference, torch.optim.SGD(reference.parameters(), lr=0.1), STEPS)
    expected = nmfx.masks(reference)
    assert result["masks"].keys() == expected.keys()
    for name, mask in expected.items():
        assert torch.equal(result["masks"][name], mask), name


def _run_example(engine, *args):
    import shutil
    import subprocess
    import sysconfig

    torchrun = os.path.join(sysconfig.get_path("scripts"), "torchrun")
    if not os.path.exists(torchrun):
        torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "train_distributed.py")
    done = subprocess.run([torchrun, "--nproc_per_node=2", "--master_port", str(_free_port()), script,
                           "--engine", engine, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_example_meta_init_trains_exactly_like_in_memory_init(tmp_path):
    """examples/train_distributed.py --meta-init (meta device, sparsify, fully_shard, to_empty, weights broadcast
    from rank 0, nmfx.refresh) ends bit-identical to the same run built in memory."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    states = []
    for name, flags in (("memory", []), ("meta", ["--meta-init"])):
        _run_example("fsdp2", "--steps", "6", "--batch", "32", "--checkpoint", str(tmp_path / name), *flags)
        dcp_to_torch_save(str(tmp_path / name / "step-6"), str(tmp_path / f"{name}.pt"))
        states.append(torch.load(tmp_path / f"{name}.pt", weights_only=False)["model"])
    memory, meta = states
    assert memory.keys() == meta.keys() and any(key.endswith("_nm.mask") for key in meta)
    for key, value in memory.items():
        assert torch.equal(value, meta[key]), key


@pytest.mark.parametrize("engine", ["fsdp2", "ddp"])
def test_example_checkpoints_and_resumes_exactly(engine, tmp_path):
    """examples/train_distributed.py: DCP checkpoints (model incl. nmfx state, optimizer, step) under both
    engines; a run resumed from step 6 ends bit-identical to the uninterrupted run (issue 14: --checkpoint
    used to be ignored under FSDP2)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    def run(*args):
        return _run_example(engine, "--steps", "12", "--batch", "32", *args)

    run("--checkpoint", str(tmp_path / "a"), "--checkpoint-every", "6")
    out = run("--checkpoint", str(tmp_path / "b"), "--resume", str(tmp_path / "a" / "step-6"))
    assert "resumed from" in out and "at step 6" in out
    states = []
    for name in ("a", "b"):
        dcp_to_torch_save(str(tmp_path / name / "step-12"), str(tmp_path / f"{name}.pt"))
        states.append(torch.load(tmp_path / f"{name}.pt", weights_only=False))
    straight, resumed = states
    assert int(straight["step"]) == int(resumed["step"]) == 12
    assert any(key.endswith("_nm.mask") for key in straight["model"])
    assert straight["model"].keys() == resumed["model"].keys()
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


def _single_process_meta_flow():
    """The same flow on one process without FSDP2, on the whole batch."""
    model = _meta_llama()
    _materialize(model)
    model.load_state_dict(_dense_llama_state())  # a dense checkpoint: the documented path before refresh
    nmfx.refresh(model)
    _train_lm(model, _lm_optimizer(model), FLOW_STEPS + FLOW_MORE, 0)
    return nmfx.masks(model), {k: v.detach() for k, v in model.named_parameters()}


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_meta_device_flow_under_fsdp2_matches_single_process():
    """Issue 14's large-model flow on 2 ranks: a transformers Llama built on meta, sparsified, fully_shard per
    block and root, to_empty, the dense weights broadcast from rank 0 (set_model_state_dict), refused training
    until nmfx.refresh, steps, a DCP checkpoint, more steps; a run resumed from the checkpoint ends identical,
    and both match one process running the same flow (float64)."""
    pytest.importorskip("transformers")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pt")
        mp.start_processes(_worker, args=("meta_flow", _free_port(), out), nprocs=WORLD, start_method="spawn")
        result = torch.load(out, weights_only=False)
    assert result["refused"], "nmfx.step before nmfx.refresh was not refused with the fix named"
    assert result["follows"], "a mask is not the N:M mask of its (full) parameter"
    assert result["resumed"], "the run resumed from the DCP checkpoint diverged from the uninterrupted one"
    assert result["shard_local"] == {"all local": True, "same masks": True, "split refused": True, "whole taken": True}
    _assert_sharded(result["storage"], 14)
    assert sum(full for _, full in result["storage"]["trained"].values()) == 18_432
    ref_masks, ref_weights = _single_process_meta_flow()
    assert result["masks"].keys() == ref_masks.keys() and len(ref_masks) == 14
    for name, mask in result["masks"].items():
        assert torch.equal(mask, ref_masks[name]), name
    assert result["weights"].keys() == ref_weights.keys()
    for name, weight in result["weights"].items():
        assert weight.dtype == torch.float64
        torch.testing.assert_close(weight, ref_weights[name], rtol=1e-12, atol=1e-13, msg=name)


class _FakeShard:
    """What nmfx.state._shard_local reads of an FSDP2 DTensor parameter: shape, placements and mesh sizes."""

    def __init__(self, shape, placements, mesh_sizes):
        self.shape, self.placements = torch.Size(shape), placements
        self.device_mesh = type("Mesh", (), {"size": lambda _, i: mesh_sizes[i]})()

    def dim(self):
        return len(self.shape)

    def to_local(self):
        raise AssertionError("the predicate must not read data")


@settings(max_examples=60, deadline=None)
@given(groups=st.integers(1, 40), m=st.sampled_from([2, 4, 8, 16]), world=st.integers(1, 9), dim=st.sampled_from([0, 1]))
def test_shard_local_exactly_when_no_shard_boundary_splits_a_group(groups, m, world, dim):
    """FSDP2 shards dim 0 like torch.chunk; a shard's mask can be computed alone iff no chunk boundary falls
    inside a group of M along the group dim (always, when the groups run along the other dim)."""
    from torch.distributed.tensor import Replicate, Shard

    from nmfx.state import _shard_local

    shape = (groups * m, 3 * m) if dim == 0 else (5, groups * m)
    boundaries = [int(chunk[0]) for chunk in torch.arange(shape[0]).chunk(world)]
    expected = dim != 0 or all(b % m == 0 for b in boundaries)
    assert _shard_local(_FakeShard(shape, (Shard(0),), [world]), nmfx.Pattern(1, m), dim) == expected
    assert _shard_local(_FakeShard(shape, (Replicate(), Shard(0)), [2, world]), nmfx.Pattern(1, m), dim) == expected
    assert not _shard_local(torch.zeros(shape), nmfx.Pattern(1, m), dim)  # a plain tensor: nothing to shard
