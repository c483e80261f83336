"""TWA on a real dataset (scikit-learn's digits): start point, training, 4-bit vs dense,
export, gradients and resuming."""

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader

import twa_kernels as tk
from twa_kernels.errors import InvalidArgumentError, MissingKeyError

from tests.digits import digits_splits, evaluate, make_model, train_coefficients


@pytest.fixture(scope="module")
def run(digits_checkpoints):
    train, val, test = digits_splits()
    # the head of a run: 5 early epochs at a small learning rate, far from converged
    return train, val, test, digits_checkpoints(epochs=5, lr=0.01)


def _swa_model(checkpoints, train):
    model = make_model(1)
    model.load_state_dict(tk.uniform_average(checkpoints))
    torch.optim.swa_utils.update_bn(DataLoader(train, batch_size=256), model)
    return model


def test_starts_exactly_at_the_swa_point(run):
    train, _, _, ckpts = run
    twa = tk.TWA(make_model(1), ckpts, bits=4)
    swa = tk.uniform_average(ckpts)
    for name, weight in twa.weights().items():
        torch.testing.assert_close(weight, swa[name], rtol=0, atol=1e-6)
    assert torch.equal(twa.coefficients, torch.zeros_like(twa.coefficients))
    assert sum(p.numel() for p in twa.parameters()) == len(ckpts) * 6  # k x one block per tensor


@pytest.fixture(scope="module")
def trained(run):
    train, val, _, ckpts = run
    out = {}
    for bits in (4, None):
        twa = tk.TWA(make_model(1), ckpts, bits=bits)
        train_coefficients(twa, train)
        twa.update_bn(DataLoader(train, batch_size=256))
        out[bits] = twa
    return out


def test_trained_coefficients_beat_swa_on_held_out_data(run, trained):
    train, val, _, ckpts = run
    swa_loss, swa_acc = evaluate(_swa_model(ckpts, train), val)
    twa_loss, twa_acc = evaluate(trained[4], val)
    assert twa_loss < swa_loss - 0.05, (twa_loss, swa_loss)
    assert twa_acc >= swa_acc


def test_four_bit_basis_lands_near_the_dense_one(trained, run):
    _, val, _, _ = run
    loss4, acc4 = evaluate(trained[4], val)
    loss_dense, acc_dense = evaluate(trained[None], val)
    assert abs(loss4 - loss_dense) < 0.05 and abs(acc4 - acc_dense) < 0.03, (loss4, loss_dense, acc4, acc_dense)


def test_averaged_state_dict_reproduces_twa_in_a_plain_model(trained, run):
    _, val, _, _ = run
    twa = trained[4]
    plain = make_model(7)
    plain.load_state_dict(twa.averaged_state_dict())
    plain.eval(), twa.eval()
    x = val.tensors[0]
    with torch.no_grad():
        torch.testing.assert_close(plain(x), twa(x), rtol=0, atol=1e-5)


def test_coefficient_gradients_equal_dense_autograd(run):
    train, _, _, ckpts = run
    twa = tk.TWA(make_model(1), ckpts, bits=2)
    with torch.no_grad():
        twa.coefficients.normal_(0, 0.3)
    x, y = train.tensors[0][:50], train.tensors[1][:50]
    F.cross_entropy(twa(x), y).backward()
    # the same weights written with dense torch ops
    coeffs = twa.coefficients.detach().clone().requires_grad_()
    basis = tk.dequantize(twa.basis)
    blocks = torch.repeat_interleave(torch.arange(twa.basis.num_blocks), twa.basis.block_offsets.diff())
    flat = twa.center + (basis * coeffs[:, blocks]).sum(0)
    F.cross_entropy(functional_call(twa.module, twa.subspace.unflatten(flat), (x,)), y).backward()
    torch.testing.assert_close(twa.coefficients.grad, coeffs.grad, rtol=1e-4, atol=1e-6)


def test_torch_func_transforms_and_forward_mode_over_a_twa_give_autograds_numbers(run):
    # torch.func.grad and vmap(grad) raised "must override the setup_context staticmethod",
    # and forward_ad "must implement the jvp function"
    import torch.autograd.forward_ad as fwAD

    train, _, _, ckpts = run
    twa = tk.TWA(make_model(1), ckpts, bits=4)
    with torch.no_grad():
        twa.coefficients.normal_(0, 0.3)
    x, y = train.tensors[0][:6], train.tensors[1][:6]
    start = twa.coefficients.detach().clone()

    def loss(c, xb, yb):
        return F.cross_entropy(functional_call(twa, {"coefficients": c}, (xb,)), yb)

    twa.eval()  # per-sample losses: BatchNorm from its running statistics
    per_sample = []
    for i in range(len(x)):
        c = start.clone().requires_grad_()
        (g,) = torch.autograd.grad(loss(c, x[i:i + 1], y[i:i + 1]), c)
        per_sample.append(g)
    got = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(start, x[:, None], y[:, None])
    torch.testing.assert_close(got, torch.stack(per_sample), rtol=1e-4, atol=1e-6)
    whole = torch.func.grad(loss)(start, x, y)
    c = start.clone().requires_grad_()
    (reference,) = torch.autograd.grad(loss(c, x, y), c)
    torch.testing.assert_close(whole, reference, rtol=1e-4, atol=1e-6)
    tangent = torch.randn_like(start)
    _, jvp = torch.func.jvp(lambda c: loss(c, x, y), (start,), (tangent,))
    torch.testing.assert_close(jvp, (reference * tangent).sum(), rtol=1e-4, atol=1e-6)
    with fwAD.dual_level():
        dual = loss(fwAD.make_dual(start, tangent), x, y)
        torch.testing.assert_close(fwAD.unpack_dual(dual).tangent, jvp, rtol=1e-4, atol=1e-6)
    assert all(isinstance(p, nn.Parameter) for p in twa.module.parameters())  # the model's own, as before


def test_a_vectorised_forward_mode_hessian_over_a_twa(run):
    # a vectorised forward-over-reverse Hessian met "vmap: aten::_index_put_impl_ ... not possible"
    train, _, _, ckpts = run
    twa = tk.TWA(make_model(1), ckpts, bits=4).eval()
    x, y = train.tensors[0][:8], train.tensors[1][:8]

    def loss(c):
        return F.cross_entropy(functional_call(twa, {"coefficients": c}, (x,)), y)

    start = twa.coefficients.detach()
    reverse = torch.autograd.functional.hessian(loss, start)
    forward = torch.autograd.functional.hessian(loss, start, vectorize=True, outer_jacobian_strategy="forward-mode")
    torch.testing.assert_close(forward, reverse, rtol=1e-4, atol=1e-6)


