"""Per-rank scenarios for test_distributed.py (gloo on CPU), each run by tests.helpers.spawn
as fn(rank, world) in every process of a group."""

from __future__ import annotations

import gc
import os
import warnings
import weakref
from collections import defaultdict

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tests.helpers import free_port, spawn  # noqa: F401  (test modules launch the scenarios as w.spawn)

K, STEPS, GLOBAL_BATCH, GROUP_SIZE, LR = 4, 4, 12, 8, 0.05


# -- counting every collective this process calls (independent of twa's own counter) ------

SEEN: dict[str, int] = defaultdict(int)


def count_collectives() -> None:
    """Wrap torch.distributed's collectives so that SEEN[name] adds the bytes of each call
    (full-size side: all-reduce tensor, all-gather output, reduce-scatter input). Once per process."""
    if getattr(dist, "_twa_test_counted", False):
        return
    dist._twa_test_counted = True
    def nbytes(t):
        return t.numel() * t.element_size()

    def wrap(name, size):
        original = getattr(dist, name)

        def counted(*args, **kwargs):
            SEEN[name] += size(*args, **kwargs)
            return original(*args, **kwargs)
        setattr(dist, name, counted)

    wrap("all_reduce", lambda t, *a, **k: nbytes(t))
    for name in ("all_gather_into_tensor", "all_gather_single"):
        if hasattr(dist, name):
            wrap(name, lambda out, t, *a, **k: nbytes(out))
    for name in ("reduce_scatter_tensor", "reduce_scatter_single"):
        if hasattr(dist, name):
            wrap(name, lambda out, t, *a, **k: nbytes(t))
    wrap("all_gather", lambda ts, t, *a, **k: sum(nbytes(x) for x in ts))
    wrap("broadcast", lambda t, *a, **k: nbytes(t))
    wrap("_broadcast_coalesced", lambda pg, ts, *a, **k: sum(nbytes(x) for x in ts))


# -- the setup every scenario shares ------------------------------------------------------


def model_and_checkpoints():
    from twa_kernels.demo import make_model
    model = make_model(0)
    gen = torch.Generator().manual_seed(1)
    ckpts = []
    for _ in range(K):
        ckpts.append({k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
                      for k, v in model.state_dict().items()})
    return model, ckpts


def data():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(STEPS, GLOBAL_BATCH, 1, 40, generator=gen)
    y = torch.randint(0, 10, (STEPS, GLOBAL_BATCH), generator=gen)
    return x, y


def micro(x, y, step, rank, world):
    n = GLOBAL_BATCH // world
    return x[step, rank * n : (rank + 1) * n], y[step, rank * n : (rank + 1) * n]


def train_twa(twa, rank, world, split_as=None):
    """STEPS AdamW steps. Distributed (split_as None): this rank's micro-batch. Reference
    (split_as=W): one process runs the W micro-batches of each step and averages their
    gradients, as W ranks with train-mode BatchNorm on their own micro-batches would.
    Returns the bytes twa counted in each step."""
    from twa_kernels import distributed
    x, y = data()
    # eps 1e-3, not 1e-8: Adam's first steps are lr * sign(g) where |g| >> eps, so float32
    # rounding of a near-zero gradient (a different summation order) could flip a whole step
    opt = torch.optim.AdamW(twa.parameters(), lr=LR, eps=1e-3)
    per_step = []
    for step in range(STEPS):
        distributed.reset_comm_bytes(twa)
        opt.zero_grad()
        if split_as is None:
            xb, yb = micro(x, y, step, rank, world)
            F.cross_entropy(twa(xb), yb).backward()
        else:
            for r in range(split_as):
                xb, yb = micro(x, y, step, r, split_as)
                (F.cross_entropy(twa(xb), yb) / split_as).backward()
        opt.step()
        per_step.append(sum(distributed.comm_bytes(twa).values()))
    return per_step


def reference_twa(world):
    import twa_kernels as tk
    model, ckpts = model_and_checkpoints()
    twa = tk.TWA(model, ckpts, bits=4, group_size=GROUP_SIZE)
    train_twa(twa, 0, world, split_as=world)
    return twa


# -- scenarios ----------------------------------------------------------------------------


def dcp_round_trip(twa, build) -> bool:
    """Save the TWA's state with torch.distributed.checkpoint as DCP's own examples do, load it
    into a fresh TWA in place and then with load_state_dict: whether the fresh one has this
    rank's center and the same weights (DCP keeps one copy of a name it takes for the same
    on every rank: a sharded rank's columns must be saved under names of their own)."""
    import shutil
    import tempfile

    import torch.distributed.checkpoint as dcp

    where = [tempfile.mkdtemp(prefix="twa-dcp-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(where)
    try:
        dcp.save({"twa": twa.state_dict()}, checkpoint_id=where[0])
        fresh = build()
        state = {"twa": fresh.state_dict()}
        dcp.load(state, checkpoint_id=where[0])
        fresh.load_state_dict(state["twa"])
        mine, theirs = twa.weights(), fresh.weights()
        dist.barrier()
    finally:  # (a failed rank leaves no folder behind in the system's temporary directory)
        if dist.get_rank() == 0:
            shutil.rmtree(where[0], ignore_errors=True)
    return torch.equal(fresh.center, twa.center) and all(torch.equal(mine[k], theirs[k]) for k in mine)


def dcp_parent_round_trip(twa, build) -> bool:
    """The same through DCP's get_model_state_dict and set_model_state_dict over a module
    holding the TWA (as a training loop saves its whole model), into a fresh one whose
    coefficients differ: whether it ends with this rank's center and the same weights."""
    import shutil
    import tempfile

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    where = [tempfile.mkdtemp(prefix="twa-dcp-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(where)
    try:
        dcp.save({"model": get_model_state_dict(nn.ModuleDict({"twa": twa}))}, checkpoint_id=where[0])
        fresh = build()
        with torch.no_grad():
            fresh.coefficients.add_(1.0)
        holder = nn.ModuleDict({"twa": fresh})
        state = {"model": get_model_state_dict(holder)}
        dcp.load(state, checkpoint_id=where[0])
        set_model_state_dict(holder, state["model"])
        mine, theirs = twa.weights(), fresh.weights()
        dist.barrier()
    finally:
        if dist.get_rank() == 0:
            shutil.rmtree(where[0], ignore_errors=True)
    return (torch.equal(fresh.coefficients, twa.coefficients) and torch.equal(fresh.center, twa.center)
            and all(torch.equal(mine[k], theirs[k]) for k in mine))


def coefficients_over_dcp(path, rank, world):
    """A sharded TWA's coefficients saved by torch.distributed.checkpoint on `world` ranks
    (the first run: trained, then saved), or loaded alone into a TWA sharded over another
    number of ranks (the second): the shards differ, the coefficients are the same [k, B]."""
    import torch.distributed.checkpoint as dcp

    import twa_kernels as tk
    model, ckpts = model_and_checkpoints()
    twa = tk.TWA(model, ckpts, bits=4, group_size=GROUP_SIZE, process_group=dist.group.WORLD, shard=True)
    if not os.path.exists(path):
        train_twa(twa, rank, world)
        dcp.save({"twa": twa.state_dict()}, checkpoint_id=path)
    else:
        dcp.load({"twa": {"coefficients": twa.coefficients}}, checkpoint_id=path)
    return twa.coefficients.detach().clone()


def modes(rank, world):
    """Replicated and sharded training against one process; bytes per step."""
    import twa_kernels as tk
    count_collectives()
    out = {}
    for mode in ("replicated", "sharded"):
        model, ckpts = model_and_checkpoints()
        twa = tk.TWA(model, ckpts, bits=4, group_size=GROUP_SIZE, process_group=dist.group.WORLD,
                     shard=mode == "sharded")
        SEEN.clear()
        per_step = train_twa(twa, rank, world)
        seen = dict(SEEN)
        out[mode] = {"coefficients": twa.coefficients.detach().clone(),
                     "weights": torch.cat([w.detach().reshape(-1) for w in twa.weights().values()]),
                     "bytes_per_step": torch.tensor(per_step), "seen_bytes": torch.tensor(sum(seen.values())),
                     "seen_ops": sorted(seen), "k": twa.coefficients.shape[0], "B": twa.coefficients.shape[1]}
        out[mode]["dcp_round_trip"] = dcp_round_trip(twa, lambda: tk.TWA(
            *model_and_checkpoints(), bits=4, group_size=GROUP_SIZE, process_group=dist.group.WORLD,
            shard=mode == "sharded"))
        out[mode]["dcp_parent_round_trip"] = dcp_parent_round_trip(twa, lambda: tk.TWA(
            *model_and_checkpoints(), bits=4, group_size=GROUP_SIZE, process_group=dist.group.WORLD,
            shard=mode == "sharded"))
        if mode == "sharded":
            out[mode].update(chunk=twa.parallel.chunk, start=twa.parallel.start, stop=twa.parallel.stop,
                             b_lo=twa.parallel.b_lo, b_hi=twa.parallel.b_hi, local_center=twa.center.numel())
            # a rank's own state loads back; another rank's (every rank reading rank 0's file) is refused
            own = {k: v.clone() for k, v in twa.state_dict().items()}
            twa.load_state_dict(own)
            # a rank's file saved before the names carried the rank loads as it did
            twa.load_state_dict({k.removeprefix(f"rank{rank}_"): v for k, v in own.items()})
            out[mode]["own_names"] = sorted(k for k in own if k.startswith(f"rank{rank}_"))
            states = [None] * world
            dist.all_gather_object(states, own)
            try:
                twa.load_state_dict(states[(rank + 1) % world])
                out[mode]["other_rank_state"] = None
            except tk.errors.InvalidArgumentError as exc:
                out[mode]["other_rank_state"] = str(exc)
    if rank == 0:
        ref = reference_twa(world)
        out["reference"] = {"coefficients": ref.coefficients.detach().clone(),
                            "weights": torch.cat([w.detach().reshape(-1) for w in ref.weights().values()])}
        out["D"] = ref.center.numel()
    return out


def bn_and_metrics(rank, world):
    """update_bn over the union of the ranks' batches, and the metric reduction."""
    import twa_kernels as tk
    from twa_kernels import distributed
    model, ckpts = model_and_checkpoints()
    twa = tk.TWA(model, ckpts, bits=4, group_size=GROUP_SIZE, process_group=dist.group.WORLD)
    gen = torch.Generator().manual_seed(3)
    batches = [[torch.randn(5 + r, 1, 40, generator=gen) + r for _ in range(2 + r)] for r in range(world)]
    distributed.update_bn(batches[rank], twa)
    first = [m.running_mean.clone() for m in twa.module.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    with pytest.warns(DeprecationWarning, match="loader first"):  # the former order, still working
        distributed.update_bn(twa, batches[rank])
    assert all(torch.equal(a, m.running_mean) for a, m in
               zip(first, [m for m in twa.module.modules() if isinstance(m, torch.nn.BatchNorm1d)]))
    norms = [m for m in twa.module.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    out = {"mean": [m.running_mean.clone() for m in norms], "var": [m.running_var.clone() for m in norms],
           "metrics": distributed.all_reduce_metrics({"correct": rank + 1, "count": 10 * (rank + 1)} if rank % 2 else
                                                     {"count": 10 * (rank + 1), "correct": torch.tensor(rank + 1)})}
    # a rank whose share is empty still joins the all-reduce, and counts nothing
    distributed.update_bn(batches[0] if rank == 0 else [], twa)
    out["first_share_mean"] = [m.running_mean.clone() for m in norms]
    # no rank has a batch: refused on every rank, the statistics left as they were
    with pytest.raises(tk.errors.InvalidArgumentError, match="no rank's loader yielded a batch"):
        distributed.update_bn([], twa)
    assert all(torch.equal(a, m.running_mean) for a, m in zip(out["first_share_mean"], norms))
    if rank == 0:
        model, ckpts = model_and_checkpoints()
        ref = tk.TWA(model, ckpts, bits=4, group_size=GROUP_SIZE)
        ref.update_bn([b for per_rank in batches for b in per_rank])
        norms = [m for m in ref.module.modules() if isinstance(m, torch.nn.BatchNorm1d)]
        out["ref_mean"] = [m.running_mean.clone() for m in norms]
        out["ref_var"] = [m.running_var.clone() for m in norms]
        ref.update_bn(batches[0])
        out["ref_first_share_mean"] = [m.running_mean.clone() for m in norms]
    return out


def ddp_over_twa(rank, world):
    """DDP wrapping a single-process TWA: same training as one process; the basis buffers
    are never broadcast (a deliberately different center on rank 1 survives DDP)."""
    import twa_kernels as tk
    from torch.nn.parallel import DistributedDataParallel as DDP
    count_collectives()
    model, ckpts = model_and_checkpoints()
    twa = tk.TWA(model, ckpts, bits=4, group_size=GROUP_SIZE)
    own_center = twa.center.clone() + rank  # rank 1's center differs on purpose
    twa.center.copy_(own_center)
    SEEN.clear()
    ddp = DDP(twa)  # DDP's default: broadcast the buffers at construction and before every forward
    x, y = data()
    ddp(x[0, :4]).sum().backward()
    out = {"center_kept": bool(torch.equal(twa.center, own_center)), "broadcast_bytes": SEEN["_broadcast_coalesced"],
           "coefficient_bytes": twa.coefficients.numel() * 4}
    # the control: a TWA that did not tell DDP to ignore its buffers gets rank 0's center
    model, ckpts = model_and_checkpoints()
    twa = tk.TWA(model, ckpts, bits=4, group_size=GROUP_SIZE)
    unshifted = twa.center.clone()  # what rank 0 holds
    twa.center.add_(rank)
    twa._ddp_params_and_buffers_to_ignore = []
    SEEN.clear()
    DDP(twa)
    out["control_center_is_rank0s"] = bool(torch.equal(twa.center, unshifted))
    out["control_broadcast_bytes"] = SEEN["_broadcast_coalesced"]
    out["basis_bytes"] = sum(b.numel() * b.element_size() for b in twa.buffers())
    # training, with identical bases
    model, ckpts = model_and_checkpoints()
    twa = tk.TWA(model, ckpts, bits=4, group_size=GROUP_SIZE)
    train_twa(DDPAsTWA(DDP(twa), twa), rank, world)
    out["coefficients"] = twa.coefficients.detach().clone()
    if rank == 0:
        out["reference"] = reference_twa(world).coefficients.detach().clone()
    # a TWA that averages over its process group itself, inside DDP: averaged twice, said once
    model, ckpts = model_and_checkpoints()
    both = tk.TWA(model, ckpts, bits=4, group_size=GROUP_SIZE, process_group=dist.group.WORLD)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        twice = DDP(both)
        for _ in range(2):
            twice(x[0, :4]).sum().backward()
    out["averaged_twice"] = [str(w.message) for w in caught if "averages them again" in str(w.message)]
    return out


class DDPAsTWA(torch.nn.Module):
    """A DDP-wrapped TWA with the attributes train_twa reads."""

    def __init__(self, ddp, twa):
        super().__init__()
        self.ddp = ddp

    def forward(self, x):
        return self.ddp(x)


def subspace_optimizer_ddp(rank, world):
    """SubspaceOptimizer over a DDP model (projection after DDP's all-reduce) against one
    process averaging the per-rank micro-batch gradients."""
    import twa_kernels as tk
    from torch.nn.parallel import DistributedDataParallel as DDP

    def run(distributed):
        model, ckpts = model_and_checkpoints()
        sub = tk.Subspace.from_checkpoints(ckpts, bits=None, granularity="model", orthonormalize=True,
                                           parameter_names=[n for n, _ in model.named_parameters()])
        model.load_state_dict(sub.unflatten(sub.center), strict=False)
        net = DDP(model) if distributed else model
        opt = tk.SubspaceOptimizer(torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), sub)
        x, y = data()
        for step in range(STEPS):
            opt.zero_grad()
            if distributed:
                xb, yb = micro(x, y, step, rank, world)
                F.cross_entropy(net(xb), yb).backward()
            else:
                for r in range(world):
                    xb, yb = micro(x, y, step, r, world)
                    (F.cross_entropy(net(xb), yb) / world).backward()
            opt.step()
        offset = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - sub.center
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), offset, sub

    weights, offset, sub = run(True)
    out = {"weights": weights, "in_span": float((offset - sub.basis.codes.T @ (sub.basis.codes @ offset)).norm()),
           "moved": float(offset.norm())}
    if rank == 0:
        out["reference"] = run(False)[0]
    return out


def errors(rank, world):
    """Named errors: different bases, too many ranks for the groups, a backend without the
    sharded collectives."""
    import twa_kernels as tk
    from twa_kernels import distributed
    out = {}
    model, ckpts = model_and_checkpoints()
    try:
        tk.TWA(model, ckpts if rank == 0 else ckpts[::-1], bits=4, group_size=GROUP_SIZE,
               process_group=dist.group.WORLD)
    except distributed.BasisMismatchError as exc:
        out["mismatch"] = str(exc)
    # settings that differ on one rank only: every rank names them before any collective pairs wrongly
    model, ckpts = model_and_checkpoints()
    try:
        tk.TWA(model, ckpts, bits=None if rank == 1 else 4, group_size=GROUP_SIZE, int8_gradients=True,
               process_group=dist.group.WORLD)
    except tk.errors.TWAKernelsError as exc:
        out["one_rank"] = f"{type(exc).__name__}: {exc}"
    tiny = torch.nn.Linear(2, 2)
    tiny_ckpts = [{k: v + i for k, v in tiny.state_dict().items()} for i in range(3)]
    try:
        tk.TWA(tiny, tiny_ckpts, bits=4, group_size=8, process_group=dist.group.WORLD, shard=True)
    except distributed.ShardingError as exc:
        out["too_many_ranks"] = str(exc)
    names = [n for n in ("reduce_scatter_tensor", "reduce_scatter_single") if hasattr(dist, n)]
    originals = {n: getattr(dist, n) for n in names}

    def unsupported(*args, **kwargs):
        raise RuntimeError("reduce-scatter is not supported (test stand-in for such a backend)")
    for n in names:
        setattr(dist, n, unsupported)
    try:
        tk.TWA(model, ckpts, bits=4, group_size=GROUP_SIZE, process_group=dist.group.WORLD, shard=True)
    except distributed.ShardingError as exc:
        out["backend"] = str(exc)
    finally:
        for n, f in originals.items():
            setattr(dist, n, f)
    # twa.update_bn on a TWA over ranks: each rank measured its own batches alone, silently
    model, ckpts = model_and_checkpoints()
    twa = tk.TWA(model, ckpts, bits=4, group_size=GROUP_SIZE, process_group=dist.group.WORLD)
    x, _ = data()
    before = [b.clone() for b in model.buffers()]
    try:
        twa.update_bn([x[0]])
    except tk.errors.UsageError as exc:
        out["local_bn"] = str(exc)
    out["local_bn_kept"] = all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    # a whole (unsharded) state loaded into a sharded TWA: named as such, not as another build
    model, ckpts = model_and_checkpoints()
    sharded = tk.TWA(model, ckpts, bits=4, group_size=GROUP_SIZE, process_group=dist.group.WORLD, shard=True)
    try:
        sharded.load_state_dict(twa.state_dict())
    except tk.errors.InvalidArgumentError as exc:
        out["whole_into_shard"] = str(exc)
    # the subspace of a sharded TWA: an inconsistent Subspace was built from this rank's columns
    out["sharded_subspace"] = _error_text(lambda: sharded.subspace)
    # sharded over a group of one rank, the TWA holds every column: its subspace is whole
    solo = dist.new_group([0])
    if rank == 0:
        model, ckpts = model_and_checkpoints()
        one = tk.TWA(model, ckpts, bits=4, group_size=GROUP_SIZE, process_group=solo, shard=True)
        out["one_rank_subspace"] = one.subspace.center.numel() == one.center.numel()
    return out


def int8_gradients(rank, world):
    """One backward with int8_gradients, replicated and sharded, and what each should give:
    replicated ranks round their own weight gradients, then average the projections;
    sharded ranks reduce-scatter the weight gradients first, so the mean gradient is rounded."""
    import twa_kernels as tk
    from torch.func import functional_call
    x, y = data()
    xb, yb = micro(x, y, 0, rank, world)
    model, ckpts = model_and_checkpoints()
    plain = tk.TWA(model, ckpts, bits=4, group_size=GROUP_SIZE)  # this process alone
    with torch.no_grad():
        plain.coefficients.normal_(0, 0.3, generator=torch.Generator().manual_seed(4))
    weights = {name: v.detach().requires_grad_() for name, v in plain.weights().items()}
    F.cross_entropy(functional_call(plain.module, weights, (xb,)), yb).backward()
    g = torch.cat([weights[name].grad.reshape(-1) for name in plain.names])
    mean_g = g.clone()
    dist.all_reduce(mean_g)
    mean_g /= world
    own = tk.project_int8(plain.basis, g)
    dist.all_reduce(own)
    out = {"expected": {"replicated": own / world, "sharded": tk.project_int8(plain.basis, mean_g)},
           "float": tk.project(plain.basis, mean_g)}
    for mode in ("replicated", "sharded"):
        model, ckpts = model_and_checkpoints()
        twa = tk.TWA(model, ckpts, bits=4, group_size=GROUP_SIZE, process_group=dist.group.WORLD,
                     shard=mode == "sharded", int8_gradients=True)
        with torch.no_grad():
            twa.coefficients.copy_(plain.coefficients)
        F.cross_entropy(twa(xb), yb).backward()
        out[mode] = twa.coefficients.grad.clone()
    return out


def all_scenarios(rank, world):
    out = {"modes": modes(rank, world), "int8": int8_gradients(rank, world)}
    if world == 2:  # the rest at 2 ranks only (CI time)
        out.update(bn=bn_and_metrics(rank, world), errors=errors(rank, world))
    return out


def ddp_scenarios(rank, world):
    return {"ddp": ddp_over_twa(rank, world), "psgd": subspace_optimizer_ddp(rank, world)}


# -- building from this rank's columns ----------------------------------------------------


def big_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(1000, 2000), torch.nn.Linear(2000, 1000))  # 4.0M weights


def write_checkpoints(folder: str, count: int = 10) -> int:
    """count checkpoints of big_model: safetensors, the last two as .pt (read with mmap).
    Returns their total bytes."""
    from safetensors.torch import save_file
    model, gen, total = big_model(), torch.Generator().manual_seed(4), 0
    for i in range(count):
        state = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
        path = os.path.join(folder, f"ckpt{i}.{'pt' if i >= count - 2 else 'safetensors'}")
        torch.save(state, path) if path.endswith(".pt") else save_file(state, path)
        total += os.path.getsize(path)
    return total


def _reset_peak() -> int:
    """Reset this process's peak RSS (VmHWM; Linux clear_refs 5) and return the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _peak_rss() -> int:
    return _status("VmHWM")


def write_dcp(folder: str, dcp_folder: str, count: int = 2) -> None:
    """The first `count` safetensors checkpoints again, as torch.distributed.checkpoint
    directories of {"model": state_dict} (the layout FSDP users save)."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    for i in range(count):
        state = load_file(os.path.join(folder, f"ckpt{i}.safetensors"))
        dcp.save({"model": state}, checkpoint_id=os.path.join(dcp_folder, f"dcp{i}"), no_dist=True)


def sharded_build(folder, dcp_folder, rank, world):
    """TWA(shard=True) from files: peak memory growth of the build, and the shard itself;
    rank 0 also builds the whole subspace in one process (after, for the comparison)."""
    import twa_kernels as tk
    from twa_kernels import distributed
    model = big_model()
    before = _reset_peak()
    twa = tk.TWA(model, folder, bits=4, group_size=128, process_group=dist.group.WORLD, shard=True)
    out = {"grown": _peak_rss() - before, "center": twa.center.clone(), "start": twa.parallel.start,
           "stop": twa.parallel.stop, "B": twa.coefficients.shape[1],
           "basis": {k: v.clone() for k, v in twa.basis.state_dict().items()}}
    twa.coefficients.data.normal_(generator=torch.Generator().manual_seed(9))
    out["weights"] = torch.cat([w.reshape(-1) for w in twa.weights().values()]).detach()
    del twa
    if rank == 0:
        before = _reset_peak()
        names = [n for n, _ in model.named_parameters()]
        full = tk.Subspace.from_checkpoints(folder, bits=4, group_size=128, parameter_names=names)
        out["full_grown"] = _peak_rss() - before
        edges = distributed.shard_columns(full.num_weights, 128, world)
        out["full_shards"] = []
        for start, stop in zip(edges[:-1], edges[1:]):
            local, _, _ = distributed.slice_basis(full.basis, start, stop)
            out["full_shards"].append({"center": full.center[start:stop].clone(),
                                       "basis": {k: v.clone() for k, v in local.state_dict().items()}})
        x = torch.randn(full.basis.k, full.basis.num_blocks, generator=torch.Generator().manual_seed(9))
        out["full_weights"] = tk.reconstruct(full.basis, x, full.center)
    # DCP directories give the very shard the same states as safetensors give
    model = big_model()
    names, shapes = [n for n, _ in model.named_parameters()], [tuple(p.shape) for p in model.parameters()]
    from_dcp = distributed.build_shard([os.path.join(dcp_folder, f"dcp{i}") for i in range(2)], dist.group.WORLD,
                                       names, shapes)
    from_files = distributed.build_shard([os.path.join(folder, f"ckpt{i}.safetensors") for i in range(2)],
                                         dist.group.WORLD, names, shapes)
    out["dcp_equal"] = torch.equal(from_dcp.center, from_files.center) and all(
        torch.equal(a, b) for a, b in zip(from_dcp.basis.state_dict().values(), from_files.basis.state_dict().values()))
    # a rank with a different checkpoint list: a named error on every rank
    files = sorted(os.listdir(folder))
    mine = [os.path.join(folder, f) for f in (files if rank == 0 else files[1:])]
    try:
        tk.TWA(big_model(), mine, bits=4, process_group=dist.group.WORLD, shard=True)
    except distributed.CheckpointListMismatchError as exc:
        out["list_error"] = str(exc)
    return out


# -- hostile and inconsistent checkpoints under a process group ---------------------------


def _save_small_checkpoints(folder: str, seed: int = 0) -> list[str]:
    """The K checkpoints of model_and_checkpoints() as files: safetensors and .pt alternating
    (the two formats read by column); `seed` != 0 perturbs them (another run's files)."""
    from twa_kernels.io import save_state_dict
    _, ckpts = model_and_checkpoints()
    gen = torch.Generator().manual_seed(seed)
    names = []
    for i, state in enumerate(ckpts):
        if seed:
            state = {k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                     for k, v in state.items()}
        name = f"c{i}.{'safetensors' if i % 2 == 0 else 'pt'}"
        save_state_dict(state, os.path.join(folder, name))
        names.append(name)
    return names


def _norm_state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def bn_hostile(rank: int, world: int) -> dict:
    """distributed.update_bn with a frozen BatchNorm layer, SyncBatchNorm layers and uneven
    shares, a DDP-wrapped TWA, a pass that fails on one rank, and init_from_environment
    under a group that a launcher other than torchrun made."""
    import twa_kernels as tk
    from twa_kernels import distributed
    out = {}
    gen = torch.Generator().manual_seed(3)
    batches = [[torch.randn(5 + r, 1, 40, generator=gen) + r for _ in range(3 - 2 * r)] for r in range(world)]
    everything = [b for share in batches for b in share]

    def twa_over(model, ckpts, group=dist.group.WORLD):
        return tk.TWA(model, ckpts, bits=4, group_size=GROUP_SIZE, process_group=group)

    # the first BatchNorm frozen: kept as it is (its batch count was multiplied by the world
    # size), the others equal to one process over every rank's batches
    model, ckpts = model_and_checkpoints()
    with torch.no_grad():
        model[1].running_mean.fill_(2.0)
        model[1].num_batches_tracked.fill_(100)
    twa = twa_over(model, ckpts)
    frozen_before = {k: v.clone() for k, v in model[1].state_dict().items()}
    distributed.update_bn(batches[rank], twa, frozen_norms=["1"])
    out["frozen_kept"] = all(torch.equal(v, frozen_before[k]) for k, v in model[1].state_dict().items())
    out["frozen_measured"] = _norm_state(model)
    # SyncBatchNorm layers, uneven shares: their per-batch collectives never paired up (a
    # hang), and on the CPU they refused to run
    sync_model, sync_ckpts = model_and_checkpoints()
    sync_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(sync_model)
    sync = twa_over(sync_model, sync_ckpts)
    distributed.update_bn(batches[rank], sync)
    out["sync_measured"] = _norm_state(sync_model)
    # a TWA wrapped in DDP, as training it under DDP does
    ddp_model, ddp_ckpts = model_and_checkpoints()
    ddp = torch.nn.parallel.DistributedDataParallel(twa_over(ddp_model, ddp_ckpts))
    distributed.update_bn(batches[rank], ddp)
    out["ddp_measured"] = _norm_state(ddp_model)
    out["plain_on_ddp"] = _error_text(lambda: tk.update_bn(batches[rank], ddp))
    # a pass that fails on rank 1 only (its batch has two channels): every rank stops with
    # the reason (rank 0 waited in the all-reduce until the timeout), its statistics as they were
    fail_model, fail_ckpts = model_and_checkpoints()
    fail = twa_over(fail_model, fail_ckpts)
    before = _norm_state(fail_model)
    out["one_rank_fails"] = _error_text(
        lambda: distributed.update_bn([torch.randn(4, 2 if rank == 1 else 1, 40)], fail))
    out["kept_after_failure"] = all(torch.equal(v, before[k]) for k, v in _norm_state(fail_model).items())
    # ranks that measure other layers (a frozen_norms given on one rank only): every rank
    # stops with the reason, its statistics as they were (rank 1 waited in an all-reduce of
    # another length until the timeout, or paired it with the next collective)
    odd_model, odd_ckpts = model_and_checkpoints()
    odd = twa_over(odd_model, odd_ckpts)
    before = _norm_state(odd_model)
    out["other_layers"] = _error_text(
        lambda: distributed.update_bn(batches[0], odd, frozen_norms=["1"] if rank == 0 else []))
    out["kept_after_other_layers"] = all(torch.equal(v, before[k]) for k, v in _norm_state(odd_model).items())
    # every BatchNorm frozen: nothing to measure, so nothing to refuse (it raised "no rank's
    # loader yielded a batch" although they had)
    all_model, all_ckpts = model_and_checkpoints()
    every = [name for name, m in all_model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    all_frozen = twa_over(all_model, all_ckpts)
    before = _norm_state(all_model)
    out["all_frozen"] = _error_text(lambda: distributed.update_bn(batches[rank], all_frozen,
                                                                  frozen_norms=iter(every)))
    out["kept_all_frozen"] = all(torch.equal(v, before[k]) for k, v in _norm_state(all_model).items())
    # a misspelt frozen_norms on rank 1 only: rank 0 waited in the layout check until the timeout
    out["misspelt_one_rank"] = _error_text(lambda: distributed.all_reduce_bn_statistics(
        all_model, dist.group.WORLD, frozen_norms=["nope"] if rank == 1 else []))
    # a subspace refused on one rank (a NaN in its center): both ranks stop at once
    sub_model, sub_ckpts = model_and_checkpoints()
    names = [n for n, _ in sub_model.named_parameters()]
    subspace = tk.Subspace.from_checkpoints(sub_ckpts, bits=4, group_size=GROUP_SIZE, parameter_names=names)
    if rank == 1:
        subspace.center[0] = float("nan")
    out["nan_subspace"] = _error_text(lambda: twa_over(sub_model, subspace))
    # a group made by another launcher (mp.spawn, init_method=tcp://...) without WORLD_SIZE
    saved = os.environ.pop("WORLD_SIZE", None)
    try:
        out["init_existing"] = distributed.init_from_environment() is dist.group.WORLD
    finally:
        if saved is not None:
            os.environ["WORLD_SIZE"] = saved
    # a layer that rank 1's rows never reach, and one that no rank reaches: the first was
    # restored on rank 1 with its old statistics and batch count (1000), which the all-reduce
    # then weighed against rank 0's measurement; the second keeps its statistics, with a warning
    branch_batches = [torch.randn(6, 3, generator=gen).abs().add(0.1) * (1 if r == 0 else -1) for r in range(world)]
    out["branch"], out["branch_warned"] = _branch_pass(lambda m, c: twa_over(m, c), [branch_batches[rank]],
                                                       distributed.update_bn)
    if rank == 0:
        out["ref_branch"], _ = _branch_pass(lambda m, c: tk.TWA(m, c, bits=4, group_size=GROUP_SIZE),
                                            branch_batches, lambda data, twa: twa.update_bn(data))
    if rank == 0:  # one process over every rank's batches
        ref_model, ref_ckpts = model_and_checkpoints()
        with torch.no_grad():
            ref_model[1].running_mean.fill_(2.0)
            ref_model[1].num_batches_tracked.fill_(100)
        ref = tk.TWA(ref_model, ref_ckpts, bits=4, group_size=GROUP_SIZE)
        ref.update_bn(everything, frozen_norms=["1"])
        out["ref_frozen"] = _norm_state(ref_model)
        plain_model, plain_ckpts = model_and_checkpoints()
        tk.TWA(plain_model, plain_ckpts, bits=4, group_size=GROUP_SIZE).update_bn(everything)
        out["ref_plain"] = _norm_state(plain_model)
    return out


class _Branch(torch.nn.Module):
    """A BatchNorm layer that sees the rows whose first input is positive, and one that the
    forward never reaches."""

    def __init__(self):
        super().__init__()
        self.lin, self.bn, self.never = torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.lin(x)[x[:, 0] > 0])


def _branch_pass(build, batches, update_bn) -> tuple[dict, bool]:
    """The statistics of a _Branch TWA after update_bn(batches, twa), and whether it warned
    that a layer saw none of the batches."""
    torch.manual_seed(0)
    model = _Branch()
    ckpts = [{k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v.clone()
              for k, v in model.state_dict().items()} for _ in range(3)]
    with torch.no_grad():
        model.bn.running_mean.fill_(100.0), model.bn.num_batches_tracked.fill_(1000)
        model.never.running_mean.fill_(7.0), model.never.num_batches_tracked.fill_(5)
    twa = build(model, ckpts)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        update_bn(batches, twa)
    return _norm_state(model), any("['never'] saw none of the" in str(w.message) for w in caught)


def _error_text(fn) -> str | None:
    """`Type: message` of what fn() raised, None if it returned."""
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def hostile_scenarios(root: str, rank: int, world: int) -> dict:
    """Each rank works in root/rank<r> (its own disk); the checkpoint paths are relative, so
    every rank is given the same list. Returns each scenario's error text on this rank."""
    import twa_kernels as tk
    from twa_kernels import distributed
    model, _ = model_and_checkpoints()
    own = os.path.join(root, f"rank{rank}")
    out = {}
    cwd = os.getcwd()
    os.chdir(own)
    try:
        def twa(folder, shard=True):
            files = [os.path.join(folder, n) for n in sorted(os.listdir(folder))]
            return lambda: tk.TWA(model, files, bits=4, group_size=GROUP_SIZE, process_group=dist.group.WORLD,
                                  shard=shard)
        # identical copies on both ranks: no error (the check has no false positives)
        out["same_copies"] = _error_text(twa("same"))
        # rank 1's copies of c0.safetensors and c1.pt hold other weights (same names, shapes, sizes)
        out["different_copies"] = _error_text(twa("different"))
        # rank 1's c1.pt is not a checkpoint at all: its own error, and rank 0 names it
        out["corrupt_sharded"] = _error_text(twa("corrupt"))
        out["corrupt_replicated"] = _error_text(twa("corrupt", shard=False))
        # a DCP checkpoint whose .metadata would create a marker file when unpickled
        out["dcp_payload"] = _error_text(twa("dcp"))
        out["marker_exists"] = os.path.exists(os.path.join(root, "MARKER"))
        # the same files, built with other settings on rank 1: a shard quantised another way
        # trained silently, and another group size aborted the process at the first forward
        files = [os.path.join("same", n) for n in sorted(os.listdir("same"))]
        for setting, value in (("bits", 2), ("group_size", GROUP_SIZE * 2), ("granularity", "model")):
            settings = dict(bits=4, group_size=GROUP_SIZE, granularity="tensor")
            if rank == 1:
                settings[setting] = value
            out[f"settings_{setting}"] = _error_text(
                lambda: tk.TWA(model, files, process_group=dist.group.WORLD, shard=True, **settings))
        # rank 1's model in bfloat16: it built, and its gradients were of that precision
        for shard in (False, True):
            cast_model, cast_ckpts = model_and_checkpoints()
            if rank == 1:
                cast_model.to(torch.bfloat16)
            out[f"dtype_{shard}"] = _error_text(lambda: tk.TWA(cast_model, cast_ckpts, bits=4, group_size=GROUP_SIZE,
                                                               process_group=dist.group.WORLD, shard=shard))
        # shard=True on rank 0 only: the two build paths' collectives paired wrongly and gloo
        # aborted the process
        out["settings_shard"] = _error_text(
            lambda: tk.TWA(model, files, bits=4, group_size=GROUP_SIZE, process_group=dist.group.WORLD,
                           shard=rank == 0))
        # a frozen layer whose checkpoint values differ on rank 1: each rank trained on its own backbone
        frozen_model, frozen_ckpts = model_and_checkpoints()
        first = next(name for name, p in frozen_model.named_parameters() if p.dim() > 1)
        frozen_model.get_parameter(first).requires_grad_(False)
        for state in frozen_ckpts:
            state[first] = frozen_model.state_dict()[first] + (1.0 if rank == 1 else 0.0)
        for shard in (False, True):
            out[f"frozen_differ_{shard}"] = _error_text(
                lambda: tk.TWA(frozen_model, frozen_ckpts, bits=4, group_size=GROUP_SIZE,
                               process_group=dist.group.WORLD, shard=shard))
        out["frozen_name"] = first
        # coefficients replaced by load_state_dict(assign=True): their gradient was no longer averaged
        replaced, replaced_ckpts = model_and_checkpoints()
        assigned = tk.TWA(replaced, replaced_ckpts, bits=4, group_size=GROUP_SIZE, process_group=dist.group.WORLD)
        assigned.load_state_dict({k: v.clone() for k, v in assigned.state_dict().items()}, assign=True)
        x, y = data()
        torch.nn.functional.cross_entropy(assigned(x[0][rank::2]), y[0][rank::2]).backward()
        out["assigned_grad"] = assigned.coefficients.grad.clone()
        # copy.deepcopy (a best-model snapshot, AveragedModel) raised pickle's TypeError on the
        # process group; a copy that shared it trained on each rank's own gradient
        import copy
        import functools
        import io

        snapshot = copy.deepcopy(assigned)
        torch.nn.functional.cross_entropy(snapshot(x[0][rank::2]), y[0][rank::2]).backward()
        out["copy_grad"] = snapshot.coefficients.grad.clone()
        out["pickled"] = _error_text(functools.partial(torch.save, snapshot, io.BytesIO()))
        del snapshot
        # the same two through torch.compile, whose forward never reached the eager path that
        # attached the averaging hook: each rank trained on its own gradient
        for case in ("assigned", "copy"):
            fresh_model, fresh_ckpts = model_and_checkpoints()
            fresh = tk.TWA(fresh_model, fresh_ckpts, bits=4, group_size=GROUP_SIZE, process_group=dist.group.WORLD)
            if case == "assigned":
                fresh.load_state_dict({k: v.clone() for k, v in fresh.state_dict().items()}, assign=True)
            else:
                fresh = copy.deepcopy(fresh)
            compiled = torch.compile(fresh, backend="eager")
            torch.nn.functional.cross_entropy(compiled(x[0][rank::2]), y[0][rank::2]).backward()
            out[f"compiled_{case}_grad"] = fresh.coefficients.grad.clone()
        # a snapshot of frozen coefficients: copying one failed on registering the hook; unfrozen
        # again, the copy averages its gradient
        frozen_model, frozen_ckpts = model_and_checkpoints()
        frozen = tk.TWA(frozen_model, frozen_ckpts, bits=4, group_size=GROUP_SIZE, process_group=dist.group.WORLD)
        frozen.coefficients.requires_grad_(False)
        out["frozen_copy"] = _error_text(lambda: copy.deepcopy(frozen))
        thawed = copy.deepcopy(frozen)
        thawed.coefficients.requires_grad_(True)
        torch.nn.functional.cross_entropy(thawed(x[0][rank::2]), y[0][rank::2]).backward()
        out["thawed_copy_grad"] = thawed.coefficients.grad.clone()
        # DDP over a TWA whose coefficients were then replaced: DDP averaged the old Parameter,
        # and each rank trained its own, silently
        from torch.nn.parallel import DistributedDataParallel

        ddp_model, ddp_ckpts = model_and_checkpoints()
        ddp_twa = tk.TWA(ddp_model, ddp_ckpts, bits=4, group_size=GROUP_SIZE)
        wrapped = DistributedDataParallel(ddp_twa)
        ddp_twa.load_state_dict({k: v.clone() for k, v in ddp_twa.state_dict().items()}, assign=True)
        out["ddp_assigned"] = _error_text(lambda: wrapped(x[0][rank::2]))
        del wrapped, ddp_twa
        # an optimizer over a replicated TWA's coefficients kept the TWA's strategy, and with it
        # the process group, alive after the TWA was deleted
        optimizer = torch.optim.SGD(assigned.parameters(), lr=0.1)
        strategy = weakref.ref(assigned._parallel)
        # a graph through the TWA holds it; one through its coefficients alone does not
        pending = assigned.coefficients.square().sum()
        del assigned
        gc.collect()
        out["strategy_outlives_twa"] = strategy() is not None
        out["backward_after_twa"] = _error_text(pending.backward)
        del optimizer, pending
        # gradient accumulation over two backwards on rank 0 only: its second backward's
        # all-reduce paired with rank 1's second step, and the ranks trained apart silently
        def two_batches(shard, accumulate_on):
            uneven_model, uneven_ckpts = model_and_checkpoints()
            twa = tk.TWA(uneven_model, uneven_ckpts, bits=4, group_size=GROUP_SIZE, process_group=dist.group.WORLD,
                         shard=shard)
            optimizer = torch.optim.SGD(twa.parameters(), lr=0.1)
            for batch in range(2):
                torch.nn.functional.cross_entropy(twa(x[batch][rank::2]), y[batch][rank::2]).backward()
                if rank not in accumulate_on or batch == 1:
                    optimizer.step()

        for shard in (False, True):
            out[f"uneven_accumulation_{shard}"] = _error_text(lambda: two_batches(shard, accumulate_on=[0]))
            # the same accumulation on every rank is no mismatch
            out[f"even_accumulation_{shard}"] = _error_text(lambda: two_batches(shard, accumulate_on=[0, 1]))
        # an argument refused on rank 1 only: rank 0 stopped waiting in the build's collectives
        # until the timeout; now both leave together
        out["bad_arg_one_rank"] = _error_text(lambda: tk.TWA(model, files, bits=3 if rank == 1 else 4,
                                                             process_group=dist.group.WORLD))
        # a checkpoint folder missing on rank 1 only: rank 0 waited in the build's first
        # collective until the timeout, which named no cause
        for shard in (False, True):
            out[f"missing_one_rank_{shard}"] = _error_text(lambda: tk.TWA(
                model, files if rank == 0 else os.path.join(os.path.dirname(files[0]), "nowhere"),
                process_group=dist.group.WORLD, shard=shard))
        # a process group that is not one: named before any checkpoint is read
        out["group_type"] = _error_text(lambda: tk.TWA(model, files, process_group="world"))
        metrics = {"loss": 1.5 * (rank + 1), "count": 2}
        out["metrics"] = distributed.all_reduce_metrics(metrics)
        # other names on rank 1: summed into rank 0's names; a key more: a hang
        for case, theirs in (("renamed", {"loss": 1.0, "n": 2}), ("extra", {**metrics, "correct": 1}),
                             ("not_a_number", {"loss": "high", "count": 2})):
            out[f"metrics_{case}"] = _error_text(
                lambda: distributed.all_reduce_metrics(theirs if rank == 1 else metrics))
        # each rank given its own share (pre-sharded data): the split waited in a collective
        # until the timeout, then named no cause
        n = 40 if rank == 0 else 24
        share = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(n, 3), torch.zeros(n)),
                                            batch_size=8, shuffle=True)
        out["own_share_train"] = _error_text(lambda: distributed.split_loader(share, dist.group.WORLD))
        out["own_share_eval"] = _error_text(lambda: distributed.split_for_evaluation(share, dist.group.WORLD))
        # the same sizes, drawn otherwise: samples were seen twice and others never, silently
        twenty = torch.utils.data.TensorDataset(torch.randn(20, 3), torch.zeros(20))
        same = torch.utils.data.DataLoader(twenty, batch_size=4, shuffle=True)
        out["own_seed"] = _error_text(lambda: distributed.split_loader(same, dist.group.WORLD, seed=1234 + rank))
        one_shuffles = torch.utils.data.DataLoader(twenty, batch_size=4, shuffle=rank == 0)
        out["one_shuffles"] = _error_text(lambda: distributed.split_loader(one_shuffles, dist.group.WORLD))
        subset = torch.utils.data.DataLoader(twenty, batch_size=4, sampler=torch.utils.data.SubsetRandomSampler(
            list(range(rank, rank + 10))))
        out["own_subset"] = _error_text(lambda: distributed.split_loader(subset, dist.group.WORLD))
        out["same_seed"] = len(distributed.split_loader(same, dist.group.WORLD, seed=7))
        unshuffled = torch.utils.data.DataLoader(twenty, batch_size=4)  # a seed it never uses may differ
        out["unshuffled_own_seed"] = len(distributed.split_loader(unshuffled, dist.group.WORLD, seed=100 + rank))
        # a run after the failures: every rank left each failed step together, so the
        # process group is still usable
        out["after"] = _error_text(twa("same"))
        out["bn"] = bn_hostile(rank, world)
        # an evaluation's shares: every sample once (split_loader repeats samples to even
        # them out, or drops the batches past len // W)
        samples = torch.utils.data.TensorDataset(torch.arange(7.0))
        loader = torch.utils.data.DataLoader(samples, batch_size=2, shuffle=True)
        out["eval_samples"] = [float(v) for (b,) in distributed.split_for_evaluation(loader) for v in b]
        out["eval_batches"] = [int(b) for b in distributed.split_for_evaluation([10, 11, 12])]
        out.update(sampler_splits())
        out.update(training_alone(rank))
    finally:
        os.chdir(cwd)
    return out


def training_alone(rank: int) -> dict:
    """A TWA without a process group in a 2-rank job (process_group=dist.group.WORLD taken
    before init_process_group is None): each rank trained its own coefficients, silently.
    Inside DDP that is how it is meant to be used. And a rank outside a dist.new_group."""
    import twa_kernels as tk
    out = {}
    x, y = data()

    def warnings_of(module) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                torch.nn.functional.cross_entropy(module(x[0][rank::2]), y[0][rank::2]).backward()
        return [str(w.message) for w in caught if "trains coefficients of its own" in str(w.message)]

    model, ckpts = model_and_checkpoints()
    out["alone"] = warnings_of(tk.TWA(model, ckpts, bits=4, group_size=GROUP_SIZE))
    model, ckpts = model_and_checkpoints()
    ddp = torch.nn.parallel.DistributedDataParallel(tk.TWA(model, ckpts, bits=4, group_size=GROUP_SIZE))
    out["in_ddp"] = warnings_of(ddp)
    model, ckpts = model_and_checkpoints()
    out["with_group"] = warnings_of(tk.TWA(model, ckpts, bits=4, group_size=GROUP_SIZE, process_group=dist.group.WORLD))
    only_rank0 = dist.new_group([0])  # every rank calls new_group; rank 1 gets the non-member marker
    if rank == 1:
        out["non_member"] = _error_text(lambda: tk.TWA(model, ckpts, bits=4, process_group=only_rank0))
    return out


class _Stream(torch.utils.data.IterableDataset):
    """An iterable dataset of 0 .. n - 1, without a length."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        return iter(torch.arange(float(self.n)))


class _SizedStream(_Stream):
    """The same with a length."""

    def __len__(self):
        return self.n


def sampler_splits() -> dict:
    """split_loader and split_for_evaluation over samplers other than the plain two, and
    over iterable datasets: a train/validation split of one dataset by SubsetRandomSampler
    was split over the whole dataset, so the validation loss counted the training samples."""
    from twa_kernels import distributed
    out = {}
    samples = torch.utils.data.TensorDataset(torch.arange(10.0))
    subset = torch.utils.data.SubsetRandomSampler([0, 1, 2, 3, 7])
    loader = torch.utils.data.DataLoader(samples, batch_size=2, sampler=subset)
    out["subset_eval"] = [float(v) for (b,) in distributed.split_for_evaluation(loader) for v in b]
    # drop_last=True: each rank's share dropped its own last partial batch, 6 of the 9 kept
    dropping = torch.utils.data.DataLoader(samples, batch_size=3, drop_last=True)
    out["drop_last_eval"] = [float(v) for (b,) in distributed.split_for_evaluation(dropping) for v in b]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a sampler it keeps is not warned about
        out["subset_train"] = [float(v) for (b,) in distributed.split_loader(loader, dist.group.WORLD) for v in b]
    weighted = torch.utils.data.WeightedRandomSampler([1.0] * 10, 10)
    out["weighted_eval"] = _error_text(lambda: distributed.split_for_evaluation(
        torch.utils.data.DataLoader(samples, batch_size=2, sampler=weighted)))
    # a shuffled split drew from seed 0 whatever torch.manual_seed said; the ranks seed
    # differently here, and rank 0's draw is the one they share
    shuffled = torch.utils.data.DataLoader(samples, batch_size=10, shuffle=True)
    orders = []
    for seed in (1, 2, 1):
        torch.manual_seed(seed + 100 * dist.get_rank())
        orders.append([float(v) for (b,) in distributed.split_loader(shuffled, dist.group.WORLD) for v in b])
    out["orders"] = orders
    sized = torch.utils.data.DataLoader(_SizedStream(6), batch_size=2)
    out["stream_train"] = [float(v) for b in distributed.split_loader(sized, dist.group.WORLD) for v in b]
    out["stream_eval"] = [float(v) for b in distributed.split_for_evaluation(sized) for v in b]
    unsized = torch.utils.data.DataLoader(_Stream(6), batch_size=2)
    out["unsized_train"] = _error_text(lambda: distributed.split_loader(unsized, dist.group.WORLD))
    out["unsized_eval"] = _error_text(lambda: distributed.split_for_evaluation(unsized))
    return out


class _MarkerPayload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_hostile_checkpoints(root: str, world: int) -> None:
    """root/rank<r>/{same,different,corrupt,dcp}/ for each rank (see hostile_scenarios)."""
    import pickle
    import shutil

    import torch.distributed.checkpoint as dcp
    import warnings
    from twa_kernels.io import load_state_dict
    for rank in range(world):
        base = os.path.join(root, f"rank{rank}")
        for sub in ("same", "different", "corrupt", "dcp"):
            os.makedirs(os.path.join(base, sub))
        _save_small_checkpoints(os.path.join(base, "same"))
        names = _save_small_checkpoints(os.path.join(base, "different"))
        if rank == 1:
            other = os.path.join(root, "other")
            _save_small_checkpoints(other, seed=5)
            for name in names[:2]:
                shutil.copyfile(os.path.join(other, name), os.path.join(base, "different", name))
        _save_small_checkpoints(os.path.join(base, "corrupt"))
        if rank == 1:
            with open(os.path.join(base, "corrupt", "c1.pt"), "wb") as f:
                f.write(b"not a checkpoint" * 64)
        for i, name in enumerate(names):
            state = load_state_dict(os.path.join(base, "same", name))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.save({"model": state}, checkpoint_id=os.path.join(base, "dcp", f"d{i}"), no_dist=True)
        with open(os.path.join(base, "dcp", "d1", ".metadata"), "wb") as f:
            pickle.dump(_MarkerPayload(os.path.join(root, "MARKER")), f)


# -- activation checkpointing over a replicated process group ---------------------------------


def reentrant_replicated(rank: int, world: int) -> dict:
    """Coefficient gradients of a replicated TWA over a model checkpointed as a whole
    (a reentrant recomputation's gradients reach the coefficients only after the graph's
    own projection), with and without checkpointing, each rank on its own batch."""
    import torch.nn as nn
    from torch.utils.checkpoint import checkpoint

    import twa_kernels as tk

    class Whole(nn.Module):
        def __init__(self, reentrant: bool):
            super().__init__()
            torch.manual_seed(1)
            self.net = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))
            self.reentrant = reentrant

        def forward(self, x):
            return checkpoint(self.net, x, use_reentrant=True) if self.reentrant else self.net(x)

    gen = torch.Generator().manual_seed(0)
    base = Whole(False).state_dict()
    states = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(3)]
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(10 + rank)).requires_grad_()
    grads = {}
    for reentrant in (False, True):
        twa = tk.TWA(Whole(reentrant), states, bits=4, group_size=8, process_group=dist.group.WORLD)
        with torch.no_grad():
            twa.coefficients.copy_(torch.linspace(-0.5, 0.5, twa.coefficients.numel()).view_as(twa.coefficients))
        twa(x).pow(2).mean().backward()
        grads["reentrant" if reentrant else "plain"] = twa.coefficients.grad.clone()
    return grads


def reentrant_under_ddp(rank: int, world: int) -> dict:
    """Coefficient gradients of a TWA inside DistributedDataParallel over a model whose
    weights are used only inside reentrant checkpoints (LoRA under gradient checkpointing),
    with and without checkpointing, each rank on its own batches: DDP(twa) for one backward
    and for two micro-batches accumulated under no_sync; and a TWA inside a module with a
    head under find_unused_parameters=True, whose graph differs by rank: rank 1 skips the
    TWA's weights once (an output with no graph), and rank 0 once uses a weight beside the
    checkpoints too."""
    import torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.checkpoint import checkpoint

    import twa_kernels as tk

    class Net(nn.Module):
        def __init__(self, reentrant: bool):
            super().__init__()
            torch.manual_seed(1)
            self.a, self.b = nn.Sequential(nn.Linear(6, 10), nn.Tanh()), nn.Linear(10, 3)
            self.reentrant = reentrant

        def run(self, block, x):
            return checkpoint(block, x, use_reentrant=True) if self.reentrant else block(x)

        def forward(self, x, use="inside"):
            if use == "skip":
                return x.detach()[:, :3] * 1.0
            out = self.run(self.b, self.run(self.a, x))
            return out + 0.1 * self.b.weight.sum() if use == "beside" else out

    class WithHead(nn.Module):
        def __init__(self, twa):
            super().__init__()
            self.twa, self.head = twa, nn.Linear(3, 3)

        def forward(self, x, use="inside"):
            return self.head(self.twa(x, use))

    gen = torch.Generator().manual_seed(0)
    base = Net(False).state_dict()
    states = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(3)]
    xs = torch.randn(3, 8, 6, generator=torch.Generator().manual_seed(10 + rank)).requires_grad_()
    grads = {}
    for reentrant in (False, True):
        twa = tk.TWA(Net(reentrant), states, bits=4, group_size=8)
        with torch.no_grad():
            twa.coefficients.copy_(torch.linspace(-0.5, 0.5, twa.coefficients.numel()).view_as(twa.coefficients))
        ddp = DDP(twa)
        out = ddp(xs[0])
        out[:, 0] *= 1.0  # changed in place, as logits are masked: allowed on the output tied to the anchor
        out.pow(2).mean().backward()
        got = [twa.coefficients.grad.clone()]
        twa.coefficients.grad = None
        with ddp.no_sync():
            ddp(xs[0]).pow(2).mean().backward()
        ddp(xs[1]).pow(2).mean().backward()
        grads["whole", reentrant] = got + [twa.coefficients.grad.clone()]

        twa = tk.TWA(Net(reentrant), states, bits=4, group_size=8)
        torch.manual_seed(5)
        model = WithHead(twa)
        ddp = DDP(model, find_unused_parameters=True)
        got = []
        for use in (("inside", "skip"), ("beside", "inside"), ("inside", "inside")):
            model.zero_grad()
            ddp(xs[len(got)], use[rank]).pow(2).mean().backward()
            got.append(twa.coefficients.grad.clone())
        grads["differing", reentrant] = got

        # an output and a view of it, one changed in place, the loss on the other: each rank
        # on the same batch, against the same TWA outside DDP
        class Pair(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = Net(reentrant)

            def forward(self, x):
                h = self.net(x)
                return h, h[:, :2]

        pair_states = [{f"net.{k}": v for k, v in state.items()} for state in states]
        same = torch.randn(8, 6, generator=torch.Generator().manual_seed(3)).requires_grad_()
        got = []
        for wrap in (DDP, lambda m: m):
            twa = tk.TWA(Pair(), pair_states, bits=4, group_size=8)
            h, view = wrap(twa)(same)
            h.mul_(3.0)  # scaled in place, as logits by a temperature
            view.pow(2).sum().backward()
            got.append(twa.coefficients.grad.clone())
        grads["aliased", reentrant] = got
    # one process, no DDP, no checkpoints: the mean of the gradients of every rank's first batch
    alone = []
    for other in range(world):
        twa = tk.TWA(Net(False), states, bits=4, group_size=8)
        with torch.no_grad():
            twa.coefficients.copy_(torch.linspace(-0.5, 0.5, twa.coefficients.numel()).view_as(twa.coefficients))
        batch = torch.randn(3, 8, 6, generator=torch.Generator().manual_seed(10 + other))[0]
        twa(batch).pow(2).mean().backward()
        alone.append(twa.coefficients.grad.clone())
    grads["one process"] = sum(alone) / world
    return grads


def one_rank_exports(rank: int, world: int) -> dict:
    """Rank 0 alone asks a sharded TWA for its averaged state (under `if rank == 0:`), which
    gathers the weights from every rank: it waits for the others until the timeout, then
    gets an error saying that every rank makes the call."""
    import time

    import twa_kernels as tk
    model, ckpts = model_and_checkpoints()
    twa = tk.TWA(model, ckpts, bits=4, group_size=GROUP_SIZE, process_group=dist.group.WORLD, shard=True)
    out = {}
    if rank == 0:
        try:
            twa.averaged_state_dict()
        except tk.errors.TWAKernelsError as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
    else:
        time.sleep(8)  # alive past rank 0's timeout, so rank 0 meets the timeout and not a closed peer
    return out


def unlike_exchanges(rank: int, world: int) -> dict:
    """Ranks that reach different exchanges of the library at once: a helper called on rank
    0 only meets another on rank 1, and one check gets rows of other sizes on each rank."""
    import twa_kernels as tk
    from twa_kernels import distributed
    from twa_kernels.sharding import check_same_values

    torch.manual_seed(0)  # the same model on every rank
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    twa = tk.TWA(model, [model.state_dict(), {k: v + 0.1 if v.is_floating_point() else v
                                             for k, v in model.state_dict().items()}],
                 bits=8, group_size=8, process_group=dist.group.WORLD)
    out = {}
    try:
        if rank == 0:
            distributed.all_reduce_metrics({"loss": 1.0}, dist.group.WORLD)
        else:
            distributed.update_bn([torch.randn(8, 3)], twa, dist.group.WORLD)
    except tk.errors.TWAKernelsError as exc:
        out["helpers"] = f"{type(exc).__name__}: {exc}"
    try:
        check_same_values(["w"] * (rank + 1), [torch.ones(2)] * (rank + 1), dist.group.WORLD, "the test's values")
    except tk.errors.TWAKernelsError as exc:
        out["sizes"] = f"{type(exc).__name__}: {exc}"
    ones = torch.ones(1)
    dist.all_reduce(ones)  # the ranks are still in step: the next collective pairs as it should
    out["after"] = float(ones)
    return out
