"""sparsify + step + masks on a small MLP: schedules reach the buffers, state_dict round-trips and
resumes bit-exactly, mismatched checkpoints are refused whole, compile needs no recompiles."""

import copy

import pytest
import torch
from torch import nn

import nmfx
from nmfx import nm_mask

METHOD_CASES = {
    "dense": {},
    "ste": {"total_steps": 12, "fine_tune_steps": 3},
    "srste": {"total_steps": 12, "dense_steps": 2},
    "mdgf": {"total_steps": 12, "dense_steps": 2, "fine_tune_steps": 2},
    "mdgf-exp-exact": {"total_steps": 12, "decay": "exponential", "gradient": "exact"},
    "sdgf": {"total_steps": 12, "dense_steps": 2},
    "sdgf-geometric": {"total_steps": 12, "schedule": "geometric"},
}


class MLP(nn.Module):
    def __init__(self, width=64):
        super().__init__()
        self.fc1 = nn.Linear(64, width)
        self.fc2 = nn.Linear(width, 64)
        self.out = nn.Linear(64, 4)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _model(seed=0):
    torch.manual_seed(seed)
    return MLP()


def _sparsified(case, seed=0):
    method = case.split("-")[0]
    return nmfx.sparsify(_model(seed), "1:8", method, **METHOD_CASES[case])


def _train(model, steps, seed=1, opt_state=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 64, generator=g)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        nmfx.step(model)
    return opt


def test_masks_named_like_the_original_parameters():
    model = _sparsified("ste")
    masks = nmfx.masks(model)
    assert set(masks) == {"fc1.weight", "fc2.weight"}  # the head is skipped by default
    for name, mask in masks.items():
        assert torch.equal(mask, nm_mask(model.get_parameter(name), "1:8"))


def test_step_refreshes_masks_from_the_dense_weights():
    model = _sparsified("ste")
    _train(model, 3)
    for name, mask in nmfx.masks(model).items():
        assert torch.equal(mask, nm_mask(model.get_parameter(name), "1:8"))
    assert int(nmfx.states(model)["fc1.weight"].step) == 3


def test_mask_interval():
    model = nmfx.sparsify(_model(), "1:8", "ste", mask_interval=3)
    initial = nmfx.masks(model)["fc1.weight"].clone()
    w = model.get_parameter("fc1.weight")
    with torch.no_grad():
        w.copy_(torch.randn_like(w))  # a different magnitude order
    for _ in range(2):
        nmfx.step(model)
        assert torch.equal(nmfx.masks(model)["fc1.weight"], initial)  # steps 1, 2: not due
    nmfx.step(model)
    assert torch.equal(nmfx.masks(model)["fc1.weight"], nm_mask(w, "1:8"))
    assert not torch.equal(initial, nm_mask(w, "1:8"))


def test_schedule_values_reach_the_buffers():
    model = nmfx.sparsify(_model(), "1:8", "mdgf", total_steps=10)
    state = nmfx.states(model)["fc1.weight"]
    seen = []
    for _ in range(11):
        seen.append(float(state.alpha))
        nmfx.step(model)
    # fitted to total_steps: linear decay over the first half of the sparse phase, then hard
    assert seen[0] == 1.0 and seen[2] == pytest.approx(0.6) and seen[5] == 0.0 and seen[10] == 0.0


def test_sdgf_mask_follows_stages():
    model = nmfx.sparsify(_model(), "1:8", "sdgf", total_steps=8)
    mask = lambda: nmfx.masks(model)["fc1.weight"]
    counts = []
    for _ in range(8):
        counts.append(int(mask().reshape(-1, 8).sum(-1).unique().item()))
        nmfx.step(model)
    assert counts == [7, 7, 4, 4, 2, 2, 1, 1]


def test_fine_tune_freezes_the_mask():
    model = nmfx.sparsify(_model(), "1:8", "ste", total_steps=4, fine_tune_steps=2)
    _train(model, 2)
    frozen = nmfx.masks(model)["fc1.weight"].clone()
    _train(model, 4, seed=9)
    assert torch.equal(nmfx.masks(model)["fc1.weight"], frozen)