def test_a_gradient_differentiated_in_forward_mode_along_the_input(run):
    # the backward of a create_graph=True pass under forward-mode AD (an input tangent) met
    # "You must implement the jvp function"
    import torch.autograd.forward_ad as fwAD

    train, _, _, ckpts = run
    twa = tk.TWA(make_model(1), ckpts, bits=4).eval()
    x, y = train.tensors[0][:8], train.tensors[1][:8]
    tangent = torch.randn_like(x)

    def gradient(inputs):
        return torch.autograd.grad(F.cross_entropy(twa(inputs), y), twa.coefficients, create_graph=True)[0]

    with fwAD.dual_level():
        loss = F.cross_entropy(twa(fwAD.make_dual(x, tangent)), y)
        (g,) = torch.autograd.grad(loss, twa.coefficients, create_graph=True)
        got = fwAD.unpack_dual(g).tangent
    _, want = torch.autograd.functional.jvp(gradient, x, tangent)  # reverse over reverse: the double-backward trick
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_tracing_a_twa_with_torch_jit_is_named(run):
    # torch.jit.trace failed on "QuantizedBasis.num_cols must be an int, got tensor(...)"
    train, _, _, ckpts = run
    twa = tk.TWA(make_model(1), ckpts, bits=4)
    with pytest.raises(tk.errors.UsageError, match="torch.jit.trace cannot trace a TWA"):
        torch.jit.trace(twa, (train.tensors[0][:4],))


