"""Peak memory of building a subspace's center and packed basis from checkpoints on disk,
for each caller of the builder: the single-process subspace, the sharded build (one rank),
and a plane's two directions. Each case runs in a fresh process; the number is the growth
of the peak resident size over the process's size just before the build, in MB, next to
W (one dense checkpoint) and the packed basis, so the ratios are comparable. The table
goes to bench/results/<machine>-builder-memory.json with its stamp (machine, date, commit).

    python bench/builder_memory.py [--k 8] [--bits 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/ is not a package: its helpers are imported by path

from stamp import machine_slug, stamp  # noqa: E402

# ResNet-18's convolution and classifier weights: 11.7M parameters, the largest tensor 2.4M
SHAPES = [(64, 3, 7, 7)] + [(64, 64, 3, 3)] * 4 + [(128, 64, 3, 3), (128, 128, 3, 3), (128, 64, 1, 1)] + \
    [(128, 128, 3, 3)] * 2 + [(256, 128, 3, 3), (256, 256, 3, 3), (256, 128, 1, 1)] + [(256, 256, 3, 3)] * 2 + \
    [(512, 256, 3, 3), (512, 512, 3, 3), (512, 256, 1, 1)] + [(512, 512, 3, 3)] * 2 + [(1000, 512), (1000,)]


class Flat(nn.Module):
    def __init__(self, shapes):
        super().__init__()
        self.w = nn.ParameterList([nn.Parameter(torch.zeros(s)) for s in shapes])


CASE = r"""
import json, resource, sys, torch
sys.path.insert(0, {bench!r})
from builder_memory import Flat, SHAPES
import torch.distributed as dist
import twa_kernels as tk
torch.set_num_threads(1)
case, paths, bits = {case!r}, {paths!r}, {bits!r}
model = Flat(SHAPES)
names = [n for n, _ in model.named_parameters()]
shapes = [tuple(p.shape) for p in model.parameters()]
if case == "sharded (1 rank)":
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
before = rss()
base_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if case == "single process":
    sub = tk.Subspace.from_checkpoints(paths, bits=bits, parameter_names=names, parameter_shapes=shapes)
    basis = sub.basis
elif case == "sharded (1 rank)":
    from twa_kernels.distributed import build_shard
    basis = build_shard(paths, dist.group.WORLD, names, shapes, bits=bits).basis
else:
    from twa_kernels.geometry.planes import _frame_from_checkpoints as frame
    basis = frame(model, paths[:3], bits, 128, False)[0].basis
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(dict(grown=max(peak, base_peak) - before, basis=basis.nbytes)))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--json", default=None, help="default: bench/results/<machine>-builder-memory.json")
    args = parser.parse_args()
    info = stamp()
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(args.k):
            gen = torch.Generator().manual_seed(i)
            state = {f"w.{j}": torch.randn(s, generator=gen) for j, s in enumerate(SHAPES)}
            paths.append(os.path.join(tmp, f"ckpt{i}.pt"))
            torch.save(state, paths[-1])
        dense = sum(math.prod(s) for s in SHAPES) * 4
        rows = []
        for case in ("single process", "sharded (1 rank)", "plane (3 checkpoints, 2 directions)"):
            code = CASE.format(bench=os.path.dirname(os.path.abspath(__file__)), case=case, paths=paths,
                               bits=args.bits, port=29500 + os.getpid() % 1000)
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
            if done.returncode:
                raise SystemExit(done.stderr[-3000:])
            out = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(dict(case=case, peak_mb=out["grown"] / 1e6, w_mb=dense / 1e6, basis_mb=out["basis"] / 1e6))
            print(f"{case:38s} peak +{out['grown'] / 1e6:7.1f} MB   W {dense / 1e6:6.1f} MB   "
                  f"basis {out['basis'] / 1e6:6.1f} MB   peak / (W + basis) {out['grown'] / (dense + out['basis']):.2f}")
    path = Path(args.json or HERE / "results" / f"{machine_slug()}-builder-memory.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {"stamp": {**info, "threads": 1}, "k": args.k, "bits": args.bits, "checkpoint": "ResNet-18 shapes, .pt",
              "rows": rows}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)  # a results file is whole or absent
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
