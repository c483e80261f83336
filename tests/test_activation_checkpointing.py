"""Activation checkpointing under TWA: a model that recomputes part of its forward during
the backward (torch.utils.checkpoint in either mode, or a Hugging Face model after
gradient_checkpointing_enable) must give the coefficients the same gradients as without
checkpointing, and must leave its own parameters and their .grad untouched."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import twa_kernels as tk
from twa_kernels.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")

REENTRANT = [pytest.param(False, id="non_reentrant"), pytest.param(True, id="reentrant")]


class Blocks(nn.Module):
    """An MLP whose middle blocks run under torch.utils.checkpoint when `use_reentrant` is set."""

    def __init__(self, seed: int, width: int = 12):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(6, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.LayerNorm(width))
                                    for _ in range(2))
        self.out = nn.Linear(width, 3)
        self.use_reentrant: bool | None = None  # None: no checkpointing

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for block in self.blocks:
            h = block(h) if self.use_reentrant is None else checkpoint(block, h, use_reentrant=self.use_reentrant)
        return self.out(h)


def _perturbed(state: dict[str, torch.Tensor], n: int = 4, scale: float = 0.3) -> list[dict[str, torch.Tensor]]:
    """n copies of `state` with noise added; tied entries (one tensor under several names,
    as GPT-2's embedding and head) get the same noise, as a real checkpoint holds them."""
    gen = torch.Generator().manual_seed(1)
    copies = []
    for _ in range(n):
        noisy: dict[int, torch.Tensor] = {}
        for v in state.values():
            if v.is_floating_point() and v.data_ptr() not in noisy:
                noisy[v.data_ptr()] = v + scale * torch.randn(v.shape, generator=gen).to(v.dtype)
        copies.append({k: noisy[v.data_ptr()] if v.is_floating_point() else v.clone() for k, v in state.items()})
    return copies


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)


def _own_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_model_untouched(model: nn.Module, params: dict[str, nn.Parameter], before: dict[str, torch.Tensor]):
    """The model's parameters are its own Parameter objects again, unchanged, without .grad."""
    assert dict(model.named_parameters()) == params
    assert all(type(p) is nn.Parameter and p.grad is None for p in params.values())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def _twa_blocks():
    checkpoints = _perturbed(Blocks(seed=0).state_dict())
    model = Blocks(seed=1)  # its own (random) weights are far from TWA's
    twa = tk.TWA(model, checkpoints, bits=4)
    with torch.no_grad():
        twa.coefficients.normal_(0, 0.5)  # away from the center, so every row of the basis matters
    return twa, model


def _coefficient_grad(twa: tk.TWA, loss_fn) -> torch.Tensor:
    twa.coefficients.grad = None
    loss_fn().backward()
    return twa.coefficients.grad.clone()


@pytest.mark.parametrize("use_reentrant", REENTRANT)
def test_plain_module_gradients_equal_without_checkpointing(use_reentrant):
    twa, model = _twa_blocks()
    params, before = dict(model.named_parameters()), _own_state(model)
    x, y = _batch()

    def loss():
        return F.cross_entropy(twa(x), y)

    model.use_reentrant = None
    want = _coefficient_grad(twa, loss)
    model.use_reentrant = use_reentrant
    got = _coefficient_grad(twa, loss)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    _assert_model_untouched(model, params, before)


@pytest.mark.parametrize("use_reentrant", REENTRANT)
def test_two_forwards_before_one_backward_with_checkpointing(use_reentrant):
    twa, model = _twa_blocks()
    params, before = dict(model.named_parameters()), _own_state(model)
    (x1, y1), (x2, y2) = _batch(0), _batch(1)

    def together():
        return F.cross_entropy(twa(x1), y1) + F.cross_entropy(twa(x2), y2)

    model.use_reentrant = None
    want = _coefficient_grad(twa, together)
    model.use_reentrant = use_reentrant
    torch.testing.assert_close(_coefficient_grad(twa, together), want, rtol=1e-6, atol=1e-6)
    # two graphs alive, each backpropagated on its own, an evaluation in between
    twa.coefficients.grad = None
    first, second = F.cross_entropy(twa(x1), y1), F.cross_entropy(twa(x2), y2)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "None of the inputs have requires_grad")  # reentrant, without grad
        twa(x1)
    second.backward()
    first.backward()
    torch.testing.assert_close(twa.coefficients.grad, want, rtol=1e-6, atol=1e-6)
    _assert_model_untouched(model, params, before)