def test_compiled_autograd_over_an_eager_forward_gives_autograds_gradient(run):
    # compiled autograd refused the end-of-backward callbacks the backward queued, with a raw
    # AssertionError
    train, _, _, ckpts = run
    twa = tk.TWA(make_model(1), ckpts, bits=4)
    x, y = train.tensors[0][:16], train.tensors[1][:16]
    F.cross_entropy(twa(x), y).backward()
    want, twa.coefficients.grad = twa.coefficients.grad, None
    loss = F.cross_entropy(twa(x), y)
    with torch._dynamo.compiled_autograd._enable(torch.compile(backend="eager")):
        loss.backward()
    torch.testing.assert_close(twa.coefficients.grad, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("int8_gradients", [False, True])
def test_a_batched_or_penalised_backward_the_kernels_cannot_run_is_named(run, int8_gradients):
    # is_grads_batched=True raised torch's "Batching rule not implemented", and a gradient
    # penalty over int8 gradients "no autograd formula was registered"
    train, _, _, ckpts = run
    twa = tk.TWA(make_model(1), ckpts, bits=4, int8_gradients=int8_gradients)
    x, y = train.tensors[0][:8], train.tensors[1][:8]
    out = twa(x)
    with pytest.raises(tk.errors.UsageError, match="batched backward .*call backward once per gradient"):
        torch.autograd.grad(out, twa.coefficients, torch.randn(3, *out.shape), is_grads_batched=True)
    (want,) = torch.autograd.grad(F.cross_entropy(twa(x), y), twa.coefficients)
    loss = F.cross_entropy(twa(x), y)
    (g,) = torch.autograd.grad(loss, twa.coefficients, create_graph=True)  # first order: as without it
    torch.testing.assert_close(g, want, rtol=0, atol=0)
    if int8_gradients:
        with pytest.raises(tk.errors.UsageError, match="gradient penalty, a Hessian.*int8_gradients=False"):
            (loss + g.square().sum()).backward()
    else:  # the float path has the penalty's gradient
        (loss + g.square().sum()).backward()
        assert twa.coefficients.grad.abs().sum() > 0


def test_a_training_step_inside_averaged_model_leaves_the_block_its_weights(run):
    # the block's model kept the inner forward's weights, graph and all: its outputs then
    # required grad, and drifted once the reused buffer was written by the next forward
    train, _, _, ckpts = run
    twa = tk.TWA(make_model(1), ckpts, bits=4)
    opt = torch.optim.SGD(twa.parameters(), lr=0.5)
    x, y = train.tensors[0][:32], train.tensors[1][:32]
    twa.eval()
    with twa.averaged_model() as model:
        before = model(x)
        for _ in range(2):
            F.cross_entropy(twa(x), y).backward()
            opt.step()
            opt.zero_grad()
        after = model(x)
    assert not after.requires_grad
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # the weights of the block's entry, as documented
    assert all(isinstance(p, nn.Parameter) for p in twa.module.parameters())


def test_a_copy_taken_between_a_forward_and_its_backward_is_its_own(run, tmp_path):
    # the copy shared the original's pending loans: its forward at other coefficients made
    # the original's backward refuse, and torch.save failed on the loans' weak references
    import copy

    train, _, _, ckpts = run
    twa = tk.TWA(make_model(1), ckpts, bits=4)
    x, y = train.tensors[0][:32], train.tensors[1][:32]
    loss = F.cross_entropy(twa(x), y)
    clone = copy.deepcopy(twa)
    torch.save(twa, tmp_path / "twa.pt")
    assert all(isinstance(p, nn.Parameter) for p in clone.module.parameters())
    with torch.no_grad():
        clone.coefficients.add_(0.2)
    F.cross_entropy(clone(x), y).backward()
    loss.backward()  # raised UsageError: "the coefficients ... changed after this graph's forward"
    fresh = tk.TWA(make_model(1), ckpts, bits=4)
    F.cross_entropy(fresh(x), y).backward()
    torch.testing.assert_close(twa.coefficients.grad, fresh.coefficients.grad, rtol=1e-6, atol=1e-8)


def test_exporting_while_a_graph_waits_for_its_backward_warns_that_a_load_would_be_undone(run):
    # a step interrupted between forward and backward, whose traceback a notebook keeps:
    # the model holds that forward's weights, and model.load_state_dict(averaged) went into
    # them, to be undone without a word once the graph was freed
    import gc
    import warnings

    train, _, _, ckpts = run
    model = make_model(1)
    own = {k: v.clone() for k, v in model.named_parameters()}
    twa = tk.TWA(model, ckpts, bits=4)
    x = train.tensors[0][:8]
    kept = twa(x)  # its graph waits for a backward
    assert not all(torch.equal(v, own[k]) for k, v in model.named_parameters())  # the forward's weights
    with pytest.warns(RuntimeWarning, match=r"has not run its backward yet.*sys.last_traceback = None"):
        twa.averaged_state_dict()
    del kept
    gc.collect()
    assert all(torch.equal(v, own[k]) for k, v in model.named_parameters())  # the model's own again
    twa.update_bn([x])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        averaged = twa.averaged_state_dict()  # no graph waits: no warning
    model.load_state_dict(averaged)
    assert all(torch.equal(v, averaged[k]) for k, v in model.state_dict().items())


def test_run_lends_the_weights_to_any_call_of_the_model_as_forward_does(run):
    # a loss computed by another method than forward (a LightningModule's training_step,
    # model.compute_loss) trains the coefficients as the same loss through forward
    train, _, _, ckpts = run
    x, y = train.tensors[0][:50], train.tensors[1][:50]
    by_forward, by_run = (tk.TWA(make_model(1), ckpts, bits=4) for _ in range(2))
    for twa in (by_forward, by_run):
        with torch.no_grad():
            twa.coefficients.copy_(torch.linspace(-0.3, 0.3, twa.coefficients.numel()).view_as(twa.coefficients))
    model = by_run.module
    own = {name: p.detach().clone() for name, p in model.named_parameters()}
    F.cross_entropy(by_forward(x), y).backward()
    loss = by_run.run(lambda inputs, targets: {"loss": F.cross_entropy(model(inputs), targets)}, x, targets=y)
    loss["loss"].backward()
    torch.testing.assert_close(by_run.coefficients.grad, by_forward.coefficients.grad, rtol=0, atol=0)
    # the model has its own parameters back, unchanged and without a gradient
    assert all(torch.equal(p, own[name]) and p.grad is None for name, p in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(by_run.run(model, x), by_run(x), rtol=0, atol=0)
    with pytest.raises(InvalidArgumentError, match="not callable"):
        by_run.run("forward", x)


def _weight_gradient(twa, x, y):
    """dL/dw at the TWA's weights, written with plain autograd, flat in the basis's order."""
    weights = {name: w.detach().requires_grad_() for name, w in twa.weights().items()}
    F.cross_entropy(functional_call(twa.module, weights, (x,)), y).backward()
    return torch.cat([weights[name].grad.reshape(-1) for name in twa.names])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_int8_gradients_project_the_weight_gradient_rounded_per_group(run, bits):
    train, _, _, ckpts = run
    x, y = train.tensors[0][:50], train.tensors[1][:50]
    twa = tk.TWA(make_model(1), ckpts, bits=bits, group_size=64, int8_gradients=True)
    with torch.no_grad():
        twa.coefficients.normal_(0, 0.3)
    g = _weight_gradient(twa, x, y)
    F.cross_entropy(twa(x), y).backward()
    # what the kernel projected: g rounded per basis group, not the float gradient
    torch.testing.assert_close(twa.coefficients.grad, tk.project_int8(twa.basis, g), rtol=1e-6, atol=1e-9)
    float_grad = tk.project(twa.basis, g)
    assert not torch.allclose(twa.coefficients.grad, float_grad, rtol=0, atol=1e-9)
    # and within the rounding's size: half a step (max|g| / 254) per element of each group
    torch.testing.assert_close(twa.coefficients.grad, float_grad, rtol=0.02, atol=1e-4 * float_grad.abs().max())


def test_a_compiled_twa_projects_in_float32_even_with_int8_gradients(run):
    train, _, _, ckpts = run
    x, y = train.tensors[0][:50], train.tensors[1][:50]
    twa = tk.TWA(make_model(1), ckpts, bits=4, group_size=64, int8_gradients=True)
    g = _weight_gradient(twa, x, y)
    F.cross_entropy(torch.compile(twa, backend="aot_eager")(x), y).backward()
    torch.testing.assert_close(twa.coefficients.grad, tk.project(twa.basis, g), rtol=1e-5, atol=1e-7)


def test_a_compiled_twa_over_sparse_embeddings_gives_the_eager_gradients():
    # the embedding's sparse gradient could not pass back through the weights' views in the
    # compiled graph: "reshape is not implemented for sparse tensors"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 8, sparse=True), nn.Flatten(), nn.Linear(8 * 3, 2))
    bag = nn.EmbeddingBag(50, 4, mode="sum", sparse=True)
    model.add_module("bag", bag)

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net[:3](x) + self.net.bag(x).sum(1, keepdim=True)

    wrapped = Both()
    checkpoints = [{k: v + 0.1 * torch.randn_like(v) for k, v in wrapped.state_dict().items()} for _ in range(3)]
    twa = tk.TWA(wrapped, checkpoints, bits=4)
    x = torch.randint(0, 50, (4, 3))
    twa(x).square().sum().backward()
    eager, twa.coefficients.grad = twa.coefficients.grad, None
    compiled = torch.compile(twa, backend="aot_eager")
    for _ in range(2):  # and again, through the same compiled graph
        compiled(x).square().sum().backward()
        torch.testing.assert_close(twa.coefficients.grad, eager, rtol=1e-5, atol=1e-6)
        twa.coefficients.grad = None
    assert model[0].sparse and bag.sparse  # the model's own setting, as it was


def test_int8_gradients_need_a_packed_basis(run):
    _, _, _, ckpts = run
    with pytest.raises(InvalidArgumentError, match="dense basis"):
        tk.TWA(make_model(1), ckpts, bits=None, int8_gradients=True)
    with pytest.raises(InvalidArgumentError, match="True or False"):
        tk.TWA(make_model(1), ckpts, int8_gradients="yes")


def _steps(twa, opt, batches):
    for xb, yb in batches:
        opt.zero_grad()
        F.cross_entropy(twa(xb), yb).backward()
        opt.step()


def test_resumed_run_takes_bit_identical_steps(run):
    train, _, _, ckpts = run
    batches = [(train.tensors[0][i : i + 64], train.tensors[1][i : i + 64]) for i in range(0, 320, 64)]
    twa = tk.TWA(make_model(1), ckpts, bits=4)
    opt = torch.optim.AdamW(twa.parameters(), lr=0.05)
    _steps(twa, opt, batches[:3])
    buf = io.BytesIO()
    torch.save({"twa": twa.state_dict(), "opt": opt.state_dict(), "model": twa.module.state_dict()}, buf)
    _steps(twa, opt, batches[3:])

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model = make_model(3)
    model.load_state_dict(saved["model"])  # the BatchNorm statistics the steps so far measured
    resumed = tk.TWA(model, tk.Subspace.from_checkpoints(ckpts, bits=4,
                     parameter_names=[n for n, _ in make_model(3).named_parameters()]))
    resumed.load_state_dict(saved["twa"])
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=0.05)
    resumed_opt.load_state_dict(saved["opt"])
    _steps(resumed, resumed_opt, batches[3:])
    assert torch.equal(resumed.coefficients, twa.coefficients)
    twa.eval(), resumed.eval()
    with torch.no_grad():  # the running statistics too, as the docs' recipe says
        assert torch.equal(resumed(batches[0][0]), twa(batches[0][0]))


def test_a_state_with_moved_block_offsets_or_no_basis_is_refused_by_name(run):
    _, _, _, ckpts = run
    twa = tk.TWA(make_model(1), ckpts, bits=4)
    before = {k: v.clone() for k, v in twa.state_dict().items()}
    # the same block count with another boundary fits every shape, but would change the weights
    moved = dict(before, basis_block_offsets=before["basis_block_offsets"].clone())
    moved["basis_block_offsets"][1] += 8
    with pytest.raises(InvalidArgumentError, match=r"TWA state_dict: its basis_block_offsets \[0, 3080, .* differ "
                                                   r"from this TWA's \[0, 3072, "):
        twa.load_state_dict(moved)
    no_basis = {k: v for k, v in before.items() if not k.startswith("basis_")}
    with pytest.raises(MissingKeyError, match=r"TWA state_dict: missing \['basis_codes', 'basis_scales', "
                                              r"'basis_mins', 'basis_block_offsets', 'basis_meta'\]"):
        twa.load_state_dict(no_basis)
    assert all(torch.equal(twa.state_dict()[k], v) for k, v in before.items())
    twa.load_state_dict(no_basis, strict=False)  # keeps its own basis, as strict=False asks


class _TwoLayers(nn.Module):
    """Two layers of one shape, registered in either order: the same columns either way."""

    def __init__(self, b_first: bool = False):
        super().__init__()
        for name in ("b", "a") if b_first else ("a", "b"):
            setattr(self, name, nn.Linear(5, 5))
        self.scale = nn.Parameter(torch.ones(5), requires_grad=False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) * self.scale


def test_a_state_of_a_model_whose_layers_are_in_another_order_is_refused_by_name():
    # every shape check passed, and each layer took the other's center, columns and coefficients
    torch.manual_seed(0)
    ckpts = [{k: v + torch.randn_like(v) for k, v in _TwoLayers().state_dict().items()} for _ in range(3)]
    saved = tk.TWA(_TwoLayers(), ckpts, bits=8)
    with torch.no_grad():
        saved.coefficients.normal_()
    swapped = tk.TWA(_TwoLayers(b_first=True), ckpts, bits=8)
    before = {k: v.clone() for k, v in swapped.state_dict().items()}
    with pytest.raises(InvalidArgumentError, match=r"its averaged parameter 0 is 'a.weight' \(5, 5\) where this "
                                                   r"TWA's is 'b.weight' \(5, 5\) .* delete the state's "
                                                   r"'parameter_layout' entry"):
        swapped.load_state_dict(saved.state_dict())
    assert all(torch.equal(swapped.state_dict()[k], v) for k, v in before.items())
    # the same model loads, and a state saved without the record (an earlier version's) too
    x = torch.randn(3, 5)
    for state in (saved.state_dict(), {k: v for k, v in saved.state_dict().items() if k != "parameter_layout"}):
        same = tk.TWA(_TwoLayers(), ckpts, bits=8)
        same.load_state_dict(state)
        assert torch.equal(same(x), saved(x))
    # inside another module, whose own load hands the TWA's entries on
    holder = nn.ModuleDict({"twa": tk.TWA(_TwoLayers(b_first=True), ckpts, bits=8)})
    with pytest.raises(InvalidArgumentError, match="saved from a TWA over other parameters"):
        holder.load_state_dict(nn.ModuleDict({"twa": saved}).state_dict())
    # the frozen parameters' order is checked too: their pinned values go by position
    frozen_record = tk.TWA(_TwoLayers(), ckpts, bits=8).parameter_layout
    assert b'"frozen":[["scale",[5]]]' in bytes(frozen_record.tolist())


def test_layerwise_granularity_merges_tensors(run):
    _, _, _, ckpts = run
    assert tk.TWA(make_model(1), ckpts, granularity="model").coefficients.shape == (5, 1)
    # 64*48 + 48 + 48 + 48 + 48*10 + 10: merging up to 3200 elements gives [3072+48+48+48, 480+10]
    assert tk.TWA(make_model(1), ckpts, granularity=3300).coefficients.shape == (5, 2)



def test_settings_given_beside_a_built_subspace_must_be_its_own(run):
    # they were taken silently: TWA(model, four_bit_subspace, bits=8).bits was 4
    _, _, _, ckpts = run
    model = make_model(1)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    sub = tk.Subspace.from_checkpoints(ckpts, bits=4, group_size=64, parameter_names=names)
    for bad, match in ((dict(bits=8), "bits=8 was given"), (dict(group_size=256), "group_size=256 was given"),
                       (dict(granularity="model"), "granularity='model' was given")):
        with pytest.raises(InvalidArgumentError, match=match):
            tk.TWA(model, sub, **bad)
    assert tk.TWA(model, sub).bits == 4  # defaults, and the subspace's own values, are taken
    assert tk.TWA(model, sub, group_size=64, granularity="tensor").group_size == 64
    # a setting passed at TWA's default value is a setting given: bits=4 beside an 8-bit basis
    other = tk.Subspace.from_checkpoints(ckpts, bits=8, group_size=64, granularity="model", parameter_names=names)
    for bad, match in ((dict(bits=4), "bits=4 was given"), (dict(group_size=128), "group_size=128 was given"),
                       (dict(granularity="tensor"), "granularity='tensor' was given")):
        with pytest.raises(InvalidArgumentError, match=match):
            tk.TWA(model, other, **bad)
    assert tk.TWA(model, other).bits == 8
    # the same number of blocks in another layout is another granularity
    model = nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 5))  # tensors of 91, 13, 65 and 5 weights
    states = [{k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(3)]
    names = [n for n, _ in model.named_parameters()]
    blocks = tk.Subspace.from_checkpoints(states, granularity=100, parameter_names=names)
    assert blocks.basis.block_sizes == [91, 83]
    with pytest.raises(InvalidArgumentError, match="granularity=104 was given"):  # it would be [104, 70]
        tk.TWA(model, blocks, granularity=104)
    assert tk.TWA(model, blocks, granularity=100).basis.block_sizes == [91, 83]


@pytest.mark.parametrize("nested", [False, True], ids=["a layer", "a parent of layers"])
def test_a_submodule_replaced_after_build_is_refused_by_name(run, nested):
    train, _, _, ckpts = run
    if nested:  # the layers sit inside a module that is replaced whole
        model = torch.nn.Sequential(torch.nn.Identity(), make_model(1))
        ckpts = [{f"1.{k}": v for k, v in c.items()} for c in ckpts]
        index, replacement = 1, make_model(2)
    else:
        model = make_model(1)
        index, replacement = 0, torch.nn.Linear(64, 48)  # a user swapping a layer for a new one
    twa = tk.TWA(model, ckpts, bits=4)
    twa.eval()
    x = train.tensors[0][:8]
    before = twa(x)
    original, model[index] = model[index], replacement
    with pytest.raises(tk.errors.UsageError, match=rf"submodule '{index}' was replaced after TWA was built"):
        twa(x)
    with pytest.raises(tk.errors.UsageError, match="replaced after TWA was built"), twa.averaged_model():
        pass
    model[index] = original  # the module TWA was built on, put back: it runs as before
    torch.testing.assert_close(twa(x), before, rtol=0, atol=0)


@pytest.mark.parametrize("how", ["a layer appended", "a parameter registered", "a frozen layer unfrozen",
                                 "a trained layer frozen"])
def test_a_parameter_the_twa_does_not_hold_after_build_is_refused_by_name(run, how):
    # the new or unfrozen parameter trained outside the subspace (or not at all) and was
    # missing from the export, and a parameter frozen since went on training, without a word
    train, _, _, ckpts = run
    model = make_model(1)
    if how == "a frozen layer unfrozen":
        model[0].requires_grad_(False)
    twa = tk.TWA(model, ckpts, bits=4)
    x = train.tensors[0][:8]
    before = twa(x).detach()
    torch.nn.Linear(4, 4)  # a module built elsewhere in the process is no change to this model
    torch.testing.assert_close(twa(x), before, rtol=0, atol=0)
    if how == "a layer appended":
        model.append(torch.nn.Linear(10, 10))
        name, match = "'4.weight'", "was added after TWA was built"
    elif how == "a parameter registered":
        model[0].register_parameter("scale", torch.nn.Parameter(torch.ones(1)))
        name, match = "'0.scale'", "was added after TWA was built"
    elif how == "a frozen layer unfrozen":
        model[0].weight.requires_grad_(True)
        name, match = "'0.weight'", "was frozen when TWA was built"
    else:  # the coefficients went on training it, and the export held the moved value
        model[3].weight.requires_grad_(False)
        name, match = "'3.weight'", "was trainable when TWA was built"
    with pytest.raises(tk.errors.UsageError, match=f"parameter {name} {match}"):
        twa(x)
    if how == "a trained layer frozen":  # nothing trains there: a model frozen for inference is no error
        with torch.no_grad():
            twa(x)
        with twa.averaged_model():
            pass
        twa.averaged_state_dict()
        twa.coefficients.requires_grad_(False)  # (LightningModule.freeze(), a frozen teacher)
        twa(x)
        return
    with pytest.raises(tk.errors.UsageError, match=match), twa.averaged_model():
        pass
    with pytest.raises(tk.errors.UsageError, match=match):  # the export would hold it untrained
        twa.averaged_state_dict()


@pytest.mark.parametrize("how", ["deleted", "set to None"])
def test_a_parameter_removed_after_build_is_refused_by_name(run, how):
    # a raw KeyError or AttributeError from deep inside the lending, outside the library's errors
    train, _, _, ckpts = run
    model = make_model(1)
    twa = tk.TWA(model, ckpts, bits=4)
    x = train.tensors[0][:8]
    with torch.no_grad():  # no graph keeps the weights lent: the model holds its own Parameters again
        before = twa(x)
    bias = model[0].bias
    if how == "deleted":
        del model[0].bias
    else:
        model[0].bias = None
    with pytest.raises(tk.errors.UsageError, match=r"parameter '0.bias' was removed \(deleted or set to None\)"):
        twa(x)
    with pytest.raises(tk.errors.UsageError, match="'0.bias' was removed"), twa.averaged_model():
        pass
    model[0].bias = bias  # put back: it runs as before
    torch.testing.assert_close(twa(x), before, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [4, None])
def test_a_float64_default_dtype_builds_the_same_twa(run, bits):
    # torch.set_default_dtype(torch.float64) made the builder allocate float64 scales and the
    # coefficients float64, and the build failed on the basis's own layout check
    train, _, _, ckpts = run
    x = train.tensors[0][:8]
    want = tk.TWA(make_model(1), ckpts, bits=bits)(x)
    model, before = make_model(1), torch.get_default_dtype()  # a float32 model, as its checkpoints are
    torch.set_default_dtype(torch.float64)
    try:
        twa = tk.TWA(model, ckpts, bits=bits)
        got = twa(x)
        got.sum().backward()
    finally:
        torch.set_default_dtype(before)
    assert twa.coefficients.dtype == torch.float32 and twa.coefficients.grad.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_parametrization_registered_after_the_build_is_named_as_one(run):
    # the weight moved into parametrizations.weight.original, and the error said it was deleted
    train, _, _, ckpts = run
    model = make_model(1)
    twa = tk.TWA(model, ckpts, bits=4)
    torch.nn.utils.parametrizations.weight_norm(model[0])
    with pytest.raises(tk.errors.UsageError, match=r"a parametrization \(weight_norm.*registered on the model's "
                                                   r"parameter '0.weight' after TWA was built"):
        twa(train.tensors[0][:8])


def test_a_gradient_penalty_through_the_forward_matches_the_weights_path(run):
    # a backward under create_graph=True projected without recording a graph: the
    # penalty's own gradient was silently dropped (coefficient gradient 0.14 for 4.50)
    train, _, _, ckpts = run
    twa = tk.TWA(make_model(1), ckpts, bits=4)
    with torch.no_grad():
        twa.coefficients.normal_(std=0.1)
    xb, yb = train.tensors[0][:32], train.tensors[1][:32]

    def penalised(logits):
        loss = F.cross_entropy(logits, yb)
        (grad,) = torch.autograd.grad(loss, twa.coefficients, create_graph=True)
        return loss + 10 * grad.square().sum()

    (got,) = torch.autograd.grad(penalised(twa(xb)), twa.coefficients)
    # the same loss through twa.weights() (reconstruct's autograd rule, no workspace)
    (want,) = torch.autograd.grad(penalised(functional_call(twa.module, twa.weights(), (xb,))), twa.coefficients)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.left, self.right = nn.Linear(20, 32), nn.Linear(32, 5), nn.Linear(32, 5)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.left(h), self.right(h), h


def test_a_graph_whose_weights_were_rewritten_raises_the_in_place_error():
    # one head's backward freed the forward's graph node and with it the workspace; the next
    # forward wrote new weights there while the other head's graph still held the old ones:
    # its gradient came from the new weights without a word
    torch.manual_seed(0)
    model = _TwoHeads()
    checkpoints = [{k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(3)]
    twa = tk.TWA(model, checkpoints, bits=4)
    x = torch.randn(8, 20)
    left, right, h = twa(x)
    left.sum().backward()
    with torch.no_grad():
        twa.coefficients.add_(1.0)
    twa(x)
    with pytest.raises(RuntimeError, match="modified inplace"):
        torch.autograd.grad(right.sum(), h)


def test_a_gradient_hook_on_a_model_parameter_is_named_as_not_run():
    # a gradient mask registered on the model's Parameter was silently left out of training
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    checkpoints = [{k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(3)]
    model[0].weight.register_hook(lambda grad: grad * 0)
    with pytest.warns(UserWarning, match=r"\['0.weight'\] have gradient hooks"):
        tk.TWA(model, checkpoints, bits=8)


class _ExtraState(nn.Module):
    """A layer whose extra state is a plain object, not a tensor."""

    def __init__(self):
        super().__init__()
        self.linear, self.scale = nn.Linear(4, 2), 2.0

    def forward(self, x):
        return self.linear(x) * self.scale

    def get_extra_state(self):
        return {"scale": self.scale}

    def set_extra_state(self, state):
        self.scale = state["scale"]


def test_the_statistics_warning_follows_the_statistics_not_only_the_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    checkpoints = [{k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v
                    for k, v in model.state_dict().items()} for _ in range(3)]
    twa = tk.TWA(model, checkpoints, bits=4)
    loader = [torch.randn(16, 4) for _ in range(3)]

    def warned(of: tk.TWA | None = None) -> bool:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            (of or twa).averaged_state_dict()
        return any("statistics were not measured at these averaged weights" in str(w.message) for w in caught)

    assert warned()
    twa.update_bn(loader)
    assert not warned()
    tk.update_bn(loader, model)  # measured again, at the model's own weights: stale for the average
    assert warned()
    twa.update_bn(loader)
    model.load_state_dict(twa.averaged_state_dict())  # the export loaded back: the same statistics
    assert not warned()
    twa.train()
    twa(torch.randn(16, 4))  # a train-mode forward moves them
    assert warned()
    twa.update_bn(loader)
    with pytest.raises(ZeroDivisionError):  # a pass cut short puts back the statistics measured before
        twa.update_bn(_failing(loader))
    assert not warned()
    # a copy (deepcopy, a pickle round trip) holds the same weights and statistics: measured
    # there too, while the original's subspace is as the statistics saw it
    assert not warned(copy.deepcopy(twa)) and not warned(pickle.loads(pickle.dumps(twa)))
    with torch.no_grad():
        twa.center.add_(0.1)  # the subspace changed since the statistics were measured
    assert warned(copy.deepcopy(twa))


def _failing(batches):
    yield from batches[:1]
    raise ZeroDivisionError("the loader broke")


def test_numpy_ints_are_taken_for_the_build_settings_as_quantize_takes_them():
    np = pytest.importorskip("numpy")
    model = nn.Linear(4, 3)
    checkpoints = [{k: v + i for k, v in model.state_dict().items()} for i in range(3)]
    subspace = tk.Subspace.from_checkpoints(checkpoints, bits=np.int64(4), group_size=np.int64(8),
                                            granularity=np.int64(4))
    assert (subspace.basis.bits, subspace.basis.group_size) == (4, 8) and type(subspace.basis.bits) is int
    twa = tk.TWA(model, checkpoints, bits=np.int64(2), group_size=np.int32(16))
    assert (twa.bits, twa.group_size) == (2, 16) and type(twa.bits) is int
    for bad in (np.float64(4.0), True):
        with pytest.raises(InvalidArgumentError, match="bits must be one of"):
            tk.Subspace.from_checkpoints(checkpoints, bits=bad)


def test_a_twa_over_an_averaged_model_averages_the_network_it_holds():
    # its checkpoints' keys lost their "module." prefix to be matched, the model's names kept it
    from torch.optim.swa_utils import AveragedModel

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    ema = AveragedModel(net)
    checkpoints = [{k: v + 0.1 * i if v.is_floating_point() else v for k, v in ema.state_dict().items()}
                   for i in range(3)]
    twa = tk.TWA(ema, checkpoints, bits=None)
    plain = tk.TWA(net, [{k[len("module."):]: v for k, v in c.items() if k.startswith("module.")}
                         for c in checkpoints], bits=None)
    assert twa.module is ema.module  # AveragedModel holds a copy of the network
    for name, value in plain.weights().items():
        torch.testing.assert_close(twa.weights()[name], value)


def test_averaged_state_dict_copies_a_modules_extra_state_that_is_not_a_tensor():
    # state_dict values were all cloned as tensors: a dict raised AttributeError
    torch.manual_seed(0)
    model = _ExtraState()
    checkpoints = [{k: v + 0.1 * torch.randn_like(v) if isinstance(v, torch.Tensor) else v
                    for k, v in model.state_dict().items()} for _ in range(3)]
    files = [{k: v for k, v in c.items() if k != "_extra_state"} for c in checkpoints]  # files hold tensors only
    assert set(tk.uniform_average(files, model=model)) == {"linear.weight", "linear.bias"}  # raised AttributeError
    twa = tk.TWA(model, files, bits=8)
    state = twa.averaged_state_dict()
    assert state["_extra_state"] == {"scale": 2.0} and state["_extra_state"] is not model.get_extra_state()
    plain = _ExtraState()
    plain.load_state_dict(state)
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), twa(x), rtol=0, atol=0)


def test_two_twas_over_one_model_never_leave_it_holding_lent_weights():
    # the second TWA's loan would take the first one's weights for the model's own and put
    # them back at its end: the model would keep them, as plain tensors, for good
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    own = [p for p in model.parameters()]
    checkpoints = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
                   for _ in range(3)]
    first, second = tk.TWA(model, checkpoints), tk.TWA(model, checkpoints)
    x = torch.randn(4, 5, generator=gen)
    pending = first(x)
    with pytest.raises(tk.errors.UsageError, match="holds weights another TWA over it lent"):
        second(x)
    pending.sum().backward()
    assert all(a is b for a, b in zip(model.parameters(), own))
    second(x).sum().backward()  # once the first loan ended, the second TWA lends as usual
    assert all(a is b for a, b in zip(model.parameters(), own))
    assert second.coefficients.grad is not None


