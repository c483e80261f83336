"""Models beyond the MLP of the other tests: tied weights, bfloat16 and float16 models,
autocast, non-finite checkpoints, and the reused forward workspace."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tests.digits import digits_splits, make_model
from torch import nn
from torch.utils.data import DataLoader

import twa_kernels as tk
from twa_kernels import _ops
from twa_kernels.io import CheckpointError

VOCAB, DIM = 40, 16


class TiedLM(nn.Module):
    """A language-model layout: the output layer shares the embedding matrix; one untied
    layer and a LayerNorm in between."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.mix = nn.Linear(DIM, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(self.norm(torch.tanh(self.mix(self.embed(tokens)))))


def _tokens(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n,), generator=gen)
    return x, (3 * x + 1) % VOCAB


@pytest.fixture(scope="module")
def tied_checkpoints():
    model = TiedLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    checkpoints = []
    for step in range(60):
        x, y = _tokens(64, step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if step % 10 == 9:
            checkpoints.append({k: v.clone() for k, v in model.state_dict().items()})
    assert set(checkpoints[0]) >= {"embed.weight", "head.weight"}
    return checkpoints


def _train_twa(twa, steps: int = 15, lr: float = 0.05) -> list[float]:
    opt = torch.optim.AdamW(twa.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        x, y = _tokens(64, 1000 + step)
        opt.zero_grad()
        loss = F.cross_entropy(twa(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _plain(state) -> TiedLM:
    model = TiedLM(seed=7)
    model.load_state_dict(state)
    return model.eval()


def test_tied_weights_export_matches_the_twa_model(tied_checkpoints):
    twa = tk.TWA(TiedLM(), tied_checkpoints, bits=4)
    assert twa.names.count("embed.weight") == 1 and "head.weight" not in twa.names  # one row segment
    _train_twa(twa)
    twa.eval()
    x, _ = _tokens(200, 99)
    with torch.no_grad():
        expected = twa(x)
        got = _plain(twa.averaged_state_dict())(x)
    assert (got - expected).abs().max() < 1e-5


def test_a_subspace_built_without_the_models_names_holding_a_tied_weight_twice_is_named(tied_checkpoints):
    # the error said the model's 'head.weight' was None; the model ties it to embed.weight
    subspace = tk.Subspace.from_checkpoints(tied_checkpoints, bits=4)
    assert {"embed.weight", "head.weight"} <= set(subspace.names)
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"spans 'head.weight' and the model ties it to "
                                                             r"'embed.weight'.*parameter_names="):
        tk.TWA(TiedLM(), subspace)
    renamed = [{f"lm.{k}": v for k, v in state.items()} for state in tied_checkpoints]
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"spans 'lm.embed.weight', which is no parameter"):
        tk.TWA(TiedLM(), tk.Subspace.from_checkpoints(renamed, bits=4))
    names = [n for n, _ in TiedLM().named_parameters()]
    named = tk.Subspace.from_checkpoints(tied_checkpoints, bits=4, parameter_names=names)
    assert tk.TWA(TiedLM(), named).names == names


def test_tied_key_missing_from_the_files(tied_checkpoints, tmp_path):
    # safetensors writers keep one name of a shared tensor: files with only embed.weight
    paths = []
    for i, state in enumerate(tied_checkpoints):
        paths.append(tk.save_state_dict({k: v for k, v in state.items() if k != "head.weight"},
                                        tmp_path / f"ckpt{i}.safetensors"))
    from_files = tk.TWA(TiedLM(), paths, bits=None)
    from_memory = tk.TWA(TiedLM(), tied_checkpoints, bits=None)
    assert torch.equal(from_files.center, from_memory.center)
    x, _ = _tokens(100, 5)
    # at zero coefficients TWA is the uniform average: the baselines must agree with it
    with torch.no_grad():
        expected = from_files.eval()(x)
        for state in (tk.uniform_average(paths, model=TiedLM()), tk.uniform_average(tied_checkpoints)):
            assert (_plain(state)(x) - expected).abs().max() < 1e-5
        soup, chosen = tk.greedy_soup(paths, score=lambda s: 0.0, model=TiedLM())  # ties: every one joins
        assert sorted(chosen) == list(range(len(paths)))
        assert (_plain(soup)(x) - expected).abs().max() < 1e-5
        ema = tk.ema_average(paths, decay=0.5, model=TiedLM())
        assert torch.equal(ema["embed.weight"], ema["head.weight"])


def test_subspace_optimizer_on_a_tied_model(tied_checkpoints):
    model = TiedLM()
    names = [n for n, _ in model.named_parameters()]
    sub = tk.Subspace.from_checkpoints(tied_checkpoints, bits=None, granularity="model", orthonormalize=True,
                                       parameter_names=names,
                                       parameter_aliases=tk.io.parameter_aliases(model))
    model.load_state_dict(tk.io.fill_tied_keys(sub.unflatten(sub.center), sub.aliases), strict=False)
    opt = tk.SubspaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), sub)
    for step in range(5):
        x, y = _tokens(64, step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    offset = sub.flatten(model.state_dict()) - sub.center
    basis = tk.dequantize(sub.basis)
    inside = basis.T @ (basis @ offset)
    assert (offset - inside).norm() < 1e-4 * offset.norm()
    assert torch.equal(model.embed.weight, model.head.weight)


@pytest.fixture(scope="module")
def digits(digits_checkpoints):
    train, val, _ = digits_splits()
    return train, val, digits_checkpoints(epochs=5)


def test_bfloat16_model_trains_and_exports_bfloat16(digits):
    train, val, checkpoints = digits
    model = make_model().to(torch.bfloat16)
    twa = tk.TWA(model, checkpoints, bits=4)
    assert twa.center.dtype == torch.float32 and twa.coefficients.dtype == torch.float32
    x, y = train.tensors
    x = x.to(torch.bfloat16)
    opt = torch.optim.AdamW(twa.parameters(), lr=0.05, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(20):
        batch = torch.randint(0, len(x), (64,), generator=gen)
        opt.zero_grad()
        loss = F.cross_entropy(twa(x[batch]).float(), y[batch])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert twa.coefficients.grad.dtype == torch.float32
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    state = twa.averaged_state_dict()
    assert all(v.dtype == torch.bfloat16 for k, v in state.items() if v.is_floating_point())
    plain = make_model().to(torch.bfloat16)
    plain.load_state_dict(state)
    twa.eval()
    vx = val.tensors[0].to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(vx), twa(vx), rtol=0, atol=0)  # the same bf16 weights


def test_float16_model_and_autocast(digits):
    train, _, checkpoints = digits
    x, y = train.tensors
    half = tk.TWA(nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Identity(), nn.Linear(48, 10)).half(),
                  [{k: v for k, v in c.items() if k.startswith(("0.", "3."))} for c in checkpoints], bits=4)
    # the digits MLP's linear layers 0 and 3, without its BatchNorm
    assert all(v.dtype == torch.float16 for v in half.weights().values())
    assert half.averaged_state_dict()["0.weight"].dtype == torch.float16

    twa = tk.TWA(make_model(), checkpoints, bits=4)  # a float32 model under autocast
    opt = torch.optim.AdamW(twa.parameters(), lr=0.05, weight_decay=0.0)
    losses = []
    for step in range(10):
        batch = slice(64 * step, 64 * step + 64)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(twa(x[batch]), y[batch])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses))) and twa.coefficients.grad.abs().sum() > 0


