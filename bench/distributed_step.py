"""One TWA step across processes: ResNet-18 shapes, k = 16, 4-bit, one block per tensor.

    python bench/distributed_step.py            # 2 gloo processes
    python bench/distributed_step.py --world 3 --steps 5

A step is: the weights (forward: reconstruct; sharded: reconstruct the local columns, then
all-gather), a fixed linear loss sum(w * r) and its backward (replicated: project, then the
all-reduce of [k, B]; sharded: reduce-scatter dL/dw, project locally, all-reduce [k, B]), and
an AdamW step of the coefficients. The model's own forward is left out: it is the same in
every mode and would hide the step. Measured: the median wall time of `--steps` steps after
2 warm-ups, in one process (no group) and in W gloo processes (replicated, sharded), and the
bytes each rank's collectives moved per step (twa_kernels.distributed's counter: all-reduce
tensor, all-gather output, reduce-scatter input).

Then the bytes-per-step table for ResNet-18 and CLIP ViT-B/32 shapes, from the same formulas
the measurement checks: the paper's all-reduce of dL/dw (D floats), DDP over the full model
(D gradient floats plus its per-forward BatchNorm buffer broadcast), DDP over a TWA module
that did not exclude its buffers (the basis and center broadcast every forward), and our two
modes. On this 2-core machine the processes share the cores, so the times say little; the
bytes are the figure to trust. Writes bench/results/<machine>-distributed-step.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

K, BITS, GROUP = 16, 4, 128


def _twa(process_group=None, shard=False):
    """A TWA over ResNet-18 with a random 4-bit basis, the same on every rank (fixed seed)."""
    import twa_kernels as tk
    from twa_kernels.quant import _quantize_row, block_offsets_from_sizes, stack_rows
    from resnet import resnet18

    torch.manual_seed(0)  # the same model, so the same center, on every rank
    model = resnet18()
    names = [n for n, _ in model.named_parameters()]
    shapes = [tuple(p.shape) for p in model.parameters()]
    sizes = [math.prod(s) for s in shapes]
    gen = torch.Generator().manual_seed(0)
    center = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    rows = [_quantize_row(0.01 * torch.randn(center.numel(), generator=gen), BITS, GROUP) for _ in range(K)]
    basis = stack_rows(rows, block_offsets_from_sizes(sizes, center.numel()), BITS, GROUP, center.numel())
    return tk.TWA(model, tk.Subspace(names, shapes, center, basis), process_group=process_group, shard=shard)


def _time_steps(twa, steps: int) -> tuple[float, int]:
    from twa_kernels import distributed

    gen = torch.Generator().manual_seed(1)
    r = {n: torch.randn(s, generator=gen) for n, s in zip(twa.names, twa.shapes)}
    opt = torch.optim.AdamW(twa.parameters(), lr=1e-3)
    times, per_step = [], 0
    for i in range(steps + 2):
        distributed.reset_comm_bytes(twa)
        start = time.perf_counter()
        opt.zero_grad()
        loss = sum((w * r[n]).sum() for n, w in twa.weights().items())
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
        per_step = sum(distributed.comm_bytes(twa).values())
    return statistics.median(times[2:]), per_step


def _rank(rank: int, world: int, steps: int) -> dict:
    """One rank's timings and bytes in both modes (run by tests.helpers.spawn in a gloo group)."""
    import torch.distributed as dist

    result = {}
    for mode in ("replicated", "sharded"):
        twa = _twa(dist.group.WORLD, shard=mode == "sharded")
        seconds, nbytes = _time_steps(twa, steps)
        result[mode] = {"seconds": seconds, "bytes": nbytes, "k": K, "B": twa.coefficients.shape[1],
                        "padded": getattr(twa.parallel, "chunk", 0) * world}
        del twa
    return result