def _small_twa(checkpoints: int = 3) -> tuple[tk.TWA, torch.Generator]:
    """An 8-bit TWA over a small MLP (6 -> 8 -> 3) and random checkpoints of it, and the
    generator that drew them, for the inputs."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    states = [{k: v + torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
              for _ in range(checkpoints)]
    return tk.TWA(model, states, bits=8), gen


def test_forwards_from_several_threads_wait_for_each_other_or_are_refused_by_name():
    # each forward puts its weights into the one model: threads ran on each other's weights,
    # and half of them failed inside torch ("backward through the graph a second time")
    import threading

    twa, gen = _small_twa(4)
    x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    with torch.no_grad():
        want = twa(x)
    got, failed = [], []

    def evaluate():
        try:
            for _ in range(30):
                with torch.no_grad():
                    got.append(torch.equal(twa(x), want))
        except Exception as exc:  # reported below, with its type
            failed.append(exc)

    threads = [threading.Thread(target=evaluate) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failed and len(got) == 120 and all(got)  # forwards that record nothing take turns
    # a forward while another thread's graph waits for its backward is refused, not run
    loss = F.cross_entropy(twa(x), y)
    other = threading.Thread(target=evaluate)
    other.start()
    other.join()
    assert len(failed) == 1 and isinstance(failed[0], tk.errors.UsageError)
    assert "in another thread whose graph is not yet backpropagated" in str(failed[0])
    (grad,) = torch.autograd.grad(loss, twa.coefficients)
    alone = torch.autograd.grad(F.cross_entropy(twa(x), y), twa.coefficients)[0]
    assert torch.equal(grad, alone)
    other = threading.Thread(target=evaluate)  # after the backward, the model is free again
    other.start()
    other.join()
    assert len(failed) == 1 and len(got) == 150 and all(got)


def test_forwards_on_other_threads_inside_an_averaged_model_block_and_after_a_move_run():
    import threading

    # the block held the model for its whole length: a thread pool's forwards inside it never
    # returned (they are refused now: they would change the block's weights), a block left on
    # another thread could not let go, and a move (twa.to) that ended a pending graph left its
    # thread's record behind, refusing every other thread
    from concurrent.futures import ThreadPoolExecutor

    twa, gen = _small_twa()
    model = twa.module
    x = torch.randn(4, 6, generator=gen)
    def infer(inputs):
        with torch.no_grad():  # (grad mode is each thread's own)
            return twa(inputs)

    want = infer(x)
    with twa.averaged_model() as averaged, ThreadPoolExecutor(2) as pool:
        # another thread's forward would put its own weights into the block's model: refused
        with pytest.raises(tk.errors.UsageError, match=r"inside an averaged_model\(\) block \(or a generate\(\) "
                                                       r"call\) of another thread"):
            pool.submit(infer, x).result(timeout=60)
        with torch.no_grad():
            assert torch.equal(averaged(x), want)
    # two threads' blocks (a server's generate() calls) take turns, each at the averaged weights
    barrier = threading.Barrier(2)

    def in_a_block(_):
        barrier.wait(timeout=60)
        with twa.averaged_model() as averaged, torch.no_grad():
            return all(torch.equal(averaged(x), want) for _ in range(10))

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(in_a_block, range(2))) == [True, True]
    block = twa.averaged_model()
    block.__enter__()
    with ThreadPoolExecutor(1) as pool:
        pool.submit(block.__exit__, None, None, None).result(timeout=60)
    # a thread that ended inside a block it never left holds nobody back
    left_open = threading.Thread(target=twa.averaged_model().__enter__)
    left_open.start()
    left_open.join()
    assert torch.equal(infer(x), want)
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())  # its own again
    pending = twa(x)
    twa.to(torch.float32)  # ends the pending graph's loan
    del pending
    with ThreadPoolExecutor(1) as pool:
        assert torch.equal(pool.submit(infer, x).result(timeout=60), want)


def test_a_twa_pickled_before_its_state_held_the_parameter_layout_loads_states():
    twa, _ = _small_twa()
    state = twa.state_dict()
    del twa._buffers["parameter_layout"]  # as an earlier version pickled it
    buffer = io.BytesIO()
    torch.save(twa, buffer)
    buffer.seek(0)
    old = torch.load(buffer, weights_only=False)
    old.load_state_dict(state)
    old.load_state_dict(old.state_dict())
    assert torch.equal(old.parameter_layout, state["parameter_layout"])


def _twa_with_a_frozen_first_layer(embedding: bool = False) -> tuple[tk.TWA, torch.Tensor]:
    """A TWA over a model whose first layer is frozen (the same in every checkpoint), and an input."""
    def model() -> nn.Module:
        torch.manual_seed(0)
        first = nn.Embedding(10, 4, max_norm=1.0) if embedding else nn.Linear(4, 8)
        m = nn.Sequential(first, nn.ReLU(), nn.Linear(4 if embedding else 8, 2))
        m[0].requires_grad_(False)
        return m

    base, checkpoints = model(), []
    with torch.no_grad():
        base[0].weight.mul_(3.0)  # rows above max_norm, which an Embedding renormalises as it looks them up
    for i in range(3):
        with torch.no_grad():
            base[2].weight.add_(0.1 * torch.randn_like(base[2].weight))
        checkpoints.append({k: v.clone() for k, v in base.state_dict().items()})
    x = torch.randint(0, 10, (5,)) if embedding else torch.randn(5, 4)
    return tk.TWA(model(), checkpoints, bits=8), x


def test_a_cast_inside_averaged_model_lasts_for_the_block_and_leaves_the_frozen_values_alone():
    # the frozen values were the TWA's own buffers, whose dtype the model's cast changed for good
    twa, x = _twa_with_a_frozen_first_layer()
    with torch.no_grad():
        before, stored = twa(x), twa.averaged_state_dict()["0.weight"].clone()
    with twa.averaged_model() as model:
        model.to(torch.bfloat16)
        assert model[0].weight.dtype == model[2].weight.dtype == torch.bfloat16
        model(x.bfloat16())
    assert twa.frozen_0.dtype == torch.float32 and twa.module[0].weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(twa(x), before, rtol=0, atol=0)
    assert torch.equal(twa.averaged_state_dict()["0.weight"], stored)


def test_a_cast_inside_averaged_model_leaves_the_models_buffers_as_they_were():
    # only the parameters came back: BatchNorm's statistics stayed bfloat16 (the next forward
    # raised torch's dtype error, the export held rounded statistics)
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))  # noqa: E731
    ckpts = []
    for i in range(3):
        net = make()
        net[1].running_mean.normal_()
        ckpts.append({k: v + 0.1 * i if v.is_floating_point() else v for k, v in net.state_dict().items()})
    twa = tk.TWA(make(), ckpts, bits=8).eval()
    twa.module.load_state_dict(ckpts[0])
    x = torch.randn(5, 4)
    with torch.no_grad():
        before, exported = twa(x), twa.averaged_state_dict()
    mean = twa.module[1].running_mean
    with twa.averaged_model() as model:
        model.to(torch.bfloat16)
        assert model[1].running_mean.dtype == torch.bfloat16
    assert twa.module[1].running_mean is mean and mean.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(twa(x), before, rtol=0, atol=0)
    after = twa.averaged_state_dict()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in exported.items())


class _GrowingTable(nn.Module):
    """Like a dynamic rotary embedding: a longer input registers a longer buffer, and an
    attribute records the length it was made for."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("table", torch.arange(4.0), persistent=False)
        self.cached = 4

    def forward(self, x):
        if x.shape[0] > self.cached:
            self.register_buffer("table", torch.arange(float(x.shape[0])), persistent=False)
            self.cached = x.shape[0]
        return self.lin(x) * self.table[: x.shape[0], None]