def test_dtype_casts_reach_the_model_only(digits):
    _, _, checkpoints = digits
    twa = tk.TWA(make_model(), checkpoints, bits=4).to(torch.bfloat16)
    assert next(twa.module.parameters()).dtype == torch.bfloat16
    for t in (twa.center, twa.basis_scales, twa.basis_mins, twa.coefficients):
        assert t.dtype == torch.float32


def test_a_cast_of_the_wrapped_model_itself_reaches_the_next_forward(digits):
    train, _, checkpoints = digits
    twa = tk.TWA(make_model(), checkpoints, bits=4)
    x, y = train.tensors
    F.cross_entropy(twa(x[:64]), y[:64]).backward()  # a float32 step first
    seen = []
    handles = [m.register_forward_pre_hook(lambda m, args: seen.append(m.weight.dtype))
               for m in twa.module.modules() if isinstance(m, nn.Linear)]
    twa.module.to(torch.bfloat16)  # the model, not the TWA: the weights follow it
    twa.coefficients.grad = None
    out = twa(x[:64].to(torch.bfloat16))
    F.cross_entropy(out.float(), y[:64]).backward()
    assert out.dtype == torch.bfloat16 and seen and set(seen) == {torch.bfloat16}
    assert twa.coefficients.grad.dtype == torch.float32 and twa.coefficients.grad.abs().sum() > 0
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_checkpoints_are_refused_with_file_and_key(digits, tmp_path, bad):
    _, _, checkpoints = digits
    paths = [tk.save_state_dict(c, tmp_path / f"epoch{i}.pt") for i, c in enumerate(checkpoints)]
    broken = {k: v.clone() for k, v in checkpoints[2].items()}
    broken["3.weight"][1, 2] = bad
    tk.save_state_dict(broken, paths[2])
    for build in (lambda: tk.Subspace.from_checkpoints(paths), lambda: tk.TWA(make_model(), paths),
                  lambda: tk.uniform_average(paths)):
        with pytest.raises(CheckpointError, match=r"epoch2\.pt.*'3\.weight'.*NaN or Inf"):
            build()


# ---- the reused forward workspace -------------------------------------------------------


def _step_grads(twa, batches):
    twa.coefficients.grad = None
    loss = sum(F.cross_entropy(twa(xb), yb) for xb, yb in batches)
    loss.backward()
    return twa.coefficients.grad.clone()


def test_workspace_is_reused_across_steps_and_safe_across_forwards(digits, monkeypatch):
    train, _, checkpoints = digits
    twa = tk.TWA(make_model(), checkpoints, bits=4)
    loader = list(DataLoader(train, batch_size=64))[:3]
    # the backward projects the tensors' gradients as they are: one piece per tensor
    kernels = _ops._KERNELS["project_pieces"]
    name = _ops.backend("cpu")
    seen = []
    original = kernels.get(name)

    def spy(codes, scales, mins, block_offsets, pieces, bits, group_size):
        seen.append([p.numel() for p in pieces])
        if original is not None:
            return original(codes, scales, mins, block_offsets, pieces, bits, group_size)
        return _ops._kernel("project", torch.device("cpu"))(codes, scales, mins, block_offsets, torch.cat(pieces),
                                                             bits, group_size)

    monkeypatch.setitem(kernels, name, spy)
    pointers = set()
    for xb, yb in loader:  # a training loop: forward, backward, forward, ...
        _step_grads(twa, [(xb, yb)])
        pointers.add(twa._workspace.buffer.data_ptr())
    assert len(pointers) == 1  # the weights reuse one buffer
    assert seen == [[math.prod(s) for s in twa.shapes]] * len(loader)
    fresh = tk.TWA(make_model(), checkpoints, bits=4)
    fresh.coefficients.data.copy_(twa.coefficients.data)
    torch.testing.assert_close(_step_grads(twa, loader[:1]), _step_grads(fresh, loader[:1]))

    # two forwards before one backward (gradient accumulation in one graph) work, and give
    # the gradients of the sum
    together = _step_grads(twa, loader[:2])
    apart = _step_grads(twa, loader[:1]) + _step_grads(twa, loader[1:2])
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-6)

    # a retained graph keeps its weights: the next forward writes another buffer, and the
    # graph's second backward gives the same gradient as its first (the buffer was handed
    # to that forward and overwritten, and the second backward raised an in-place error)
    xb, yb = loader[0]
    twa.coefficients.grad = None
    loss = F.cross_entropy(twa(xb), yb)
    loss.backward(retain_graph=True)
    first = twa.coefficients.grad.clone()
    twa(loader[1][0]).sum().backward()
    twa.coefficients.grad = None
    loss.backward()
    torch.testing.assert_close(twa.coefficients.grad, first, rtol=0, atol=0)
    # the same for a graph kept by autograd.grad(create_graph=True) (a gradient penalty)
    loss = F.cross_entropy(twa(xb), yb)
    (grad,) = torch.autograd.grad(loss, twa.coefficients, create_graph=True)
    other = F.cross_entropy(twa(loader[1][0]), loader[1][1])
    twa.coefficients.grad = None
    (loss + grad.square().sum() + other).backward()
    reference = tk.TWA(make_model(), checkpoints, bits=4)
    reference.coefficients.data.copy_(twa.coefficients.data)
    want_loss = F.cross_entropy(reference(xb), yb)
    (want_grad,) = torch.autograd.grad(want_loss, reference.coefficients, create_graph=True)
    (want_loss + want_grad.square().sum()).backward()
    F.cross_entropy(reference(loader[1][0]), loader[1][1]).backward()
    torch.testing.assert_close(twa.coefficients.grad, reference.coefficients.grad, rtol=1e-5, atol=1e-7)


def test_out_argument_of_reconstruct():
    qb = tk.quantize(torch.randn(4, 1000), bits=4, group_size=64, block_sizes=[300, 700])
    x, center = torch.randn(4, 2, requires_grad=True), torch.randn(1000)
    for dtype in (torch.float32, torch.bfloat16):
        expected = tk.reconstruct(qb, x, center)
        out = torch.empty(1000, dtype=dtype)
        got = tk.reconstruct(qb, x, center, out=out)
        assert got.data_ptr() == out.data_ptr() and got.dtype == dtype
        torch.testing.assert_close(got.float(), expected.to(dtype).float(), rtol=0, atol=0)
        (grad,) = torch.autograd.grad(got.float().square().sum(), x)
        (want,) = torch.autograd.grad(expected.to(dtype).float().square().sum(), x)
        torch.testing.assert_close(grad, want)
    with pytest.raises(ValueError, match="out must be 1-D"):
        tk.reconstruct(qb, x, center, out=torch.empty(10))
    with pytest.raises(TypeError, match="out must be float32 or bfloat16"):
        tk.reconstruct(qb, x, center, out=torch.empty(1000, dtype=torch.float64))


def test_loading_a_corrupt_twa_state_changes_nothing(digits):
    _, _, checkpoints = digits
    twa = tk.TWA(make_model(), checkpoints, bits=4)
    before = {k: v.clone() for k, v in twa.state_dict().items()}
    for key, corrupt in [("basis_scales", lambda t: t.fill_(float("nan"))),
                         ("basis_meta", lambda t: t.copy_(torch.tensor([4, 0, t[2], t[3]]))),
                         ("center", lambda t: t.fill_(float("inf")))]:
        state = {k: v.clone() for k, v in before.items()}
        corrupt(state[key])
        with pytest.raises(ValueError, match="TWA state_dict"):
            twa.load_state_dict(state)
        assert all(torch.equal(twa.state_dict()[k], v) for k, v in before.items())