@pytest.mark.parametrize("use_reentrant", REENTRANT)
def test_a_retained_graph_backpropagated_twice(use_reentrant):
    twa, model = _twa_blocks()
    x, y = _batch()
    model.use_reentrant = None
    want = _coefficient_grad(twa, lambda: F.cross_entropy(twa(x), y))
    model.use_reentrant = use_reentrant
    twa.coefficients.grad = None
    loss = F.cross_entropy(twa(x), y)
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(twa.coefficients.grad, 2 * want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("whole", [False, True], ids=["blocks", "whole"])
@pytest.mark.parametrize("use_reentrant", REENTRANT)
def test_coefficients_changed_before_a_pending_backward_is_refused(use_reentrant, whole):
    if whole:
        model = Whole(seed=1)
        twa = tk.TWA(model, _perturbed(Whole(seed=0).state_dict()), bits=4)
    else:
        twa, model = _twa_blocks()
    model.use_reentrant = use_reentrant
    (x1, y1), (x2, y2) = _batch(0), _batch(1)
    x1.requires_grad_(), x2.requires_grad_()  # a reentrant checkpoint of the whole model needs it
    first = F.cross_entropy(twa(x1), y1)
    with torch.no_grad():
        twa.coefficients.add_(0.1)  # an optimizer step before the first graph's backward
    second = F.cross_entropy(twa(x2), y2)
    with pytest.raises(UsageError, match="changed"):
        first.backward()
    twa.coefficients.grad = None
    second.backward()  # the graph of the current coefficients is unaffected
    assert twa.coefficients.grad is not None and torch.isfinite(twa.coefficients.grad).all()


class Whole(nn.Module):
    """Every weight used inside one checkpoint, so a reentrant one records no use of them."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))
        self.use_reentrant: bool | None = None

    def forward(self, x):
        return self.net(x) if self.use_reentrant is None else checkpoint(self.net, x, use_reentrant=self.use_reentrant)


@pytest.mark.parametrize("int8_gradients", [False, True], ids=["float", "int8_gradients"])
@pytest.mark.parametrize("use_reentrant", REENTRANT)
def test_a_model_checkpointed_as_a_whole(use_reentrant, int8_gradients):
    # reentrant: every weight gradient arrives after the graph's own projection (TWA._project_late)
    model = Whole(seed=1)
    params, before = dict(model.named_parameters()), _own_state(model)
    twa = tk.TWA(model, _perturbed(Whole(seed=0).state_dict()), bits=4, int8_gradients=int8_gradients)
    x, y = _batch()
    x.requires_grad_()  # a reentrant checkpoint passes gradients on only when an input requires them

    def loss():
        return F.cross_entropy(twa(x), y)

    want = _coefficient_grad(twa, loss)
    model.use_reentrant = use_reentrant
    torch.testing.assert_close(_coefficient_grad(twa, loss), want, rtol=1e-6, atol=1e-6)
    _assert_model_untouched(model, params, before)


class WholeTail(nn.Module):
    """A view of Whole's output (its last two logits), returned alone."""

    def __init__(self, seed: int):
        super().__init__()
        self.whole = Whole(seed)

    def forward(self, x):
        return self.whole(x)[:, 1:]


@pytest.mark.parametrize("use_reentrant", REENTRANT)
def test_an_output_view_changed_in_place_keeps_the_gradient(use_reentrant):
    # the change gave the view a new node, and the loan hooked on the old one was freed before
    # the backward: the recomputation ran at the model's own Parameters, the coefficients got None
    model = WholeTail(seed=1)
    params, before = dict(model.named_parameters()), _own_state(model)
    twa = tk.TWA(model, _perturbed(WholeTail(seed=0).state_dict()), bits=4)
    x, _ = _batch()
    x.requires_grad_()

    def loss():
        tail = twa(x)
        tail.mul_(3.0)  # in place, as a temperature on logits
        return tail.pow(2).mean()

    want = _coefficient_grad(twa, loss)
    model.whole.use_reentrant = use_reentrant
    torch.testing.assert_close(_coefficient_grad(twa, loss), want, rtol=1e-6, atol=1e-6)
    _assert_model_untouched(model, params, before)


def test_evaluation_and_exports_between_forward_and_backward():
    twa, model = _twa_blocks()
    model.use_reentrant = False
    params, before = dict(model.named_parameters()), _own_state(model)
    x, y = _batch()
    model.use_reentrant = None
    want = _coefficient_grad(twa, lambda: F.cross_entropy(twa(x), y))
    model.use_reentrant = False
    twa.coefficients.grad = None
    loss = F.cross_entropy(twa(x), y)
    with pytest.warns(RuntimeWarning, match="has not run its backward yet"):  # a load now would be undone
        state = twa.averaged_state_dict()
    assert state.keys() == before.keys()
    twa.update_bn([x])
    with torch.no_grad():
        twa(x)
    loss.backward()
    torch.testing.assert_close(twa.coefficients.grad, want, rtol=1e-6, atol=1e-6)
    _assert_model_untouched(model, params, before)


@pytest.mark.parametrize("order", [(2, 0, 1), (0, 1, 2), (1, 2, 0)])
def test_a_penalty_over_the_models_parameters_counts_whatever_order_the_backwards_run_in(order):
    # the penalty's gradient lands on the weights the model held when it was computed; a
    # backward that looked only at the weights the model held lately dropped it
    def penalty(model):
        return sum((p.float() ** 2).sum() for p in model.parameters())

    batches = [_batch(i) for i in range(3)]
    twa, model = _twa_blocks()
    for i, (x, y) in enumerate(batches):  # one backward after each forward
        loss = F.cross_entropy(twa(x), y)
        (loss + penalty(model) if i == 0 else loss).backward()
    want = twa.coefficients.grad.clone()
    twa, model = _twa_blocks()
    losses = []
    for i, (x, y) in enumerate(batches):  # three graphs waiting, then their backwards
        loss = F.cross_entropy(twa(x), y)
        losses.append(loss + penalty(model) if i == 0 else loss)
    for i in order:
        losses[i].backward()
    torch.testing.assert_close(twa.coefficients.grad, want, rtol=1e-5, atol=1e-6)


# ---- a tiny Hugging Face GPT-2, built from a config (never downloaded) ---------------------

def _gpt2(seed: int, dtype: torch.dtype = torch.float32):
    import transformers  # the test extra has it; imported here so the plain-module tests need it not
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).to(dtype)