def test_a_buffer_the_model_replaces_itself_inside_averaged_model_stays_with_its_attributes():
    # every buffer object was put back, leaving the table short while `cached` said long
    ckpts = [{k: v + 0.1 * i for k, v in _GrowingTable().state_dict().items()} for i in range(3)]
    twa = tk.TWA(_GrowingTable(), ckpts, bits=8).eval()
    with torch.no_grad(), twa.averaged_model() as model:
        model(torch.randn(6, 4))
    assert twa.module.cached == 6 and twa.module.table.shape == (6,)
    with torch.no_grad():
        twa(torch.randn(6, 4))


def test_a_frozen_parameter_changed_in_place_is_named_not_kept_silently():
    twa, x = _twa_with_a_frozen_first_layer()
    for change in (lambda weight: weight.add_(1.0), lambda weight: weight.data.add_(1.0)):  # .data: no version
        twa, x = _twa_with_a_frozen_first_layer()
        with pytest.raises(tk.errors.UsageError, match=r"changed its frozen parameter\(s\) \['0.weight'\] in "
                                                        r"place inside averaged_model\(\)"):
            with twa.averaged_model() as model:
                with torch.no_grad():
                    change(model[0].weight)  # as merging adapters into a base weight does
    embedding, tokens = _twa_with_a_frozen_first_layer(embedding=True)
    with pytest.raises(tk.errors.UsageError, match=r"in place during the forward \(a frozen nn.Embedding\(max_norm"
                                                    r"=\.\.\.\) .* set its max_norm to None"):
        embedding(tokens)
    twa, x = _twa_with_a_frozen_first_layer()
    twa(x).sum().backward()  # a forward that leaves them alone is not refused
    assert twa.coefficients.grad is not None
    # an in-place op that writes the same values (max_norm over rows already within it) is no change
    within, tokens = _twa_with_a_frozen_first_layer(embedding=True)
    within.module[0].max_norm = 1e6
    for _ in range(2):
        within(tokens).sum().backward()
    assert within.frozen_0._version >= 2
    # values moved, not changed (their sum and norm alike): a change all the same
    twa, x = _twa_with_a_frozen_first_layer()
    flip = twa.module[0].register_forward_pre_hook(lambda module, args: module.weight.detach().copy_(
        module.weight.detach().flip(0)))
    with pytest.raises(tk.errors.UsageError, match=r"changed its frozen parameter\(s\) \['0.weight'\]"):
        twa(x)
    flip.remove()


