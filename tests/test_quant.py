import io

import pytest
import torch

import twa_kernels as tk
from twa_kernels.quant import unpack_codes

from bench.paper_baseline import paper_quantize
from tests.helpers import random_basis

BITS = [1, 2, 4, 8]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k,d,group_size", [(1, 1, 8), (3, 7, 8), (2, 129, 128), (4, 1000, 64), (2, 300, 256)])
def test_each_element_within_half_a_step(bits, k, d, group_size):
    P = random_basis(k, d, constant_groups=1, group_size=group_size)
    qb = tk.quantize(P, bits=bits, group_size=group_size)
    err = (tk.dequantize(qb) - P).abs()
    group_of_col = torch.arange(d) // group_size
    half_step = qb.scales.T[:, group_of_col] / 2
    # float32 rounding of lo + scale * code adds a few ulps of |p| on top of half a step
    assert bool((err <= half_step * (1 + 1e-5) + 4e-7 * P.abs()).all()), float((err - half_step).max())


@pytest.mark.parametrize("bits", BITS)
def test_constant_group_is_exact_and_has_zero_scale(bits):
    P = torch.full((2, 20), 0.37)
    qb = tk.quantize(P, bits=bits, group_size=8)
    assert torch.equal(qb.scales, torch.zeros_like(qb.scales))
    assert torch.equal(tk.dequantize(qb), P)


def test_plane_layout_of_a_group():
    # codes equal to the values when each group spans exactly 0..15 at 4 bits
    codes = torch.tensor([[0, 1, 2, 3, 15, 5, 6, 7, 8, 15, 0]], dtype=torch.float32)
    qb = tk.quantize(codes, bits=4, group_size=8)
    assert torch.equal(unpack_codes(qb), codes.to(torch.uint8))
    # group 0: W = 4 bytes, byte i = code[i] | code[i + 4] << 4; tail group of 3: W = 2
    expected = [0 | 15 << 4, 1 | 5 << 4, 2 | 6 << 4, 3 | 7 << 4, 0 | 0 << 4, 15 | 0 << 4]
    # tail group 8, 15, 0 -> min 0, max 15 -> codes 8, 15, 0: byte0 = 8 | 0 << 4, byte1 = 15
    expected[4], expected[5] = 8 | 0 << 4, 15
    assert qb.codes.tolist() == [expected]


@pytest.mark.parametrize("bits,limit", [(4, 0.57), (1, 0.19), (2, 0.32), (8, 1.07)])
def test_storage_per_element_at_group_128(bits, limit):
    k, d = 4, 128 * 500
    P = torch.randn(k, d)
    qb = tk.quantize(P, bits=bits, group_size=128)
    per_element = qb.nbytes / (k * d)
    assert per_element <= limit, per_element
    # the paper's code keeps one byte per element whatever the width
    assert paper_quantize(P, bits, [d]).nbytes / (k * d) >= 1.0


@pytest.mark.parametrize("bits", [None, 1, 4])
def test_state_dict_round_trip_with_weights_only_load(bits):
    P = torch.randn(3, 250)
    qb = tk.quantize(P, bits=bits, group_size=64, block_sizes=[100, 150])
    buf = io.BytesIO()
    torch.save(qb.state_dict(), buf)
    buf.seek(0)
    loaded = tk.QuantizedBasis.from_state_dict(torch.load(buf, weights_only=True))
    assert loaded.bits == bits and loaded.block_sizes == [100, 150]
    assert torch.equal(tk.dequantize(loaded), tk.dequantize(qb))
    assert loaded.nbytes == qb.nbytes


def test_dequantize_column_range_matches_full():
    P = torch.randn(3, 1001)
    qb = tk.quantize(P, bits=2, group_size=64)
    full = tk.dequantize(qb)
    for start, stop in [(0, 1001), (64, 130), (960, 1001), (0, 5), (128, 1000)]:
        assert torch.equal(tk.dequantize(qb, start, stop), full[:, start:stop])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(bits=3), "bits must be one of"),
        (dict(group_size=12), "multiple of 8"),
        (dict(block_sizes=[10, 10]), "sum to 20 but the basis has 30"),
        (dict(block_sizes=[0, 30]), "positive"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tk.quantize(torch.randn(2, 30), **kwargs)


def test_bad_basis_is_named():
    with pytest.raises(ValueError, match=r"\[k, D\]"):
        tk.quantize(torch.randn(30))
    bad = torch.randn(3, 30)
    bad[1, 4] = float("nan")
    with pytest.raises(ValueError, match="row 1"):
        tk.quantize(bad)
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"P is a torch.sparse_coo tensor.*P.to_dense\(\)"):
        tk.quantize(torch.randn(3, 32).to_sparse())  # a raw NotImplementedError from inside the checks before


def test_corrupt_state_dict_is_refused():
    state = tk.quantize(torch.randn(2, 100), bits=4, group_size=32).state_dict()
    state["codes"] = state["codes"][:, :-1]
    with pytest.raises(ValueError, match="codes must be uint8"):
        tk.QuantizedBasis.from_state_dict(state)
    with pytest.raises(KeyError, match="missing"):
        tk.QuantizedBasis.from_state_dict({"codes": state["codes"]})
    meta = {key: value.to("meta") for key, value in state.items()}  # a module's state_dict built on meta
    with pytest.raises(tk.errors.InvalidArgumentError, match="basis 'codes' is on the meta device"):
        tk.QuantizedBasis.from_state_dict(meta)