def _enable_checkpointing(model: nn.Module, use_reentrant: bool) -> None:
    with warnings.catch_warnings():  # transformers 5 renames it activation_checkpointing_enable
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 100, (4, 24), generator=torch.Generator().manual_seed(seed))


def _twa_gpt2(dtype: torch.dtype = torch.float32):
    checkpoints = _perturbed(_gpt2(seed=0, dtype=dtype).state_dict(), scale=0.05)
    model = _gpt2(seed=1, dtype=dtype)
    twa = tk.TWA(model, checkpoints, bits=4).train()
    return twa, model


@pytest.mark.parametrize("use_reentrant", REENTRANT)
def test_hugging_face_gpt2_gradients_equal_without_checkpointing(use_reentrant):
    twa, model = _twa_gpt2()
    with torch.no_grad():
        twa.coefficients.normal_(0, 0.5)
    params, before = dict(model.named_parameters()), _own_state(model)
    tokens = _tokens()

    def loss():
        return twa(tokens, labels=tokens).loss

    want = _coefficient_grad(twa, loss)
    _enable_checkpointing(model, use_reentrant)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    got = _coefficient_grad(twa, loss)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    _assert_model_untouched(model, params, before)


@pytest.mark.parametrize("use_reentrant", REENTRANT)
def test_bfloat16_gpt2_with_checkpointing_trains(use_reentrant):
    twa, model = _twa_gpt2(torch.bfloat16)
    params, before = dict(model.named_parameters()), _own_state(model)
    tokens = _tokens()

    def loss():
        return twa(tokens, labels=tokens).loss

    want = _coefficient_grad(twa, loss)
    _enable_checkpointing(model, use_reentrant)
    # the recompute repeats the same bfloat16 operations on the same weights
    torch.testing.assert_close(_coefficient_grad(twa, loss), want, rtol=1e-6, atol=1e-6)
    opt = torch.optim.AdamW(twa.parameters(), lr=0.05)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        step = loss()
        step.backward()
        opt.step()
        losses.append(step.item())
    assert losses[-1] < losses[0] - 0.05, losses
    _assert_model_untouched(model, params, before)


class BrokenBlocks(Blocks):
    """Blocks whose checkpointed blocks hold a graph break, reporting checkpointing as a
    Hugging Face model does (is_gradient_checkpointing)."""

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.use_reentrant is not None

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for block in self.blocks:
            h = checkpoint(self._broken, block, h, use_reentrant=self.use_reentrant)
        return self.out(h)

    @staticmethod
    def _broken(block, h):
        torch._dynamo.graph_break()  # what an unsupported op in a layer does (Mixtral's routing)
        return block(h)


@pytest.mark.parametrize("use_reentrant", REENTRANT)
def test_a_compiled_twa_over_a_checkpointing_model_gives_the_eager_gradients(use_reentrant):
    # the compiled forward lent the weights through functional_call, which puts the model's
    # own back on return: the graph-broken block's recomputation read those (gradients 40-60% off)
    checkpoints = _perturbed(Blocks(seed=0).state_dict())
    model = BrokenBlocks(seed=1)
    model.use_reentrant = use_reentrant
    twa = tk.TWA(model, checkpoints, bits=4)
    with torch.no_grad():
        twa.coefficients.normal_(0, 0.5)
    x, y = _batch()
    want = _coefficient_grad(twa, lambda: F.cross_entropy(twa(x), y))
    torch._dynamo.reset()  # graphs other tests compiled (a TWA's forward among them) are not this one's
    compiled = torch.compile(twa, backend="eager")
    torch._dynamo.utils.counters.clear()
    got = _coefficient_grad(twa, lambda: F.cross_entropy(compiled(x), y))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch._dynamo.utils.counters["stats"]["unique_graphs"]  # the model ran eagerly, untraced
