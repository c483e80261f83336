"""Distribution matching: the matching loss falls, the distilled set beats as many random real
examples per class (3 seeds, margin printed), shapes and dtypes follow the real data for 1-D
signals and images, the saved file reads back, and a too-large ipc is a named error."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import twa_kernels as tk
from twa_kernels.distill import DistillError

from tests.digits import digits_splits


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


@pytest.fixture(scope="module")
def digit_images():
    train, _, test = digits_splits(0)
    as_images = lambda ds: TensorDataset(ds.tensors[0].view(-1, 1, 8, 8), ds.tensors[1])  # noqa: E731
    return as_images(train), as_images(test)


def _convnet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(16 * 16, 10))


def _train_and_test(x, y, test, seed) -> float:
    model = _convnet(seed)
    tk.prune.train_classifier(model, TensorDataset(x, y), epochs=100, lr=0.02, batch_size=32, seed=seed)
    model.eval()
    with torch.no_grad():
        return float((model(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean())


def test_distilled_images_beat_random_real_examples_over_3_seeds(digit_images, tmp_path):
    train, test = digit_images
    embed = tk.distill.default_embedding(train.tensors[0], width=16)
    margins = []
    for seed in range(3):
        # iterations=0 returns the starting point: ipc random real examples per class
        x_real, y_real = tk.distill.distribution_matching(train, ipc=10, iterations=0, seed=seed)
        x_syn, y_syn = tk.distill.distribution_matching(train, ipc=10, iterations=150, lr=10.0, batch_real=64,
                                                        embed=embed, seed=seed, out=tmp_path / f"s{seed}.safetensors")
        assert torch.equal(y_syn, y_real) and torch.equal(torch.bincount(y_syn), torch.full((10,), 10))
        assert x_syn.shape == (100, 1, 8, 8) and x_syn.dtype == train.tensors[0].dtype
        before = tk.distill.matching_loss(train, x_real, y_real, embed=embed, seed=12345)
        after = tk.distill.matching_loss(train, x_syn, y_syn, embed=embed, seed=12345)
        assert after < 0.85 * before, (seed, before, after)  # on random networks it was not trained on
        acc_real, acc_syn = _train_and_test(x_real, y_real, test, seed), _train_and_test(x_syn, y_syn, test, seed)
        margins.append(acc_syn - acc_real)
        print(f"seed {seed}: matching loss {before:.4f} -> {after:.4f}; test accuracy, 10 random real per class "
              f"{100 * acc_real:.1f}%, 10 distilled per class {100 * acc_syn:.1f}%")
        saved = tk.distill.load_distilled(tmp_path / f"s{seed}.safetensors")
        assert torch.equal(saved[0], x_syn) and torch.equal(saved[1], y_syn)
    mean = sum(margins) / len(margins)
    print(f"distilled minus random real, mean over 3 seeds: {100 * mean:+.2f} points "
          f"(per seed {', '.join(f'{100 * m:+.1f}' for m in margins)})")
    assert mean > 0.005, margins


@pytest.fixture(scope="module")
def mnist1d_train():
    from twa_kernels.demo import mnist1d

    train, _, _ = mnist1d(0)
    x, y = train.tensors
    return x[:600], y[:600]  # [N, 1, 40]


@pytest.mark.parametrize("layout", ["[N, 1, L]", "[N, L]"])
def test_one_dimensional_signals_keep_their_layout_and_lower_the_loss(mnist1d_train, layout):
    x, y = mnist1d_train
    if layout == "[N, L]":
        x = x[:, 0]
    x = x.double()  # the dtype follows the real data's
    embed = tk.distill.default_embedding(x, width=16)
    start = tk.distill.distribution_matching((x, y), ipc=5, iterations=0, seed=0)
    x_syn, y_syn = tk.distill.distribution_matching((x, y), ipc=5, iterations=60, lr=10.0, batch_real=32,
                                                    embed=embed, seed=0)
    assert x_syn.shape == (50,) + tuple(x.shape[1:]) and x_syn.dtype == torch.float64 and y_syn.dtype == y.dtype
    assert tk.distill.matching_loss((x, y), x_syn, y_syn, embed=embed, seed=12345) < \
        0.9 * tk.distill.matching_loss((x, y), *start, embed=embed, seed=12345)


@pytest.mark.parametrize("ipc", [1, 10, 50])
def test_ipc_sets_the_examples_per_class(mnist1d_train, ipc):
    x, y = mnist1d_train
    x_syn, y_syn = tk.distill.distribution_matching((x, y), ipc=ipc, iterations=1, batch_real=8,
                                                    embed=tk.distill.default_embedding(x, width=8))
    assert x_syn.shape == (10 * ipc, 1, 40)
    assert torch.equal(torch.bincount(y_syn), torch.full((10,), ipc))


@pytest.mark.parametrize("shape", [(30, 2, 1, 6), (30, 2, 6, 1), (30, 1, 2)])
def test_inputs_with_a_side_of_one_distill_with_an_embedding_that_does_not_pool_it(shape):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(*shape, generator=gen), torch.arange(30) % 3
    start, _ = tk.distill.distribution_matching((x, y), ipc=2, iterations=0, seed=0)  # the real examples drawn
    x_syn, y_syn = tk.distill.distribution_matching((x, y), ipc=2, iterations=2, batch_real=8, seed=0)
    assert x_syn.shape == (6, *shape[1:]) and torch.isfinite(x_syn).all()
    assert (x_syn - start).abs().max() > 1e-3  # the examples learned, not only kept their shape


@pytest.mark.parametrize("shape, fix", [((30, 1), "pass embed="), ((30, 3, 1), r"x.reshape\(len\(x\), 1, -1\)"),
                                        ((30, 3, 1, 1), r"x.reshape\(len\(x\), 1, -1\)")])
def test_inputs_with_one_position_per_example_are_refused_with_the_default_embedding(shape, fix, tmp_path):
    # instance norm over one position outputs a constant: the synthetic set got no gradient and stayed as drawn
    x, y = torch.randn(*shape, generator=torch.Generator().manual_seed(0)), torch.arange(30) % 3
    with pytest.raises(DistillError, match=f"one position per example.*{fix}"):
        tk.distill.distribution_matching((x, y), ipc=2, iterations=2, seed=0, out=tmp_path / "d.safetensors")
    assert not (tmp_path / "d.safetensors").exists()
    with pytest.raises(DistillError, match="one position per example"):
        tk.distill.matching_loss((x, y), x[:6], y[:6], nets=1, seed=0)
    mlp = lambda: nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), 8), nn.Tanh())  # noqa: E731
    x_syn, _ = tk.distill.distribution_matching((x, y), ipc=2, iterations=2, seed=0, embed=mlp)
    start, _ = tk.distill.distribution_matching((x, y), ipc=2, iterations=0, seed=0, embed=mlp)
    assert (x_syn - start).abs().max() > 1e-3  # the fix the message names distills them


def test_any_seed_torch_takes_distills_and_one_past_it_is_named():
    # each iteration's network is seeded from the seed: a product past 2**63 overflowed
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 1, 12, generator=gen), torch.arange(30) % 3
    embed = tk.distill.default_embedding(x, width=4, depth=1)
    for seed in (2**50, 2**64 - 1, -2**63):
        x_syn, _ = tk.distill.distribution_matching((x, y), ipc=2, iterations=2, batch_real=8, embed=embed, seed=seed)
        assert torch.isfinite(x_syn).all()
    with pytest.raises(tk.errors.InvalidArgumentError, match="outside the seeds torch takes"):
        tk.distill.distribution_matching((x, y), ipc=2, iterations=2, batch_real=8, embed=embed, seed=2**64)


def test_a_seed_reproduces_the_distilled_set_and_leaves_the_global_rng_alone():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 1, 12, generator=gen), torch.arange(60) % 3
    embed = tk.distill.default_embedding(x, width=4, depth=1)
    state = torch.get_rng_state()
    first = tk.distill.distribution_matching((x, y), ipc=2, iterations=3, batch_real=8, embed=embed, seed=3)
    loss = tk.distill.matching_loss((x, y), *first, nets=2, embed=embed, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    again = tk.distill.distribution_matching((x, y), ipc=2, iterations=3, batch_real=8, embed=embed, seed=3)
    assert torch.equal(first[0], again[0])
    assert tk.distill.matching_loss((x, y), *first, nets=2, embed=embed, seed=4) == loss
    torch.manual_seed(8)
    unseeded = tk.distill.distribution_matching((x, y), ipc=2, iterations=3, batch_real=8, embed=embed)
    again = tk.distill.distribution_matching((x, y), ipc=2, iterations=3, batch_real=8, embed=embed)
    assert not torch.equal(again[0], unseeded[0])  # None draws from the global RNG, moving it
    torch.manual_seed(8)
    assert torch.equal(tk.distill.distribution_matching((x, y), ipc=2, iterations=3, batch_real=8, embed=embed)[0],
                       unseeded[0])


@pytest.mark.parametrize("kw, error, message", [
    (dict(width=0), tk.errors.InvalidArgumentError, "width must be an int >= 1, got 0"),
    (dict(depth=-1), tk.errors.InvalidArgumentError, "depth must be an int >= 1, got -1"),
    (dict(width="a"), tk.errors.InvalidTypeError, "width must be an int >= 1, got str"),
])
def test_the_default_embeddings_width_and_depth_are_checked(kw, error, message):
    # width=0 ended in a ZeroDivisionError, depth=-1 built an embedding of no blocks
    from twa_kernels.distill import default_embedding

    with pytest.raises(error, match=message):
        default_embedding(torch.randn(4, 1, 8), **kw)


@pytest.mark.parametrize("dataset", [None, {"x": 1}, 5])
def test_a_dataset_of_the_wrong_kind_is_named(dataset):
    # None and 5 raised a bare TypeError from len(), a dict a KeyError
    with pytest.raises(DistillError, match="the dataset must be a TensorDataset, a pair"):
        tk.distill.distribution_matching(dataset)


def test_ipc_larger_than_the_smallest_class_is_a_named_error():
    x = torch.randn(30, 1, 12)
    y = torch.tensor([0] * 20 + [1] * 10)
    with pytest.raises(DistillError, match=r"ipc=11 is larger than the smallest class \(class 1 has 10"):
        tk.distill.distribution_matching((x, y), ipc=11)
    with pytest.raises(DistillError, match="ipc must be an int >= 1"):
        tk.distill.distribution_matching((x, y), ipc=0)
    with pytest.raises(DistillError, match="floating-point"):
        tk.distill.distribution_matching((x.long(), y), ipc=1)


def test_hostile_inputs_are_refused_before_anything_is_saved(tmp_path):
    x, y = torch.randn(30, 1, 12), torch.arange(30) % 3
    embed = tk.distill.default_embedding(x, width=4, depth=1)
    run = lambda data, **kw: tk.distill.distribution_matching(
        data, **{"ipc": 2, "iterations": 2, "batch_real": 4, "embed": embed, "seed": 0, "out": tmp_path / "d", **kw})
    bad = x.clone()
    bad[3, 0, 5] = float("nan")
    with pytest.raises(DistillError, match=r"inputs hold 1 NaN/Inf"):
        run((bad, y))
    with pytest.raises(DistillError, match="batch_real must be an int >= 1"):
        run((x, y), batch_real=0)
    with pytest.raises(DistillError, match="iterations must be an int >= 0"):
        run((x, y), iterations=2.0)
    with pytest.raises(DistillError, match="dataset is empty"):
        run((x[:0], y[:0]))
    with pytest.raises(DistillError, match="dataset is empty"):
        run(TensorDataset(x[:0], y[:0]))
    with pytest.raises(DistillError, match="lr must be finite and > 0"):
        run((x, y), lr=float("nan"))
    with pytest.raises(DistillError, match="lr must be finite and > 0"):
        run((x, y), momentum=True)
    with pytest.raises(DistillError, match=r"dataset\[0\] is tuple of length 1; items must be \(input, label\)"):
        run([(row,) for row in x])
    with pytest.raises(DistillError, match=r"dataset\[0\] is dict"):
        run([{"x": row, "y": label} for row, label in zip(x, y)])
    with pytest.raises(DistillError, match=r"dataset\[0\]'s label is a str \('dog'\), not an integer class id"):
        run([(row, "dog" if i % 2 == 0 else "cat") for i, row in enumerate(x)])
    with pytest.raises(DistillError, match=r"dataset\[0\]'s label is a float \('inf'\), not an integer class id"):
        run([(row, float("inf")) for row in x])
    for label in (0.9, torch.tensor(1.2), np.float32(0.3)):  # int() rounded them, merging classes
        with pytest.raises(DistillError, match=rf"dataset\[0\]'s label is a {type(label).__name__} .*not an "
                                                "integer class id"):
            run([(row, label) for row in x])
    with pytest.raises(DistillError, match=r"dataset\[0\]'s input is a object, which is not an array of numbers.*"
                                           "ToTensor"):
        run([(object(), int(label)) for label in y])
    with pytest.raises(DistillError, match=r"TensorDataset holds 1 tensor\(s\).*TensorDataset\(x, y\)"):
        run(TensorDataset(x))
    with pytest.raises(DistillError, match="an example with no values"):
        run((x[:, :, :0], y))
    with pytest.raises(DistillError, match="diverged; lower lr.*nothing was saved"):
        run((x, y), lr=1e30, iterations=5, embed=nn.Flatten)  # no normalisation: the steps blow up
    assert not (tmp_path / "d").exists()



def test_a_map_style_dataset_takes_integer_labels_of_every_kind():
    x, y = torch.randn(12, 1, 8), torch.arange(12) % 3
    embed = tk.distill.default_embedding(x, width=4, depth=1)
    run = lambda data: tk.distill.distribution_matching(data, ipc=2, iterations=1, batch_real=4, embed=embed, seed=0)
    expected = run((x, y))
    for to_label in (int, str, lambda c: torch.tensor(c), lambda c: np.int64(c), lambda c: np.array([c])):
        got = run([(row, to_label(int(c))) for row, c in zip(x, y)])
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_a_seed_also_governs_an_embedding_with_dropout_and_a_directory_as_out_is_named_first(tmp_path):
    # the forwards run in train mode: dropout drew from the global RNG, so a seeded run moved
    # it and differed from one global state to the next
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 1, 12, generator=gen), torch.arange(60) % 3
    plain = tk.distill.default_embedding(x, width=4, depth=1)

    def embed():
        return torch.nn.Sequential(plain(), torch.nn.Dropout(0.5))

    results, losses = [], []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        results.append(tk.distill.distribution_matching((x, y), ipc=2, iterations=3, batch_real=8, embed=embed,
                                                        seed=3)[0])
        losses.append(tk.distill.matching_loss((x, y), results[-1], torch.arange(6) // 2, nets=2, embed=embed,
                                               seed=4))
        assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(results[0], results[1]) and losses[0] == losses[1]
    with pytest.raises(tk.errors.OutputError, match=r"is a directory; give a file path such as .*distilled"):
        tk.distill.distribution_matching((x, y), ipc=2, iterations=10**6, embed=embed, seed=3, out=tmp_path)

def test_matching_loss_draws_networks_apart_from_those_a_run_at_the_same_seed_trained_on():
    # seed + i, as the evaluation drew them, was the stream of the run's iterations 0, 1, ...
    x, y = torch.randn(30, 1, 12), torch.arange(30) % 3
    drawn = []

    def embed():
        net = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
        drawn.append(net[1].weight.detach().clone())
        return net

    x_syn, y_syn = tk.distill.distribution_matching((x, y), ipc=2, iterations=4, batch_real=4, embed=embed, seed=0)
    trained = list(drawn)
    drawn.clear()
    tk.distill.matching_loss((x, y), x_syn, y_syn, nets=4, embed=embed, seed=0)
    assert len(trained) == len(drawn) == 4
    assert not any(torch.equal(a, b) for a in trained for b in drawn)
    assert math.isfinite(tk.distill.matching_loss((x, y), x_syn, y_syn, nets=2, embed=embed, seed=2**64 - 1))


def test_matching_loss_refuses_a_synthetic_set_that_does_not_fit_the_data():
    x, y = torch.randn(30, 1, 12), torch.arange(30) % 3
    embed = tk.distill.default_embedding(x, width=4, depth=1)
    x_syn, y_syn = x[:6].clone(), y[:6].clone()
    assert math.isfinite(tk.distill.matching_loss((x, y), x_syn, y_syn, nets=1, embed=embed, seed=0))
    with pytest.raises(DistillError, match=r"y_syn has classes \[0, 1\] but the data has \[0, 1, 2\]"):
        tk.distill.matching_loss((x, y), x_syn[y_syn < 2], y_syn[y_syn < 2], nets=1, embed=embed)
    with pytest.raises(DistillError, match=r"y_syn has classes \[0, 1, 2, 7\]"):
        tk.distill.matching_loss((x, y), x[:7], torch.cat([y_syn, torch.tensor([7])]), nets=1, embed=embed)
    with pytest.raises(DistillError, match="nets must be an int >= 1"):
        tk.distill.matching_loss((x, y), x_syn, y_syn, nets=0, embed=embed)
    with pytest.raises(DistillError, match=r"one per row of x_syn"):
        tk.distill.matching_loss((x, y), x_syn, y_syn[:5], nets=1, embed=embed)
    with pytest.raises(DistillError, match=r"x_syn has shape \(6, 12\)"):
        tk.distill.matching_loss((x, y), x_syn[:, 0], y_syn, nets=1, embed=embed)
    # another floating dtype is measured in the data's, as the networks are built for it
    assert tk.distill.matching_loss((x, y), x_syn.double(), y_syn, nets=1, embed=embed, seed=0) == pytest.approx(
        tk.distill.matching_loss((x, y), x_syn, y_syn, nets=1, embed=embed, seed=0), rel=1e-6)
    x_syn[0, 0, 0] = float("inf")
    with pytest.raises(DistillError, match="x_syn hold 1 NaN/Inf"):
        tk.distill.matching_loss((x, y), x_syn, y_syn, nets=1, embed=embed)


def test_an_embedding_of_one_value_per_example_is_named_and_one_of_another_dtype_takes_the_datas():
    # a [N] output raised an IndexError from inside the matching, and a float32 network over
    # float64 data a dtype mismatch
    x, y = torch.randn(20, 1, 8), torch.arange(20) % 2

    class OneValue(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 1)

        def forward(self, x):
            return self.lin(x.flatten(1)).squeeze(1)

    with pytest.raises(DistillError, match=r"returns shape \(20,\) for 20 examples; it must return \[examples"):
        tk.distill.distribution_matching((x, y), ipc=1, iterations=1, seed=0, embed=OneValue)

    def mlp():
        return nn.Sequential(nn.Flatten(), nn.Linear(8, 4))

    shared = mlp()
    x_syn, _ = tk.distill.distribution_matching((x.double(), y), ipc=1, iterations=2, seed=0, embed=lambda: shared)
    assert x_syn.dtype == torch.float64 and torch.isfinite(x_syn).all()
    assert shared[1].weight.dtype == torch.float32  # the network is left as its factory built it
    # numpy's numbers are taken as Python's
    same = tk.distill.distribution_matching((x, y), ipc=1, iterations=2, seed=0, embed=mlp, lr=1.0)[0]
    given = tk.distill.distribution_matching((x, y), ipc=1, iterations=2, seed=0, embed=mlp, lr=np.float32(1.0))[0]
    assert torch.equal(same, given)


def test_an_embedding_network_that_returns_no_tensor_is_named():
    class Output(dict):
        """What a Hugging Face model returns: a mapping of named outputs, not a tensor."""

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(12, 4)

        def forward(self, x):
            return Output(pooler_output=self.linear(x.flatten(1)))

    x, y = torch.randn(30, 1, 12), torch.arange(30) % 3
    with pytest.raises(tk.errors.InvalidTypeError, match=r"returns Output, not a tensor.*\.pooler_output"):
        tk.distill.distribution_matching((x, y), ipc=2, iterations=2, batch_real=4, embed=Wrapped, seed=0)


def test_a_network_the_factory_shares_is_left_as_it_was():
    # its parameters were left frozen and the network in train mode, after a call that succeeded
    net = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(12, 4)).eval()
    net[1].train()  # a submodule in a mode of its own
    x, y = torch.randn(30, 1, 12), torch.arange(30) % 3
    x_syn, y_syn = tk.distill.distribution_matching((x, y), ipc=2, iterations=3, batch_real=4, embed=lambda: net,
                                                    seed=0)
    tk.distill.matching_loss((x, y), x_syn, y_syn, nets=2, embed=lambda: net, seed=0)
    assert [m.training for m in net.modules()] == [False, False, True, False]
    assert all(p.requires_grad and p.grad is None for p in net.parameters())


def test_a_layer_the_embedding_uses_without_registering_it_gets_no_gradient():
    outside = nn.Linear(12, 6)

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(6, 4)

        def forward(self, x):
            return self.linear(outside(x.flatten(1)))

    x, y = torch.randn(30, 1, 12), torch.arange(30) % 3
    tk.distill.distribution_matching((x, y), ipc=2, iterations=2, batch_real=4, embed=Head, seed=0)
    assert outside.weight.grad is None and outside.bias.grad is None


def test_an_embedding_that_checkpoints_its_activations_reentrantly_distills():
    # (torch.autograd.grad, which a reentrant checkpoint refuses, once took the gradient)
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(12, 4)

        def forward(self, x):
            return checkpoint(self.linear, x.flatten(1), use_reentrant=True)

    x, y = torch.randn(30, 1, 12), torch.arange(30) % 3
    x_syn, _ = tk.distill.distribution_matching((x, y), ipc=2, iterations=2, batch_real=4, embed=Checkpointed,
                                                seed=0)
    assert torch.isfinite(x_syn).all()


def test_a_network_instead_of_a_factory_and_inputs_of_two_shapes_are_named():
    data = TensorDataset(torch.randn(6, 5), torch.tensor([0, 1] * 3))
    with pytest.raises(DistillError, match="factory .* got a Linear instance"):
        tk.distill.distribution_matching(data, ipc=1, iterations=1, embed=nn.Linear(5, 4), seed=0)
    ragged = [(torch.randn(5), 0), (torch.randn(6), 1)]
    with pytest.raises(DistillError, match=r"dataset\[1\]'s input has shape \(6,\) but dataset\[0\]'s has \(5,\)"):
        tk.distill.distribution_matching(ragged, ipc=1, iterations=1, seed=0)