def test_a_twa_whose_frozen_parameter_was_changed_refuses_its_outputs_until_a_whole_state_is_loaded():
    # after the error, the next forward took the changed value as the TWA's own: outputs and
    # the export then carried it, and a state_dict() saved it into another TWA
    twa, x = _twa_with_a_frozen_first_layer()
    saved = {key: value.clone() for key, value in twa.state_dict().items()}
    before = twa(x).detach()
    with pytest.raises(tk.errors.UsageError, match="changed its frozen parameter"):
        with twa.averaged_model() as model:
            with torch.no_grad():
                model[0].weight.add_(1.0)
    for use in (lambda: twa(x), twa.averaged_state_dict, twa.weights, twa.state_dict, twa.averaged_model().__enter__,
                lambda: copy.deepcopy(twa)(x)):
        with pytest.raises(tk.errors.UsageError, match=r"frozen parameter\(s\) \['0.weight'\] were changed in place "
                                                        r".*new.coefficients.data.copy_\(twa.coefficients\)"):
            use()
    twa.load_state_dict({"coefficients": saved["coefficients"]}, strict=False)
    with pytest.raises(tk.errors.UsageError, match="were changed in place"):  # a state without them mends nothing
        twa(x)
    twa.load_state_dict(saved)  # a whole state saved before the change: the TWA is whole again
    assert torch.equal(twa(x).detach(), before)
    # so it is through a module holding it, or with a compiled wrapper's prefix
    for load in (lambda: nn.ModuleDict({"twa": twa}).load_state_dict({f"twa.{k}": v for k, v in saved.items()}),
                 lambda: twa.load_state_dict({f"_orig_mod.{k}": v for k, v in saved.items()})):
        with pytest.raises(tk.errors.UsageError, match="changed its frozen parameter"):
            with twa.averaged_model() as model:
                with torch.no_grad():
                    model[0].weight.add_(1.0)
        load()
        assert torch.equal(twa(x).detach(), before)
    # a TWA pickled by an earlier version, without the state_dict hook, gets it when unpickled
    twa._state_dict_hooks.clear()
    twa = pickle.loads(pickle.dumps(twa))
    with pytest.raises(tk.errors.UsageError, match="changed its frozen parameter"):
        with twa.averaged_model() as model:
            with torch.no_grad():
                model[0].weight.add_(1.0)
    with pytest.raises(tk.errors.UsageError, match="were changed in place"):
        twa.state_dict()


def test_a_frozen_twa_passes_gradients_to_its_inputs_across_several_forwards_before_the_backward():
    # a critic or teacher: the coefficients take no gradient, the inputs do. Every forward
    # wrote the weights into one buffer, which the first forward's graph had saved: its
    # backward failed, "modified by an inplace operation"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    checkpoints = [{k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(3)]
    twa = tk.TWA(model, checkpoints, bits=4).requires_grad_(False)
    reference = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    reference.load_state_dict(twa.averaged_state_dict())
    generator, z = nn.Linear(4, 8), torch.randn(32, 4)
    grads = []
    for critic in (twa, reference):
        generator.zero_grad()
        loss = critic(generator(z)).logsumexp(1).mean() + critic(generator(z + 1)).logsumexp(1).mean()
        with torch.no_grad():
            critic(generator(z))  # an evaluation in between
        loss.backward()
        grads.append(generator.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    assert not twa._workspace.busy  # the buffer is free again once the graph is
    # a loop whose last loss lives on into the next step reuses the one buffer: it is freed
    # at the end of the backward, not when the graph's nodes go
    generation = twa._workspace.generation
    for _ in range(3):
        loss = twa(generator(z)).sum()
        loss.backward()
    assert twa._workspace.generation == generation


def test_the_basis_sample_stays_inside_codes_of_more_than_2_to_the_24_elements():
    # linspace in float32 rounded the last index to the length itself: IndexError at the build
    twa, _ = _twa_with_a_frozen_first_layer()
    twa.basis_codes = torch.zeros(25_175_040, dtype=torch.uint8)
    assert len(twa._fixed_basis_sample()[0]) == 4096


def test_an_averaged_model_of_a_twa_averages_its_coefficients_and_an_average_of_its_basis_is_refused():
    # AveragedModel(use_buffers=True) averaged the basis's integer codes with the rest: an EMA
    # of equal codes truncates (x * 0.9 + x * 0.1 < x), and the weights came from a damaged basis
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    checkpoints = [{k: v + 0.3 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(3)]
    twa, x = tk.TWA(model, checkpoints, bits=4), torch.randn(16, 8)
    averaged = AveragedModel(twa)  # keeps the copy's buffers in step with twa's by writing them: the same values
    for step in range(2):
        with torch.no_grad():
            twa.coefficients.add_(0.1)
        averaged.update_parameters(twa)
    torch.testing.assert_close(averaged.module.coefficients, twa.coefficients - 0.05)
    averaged(x)
    ema = AveragedModel(twa, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    ema.update_parameters(twa)
    ema(x)  # its first update copies: the same codes
    ema.update_parameters(twa)
    with pytest.raises(tk.errors.UsageError, match=r"AveragedModel\(twa, use_buffers=True\) averages every buffer"):
        ema(x)
    with pytest.raises(tk.errors.UsageError, match="use_buffers=True"):
        ema.module.averaged_state_dict()
    with pytest.raises(tk.errors.UsageError, match="use_buffers=True"):  # under a torch.func transform too
        torch.func.grad(lambda c: torch.func.functional_call(ema.module, {"coefficients": c}, (x,)).sum())(
            ema.module.coefficients.detach())
    twa(x)  # the original is untouched


def test_a_twa_over_a_compiled_model_says_it_holds_the_model_inside():
    # the compiled wrapper was dropped without a word, and the average's keys did not load into it
    model = make_model(0)
    compiled = torch.compile(model)
    checkpoints = [{k: v + 0.01 * i for k, v in model.state_dict().items()} for i in range(3)]
    with pytest.warns(UserWarning, match=r"inside the OptimizedModule it was given .* load it into the inner model\. "
                                         r"To compile, compile the TWA"):
        twa = tk.TWA(compiled, checkpoints, bits=None)
    assert twa.module is model
    compiled._orig_mod.load_state_dict(twa.averaged_state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the model itself: nothing to say
        tk.TWA(make_model(0), checkpoints, bits=None)
