"""What several test modules share: synthetic bases, the op tests' shape grid, and the one
launcher of gloo process groups (bench/distributed_step.py uses it too)."""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from twa_kernels.quant import QuantizedBasis, dequantize, quantize

BITS = [None, 1, 2, 4, 8]
# (k, D, group_size, block_sizes): D not a multiple of 8 or of the group, k = 1,
# one-element blocks, groups straddling block edges, a basis smaller than one group.
SHAPES = [
    (1, 1, 8, None),
    (3, 7, 8, [3, 4]),
    (1, 1000, 128, [1] * 10 + [990]),
    (4, 1003, 64, [500, 1, 502]),
    (5, 777, 8, [1] * 777),
    (16, 4099, 128, [1000, 3099]),
]


def random_basis(k: int, d: int, *, constant_groups: int = 0, group_size: int = 8) -> torch.Tensor:
    """Random rows on varied scales; the first `constant_groups` groups of each row are flat."""
    P = torch.randn(k, d) * torch.logspace(-2, 1, k)[:, None]
    for t in range(constant_groups):
        P[:, t * group_size : (t + 1) * group_size] = torch.randn(k, 1)
    return P


# -- multi-process tests: gloo on CPU ---------------------------------------------------------


def reconstruct_budget(qb: QuantizedBasis, x: torch.Tensor) -> float:
    """The spec's tolerance for reconstruct: 1e-6 of the largest column's sum_r |p^ x|."""
    blocks_of_col = torch.repeat_interleave(torch.arange(qb.num_blocks, device=x.device), qb.block_offsets.diff())
    return float((dequantize(qb).abs() * x.float().abs()[:, blocks_of_col]).sum(0).max()) * 1e-6


def assert_one_rounding_of_the_weight(w: torch.Tensor, expected: torch.Tensor, budget: float) -> None:
    """|w - expected| within the terms' budget plus one float32 rounding of the weight: what
    a reconstruct that sums the rows' terms and adds the center last may differ by from the
    spec, which sums in float64 and rounds once."""
    one_rounding = torch.nextafter(expected.abs(), torch.tensor(float("inf"), device=expected.device)) - expected.abs()
    excess = (w - expected).abs() - (budget + one_rounding)
    assert float(excess.max()) <= 0, f"{int((excess > 0).sum())} of {w.numel()} weights beyond one rounding"


def outlier_basis(bits: int, group_size: int) -> tuple[QuantizedBasis, torch.Tensor]:
    """(basis, g): rows of 1e-3 with one outlier each (-1000 once, -50 at every half group,
    300 once) over two groups, and g = 1/3: each group's minimum lies far below its other
    values, so scale * sum(code * g) and lo * sum(g) nearly cancel."""
    rows = torch.full((3, group_size * 2), 1e-3)
    rows[0, 0], rows[1, :: group_size // 2], rows[2, 5] = -1000.0, -50.0, 300.0
    return quantize(rows, bits, group_size), torch.full((group_size * 2,), 1 / 3)


def assert_rounded_to_nearest_bfloat16(w: torch.Tensor, expected: torch.Tensor, budget: float) -> None:
    """bfloat16 `w` within the terms' budget of the spec's float32 `expected`, plus half a
    bfloat16 step: one round-to-nearest of the float result (a truncation is off by up to a
    whole step) and one float32 rounding of the weight."""
    _, exponent = torch.frexp(expected.abs())  # |e| = m 2^exponent, m in [0.5, 1): a bfloat16 step is 2^(exponent - 8)
    half_step = torch.ldexp(torch.ones_like(expected), exponent - 9)
    float32_rounding = expected.abs() * 2.0 ** -23
    excess = (w.float() - expected).abs() - (budget + half_step + float32_rounding)
    assert float(excess.max()) <= 0, f"{int((excess > 0).sum())} of {w.numel()} weights beyond a nearest rounding"


def noisy_checkpoints(model: torch.nn.Module, n: int, scale: float = 0.1) -> list[dict]:
    """n state_dicts of a random walk from `model`'s weights (each adds scale x N(0, 1) to
    every parameter), as a training run's checkpoints; `model` is left at the last one."""
    out = []
    for _ in range(n):
        for p in model.parameters():
            p.data.add_(scale * torch.randn_like(p))
        out.append({k: v.clone() for k, v in model.state_dict().items()})
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def one_process_group() -> Iterator[None]:
    """A gloo group of this process alone (an in-memory store, no port), destroyed on exit:
    for code that needs an initialised group but no peers."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _entry(rank: int, fn: Callable[[int, int], Any], world: int, port: int, out: str,
           collective_timeout: float = 60.0) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=collective_timeout))
    try:
        result = fn(rank, world)
        tmp = os.path.join(out, f".rank{rank}.pt")
        torch.save(result, tmp)
        os.replace(tmp, os.path.join(out, f"rank{rank}.pt"))  # a rank's file is whole or absent
    finally:
        # What holds the group (a replicated TWA) may sit in cyclic garbage: the first
        # custom-op call imports torch._dynamo, which keeps that call's frames in a cycle.
        # Freed now, the group's gloo threads stop while the interpreter is whole; freed at
        # interpreter exit, their teardown can abort the process.
        gc.collect()
        dist.destroy_process_group()
    # The rank's work is done and its result is on disk. Leave without the interpreter's
    # teardown: on a loaded machine, torch's native threads could still abort the process
    # there ("terminate called without an active exception"), after the result was written.
    # A rank that raised took the path above instead and reports its traceback.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn: Callable[[int, int], Any], world: int, out: str, timeout: float = 100.0,
          collective_timeout: float = 60.0) -> list:
    """Run fn(rank, world) in `world` fresh processes (1 thread each) joined in a gloo group
    on a free port, and return the ranks' results, read back from files in `out`. `fn` must
    be picklable (a module-level function or a functools.partial of one). A rank that raises
    fails the call with its traceback; a run past `timeout` seconds is killed and raises
    TimeoutError, so a test never hangs; a collective that waits more than
    `collective_timeout` seconds for a peer fails its rank."""
    ctx = mp.start_processes(_entry, args=(fn, world, free_port(), out, collective_timeout), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{world} ranks did not finish in {timeout} s")
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in range(world)]


def tiny_gpt2(seed: int = 0, tie: bool = True) -> torch.nn.Module:
    """A 2-layer GPT-2 from a config (nothing downloaded): its attention and MLP layers are
    transformers' Conv1D, whose weight is stored (in, out), and its lm_head shares the token
    embedding's weight unless tie=False."""
    import transformers  # a test extra; only the tests of transformers models need it

    transformers.logging.set_verbosity_error()  # the tiny vocabulary makes it warn about GPT-2's token ids
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=30, n_positions=16,
                                     tie_word_embeddings=tie)
    return transformers.GPT2LMHeadModel(config)


class RunsCode:
    """Unpickling this creates the marker file: what a hostile checkpoint would do."""

    def __init__(self, marker: object):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