@pytest.mark.parametrize("case", list(METHOD_CASES))
def test_forward_equals_original_with_effective_weights(case):
    original = _model()
    model = _sparsified(case)
    _train(model, 5)
    x = torch.randn(3, 64)
    ref = copy.deepcopy(original)
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if "_nm." not in k})
    with torch.no_grad():
        for name, state in nmfx.states(model).items():
            w = ref.get_parameter(name)
            w.copy_(torch.where(state.mask, w, w * state.alpha))
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("case", list(METHOD_CASES))
@pytest.mark.parametrize("split", [1, 4, 7])
def test_resume_is_bit_exact(case, split):
    """Train 10 steps straight vs split + save + load into a fresh model + continue: identical."""
    straight = _sparsified(case)
    _train(straight, 10)
    first = _sparsified(case)
    opt = _train(first, split)
    checkpoint = copy.deepcopy(first.state_dict())
    opt_state = copy.deepcopy(opt.state_dict())
    resumed = _sparsified(case, seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(checkpoint)
    # continue with the same data stream: skip the batches already used
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(opt_state)
    g = torch.Generator().manual_seed(1)
    for _ in range(split):
        torch.randn(16, 64, generator=g)
    for _ in range(10 - split):
        x = torch.randn(16, 64, generator=g)
        loss = resumed(x).square().mean()
        opt2.zero_grad()
        loss.backward()
        opt2.step()
        nmfx.step(resumed)
    for (k1, v1), (k2, v2) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert k1 == k2
        if isinstance(v1, torch.Tensor):
            assert torch.equal(v1, v2), k1


@pytest.mark.parametrize("other", [("2:8", "ste"), ("1:8", "srste"), ("1:8", "mdgf")])
def test_mismatched_checkpoint_refused_whole(other):
    source = nmfx.sparsify(_model(seed=1), other[0], other[1], total_steps=12)
    target = nmfx.sparsify(_model(seed=2), "1:8", "ste", total_steps=12)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match="refusing.*nothing was loaded") as info:
        target.load_state_dict(source.state_dict())
    assert "fc1.weight" in str(info.value)
    for k, v in target.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), f"{k} was half-loaded"


def test_dense_checkpoint_refused_after_sparsify_and_accepted_before():
    dense = _model(seed=1)
    target = nmfx.sparsify(_model(seed=2), "1:8", "ste")
    with pytest.raises(ValueError, match="dense model"):
        target.load_state_dict(dense.state_dict())
    # The documented path: load the dense (pretrained) checkpoint first, then sparsify.
    fresh = _model(seed=2)
    fresh.load_state_dict(dense.state_dict())
    nmfx.sparsify(fresh, "1:8", "ste")
    assert torch.equal(nmfx.masks(fresh)["fc1.weight"], nm_mask(dense.fc1.weight, "1:8"))


def test_compiled_training_matches_eager_without_recompiles():
    torch._dynamo.reset()
    eager = nmfx.sparsify(_model(), "1:8", "mdgf", total_steps=6)
    compiled_model = nmfx.sparsify(_model(), "1:8", "mdgf", total_steps=6)
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_model, backend=counter, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        x = torch.randn(8, 64, generator=g)
        for model, fn in ((eager, eager), (compiled_model, compiled)):
            model.zero_grad()
            fn(x).square().mean().backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
            nmfx.step(model)  # new alpha and new masks every step
    assert counter.frame_count == 1, "a schedule change caused a recompilation"
    for (k, a), (_, b) in zip(eager.state_dict().items(), compiled_model.state_dict().items()):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


def test_stats_hand_computed():
    """One 1:2 layer with known weights and gradients: every number checked by hand."""
    model = nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -3.0, 0.5, 0.25], [2.0, 1.0, -1.0, 4.0]]))
    nmfx.sparsify(model, "1:2", "mdgf", total_steps=4)  # model[1] is the head: skipped
    model[0].weight.grad = torch.tensor([[3.0, 4.0, 1.0, 2.0], [0.0, 1.0, 2.0, 2.0]])
    s = nmfx.stats(model)
    # mask: row0 keeps -3 (pos 1) and 0.5 (pos 2); row1 keeps 2 (pos 0) and 4 (pos 3)
    kept = [4.0, 1.0, 0.0, 2.0]
    pruned = [3.0, 2.0, 1.0, 2.0]
    assert s["nmfx/0.weight/mask_sparsity"] == 0.5 and s["nmfx/mask_sparsity"] == 0.5
    assert s["nmfx/0.weight/sparsity"] == 0.0 and s["nmfx/sparsity"] == 0.0  # alpha = 1: the forward is dense
    assert s["nmfx/0.weight/alpha"] == 1.0 and (s["nmfx/0.weight/n"], s["nmfx/0.weight/m"]) == (1.0, 2.0)
    assert s["nmfx/0.weight/flip_rate"] == 0.0
    assert s["nmfx/0.weight/grad_norm_kept"] == pytest.approx(sum(v * v for v in kept) ** 0.5)
    assert s["nmfx/0.weight/grad_norm_pruned"] == pytest.approx(sum(v * v for v in pruned) ** 0.5)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, -1.0, 0.5, 0.25], [2.0, 1.0, -1.0, 4.0]]))  # one group flips
    nmfx.step(model)
    s = nmfx.stats(model)
    assert s["nmfx/0.weight/flip_rate"] == pytest.approx(2 / 8)
    assert s["nmfx/0.weight/alpha"] == pytest.approx(0.5) and s["nmfx/step"] == 1.0  # decays over 2 of 4 steps
    nmfx.step(model)
    s = nmfx.stats(model)
    assert s["nmfx/0.weight/alpha"] == 0.0 and s["nmfx/sparsity"] == 0.5 == s["nmfx/mask_sparsity"]  # hard mask
    model[0].weight.grad = None
    assert "nmfx/grad_norm_kept" not in nmfx.stats(model)