def _formulas(sizes: list[int], world: int, bn_buffer_floats: int) -> dict[str, int]:
    """Bytes each rank sends into the collectives of one step (float32), by scheme."""
    from twa_kernels.distributed import shard_columns

    D, B = sum(sizes), len(sizes)
    n_groups = -(-D // GROUP)
    edges = shard_columns(D, GROUP, world)
    chunk = max(b - a for a, b in zip(edges[:-1], edges[1:]))
    packed = K * (D // GROUP * GROUP * BITS // 8 + -(-(D % GROUP) * BITS // 8)) + 2 * 4 * K * n_groups
    return {
        "paper: all-reduce of dL/dw (D floats)": 4 * D,
        "DDP over the full model (D grads + BN buffers)": 4 * (D + bn_buffer_floats),
        "DDP over TWA, basis buffers not excluded": 4 * D + packed + 4 * K * B,
        "ours, replicated (k x B + 2)": 4 * (K * B + 2),
        f"ours, sharded over {world} (2 x W x L + k x B + 2)": 4 * (2 * world * chunk + K * B + 2),
    }


def main() -> None:
    from shapes import clip_vit_b32_visual_sizes, resnet18_sizes
    from tests.helpers import spawn  # the one gloo launcher, shared with the tests

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=None, help="default: bench/results/<machine>-distributed-step.json")
    args = parser.parse_args()
    from stamp import machine_slug, stamp

    info = stamp()

    torch.set_num_threads(1)
    single, _ = _time_steps(_twa(), args.steps)
    with tempfile.TemporaryDirectory() as out:
        # ResNet-18-sized steps on shared cores: generous limits, where the tests' are tight
        ranks = spawn(functools.partial(_rank, steps=args.steps), args.world, out, timeout=3600.0,
                      collective_timeout=300.0)

    resnet = resnet18_sizes()
    report = {
        "stamp": {**info, "threads": 1},
        "world": args.world, "k": K, "bits": BITS, "group_size": GROUP, "steps": args.steps,
        "threads_per_process": 1, "cpu_count": os.cpu_count(),
        "measured": {"one process": {"seconds": single, "bytes": 0},
                     **{mode: {"seconds": max(r[mode]["seconds"] for r in ranks), "bytes": ranks[0][mode]["bytes"]}
                        for mode in ("replicated", "sharded")}},
        "bytes_per_step": {"resnet18": _formulas(resnet, args.world, _bn_floats("resnet18")),
                           "clip-vit-b32": _formulas(clip_vit_b32_visual_sizes(), args.world, 0)},
    }
    formula = _formulas(resnet, args.world, 0)  # the measured bytes are what the formulas say
    assert report["measured"]["replicated"]["bytes"] == formula["ours, replicated (k x B + 2)"]
    assert report["measured"]["sharded"]["bytes"] == formula[f"ours, sharded over {args.world} (2 x W x L + k x B + 2)"]
    path = Path(args.out or HERE / "results" / f"{machine_slug()}-distributed-step.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, path)

    print(f"one TWA step, ResNet-18 shapes (D = {sum(resnet):,}), k = {K}, {BITS}-bit, {args.world} gloo "
          f"processes on {os.cpu_count()} cores (median of {args.steps})")
    print(f"{'':<14}{'seconds':>10}{'bytes/step/rank':>18}")
    for mode, m in report["measured"].items():
        print(f"{mode:<14}{m['seconds']:>10.3f}{m['bytes']:>18,}")
    for model, table in report["bytes_per_step"].items():
        print(f"\nbytes per step per rank, {model}")
        for scheme, nbytes in table.items():
            print(f"  {scheme:<48}{nbytes:>16,}")
    print(f"\nwrote {path}")


def _bn_floats(model: str) -> int:
    """Floats DDP broadcasts per forward for BatchNorm buffers (running mean and var, plus one
    int64 counter counted as 2 floats), from the bench ResNet-18."""
    from resnet import resnet18

    bns = [m for m in resnet18().modules() if isinstance(m, torch.nn.BatchNorm2d)]
    return sum(2 * m.num_features + 2 for m in bns)


if __name__ == "__main__":
    main()
