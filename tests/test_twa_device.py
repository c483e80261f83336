"""tk.TWA's training step on the op tests' device, for each backend that runs there: CUDA
with the cuda and Triton backends where there is a GPU (bench/gpu_run.sh runs this file
there), else the CPU with the C++ kernels and Triton's interpreter. The coefficient gradients
equal dense autograd of the same weights, and a few steps on the coefficients lower the loss."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import twa_kernels as tk

from tests.digits import digits_splits, make_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _twa_on(device: torch.device, checkpoints: list[dict], bits: int) -> tk.TWA:
    twa = tk.TWA(make_model(1), checkpoints, bits=bits).to(device)
    with torch.no_grad():
        twa.coefficients.normal_(0, 0.3)
    return twa


@pytest.mark.parametrize("bits", [2, 4])
def test_coefficient_gradients_on_device_equal_dense_autograd(backend_name, device, digits_checkpoints, bits):
    train, _, _ = digits_splits()
    twa = _twa_on(device, digits_checkpoints(epochs=5, lr=0.01), bits)
    assert twa.basis.codes.device.type == device.type and twa.center.device.type == device.type
    x, y = train.tensors[0][:64].to(device), train.tensors[1][:64].to(device)
    F.cross_entropy(twa(x), y).backward()
    assert tk.backend(device) == backend_name
    # the same weights written with dense torch ops on the same device
    coeffs = twa.coefficients.detach().clone().requires_grad_()
    blocks = torch.repeat_interleave(torch.arange(twa.basis.num_blocks, device=device),
                                     twa.basis.block_offsets.diff())
    flat = twa.center + (tk.dequantize(twa.basis) * coeffs[:, blocks]).sum(0)
    F.cross_entropy(functional_call(twa.module, twa.subspace.unflatten(flat), (x,)), y).backward()
    assert twa.coefficients.grad.device.type == device.type
    torch.testing.assert_close(twa.coefficients.grad, coeffs.grad, rtol=1e-4, atol=1e-6)


def test_steps_on_the_coefficients_lower_the_loss_on_device(backend_name, device, digits_checkpoints):
    train, _, _ = digits_splits()
    twa = _twa_on(device, digits_checkpoints(epochs=5, lr=0.01), bits=4)
    x, y = train.tensors[0].to(device), train.tensors[1].to(device)
    opt = torch.optim.SGD(twa.parameters(), lr=0.05)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = F.cross_entropy(twa(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses
