"""TWA across processes: real gloo jobs of 2 and 3 processes (1 thread each, a free port,
timeouts), compared with one process on the same global batch.

BatchNorm runs in train mode, so each rank normalises its own micro-batch: the single-process
reference runs the same per-rank micro-batches and averages their gradients (what W ranks
compute), which is the one-process equivalent of the split global batch.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import twa_kernels as tk
from twa_kernels import distributed
from twa_kernels.errors import CheckpointError
from twa_kernels.ops import project, reconstruct
from twa_kernels.quant import quantize

from tests import dist_workers as w
from tests.helpers import free_port, spawn

# float32 accumulation in a different order (all-reduce vs one process), through 4 AdamW steps
TOL = dict(rtol=1e-4, atol=2e-5)


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def job(request, tmp_path_factory):
    world = request.param
    return world, spawn(w.all_scenarios, world, str(tmp_path_factory.mktemp(f"ranks{world}")))


@pytest.fixture(scope="module")
def ddp_job(tmp_path_factory):
    return spawn(w.ddp_scenarios, 2, str(tmp_path_factory.mktemp("ddp")))


# -- one process: the shard arithmetic ------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 2, None])
def test_column_slices_reconstruct_and_project_like_the_whole_basis(bits):
    torch.manual_seed(0)
    num_cols, group = 203, 16
    qb = quantize(torch.randn(3, num_cols), bits, group, block_sizes=[50, 7, 100, 46])
    x, center, g = torch.randn(3, 4), torch.randn(num_cols), torch.randn(num_cols)
    full_w, full_y = reconstruct(qb, x, center), project(qb, g)
    edges = distributed.shard_columns(num_cols, group, 3)
    assert edges[0] == 0 and edges[-1] == num_cols and all(e % group == 0 for e in edges[:-1])
    partial = torch.zeros_like(full_y)
    for start, stop in zip(edges[:-1], edges[1:]):
        local, b_lo, b_hi = distributed.slice_basis(qb, start, stop)
        torch.testing.assert_close(reconstruct(local, x[:, b_lo:b_hi], center[start:stop]), full_w[start:stop],
                                   rtol=0, atol=1e-6)
        partial[:, b_lo:b_hi] += project(local, g[start:stop])
    # blocks 0 and 2 straddle the edges 64 and 128 (groups of 16, 13 groups over 3 ranks)
    torch.testing.assert_close(partial, full_y, rtol=1e-5, atol=1e-5)


def test_too_many_ranks_for_the_groups_is_named():
    with pytest.raises(distributed.ShardingError, match="only 2 quantisation groups"):
        distributed.shard_columns(20, 16, 3)


def test_checksum_sees_reordered_rows_and_a_changed_center():
    torch.manual_seed(0)
    P, center = torch.randn(3, 100), torch.randn(100)
    qb = quantize(P, 4, 16)
    base = distributed.basis_checksum(center, qb)
    assert torch.equal(base, distributed.basis_checksum(center.clone(), quantize(P.clone(), 4, 16)))
    assert not torch.equal(base, distributed.basis_checksum(center, quantize(P[[1, 0, 2]], 4, 16)))
    bumped = center.clone()
    bumped[7] += 1e-3
    assert not torch.equal(base, distributed.basis_checksum(bumped, qb))


def test_checksums_are_summed_a_chunk_at_a_time_to_the_whole_tensors_sums(monkeypatch):
    # the checksum cast the center and each codes row to float64 whole, with position weights
    # as long: 24 bytes per column at once (168 GB per rank for a 7B-parameter model)
    from twa_kernels import _sums

    torch.manual_seed(0)
    P, center = torch.randn(3, 1000), torch.randn(1000)
    qb = quantize(P, 4, 16)
    whole = distributed.basis_checksum(center, qb)
    monkeypatch.setattr(_sums, "CHUNK", 7)  # chunks that end inside a group, a row and the center
    torch.testing.assert_close(distributed.basis_checksum(center, qb), whole, rtol=1e-13, atol=0)
    flat = center.double()
    position = torch.arange(1000, dtype=torch.float64) % 65521 + 1
    want = torch.stack([flat.sum(), flat.square().sum(), (flat * position).sum()])
    torch.testing.assert_close(_sums.float64_sums(center, 65521), want, rtol=1e-13, atol=0)


def test_ddp_is_told_to_ignore_the_basis_buffers():
    model, ckpts = w.model_and_checkpoints()
    twa = tk.TWA(model, ckpts, bits=4, group_size=8)
    buffers = {name for name, _ in twa.named_buffers()}
    assert buffers and buffers <= set(twa._ddp_params_and_buffers_to_ignore)


def test_a_twa_held_by_another_module_is_ignored_by_ddp_once_asked():
    # DDP reads the ignore list of the module it wraps only: a LightningModule holding a TWA
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tests.helpers import one_process_group

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            model, ckpts = w.model_and_checkpoints()
            self.twa = tk.TWA(model, ckpts, bits=4, group_size=8)

        def forward(self, x):
            return self.twa(x)

    twa_buffers = {f"twa.{name}" for name, _ in Holder().twa.named_buffers()}
    with one_process_group():
        assert twa_buffers <= set(DDP(Holder()).named_module_buffers)  # broadcast before every forward
        holder = Holder()
        assert set(tk.distributed.ignore_twa_buffers_in_ddp(holder)) == twa_buffers
        assert not twa_buffers & set(DDP(holder).named_module_buffers)
    with pytest.raises(tk.errors.InvalidArgumentError, match="holds no TWA"):
        tk.distributed.ignore_twa_buffers_in_ddp(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("env, named", [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE is 'two', not a number of processes"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE is 2 but RANK, MASTER_ADDR, MASTER_PORT are not set"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}, "WORLD_SIZE is 2 but MASTER_PORT is not set"),
])
def test_a_half_set_launch_environment_is_named_before_any_rendezvous(monkeypatch, env, named):
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(tk.errors.UsageError, match=named):
        distributed.init_from_environment(timeout_s=5)
    assert not torch.distributed.is_initialized()


def test_a_single_process_environment_needs_no_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init_from_environment(timeout_s=5) is None


def test_shard_needs_a_process_group():
    model, ckpts = w.model_and_checkpoints()
    with pytest.raises(ValueError, match="process_group"):
        tk.TWA(model, ckpts, shard=True)


# -- real multi-process jobs ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["replicated", "sharded"])
def test_ranks_on_a_split_batch_match_one_process(job, mode):
    world, results = job
    ref = results[0]["modes"]["reference"]
    moved = ref["coefficients"].abs().max()
    assert moved > w.STEPS * w.LR * 0.5  # the reference really trained (AdamW steps of up to lr each)
    for rank, res in enumerate(results):
        got = res["modes"][mode]
        torch.testing.assert_close(got["coefficients"], ref["coefficients"], **TOL)
        torch.testing.assert_close(got["weights"], ref["weights"], **TOL)
        # every rank holds the very same coefficients (the all-reduce hands all the same sum)
        assert torch.equal(got["coefficients"], results[0]["modes"][mode]["coefficients"]), rank
        # saved with torch.distributed.checkpoint and loaded into a fresh TWA: a sharded
        # rank's columns were saved from one rank only, and another rank's loaded silently
        assert got["dcp_round_trip"], rank
        # and through DCP's get/set_model_state_dict over a module holding the TWA, which look
        # each key up as an attribute (a sharded rank's "rank1_center" too)
        assert got["dcp_parent_round_trip"], rank
        if mode == "sharded":  # another rank's state fits the shapes but not the columns
            assert f"not those of this rank ({rank})" in got["other_rank_state"]
            assert f"rank{rank}_center" in got["own_names"] and f"rank{rank}_basis_codes" in got["own_names"]


@pytest.mark.parametrize("mode", ["replicated", "sharded"])
def test_int8_gradients_over_ranks_round_what_each_mode_projects(job, mode):
    world, results = job
    for res in results:
        got = res["int8"]
        torch.testing.assert_close(got[mode], got["expected"][mode], rtol=1e-5, atol=1e-7)
        assert not torch.allclose(got[mode], got["float"], rtol=0, atol=1e-8)  # the rounding is real
        assert torch.equal(got[mode], results[0]["int8"][mode])  # every rank gets the same gradient


def test_replicated_moves_k_by_b_floats_a_step(job):
    world, results = job
    for res in results:
        got = res["modes"]["replicated"]
        kb_bytes = (got["k"] * got["B"] + 2) * 4  # and the two numbers that check the ranks agree
        assert got["bytes_per_step"].tolist() == [kb_bytes] * w.STEPS
        # the collectives torch.distributed itself saw: the same, and nothing else
        assert int(got["seen_bytes"]) == kb_bytes * w.STEPS and got["seen_ops"] == ["all_reduce"]


def test_sharded_moves_two_gathers_of_d_plus_k_by_b_a_step(job):
    world, results = job
    D = results[0]["modes"]["D"]
    stops = [res["modes"]["sharded"]["stop"] for res in results]
    assert [res["modes"]["sharded"]["start"] for res in results] == [0] + stops[:-1] and stops[-1] == D
    for res in results:
        got = res["modes"]["sharded"]
        assert got["local_center"] == got["stop"] - got["start"]  # the rank stores its columns only
        padded = world * got["chunk"]
        assert D <= padded < D + world * w.GROUP_SIZE  # equal chunks: padding under W x group_size
        expected = 4 * (2 * padded + got["k"] * got["B"] + 2)
        assert got["bytes_per_step"].tolist() == [expected] * w.STEPS
        assert int(got["seen_bytes"]) == expected * w.STEPS
        single = hasattr(torch.distributed, "all_gather_single")  # torch >= 2.13's names
        gather = "all_gather_single" if single else "all_gather_into_tensor"
        scatter = "reduce_scatter_single" if single else "reduce_scatter_tensor"
        assert got["seen_ops"] == sorted([gather, "all_reduce", scatter])
    # some block straddles a shard edge (it appears on two ranks)
    spans = [range(res["modes"]["sharded"]["b_lo"], res["modes"]["sharded"]["b_hi"]) for res in results]
    assert any(set(a) & set(b) for a, b in zip(spans[:-1], spans[1:]))


@pytest.mark.parametrize("job", [2], ids=["2ranks"], indirect=True)  # 2 ranks only (CI time)
def test_update_bn_over_ranks_equals_one_process_over_all_batches(job):
    world, results = job
    ref = results[0]["bn"]
    for res in results:
        for got, want in zip(res["bn"]["mean"] + res["bn"]["var"], ref["ref_mean"] + ref["ref_var"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert res["bn"]["metrics"] == {"correct": sum(range(1, world + 1)),
                                        "count": 10 * sum(range(1, world + 1))}
        for got, want in zip(res["bn"]["first_share_mean"], ref["ref_first_share_mean"]):  # the others' shares empty
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)



def test_update_bn_over_ranks_keeps_frozen_layers_and_measures_sync_batchnorm_as_one_process(hostile_job):
    ref = hostile_job[0]["bn"]
    for res in hostile_job:
        bn = res["bn"]
        assert bn["frozen_kept"], "a frozen layer's statistics and batch count stay as they were"
        for key, want in ref["ref_frozen"].items():
            torch.testing.assert_close(bn["frozen_measured"][key], want, rtol=1e-5, atol=1e-6, msg=key)
        for measured in ("sync_measured", "ddp_measured"):  # SyncBatchNorm over uneven shares; DDP(twa)
            for key, want in ref["ref_plain"].items():
                torch.testing.assert_close(bn[measured][key], want, rtol=1e-5, atol=1e-6, msg=f"{measured} {key}")
        assert bn["plain_on_ddp"].startswith("InvalidTypeError") and "wrapper.module.update_bn" in bn["plain_on_ddp"]
        assert bn["kept_after_failure"] and bn["init_existing"]
    failed, told = hostile_job[1]["bn"]["one_rank_fails"], hostile_job[0]["bn"]["one_rank_fails"]
    assert failed.startswith("RuntimeError: Given groups=1"), failed
    assert told.startswith("RankFailedError: rank 1 failed while recomputing BatchNorm statistics"), told
    for res in hostile_job:
        assert res["bn"]["other_layers"].startswith("InvalidArgumentError: all_reduce_bn_statistics: ranks [1] "
                                                    "measure other BatchNorm layers than rank 0"), res["bn"]
        assert res["bn"]["kept_after_other_layers"]
    for res in hostile_job:  # reached on rank 0 alone: rank 0's measurement; reached by none: kept, with a warning
        branch = res["bn"]["branch"]
        assert res["bn"]["branch_warned"]
        for key, want in ref["ref_branch"].items():
            torch.testing.assert_close(branch[key], want, rtol=1e-5, atol=1e-6, msg=key)
        assert float(branch["never.running_mean"][0]) == 7.0 and int(branch["never.num_batches_tracked"]) == 5
    for res in hostile_job:  # every layer frozen (given as an iterator, read more than once): kept, no error
        assert res["bn"]["all_frozen"] is None and res["bn"]["kept_all_frozen"], res["bn"]["all_frozen"]
    assert hostile_job[1]["bn"]["misspelt_one_rank"].startswith("InvalidArgumentError: update_bn: frozen_norms names "
                                                                "'nope'")
    assert hostile_job[0]["bn"]["misspelt_one_rank"].startswith("RankFailedError: rank 1 failed while checking the "
                                                                "BatchNorm layers")
    assert hostile_job[1]["bn"]["nan_subspace"].startswith("InvalidArgumentError: the subspace's center holds NaN")
    assert hostile_job[0]["bn"]["nan_subspace"].startswith("RankFailedError: rank 1 failed while checking its "
                                                          "subspace")


def test_an_evaluation_split_gives_every_sample_once_over_the_ranks(hostile_job):
    # twa fit's validation loss under torchrun was over repeated samples or dropped batches
    assert sorted(v for res in hostile_job for v in res["eval_samples"]) == [float(i) for i in range(7)]
    assert sorted(v for res in hostile_job for v in res["eval_batches"]) == [10, 11, 12]

def test_a_loaders_sampler_is_split_as_it_draws_or_refused(hostile_job):
    # a SubsetRandomSampler (a train/validation split of one dataset) was split over the whole
    # dataset: the validation loss counted training samples, and training took validation ones
    evaluated = sorted(v for res in hostile_job for v in res["subset_eval"])
    assert evaluated == [0.0, 1.0, 2.0, 3.0, 7.0]
    # with drop_last=True, the samples one process keeps (9 of 10 in batches of 3), each once
    assert sorted(v for res in hostile_job for v in res["drop_last_eval"]) == [float(i) for i in range(9)]
    trained = [res["subset_train"] for res in hostile_job]
    assert len({len(t) for t in trained}) == 1 and set(sum(trained, [])) == {0.0, 1.0, 2.0, 3.0, 7.0}
    for res in hostile_job:
        assert res["weighted_eval"].startswith("InvalidArgumentError: split_for_evaluation: the DataLoader's "
                                               "WeightedRandomSampler"), res["weighted_eval"]
        for case in ("unsized_train", "unsized_eval"):  # raw TypeError / ValueError / NotImplementedError before
            assert res[case].startswith("InvalidTypeError: under torch.distributed a data loader must be"), res[case]
    first, other, again = zip(*(res["orders"] for res in hostile_job))  # per seed: each rank's share
    assert sorted(sum(first, [])) == [float(i) for i in range(10)]  # one order, split over the ranks
    assert first == again and first != other  # torch.manual_seed decides it
    # an iterable dataset with a length: every W-th batch (training), each batch once (evaluation)
    assert sorted(v for res in hostile_job for v in res["stream_eval"]) == [float(i) for i in range(6)]
    assert [len(res["stream_train"]) for res in hostile_job] == [2, 2]


def test_a_twa_training_alone_in_a_distributed_job_is_warned_about_once(hostile_job):
    for res in hostile_job:
        assert len(res["alone"]) == 1 and "Build the TWA after init_process_group" in res["alone"][0], res["alone"]
        assert res["in_ddp"] == [] and res["with_group"] == []
    assert hostile_job[1]["non_member"].startswith("UsageError: this rank is not a member of the process_group")


def test_update_bn_refuses_a_plain_model_before_any_collective():
    with pytest.raises(tk.errors.InvalidTypeError, match="tk.update_bn"):
        distributed.update_bn([torch.zeros(1, 3)], torch.nn.Linear(3, 1))


def test_ddp_over_twa_trains_like_one_process_and_never_broadcasts_the_basis(ddp_job):
    results = ddp_job
    for res in results:
        ddp = res["ddp"]
        assert ddp["center_kept"]  # rank 1's different center survived DDP's buffer broadcast
        assert ddp["broadcast_bytes"] == ddp["coefficient_bytes"]  # only the coefficients, once
        # the control without the ignore list: the basis is broadcast and rank 1's center replaced
        assert ddp["control_center_is_rank0s"]
        assert ddp["control_broadcast_bytes"] >= ddp["basis_bytes"] + ddp["coefficient_bytes"]
        torch.testing.assert_close(ddp["coefficients"], results[0]["ddp"]["reference"], **TOL)
        # built with process_group= and wrapped in DDP too: each backward averaged twice, said once
        assert len(ddp["averaged_twice"]) == 1 and "Build the TWA without process_group=" in ddp["averaged_twice"][0]


def test_subspace_optimizer_under_ddp_matches_one_process(ddp_job):
    results = ddp_job
    for res in results:
        psgd = res["psgd"]
        assert psgd["moved"] > 1e-3 and psgd["in_span"] < 1e-4 * psgd["moved"] + 1e-6
        torch.testing.assert_close(psgd["weights"], results[0]["psgd"]["reference"], **TOL)


@pytest.mark.parametrize("job", [2], ids=["2ranks"], indirect=True)  # 2 ranks only (CI time)
def test_bad_input_gets_named_errors_on_every_rank(job):
    world, results = job
    for rank, res in enumerate(results):
        errors = res["errors"]
        assert "ranks [1] differ from rank 0" in errors["mismatch"] and "codes" in errors["mismatch"]
        assert "only 1 quantisation groups" in errors["too_many_ranks"]
        assert "'gloo' backend cannot run" in errors["backend"] and "shard=False" in errors["backend"]
        assert "ranks [1] were given other build settings than rank 0" in errors["one_rank"]
        assert f"bits={None if rank == 1 else 4}," in errors["one_rank"]
        assert "call tk.distributed.update_bn(loader, twa) on every rank" in errors["local_bn"]
        assert errors["local_bn_kept"]
        assert "holds all" in errors["whole_into_shard"] and "columns of an unsharded TWA" in errors["whole_into_shard"]
        assert "shard=False" in errors["whole_into_shard"]
        assert errors["sharded_subspace"].startswith("UsageError: twa.subspace: this TWA is sharded over"), \
            errors["sharded_subspace"]
    assert results[0]["errors"]["one_rank_subspace"] is True


def test_sharded_build_reads_only_its_columns_and_equals_the_whole_basis(tmp_path_factory):
    import functools

    folder = tmp_path_factory.mktemp("ckpts")
    total = w.write_checkpoints(str(folder))
    dcp_folder = tmp_path_factory.mktemp("dcp")
    w.write_dcp(str(folder), str(dcp_folder))
    # glibc keeps freed large blocks in its heap once its mmap threshold has adapted upwards,
    # which would count in peak RSS; a fixed threshold returns them, so the peak is the data's
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        results = spawn(functools.partial(w.sharded_build, str(folder), str(dcp_folder)), 2,
                          str(tmp_path_factory.mktemp("build")))
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
    budget = total // 2  # test-only: a rank may not hold half of the checkpoints' bytes
    full = results[0]
    print(f"\npeak growth: one process {full['full_grown'] >> 20} MB, ranks "
          f"{[r['grown'] >> 20 for r in results]} MB, budget {budget >> 20} MB")
    for rank, res in enumerate(results):
        assert res["grown"] < budget, (rank, res["grown"], budget)
        # the control: a rank builds half of the columns, below what one process building all of them needs
        assert res["grown"] < full["full_grown"], (rank, res["grown"], full["full_grown"])
        want = full["full_shards"][rank]
        assert torch.equal(res["center"], want["center"])
        for key, value in want["basis"].items():
            assert torch.equal(res["basis"][key], value), key
        # the gathered weights at random coefficients equal the single-process ones
        torch.testing.assert_close(res["weights"], full["full_weights"], rtol=0, atol=1e-6)
        assert res["dcp_equal"]  # read through torch.distributed.checkpoint's own reader
        assert "ranks [1]" in res["list_error"] and "same files in the same order" in res["list_error"]


USER_PACKAGE = '''
import os
import torch
from torch.utils.data import DataLoader, TensorDataset
from twa_kernels.demo import make_model as _make

def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 40, generator=g), torch.randint(0, 10, (n,), generator=g))

def make_model():
    return _make(0)

def broken_model():
    if os.environ.get("RANK") == "1":
        raise RuntimeError("rank 1 cannot build its model")
    return _make(0)

def model_on_own_disk():
    # rank 1 runs on a node of its own: the same relative checkpoint paths name its own files
    if os.environ.get("RANK") == "1":
        os.chdir("rank1")
    return _make(0)

def train_loader():
    return DataLoader(_data(48, 0), batch_size=8, shuffle=True)

def val_loader():
    return DataLoader(_data(32, 1), batch_size=16)

_calls = [0]

def stopping_loss(outputs, targets):  # Ctrl-C on every rank at loss call FIT_STOP_AT_LOSS
    _calls[0] += 1
    if str(_calls[0]) == os.environ.get("FIT_STOP_AT_LOSS"):
        raise KeyboardInterrupt
    return torch.nn.functional.cross_entropy(outputs, targets)

def ragged_val_loader():
    # one process keeps 36 of the 37 samples (9 batches of 4); ranks that pad their shares to
    # 19 samples each, then drop their own last partial batch, keep 32
    return DataLoader(_data(37, 1), batch_size=4, drop_last=True)
'''


def _torchrun(root, config, timeout=150):
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    package_root = str(Path(tk.__file__).resolve().parents[1])  # this checkout's twa_kernels
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), package_root]), "OMP_NUM_THREADS": "1",
           "PYTHONFAULTHANDLER": "1"}  # a rank that aborts prints every thread's Python stack
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "twa_kernels", "fit", str(path), "--no-progress"]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def user_project(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    (root / "userpkg_dist.py").write_text(USER_PACKAGE)
    _, ckpts = w.model_and_checkpoints()
    for i, state in enumerate(ckpts):
        tk.save_state_dict(state, root / "ckpts" / f"epoch_{i}.pt")
    return root


def _fit_config(root, **overrides):
    config = dict(model="userpkg_dist:make_model", data=dict(train="userpkg_dist:train_loader",
                                                             val="userpkg_dist:val_loader"),
                  checkpoints=str(root / "ckpts" / "epoch_*.pt"), bits=4, group_size=8, epochs=1,
                  optimizer=dict(name="AdamW", lr=0.02), output=str(root / "out"),
                  distributed=dict(mode="sharded"))
    config.update(overrides)
    return config


def test_twa_fit_under_torchrun_sharded(user_project):
    import json

    config = _fit_config(user_project)
    config["data"]["val"] = "userpkg_dist:ragged_val_loader"
    result = _torchrun(user_project, config)
    assert result.returncode == 0, result.stderr[-8000:]
    report = json.loads((user_project / "out" / "report.json").read_text())
    assert report["world_size"] == 2 and report["distributed_mode"] == "sharded"
    k, B = report["coefficients"]
    D = sum(p.numel() for p in w.model_and_checkpoints()[0].parameters())
    padded = 2 * -(-(-(-D // 8)) // 2) * 8  # W x (the larger rank's groups x group_size)
    assert report["bytes_communicated_per_step"] == 4 * (2 * padded + k * B + 2)
    # the basis over both ranks, not rank 0's share alone
    whole = tk.TWA(w.model_and_checkpoints()[0], sorted((user_project / "ckpts").glob("epoch_*.pt")), bits=4,
                   group_size=8).basis.nbytes
    assert report["basis_bytes_per_rank"] < whole <= report["basis_bytes"] < 2 * report["basis_bytes_per_rank"] + 64
    # numbers from both ranks' shares (single-process runs check that TWA lowers the loss)
    assert math.isfinite(report["val_loss_after_twa"]) and math.isfinite(report["val_loss_at_swa"])
    averaged = tk.load_state_dict(user_project / "out" / "averaged.safetensors")
    assert set(averaged) == set(w.model_and_checkpoints()[0].state_dict())
    assert not list((user_project / "out").glob("*.tmp"))
    # the loss over the samples one process keeps, each once, at the exported weights (the
    # ranks' padded, separately trimmed shares counted 32 of them: 0.6% lower)
    model = w.model_and_checkpoints()[0].eval()
    model.load_state_dict(averaged)
    gen = torch.Generator().manual_seed(1)  # userpkg_dist._data(37, 1)
    x, y = torch.randn(37, 1, 40, generator=gen), torch.randint(0, 10, (37,), generator=gen)
    with torch.no_grad():
        expected = F.cross_entropy(model(x[:36]), y[:36]).item()
    assert report["val_loss_after_twa"] == pytest.approx(expected, rel=1e-5)


def test_an_interrupted_torchrun_fit_resumes_and_ends_as_the_uninterrupted_run(user_project, monkeypatch):
    import json

    # each rank's shuffled share comes from a sampler that counts its passes: resumed at its first
    # pass's order, the run trained the later epochs on other batches
    def run(name, stop_at=None):
        monkeypatch.delenv("FIT_STOP_AT_LOSS", raising=False)
        if stop_at is not None:
            monkeypatch.setenv("FIT_STOP_AT_LOSS", str(stop_at))
        return _torchrun(user_project, _fit_config(user_project, epochs=3, loss="userpkg_dist:stopping_loss",
                                                   distributed=dict(mode="replicated"),
                                                   output=str(user_project / name)))

    assert run("straight").returncode == 0
    # loss calls: the SWA baseline's evaluation, then 3 batches a rank per epoch: 6 is in epoch 2
    stopped = run("resumed", stop_at=6)
    assert stopped.returncode != 0 and (user_project / ".resumed.twa-progress.pt").is_file()
    resumed = run("resumed")
    assert resumed.returncode == 0 and "resuming after epoch 1 of 3" in resumed.stderr, resumed.stderr[-4000:]
    reports = [json.loads((user_project / name / "report.json").read_text()) for name in ("straight", "resumed")]
    assert reports[1]["resumed_after_epoch"] == 1
    assert reports[1]["val_loss_after_twa"] == reports[0]["val_loss_after_twa"]
    want, got = (tk.load_state_dict(user_project / name / "averaged.safetensors") for name in ("straight", "resumed"))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_failing_rank_ends_the_torchrun_job_with_its_error(user_project):
    result = _torchrun(user_project, _fit_config(user_project, model="userpkg_dist:broken_model",
                                                 distributed=dict(mode="replicated"), output=str(user_project / "o2")),
                       timeout=150)
    assert result.returncode != 0
    assert "rank 1 cannot build its model" in result.stderr + result.stdout
    # rank 0 failed only because rank 1 went away: the summary's root cause is rank 1's error
    root_cause = (result.stderr + result.stdout).split("Root Cause (first observed failure):", 1)[1]
    assert "RuntimeError: rank 1 cannot build its model" in root_cause, root_cause[:1500]
    assert not (user_project / "o2" / "report.json").exists()


# -- hostile and inconsistent checkpoints under a process group ------------------------------


@pytest.fixture(scope="module")
def hostile_job(tmp_path_factory):
    import functools

    root = str(tmp_path_factory.mktemp("hostile"))
    w.write_hostile_checkpoints(root, 2)
    return spawn(functools.partial(w.hostile_scenarios, root), 2, str(tmp_path_factory.mktemp("hostile_out")))


def test_same_paths_with_identical_copies_build_without_error(hostile_job):
    for res in hostile_job:
        assert res["same_copies"] is None and res["after"] is None


def test_sharded_ranks_given_different_copies_of_the_same_paths_fail_naming_the_files(hostile_job):
    for res in hostile_job:
        text = res["different_copies"]
        assert text.startswith("CheckpointContentMismatchError"), text
        # c0.safetensors: same header and size, other weights; c1.pt: its records' CRCs differ
        assert "different/c0.safetensors (rank 1: sampled weights)" in text
        assert "different/c1.pt (rank 1: header, sampled weights)" in text
        assert "c2.safetensors" not in text and "c3.pt" not in text


@pytest.mark.parametrize("setting", ["bits", "group_size", "granularity"])
def test_sharded_ranks_given_other_build_settings_fail_on_every_rank(hostile_job, setting):
    for res in hostile_job:
        text = res[f"settings_{setting}"]
        assert text.startswith("BasisMismatchError") and "ranks [1] were given other build settings" in text, text


@pytest.mark.parametrize("shard", [False, True], ids=["replicated", "sharded"])
def test_a_model_of_another_dtype_on_one_rank_is_named_on_every_rank(hostile_job, shard):
    for rank, res in enumerate(hostile_job):
        text = res[f"dtype_{shard}"]
        assert text.startswith("BasisMismatchError: ranks [1] were given other build settings"), text
        assert f"parameter_dtypes={['bfloat16'] if rank else ['float32']}" in text, text


def test_shard_given_on_one_rank_only_is_named_on_every_rank(hostile_job):
    for rank, res in enumerate(hostile_job):
        text = res["settings_shard"]
        assert text.startswith("BasisMismatchError: ranks [1] were given other build settings"), text
        assert f"shard={rank == 0}" in text


@pytest.mark.parametrize("shard", [False, True], ids=["replicated", "sharded"])
def test_frozen_parameters_that_differ_across_ranks_are_named_on_every_rank(hostile_job, shard):
    for res in hostile_job:
        text = res[f"frozen_differ_{shard}"]
        assert text.startswith("BasisMismatchError: the values of the model's frozen parameters differ across "
                               f"ranks: ranks [1] differ from rank 0 (rank 1: {res['frozen_name']})"), text


def test_coefficients_loaded_with_assign_keep_their_gradient_averaged(hostile_job):
    grads = [res["assigned_grad"] for res in hostile_job]
    assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1])


def test_a_deep_copy_of_a_replicated_twa_averages_its_gradient_and_pickling_is_named(hostile_job):
    grads = [res["copy_grad"] for res in hostile_job]
    assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1])
    torch.testing.assert_close(grads[0], hostile_job[0]["assigned_grad"], rtol=0, atol=0)  # the same step
    for res in hostile_job:
        assert res["pickled"].startswith("UsageError: a TWA built with a process_group holds that "
                                         "torch.distributed group, which cannot be pickled"), res["pickled"]


@pytest.mark.parametrize("shard", [False, True], ids=["replicated", "sharded"])
def test_ranks_that_step_after_different_numbers_of_backwards_are_named_on_every_rank(hostile_job, shard):
    for res in hostile_job:
        assert res[f"uneven_accumulation_{shard}"].startswith(
            "UsageError: the ranks of this TWA averaged a gradient over coefficients that differ from rank to "
            "rank: they ran different numbers of backwards per optimizer step"), res[f"uneven_accumulation_{shard}"]
        # the check has no false positives: the same two backwards per step on every rank
        assert res[f"even_accumulation_{shard}"] is None, res[f"even_accumulation_{shard}"]


def test_a_sharded_twas_coefficients_carry_over_dcp_to_another_number_of_ranks(tmp_path):
    # the per-rank center and basis differ with the world size; the coefficients do not
    import functools

    path = str(tmp_path / "dcp")
    saved = spawn(functools.partial(w.coefficients_over_dcp, path), 2, str(tmp_path))
    loaded = spawn(functools.partial(w.coefficients_over_dcp, path), 3, str(tmp_path))
    assert saved[0].abs().sum() > 0 and torch.equal(saved[0], saved[1])
    for coefficients in loaded:
        assert torch.equal(coefficients, saved[0])


def test_a_compiled_twa_with_assigned_or_copied_coefficients_averages_its_gradient(hostile_job):
    for case in ("assigned", "copy"):
        grads = [res[f"compiled_{case}_grad"] for res in hostile_job]
        assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1]), case
        torch.testing.assert_close(grads[0], hostile_job[0]["assigned_grad"], rtol=1e-5, atol=1e-7)  # the same step


def test_a_copy_of_frozen_coefficients_is_made_and_averages_once_it_trains(hostile_job):
    grads = [res["thawed_copy_grad"] for res in hostile_job]
    assert all(res["frozen_copy"] is None for res in hostile_job), [res["frozen_copy"] for res in hostile_job]
    assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1])


def test_ddp_over_a_twa_whose_coefficients_were_replaced_is_named(hostile_job):
    for res in hostile_job:
        text = res["ddp_assigned"]
        assert text.startswith("UsageError: this TWA runs inside a DistributedDataParallel forward, but its "
                               "coefficients are not among the Parameters DDP was built over"), text


def test_an_optimizer_keeps_no_deleted_replicated_twa_or_its_group_alive(hostile_job):
    for res in hostile_job:
        assert res["strategy_outlives_twa"] is False
        text = res["backward_after_twa"]
        assert text.startswith("UsageError: a backward reached the coefficients of a replicated TWA that no longer "
                               "exists"), text


def test_ranks_given_data_of_their_own_are_named_before_the_split(hostile_job):
    for res in hostile_job:
        for who in ("train", "eval"):
            text = res[f"own_share_{who}"]
            assert text.startswith("UsageError: split_") and "the ranks were given other data (rank 0: 40 samples in " \
                "batches of 8, shuffled; rank 1: 24 samples in batches of 8, shuffled)" in text, text
        # the same sizes drawn otherwise: another seed, shuffle on one rank, another subset
        assert "rank 0: 20 samples in batches of 4, shuffled, seed=1234; rank 1: 20 samples in batches of 4, " \
            "shuffled, seed=1235" in res["own_seed"], res["own_seed"]
        assert "rank 0: 20 samples in batches of 4, shuffled; rank 1: 20 samples in batches of 4)" \
            in res["one_shuffles"], res["one_shuffles"]
        assert res["own_subset"].startswith("UsageError: split_loader: the ranks were given other data") \
            and "a subset with index digest" in res["own_subset"], res["own_subset"]
        assert res["same_seed"] == 3  # 20 samples over 2 ranks in batches of 4
        assert res["unshuffled_own_seed"] == 3


def test_an_argument_refused_on_one_rank_stops_every_rank_at_once(hostile_job):
    own, peer = hostile_job[1]["bad_arg_one_rank"], hostile_job[0]["bad_arg_one_rank"]
    assert own.startswith("InvalidArgumentError: bits must be one of"), own
    assert peer.startswith("RankFailedError: rank 1 failed while checking its arguments"), peer
    for shard in (False, True):  # a checkpoint folder only rank 1 cannot find
        own, peer = hostile_job[1][f"missing_one_rank_{shard}"], hostile_job[0][f"missing_one_rank_{shard}"]
        assert own.startswith("CheckpointError") and "nowhere" in own, own
        assert peer.startswith("RankFailedError: rank 1 failed while resolving its checkpoints"), peer


def test_a_process_group_that_is_not_one_is_named_before_reading(hostile_job):
    for res in hostile_job:
        assert res["group_type"] == ("InvalidTypeError: process_group must be a torch.distributed ProcessGroup "
                                     "(dist.group.WORLD, or one from dist.new_group), got str")


def test_all_reduce_metrics_sums_by_name_and_refuses_names_that_differ_on_every_rank(hostile_job):
    for res in hostile_job:
        assert res["metrics"] == {"count": 4.0, "loss": 4.5}
        for case in ("renamed", "extra"):
            text = res[f"metrics_{case}"]
            expected = "InvalidArgumentError: all_reduce_metrics: ranks [1] passed other metric names"
            assert text.startswith(expected), text
    own, peer = hostile_job[1]["metrics_not_a_number"], hostile_job[0]["metrics_not_a_number"]
    assert own.startswith("InvalidTypeError: all_reduce_metrics: 'loss' is str"), own
    assert peer.startswith("RankFailedError: rank 1 failed while checking its metrics"), peer


@pytest.mark.parametrize("mode", ["sharded", "replicated"])
def test_a_rank_with_a_corrupt_checkpoint_reports_its_own_error_on_every_rank(hostile_job, mode):
    own, peer = hostile_job[1][f"corrupt_{mode}"], hostile_job[0][f"corrupt_{mode}"]
    assert own.startswith("CheckpointError") and "corrupt/c1.pt" in own, own
    # rank 0 names rank 1 and its error, not a lost connection
    assert peer.startswith("RankFailedError: rank 1 failed while"), peer
    assert own in peer and "Connection closed" not in peer


def test_a_malicious_dcp_metadata_is_refused_on_every_rank_and_runs_nothing(hostile_job):
    for res in hostile_job:
        text = res["dcp_payload"]
        assert text.startswith("CheckpointError") and "dcp/d1/.metadata: refused" in text, text
        assert "posix.system" in text
        assert not res["marker_exists"]


def test_a_rank_with_a_corrupt_checkpoint_is_the_root_cause_in_torchruns_summary(user_project):
    import shutil

    own = user_project / "rank1" / "ckpts"
    shutil.copytree(user_project / "ckpts", own)
    (own / "epoch_1.pt").write_bytes(b"not a checkpoint" * 64)
    result = _torchrun(user_project, _fit_config(user_project, model="userpkg_dist:model_on_own_disk",
                                                 checkpoints="ckpts/epoch_*.pt", output=str(user_project / "o3")))
    text = result.stderr + result.stdout
    assert result.returncode != 0
    # rank 0 names rank 1 and its error, where it would have reported a lost connection
    assert "RankFailedError: rank 1 failed while reading its checkpoints" in text, text[-6000:]
    assert "Connection closed by peer" not in text
    # torchrun's summary: the root cause is rank 1's own error, from the error file it wrote
    root_cause = text.split("Root Cause (first observed failure):", 1)[1]
    header, traceback = root_cause.split("traceback :", 1)
    assert "rank      : 1 (local_rank: 1)" in header and "error.json" in header, root_cause[:1500]
    assert "CheckpointError: ckpts/epoch_1.pt" in traceback, root_cause[:1500]
    assert not (user_project / "o3" / "report.json").exists()


@pytest.mark.parametrize("error, later", [(CheckpointError("ckpt.pt: corrupt"), 0),
                                          (RuntimeError("[pair.cc:534] Connection closed by peer [::1]:4"), 1),
                                          (distributed.RankFailedError("rank 1 failed while ..."), 1)],
                         ids=["own error", "lost connection", "a peer's error"])
def test_record_errors_writes_torchruns_error_file_dating_follow_on_failures_later(tmp_path, monkeypatch, error,
                                                                                     later):
    import json

    path = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    monkeypatch.setattr(distributed.time, "time", lambda: 1000.0)

    @distributed.record_errors
    def entry():
        raise error
    with pytest.raises(type(error)):
        entry()
    message = json.loads(path.read_text())["message"]
    assert message["message"] == f"{type(error).__name__}: {error}"
    assert str(error) in message["extraInfo"]["py_callstack"]
    assert message["extraInfo"]["timestamp"] == str(1000 + later * distributed._FOLLOW_ON_DELAY_S)


def test_record_errors_outside_torchrun_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert distributed.record_errors(lambda x: x + 1)(1) == 2
    with pytest.raises(ValueError):
        distributed.record_errors(lambda: int("x"))()
    assert not list(tmp_path.iterdir())


def test_a_reentrant_recomputation_over_replicated_ranks_averages_its_gradient(tmp_path):
    results = w.spawn(w.reentrant_replicated, 2, str(tmp_path))
    for got in results:
        torch.testing.assert_close(got["reentrant"], got["plain"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[0]["plain"], results[1]["plain"], rtol=0, atol=0)


def test_a_reentrant_recomputation_under_ddp_averages_its_gradient(tmp_path):
    # where the weights are used only inside reentrant checkpoints, the whole coefficient
    # gradient was added after DDP's average: each rank trained coefficients of its own
    results = w.spawn(w.reentrant_under_ddp, 2, str(tmp_path))
    for case in ("whole", "differing"):
        plain = results[0][case, False]
        for rank in (0, 1):  # one backward and two accumulated; or graphs that differ by rank
            for got, want in zip(results[rank][case, True], plain, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        for got, other in zip(plain, results[1][case, False]):  # DDP's own average, alike on both ranks
            torch.testing.assert_close(got, other, rtol=0, atol=0)
    for res in results:  # and that average is one process's over both ranks' batches
        for reentrant in (False, True):
            torch.testing.assert_close(res["whole", reentrant][0], res["one process"], rtol=1e-5, atol=1e-7)
    for res in results:
        for reentrant in (False, True):
            # a view of an output changed in place through the output: DDP's gradient is the
            # plain one (the output tied apart from its view gave a third of it)
            in_ddp, plain = res["aliased", reentrant]
            torch.testing.assert_close(in_ddp, plain, rtol=1e-6, atol=1e-7)


def test_outputs_tied_under_ddp_keep_their_values_and_in_place_rules():
    # a conjugated view of an output was rebuilt without its conj bit (other values, other
    # gradient), and a view of an input leaf could be changed in place, changing the input
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tests.helpers import one_process_group

    class Outputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x):
            h = self.lin(x)
            c = torch.complex(h, 0.5 * h)
            return c, c.conj(), x[:, :2]

    states = [{k: v + 0.1 * i for k, v in Outputs().state_dict().items()} for i in range(3)]
    x = torch.randn(5, 4, requires_grad=True)
    x_before = x.detach().clone()
    with one_process_group():
        plain, in_ddp = tk.TWA(Outputs(), states, bits=8, group_size=8), tk.TWA(Outputs(), states, bits=8, group_size=8)
        got, want = DDP(in_ddp)(x), plain(x)
        assert got[1].is_conj() and torch.equal(got[1].resolve_conj(), want[1].resolve_conj())
        for twa, (c, conj, _) in ((in_ddp, got), (plain, want)):
            (c.abs().sum() + conj.imag.sum()).backward()
        torch.testing.assert_close(in_ddp.coefficients.grad, plain.coefficients.grad, rtol=1e-6, atol=1e-7)
        for out in (got, want):
            with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
                out[2].mul_(2.0)
    assert torch.equal(x, x_before)  # the input unchanged


def test_split_loaders_sampler_shuffles_anew_each_pass_alike_on_every_rank():
    from torch.utils.data import TensorDataset

    from twa_kernels.distributed import _EveryPassSampler

    data = TensorDataset(torch.arange(12.0))
    ranks = [_EveryPassSampler(data, num_replicas=2, rank=r, shuffle=True, seed=0) for r in range(2)]
    passes = [[list(sampler) for sampler in ranks] for _ in range(3)]
    for shares in passes:  # each pass, the ranks' shares are the whole dataset once
        assert sorted(shares[0] + shares[1]) == list(range(12))
    assert passes[0][0] != passes[1][0] != passes[2][0]  # a new shuffle every pass


def _seed_workers(worker_id):
    torch.manual_seed(worker_id)


def test_a_split_loader_keeps_how_the_loader_makes_its_batches():
    # workers' setup, pinning and timeouts were dropped: only what a rank draws may change
    from torch.utils.data import DataLoader, TensorDataset

    from tests.helpers import one_process_group

    data = TensorDataset(torch.arange(12.0))
    settings = ("batch_size", "drop_last", "collate_fn", "num_workers", "pin_memory", "timeout", "worker_init_fn",
                "persistent_workers", "prefetch_factor", "generator")
    for workers in (0, 2):
        extra = dict(persistent_workers=True, prefetch_factor=3) if workers else {}
        loader = DataLoader(data, batch_size=5, shuffle=True, drop_last=True, num_workers=workers, pin_memory=True,
                            timeout=7, worker_init_fn=_seed_workers, generator=torch.Generator(), **extra)
        with one_process_group():
            group = torch.distributed.group.WORLD
            for split in (distributed.split_loader(loader, group), distributed.split_for_evaluation(loader, group)):
                for name in settings:
                    if name == "drop_last" and split.drop_last != loader.drop_last:
                        # an evaluation share holds only the samples one process keeps, all evaluated
                        assert len(split.dataset) == 10 and not split.drop_last
                        continue
                    assert getattr(split, name) == getattr(loader, name), name


def test_a_twa_sharded_over_one_rank_loads_a_whole_state():
    # its one shard is every column: a whole state fits it, and is not refused as another rank's
    import warnings

    from tests.helpers import one_process_group

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 8))
    checkpoints = [{k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(3)]
    whole = tk.TWA(model, checkpoints, bits=4, group_size=8)
    with torch.no_grad():
        whole.coefficients.normal_()
    with one_process_group(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one rank of a "job": the warnings of a lone rank are not this test's
        sharded = tk.TWA(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 8)), checkpoints, bits=4,
                         group_size=8, process_group=torch.distributed.group.WORLD, shard=True)
        sharded.load_state_dict(whole.state_dict())
        got = sharded.averaged_state_dict()
    want = whole.averaged_state_dict()
    assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k]) for k in want)


def test_the_content_sample_sees_one_replaced_tensor_anywhere_in_the_model():
    # a copy that differs in one middle tensor only, away from the windows spread over the model
    from twa_kernels.columns import ColumnReader
    from twa_kernels.sharded_build import _content_sample

    gen = torch.Generator().manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(40, 40, generator=gen) for i in range(12)}
    names, shapes = list(state), [tuple(v.shape) for v in state.values()]
    num_cols = sum(v.numel() for v in state.values())
    digests = set()
    for name in [None, *names]:
        copy = {k: v + 1 if k == name else v for k, v in state.items()}
        digests.add(_content_sample(ColumnReader(copy, names=names), names, shapes, num_cols, {}))
    assert len(digests) == len(names) + 1


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, RuntimeError])
def test_update_bn_interrupted_in_its_all_reduce_leaves_the_statistics_and_their_stamp_as_before(
        monkeypatch, interruption):
    # a Ctrl-C there kept one rank's own statistics, stamped as measured at these weights
    from tests.helpers import one_process_group

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 2))
    checkpoints = [{k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v
                    for k, v in model.state_dict().items()} for _ in range(3)]
    twa = tk.TWA(model, checkpoints, bits=4)
    before = {k: v.clone() for k, v in model[1].state_dict().items()}

    def cut(*args, **kwargs):
        raise interruption("cut short")

    monkeypatch.setattr(distributed, "all_reduce_bn_statistics", cut)
    with one_process_group(), pytest.raises(interruption):
        distributed.update_bn([torch.randn(16, 4) for _ in range(3)], twa, torch.distributed.group.WORLD)
    assert all(torch.equal(v, before[k]) for k, v in model[1].state_dict().items())
    with pytest.warns(RuntimeWarning, match="BatchNorm statistics were not measured"):  # still stale, as said
        twa.averaged_state_dict()


def test_update_bn_over_ranks_names_unreached_layers_and_tells_them_from_empty_loaders(monkeypatch):
    # every BatchNorm layer out of the forward's reach was blamed on loaders "that yielded no
    # batch", when they had yielded batches: one process warns of the layers instead
    from tests.helpers import one_process_group

    class Unreached(torch.nn.Module):  # its BatchNorm runs in a training_step, not in forward
        def __init__(self):
            super().__init__()
            self.body, self.norm = torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)

        def forward(self, x):
            return self.body(x)

    torch.manual_seed(0)
    model = Unreached()
    model.norm.running_mean.fill_(3.0)
    checkpoints = [{k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v
                    for k, v in model.state_dict().items()} for _ in range(3)]
    twa = tk.TWA(model, checkpoints, bits=4)
    with one_process_group():
        with pytest.warns(RuntimeWarning, match=r"norm layer\(s\) \['norm'\] saw none of the 3 batches"):
            fed = distributed.update_bn([torch.randn(8, 4) for _ in range(3)], twa, torch.distributed.group.WORLD)
        assert fed == 3  # this rank's batches
        assert torch.equal(model.norm.running_mean, torch.full((4,), 3.0))  # kept, as in one process
        with pytest.raises(tk.batchnorm.NoBatchesError, match="no rank's loader yielded a batch"):
            distributed.update_bn([], twa, torch.distributed.group.WORLD)

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(distributed, "all_reduce_metrics", interrupted)  # the count's all-reduce
        with pytest.raises(KeyboardInterrupt):
            distributed.update_bn([torch.randn(8, 4)], twa, torch.distributed.group.WORLD)
        assert torch.equal(model.norm.running_mean, torch.full((4,), 3.0))  # not left reset
    with pytest.warns(RuntimeWarning, match="saw none of the 2 batches"):
        assert twa.update_bn([torch.randn(8, 4)] * 2) == 2  # the batches the pass fed the model
    assert tk.update_bn([torch.randn(8, 4)], torch.nn.Linear(4, 4)) == 0  # nothing to measure: not read


def test_a_gathering_call_on_one_rank_alone_says_every_rank_must_make_it(tmp_path):
    # the all-gather's timeout named only gloo's transport, 30 minutes after the call
    results = w.spawn(w.one_rank_exports, 2, str(tmp_path), timeout=120, collective_timeout=3)
    assert results[0]["error"].startswith("UsageError: TWA's all-gather across its process group failed (")
    assert "Every rank must make the same TWA calls" in results[0]["error"]
    assert "under `if rank == 0:`" in results[0]["error"]


def test_every_collective_of_the_library_names_a_rank_that_waited_alone(monkeypatch):
    # the checks that compare the ranks, update_bn's and all_reduce_metrics' exchanges and
    # decor.update's raised gloo's bare timeout, naming neither the call nor the fix
    from tests.helpers import one_process_group
    from twa_kernels._collectives import agree

    def timed_out(*args, **kwargs):
        raise RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 15000ms for send operation")

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    decorrelated = torch.nn.Sequential(torch.nn.Linear(3, 2))
    tk.decor.decorrelate(decorrelated, sample_fraction=1.0)
    decorrelated(torch.randn(4, 3))
    with one_process_group():
        group = torch.distributed.group.WORLD
        with monkeypatch.context() as patch:
            patch.setattr(torch.distributed, "all_gather", timed_out)
            with pytest.raises(tk.errors.UsageError, match="the exchange after a step across its process "
                                                           "group failed .*Every rank"):
                agree(lambda: 1, group, "a step")
            with pytest.raises(tk.errors.UsageError, match="the check of the ranks' bases across"):
                distributed.check_same_basis(torch.zeros(32), quantize(torch.randn(2, 32), 4, 16), group)

            def fails():
                raise ValueError("this rank's own failure")

            with pytest.raises(ValueError, match="this rank's own failure"):  # not the exchange that followed it
                agree(fails, group, "a step")
        monkeypatch.setattr(torch.distributed, "all_reduce", timed_out)  # the all-gathers before them pass
        calls = {"all_reduce_metrics' all-reduce": lambda: distributed.all_reduce_metrics({"loss": 1.0}, group),
                 "the all-reduce of the BatchNorm statistics": lambda: distributed.all_reduce_bn_statistics(model,
                                                                                                          group),
                 "decor.update's all-reduce": lambda: tk.decor.update(decorrelated, group)}
        for what, call in calls.items():
            with pytest.raises(tk.errors.UsageError, match=f"{what} across its process group failed .*Every rank"):
                call()


def test_ranks_at_different_exchanges_of_the_library_raise_together(tmp_path):
    # the all-gathers of unequal sizes met, and gloo ended both processes (SIGABRT)
    results = w.spawn(w.unlike_exchanges, 2, str(tmp_path), timeout=120, collective_timeout=20)
    for res in results:
        want = ("UsageError: the ranks reached different exchanges of the library at once (rank 0: the exchange "
                "after checking its metrics (2049 bytes); rank 1: the exchange after recomputing BatchNorm "
                "statistics (2049 bytes))")
        assert res["helpers"].startswith(want), res["helpers"]
        assert "under `if rank == 0:`" in res["helpers"]
        assert "rank 0: the check of the test's values (16 bytes); rank 1: the check of the test's values (32 " \
               "bytes)" in res["sizes"], res["sizes"]
        assert res["after"] == 2.0


def test_an_agreement_flag_left_on_a_device_is_read_every_few_all_reduces(monkeypatch):
    # on a GPU each read is a host sync: the flags are gathered there and read now and then
    from tests.helpers import one_process_group
    from twa_kernels import sharding

    sums = torch.distributed.all_reduce
    calls = []

    def disagreeing_third(buffer, **kwargs):  # as if another rank held other coefficients at call 3
        sums(buffer, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            buffer[-1] += 1
    monkeypatch.setattr(sharding, "_read_at_once", lambda device: False)
    monkeypatch.setattr(sharding, "_READ_EVERY", 4)
    with one_process_group():
        comm = sharding.Comm(torch.distributed.group.WORLD)
        monkeypatch.setattr(torch.distributed, "all_reduce", disagreeing_third)
        coefficients = torch.randn(2, 3)
        for _ in range(3):  # read at the fourth
            torch.testing.assert_close(comm.all_reduce_agreed(torch.ones(2, 3), coefficients), torch.ones(2, 3))
        with pytest.raises(tk.errors.UsageError, match="averaged a gradient over coefficients that differ"):
            comm.all_reduce_agreed(torch.ones(2, 3), coefficients)
        for _ in range(8):  # read, and reset, at every fourth
            comm.all_reduce_agreed(torch.ones(2, 3), coefficients)
        calls.clear()
        for _ in range(3):  # the third disagrees; nothing reads it until the run's end asks
            comm.all_reduce_agreed(torch.ones(2, 3), coefficients)
        with pytest.raises(tk.errors.UsageError, match="averaged a gradient over coefficients that differ"):
            comm.check_agreement()  # TWA's eval() and averaged_state_dict() call it


def test_a_collective_that_fails_for_another_reason_keeps_its_own_error(monkeypatch):
    # memory running out in a collective was reworded as a rank mismatch
    from tests.helpers import one_process_group
    from twa_kernels.sharding import Comm

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("out of memory (test stand-in)")

    with one_process_group():
        comm = Comm(torch.distributed.group.WORLD)
        monkeypatch.setattr(torch.distributed, "all_reduce", out_of_memory)
        with pytest.raises(torch.OutOfMemoryError, match="test stand-in"):
            comm.all_reduce_agreed(torch.ones(2), torch.zeros(2))

        def timed_out(*args, **kwargs):
            raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Timed out waiting 3000ms for recv operation")

        monkeypatch.setattr(torch.distributed, "all_reduce", timed_out)
        with pytest.raises(tk.errors.UsageError, match="all-reduce across its process group failed .*Every rank"):
            comm.all_reduce_agreed(torch.ones(2), torch.zeros(2))
