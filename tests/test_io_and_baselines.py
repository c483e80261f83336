"""Checkpoint safety and formats, the averaging baselines, update_bn, and the
streaming memory bound of Subspace.from_checkpoints."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import twa_kernels as tk
from twa_kernels.columns import ColumnReader
from twa_kernels.io import load_state_dict, resolve_checkpoints

from tests.digits import make_model
from tests.helpers import RunsCode, noisy_checkpoints

HERE = Path(__file__).parent


def _checkpoints(n: int, seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    return noisy_checkpoints(make_model(seed), n)


def test_a_checkpoint_that_would_run_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    torch.save({"state_dict": make_model().state_dict(), "payload": RunsCode(str(marker))}, bad)
    with pytest.raises(tk.CheckpointError, match=r"evil\.pt: refused"):
        load_state_dict(bad)
    with pytest.raises(tk.CheckpointError, match="refused"):
        tk.TWA(make_model(), [_checkpoints(1)[0], bad])
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [4, 5])
def test_a_plain_pickle_is_refused_as_one_not_called_damaged(tmp_path, protocol):
    # torch's safe unpickler stops at protocol 4's first frame: the file was called damaged
    import pickle

    marker = tmp_path / "pwned"
    for name, payload in (("evil", RunsCode(str(marker))), ("tensors", make_model().state_dict())):
        path = tmp_path / f"{name}.pkl"
        path.write_bytes(pickle.dumps({"state_dict": payload}, protocol=protocol))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own note on the protocol
            with pytest.raises(tk.CheckpointError, match=rf"{name}\.pkl: refused. It is a plain Python pickle "
                                                         rf"\(protocol {protocol}"):
                load_state_dict(path)
    assert not marker.exists()
    # torch.save's own legacy format at that protocol is named as such, not as a plain pickle
    legacy = tmp_path / "legacy.pt"
    torch.save(make_model().state_dict(), legacy, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(tk.CheckpointError, match=rf"legacy.pt: refused. It is a torch.save file in the legacy "
                                                     rf"format at pickle_protocol={protocol}"):
            load_state_dict(legacy)
    # and its zip format at that protocol, a whole file, is not called damaged either
    zipped = tmp_path / "zipped.pt"
    torch.save(make_model().state_dict(), zipped, pickle_protocol=protocol)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for read in (load_state_dict, lambda path: tk.TWA(make_model(), [_checkpoints(1)[0], path])):
            with pytest.raises(tk.CheckpointError, match=rf"zipped.pt: refused. It is a torch.save file saved at "
                                                         rf"pickle_protocol={protocol}"):
                read(zipped)


def test_wrong_shape_names_file_key_and_both_shapes(tmp_path):
    good = _checkpoints(2)
    wrong = dict(good[1])
    wrong["3.weight"] = torch.zeros(10, 47)
    torch.save(good[0], tmp_path / "a.pt")
    torch.save(wrong, tmp_path / "b.pt")
    model = make_model()
    with pytest.raises(tk.CheckpointError, match=r"b\.pt: key '3\.weight' has shape \(10, 47\) but the model has "
                                                 r"\(10, 48\)"):
        tk.TWA(model, tmp_path)
    missing = dict(good[1])
    del missing["0.bias"]
    with pytest.raises(tk.CheckpointError, match="missing key '0.bias'"):
        tk.Subspace.from_checkpoints([good[0], missing])


def test_formats_nesting_prefixes_directories_and_globs(tmp_path):
    ckpts = _checkpoints(3)
    torch.save({"state_dict": {f"module.{k}": v for k, v in ckpts[0].items()}}, tmp_path / "e0.pt")
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in ckpts[1].items()}, "epoch": 3}, tmp_path / "e1.pth")
    tk.save_state_dict(ckpts[2], tmp_path / "e2.safetensors")
    for spec in (tmp_path, str(tmp_path / "e*"), sorted(tmp_path.iterdir())):
        loaded = [load_state_dict(p) for p in resolve_checkpoints(spec)]
        assert len(loaded) == 3
        for got, want in zip(loaded, ckpts):
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(tk.CheckpointError, match="matches no files"):
        resolve_checkpoints(str(tmp_path / "nothing*.pt"))
    with pytest.raises(tk.CheckpointError, match="no such checkpoint"):
        load_state_dict(tmp_path / "absent.pt")


def test_uniform_and_ema_averages():
    ckpts = _checkpoints(4)
    avg = tk.uniform_average(ckpts)
    torch.testing.assert_close(avg["0.weight"], torch.stack([c["0.weight"] for c in ckpts]).mean(0))
    assert avg["1.num_batches_tracked"] == ckpts[-1]["1.num_batches_tracked"]
    ema = tk.ema_average(ckpts, decay=0.5)
    expected = ckpts[0]["0.weight"].double()
    for c in ckpts[1:]:
        expected = 0.5 * expected + 0.5 * c["0.weight"].double()
    torch.testing.assert_close(ema["0.weight"], expected.float())


@pytest.mark.parametrize("average", ["uniform", "ema", "greedy"])
def test_averages_come_back_in_the_widest_dtype_whatever_the_order(average):
    # the result took the last checkpoint's dtype: bfloat16 files averaged for a float32
    # model were rounded to bfloat16, and a mixed set changed dtype and values with its order
    ckpts = _checkpoints(3)
    mixed = [{k: v.bfloat16() if v.is_floating_point() and i else v for k, v in c.items()}
             for i, c in enumerate(ckpts)]  # the first checkpoint float32, the others bfloat16
    run = {"uniform": tk.uniform_average, "ema": lambda c, **kw: tk.ema_average(c, decay=0.0, **kw),
           "greedy": lambda c, **kw: tk.greedy_soup(c, lambda state: 0.0, **kw)[0]}[average]
    forward, backward = run(mixed), run(mixed[::-1])
    assert forward["0.weight"].dtype == backward["0.weight"].dtype == torch.float32
    if average == "uniform":
        torch.testing.assert_close(forward["0.weight"], backward["0.weight"], rtol=0, atol=1e-7)
        expected = torch.stack([c["0.weight"].double() for c in mixed]).mean(0)
        torch.testing.assert_close(forward["0.weight"], expected.float(), rtol=0, atol=0)
    halves = [{k: v.bfloat16() if v.is_floating_point() else v for k, v in c.items()} for c in ckpts]
    assert run(halves)["0.weight"].dtype == torch.bfloat16  # as the files, without a model
    assert run(halves, model=make_model())["0.weight"].dtype == torch.float32  # given one: at least its dtype
    # torch has no promotion for 8-bit floats: they give way to the other dtype
    eights = [{k: v.to(dtype) if v.is_floating_point() else v for k, v in c.items()}
              for c, dtype in zip(ckpts, (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fn))]
    same_kind = [eights[0], eights[2]]
    assert run(same_kind)["0.weight"].dtype == torch.float8_e4m3fn
    assert run(same_kind, model=make_model())["0.weight"].dtype == torch.float32
    assert run(eights)["0.weight"].dtype == torch.float32


@pytest.mark.parametrize("change", ["extra key", "integer entry"])
@pytest.mark.parametrize("average", ["uniform", "ema", "greedy"])
def test_averages_refuse_a_later_checkpoint_whose_entries_differ_from_the_first(change, average):
    # the result's keys and dtypes followed the last checkpoint: an entry held by it alone was taken unaveraged
    ckpts = _checkpoints(3)
    if change == "extra key":
        ckpts[2]["head.weight"] = torch.randn(3)
    else:
        ckpts[2]["0.bias"] = ckpts[2]["0.bias"].round().long()
    run = {"uniform": tk.uniform_average, "ema": tk.ema_average,
           "greedy": lambda c: tk.greedy_soup(c, lambda state: 0.0)}[average]
    with pytest.raises(tk.CheckpointError, match=r"checkpoint.*(lacks|first checkpoint's is torch.float32)"):
        run(ckpts)
    model = make_model()  # given the model, only its keys are read
    if change == "extra key":
        assert set(tk.uniform_average(ckpts, model=model)) == set(model.state_dict())


def test_complex_entries_are_averaged_and_their_nan_refused(tmp_path):
    # a complex entry came from the last checkpoint unaveraged, and a complex NaN passed
    paths = []
    for i, v in enumerate((1.0, 3.0)):
        torch.save({"w": torch.full((2,), v * (1 + 1j), dtype=torch.complex64), "r": torch.full((2,), v)},
                   tmp_path / f"c{i}.pt")
        paths.append(tmp_path / f"c{i}.pt")
    for average in (tk.uniform_average(paths), tk.ema_average(paths, decay=0.5)):
        assert torch.equal(average["w"], torch.full((2,), 2 + 2j, dtype=torch.complex64))
        assert torch.equal(average["r"], torch.full((2,), 2.0))
    torch.save({"w": torch.full((2,), complex("nan"), dtype=torch.complex64), "r": torch.ones(2)}, tmp_path / "bad.pt")
    with pytest.raises(tk.errors.CheckpointError, match="'w' holds 2 NaN or Inf"):
        tk.uniform_average([paths[0], tmp_path / "bad.pt"])


def test_an_empty_safetensors_file_is_refused_as_an_empty_torch_file_is(tmp_path):
    # it loaded as {} and two of them averaged to {}
    import safetensors.torch

    for name in ("a", "b"):
        safetensors.torch.save_file({}, str(tmp_path / f"{name}.safetensors"))
    with pytest.raises(tk.errors.CheckpointError, match="a.safetensors: holds no tensors"):
        tk.uniform_average([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    # and the column reader (the out-of-core builders' path) says the same, not "lacks key ..."
    with pytest.raises(tk.errors.CheckpointError, match="a.safetensors: holds no tensors"):
        ColumnReader(tmp_path / "a.safetensors")


def test_greedy_soup_adds_only_what_helps():
    ckpts = _checkpoints(4)
    target = ckpts[1]["0.weight"]

    def score(state):  # closer to checkpoint 1 is better
        return -float((state["0.weight"] - target).norm())

    soup, chosen = tk.greedy_soup(ckpts, score)
    assert chosen[0] == 1 and torch.equal(soup["0.weight"], target) and chosen == [1]


@pytest.mark.parametrize("bad", [float("nan"), None, float("inf"), "0.9"])
@pytest.mark.parametrize("where", [0, 1])
def test_greedy_soup_refuses_a_score_that_is_not_a_finite_number_naming_the_checkpoint(bad, where):
    # a NaN compares false with everything: {0: nan, 1: 0.9, 2: 0.1} used to pick [0]
    scores = [0.5, 0.9, 0.1]
    scores[where] = bad
    ckpts = _checkpoints(3)
    with pytest.raises(tk.errors.InvalidArgumentError, match=rf"score of checkpoint {where} .*finite real number"):
        tk.greedy_soup(ckpts, lambda state: _score_of(state, ckpts, scores))


def _score_of(state, checkpoints, scores, other=0.0):
    """The score given for the checkpoint `state` holds the weights of (`other` for a soup)."""
    return next((s for c, s in zip(checkpoints, scores) if torch.equal(c["0.weight"], state["0.weight"])), other)


def test_greedy_soup_names_a_score_that_is_not_a_function():
    # the scores themselves, passed where the function belongs: a bare TypeError, late, before
    with pytest.raises(tk.errors.InvalidTypeError, match="score must be a function of a state_dict.*got list"):
        tk.greedy_soup(_checkpoints(3), [0.5, 0.9, 0.1])


def test_greedy_soup_is_not_changed_by_a_score_that_writes_into_what_it_is_given():
    checkpoints = [{"w": torch.ones(2)}, {"w": torch.full((2,), 3.0)}]

    def score(state):
        state["w"].clamp_(max=2.0)  # as a load with assign=True, then update_bn or training, would
        return 1.0

    soup, kept = tk.greedy_soup(checkpoints, score)
    assert kept == [0, 1] and torch.equal(soup["w"], torch.full((2,), 2.0))
    assert torch.equal(checkpoints[1]["w"], torch.full((2,), 3.0))


def test_greedy_soup_takes_tensor_scores_and_starts_from_the_best_checkpoint():
    ckpts = _checkpoints(3)
    scores = {0: 0.2, 1: 0.9, 2: 0.9}  # a tie at the top: the first of the two leads, with its own score
    soup, chosen = tk.greedy_soup(ckpts, lambda state: torch.tensor(_score_of(state, ckpts, list(scores.values()))))
    assert chosen == [1] and torch.equal(soup["0.weight"], ckpts[1]["0.weight"])


def _bn_model():
    model = make_model(0)
    with torch.no_grad():  # statistics that a reset (mean 0, var 1) would visibly lose
        model[1].running_mean.fill_(3.0)
        model[1].running_var.fill_(5.0)
        model[1].num_batches_tracked.fill_(7)
    return model


@pytest.mark.parametrize("kind", ["empty list", "spent generator", "twa spent generator"])
def test_update_bn_with_no_batches_refuses_and_keeps_the_statistics(kind):
    # an empty or used-up loader would reset the statistics to mean 0 and variance 1, as if measured
    model = _bn_model()
    batches = (torch.randn(8, 64) for _ in range(2))
    list(batches)  # used up
    target = tk.TWA(model, _checkpoints(3), bits=None) if kind.startswith("twa") else model
    module = target.module if kind.startswith("twa") else model
    before = {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}
    momentum = module[1].momentum
    with pytest.raises(tk.errors.InvalidArgumentError, match="yielded no batches") as info:
        if kind == "empty list":
            tk.update_bn([], model)
        elif kind == "spent generator":
            tk.update_bn(batches, model)
        else:
            target.update_bn(batches)
    assert ("re-iterable such as a list" in str(info.value)) == (kind != "empty list")
    after = module.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert module[1].momentum == momentum
    if kind.startswith("twa"):  # not recorded as measured: exporting still warns
        with pytest.warns(RuntimeWarning, match="update_bn"):
            target.averaged_state_dict()


def test_update_bn_that_fails_mid_pass_keeps_the_old_statistics():
    model = _bn_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def batches():
        yield torch.randn(8, 64)
        raise RuntimeError("the loader broke")

    with pytest.raises(RuntimeError, match="the loader broke"):
        tk.update_bn(batches(), model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_update_bn_refuses_statistics_that_a_nan_or_inf_in_one_batch_makes_and_keeps_the_old(bad):
    # one NaN in one batch turned every channel's statistics into NaN without a word
    model = _bn_model()
    batches = [torch.randn(8, 64) for _ in range(3)]
    tk.update_bn(batches, model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches[1][0, 0] = bad
    with pytest.raises(tk.batchnorm.NonFiniteStatisticsError, match=r"statistics measured for the norm layer"):
        tk.update_bn(batches, model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


class _HeadOutsideForward(torch.nn.Module):
    """forward runs the backbone only; training runs backbone and head (as a LightningModule's
    training_step that calls its parts)."""

    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8))
        self.head = torch.nn.Sequential(torch.nn.Linear(8, 3), torch.nn.BatchNorm1d(3))

    def forward(self, x):
        return self.backbone(x)


def test_update_bn_names_a_batchnorm_its_pass_never_reaches_and_keeps_its_statistics():
    # the head's BatchNorm was reset to mean 0 and variance 1, measured nothing, and stayed so
    torch.manual_seed(0)
    model = _HeadOutsideForward()
    with torch.no_grad():
        model.head[1].running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in model.head.state_dict().items()}
    batches = [torch.randn(8, 6) for _ in range(3)]
    with pytest.warns(RuntimeWarning, match=r"\['head.1'\] saw none of the 3 batches .* pass call_fn"):
        tk.update_bn(batches, model)
    for key, value in model.head.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert int(model.backbone[1].num_batches_tracked) == 3  # the layer it reaches is measured
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tk.update_bn(batches, model, call_fn=lambda m, x: m.head(m(x)))  # reached: measured, no warning
    assert int(model.head[1].num_batches_tracked) == 3


@pytest.mark.parametrize("bad", ["unknown key", "wrapper prefix", "shape", "meta", "dtype"])
def test_update_bn_refuses_weights_the_model_does_not_have_before_changing_anything(bad):
    # an unknown key would leave the model's own tensor in place, the statistics measured at
    # its weights; a meta tensor read uninitialised memory into them; a float64 one failed deep
    model = _bn_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = {k: v + 1.0 for k, v in model.named_parameters()}
    if bad == "unknown key":
        weights["head.weight"] = weights.pop("0.weight")
    elif bad == "wrapper prefix":
        weights = {"module." + k: v for k, v in weights.items()}
    elif bad == "shape":
        weights["0.weight"] = weights["0.weight"][:, :3]
    elif bad == "meta":
        weights["0.weight"] = weights["0.weight"].to("meta")
    else:
        weights["0.weight"] = weights["0.weight"].double()
    with pytest.raises(tk.errors.InvalidArgumentError,
                       match="names no parameter|but the model's tensor has shape|in the model's dtypes and on its"):
        tk.update_bn([torch.randn(8, 64)], model, weights=weights)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_update_bn_at_given_weights_equals_update_bn_of_a_model_holding_them():
    model, probe = _bn_model(), _bn_model()
    weights = {k: v + 0.1 * torch.randn_like(v) for k, v in model.named_parameters()}
    probe.load_state_dict(weights, strict=False)
    batches = [torch.randn(8, 64) for _ in range(3)]
    tk.update_bn(batches, model, weights=weights)
    tk.update_bn(batches, probe)
    for key, value in probe.state_dict().items():
        if "running" in key:
            torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-6)


class _TiedBN(nn.Module):
    """An embedding tied to the output layer, with a BatchNorm between."""

    def __init__(self):
        super().__init__()
        self.emb, self.bn, self.out = nn.Embedding(10, 4), nn.BatchNorm1d(4), nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens):
        return self.out(self.bn(self.emb(tokens)))


def test_update_bn_at_an_averaged_state_dict_of_a_tied_model_hands_call_fn_the_model():
    # the averaged state_dict names a tied weight twice, which functional_call refused; and
    # call_fn was handed a wrapper without the model's submodules
    torch.manual_seed(0)
    model, probe = _TiedBN(), _TiedBN()
    avg = tk.uniform_average([_TiedBN().state_dict() for _ in range(3)], model=model)
    probe.load_state_dict(avg)
    batches = [torch.randint(0, 10, (8,)) for _ in range(3)]
    tk.update_bn(batches, model, call_fn=lambda m, tokens: m.out(m.bn(m.emb(tokens))), weights=avg)
    tk.update_bn(batches, probe)
    torch.testing.assert_close(model.bn.running_mean, probe.bn.running_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.bn.running_var, probe.bn.running_var, rtol=0, atol=1e-6)
    assert model.out.weight is model.emb.weight and not torch.equal(model.emb.weight, avg["emb.weight"])
    with pytest.raises(tk.errors.InvalidArgumentError, match="ties them"):
        tk.update_bn(batches, model, weights={**avg, "out.weight": avg["emb.weight"] + 1})


def test_update_bn_recomputes_a_tracking_instancenorm_as_a_cumulative_average():
    # torch's InstanceNorm reads momentum None as 0: its statistics were left as they were
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.InstanceNorm2d(3, affine=True, track_running_stats=True))
    batches = [torch.randn(4, 2, 8, 8) for _ in range(3)]
    tk.update_bn(batches, model)
    with torch.no_grad():
        features = [model[0](x) for x in batches]
    mean = torch.stack([f.mean((2, 3)).mean(0) for f in features]).mean(0)
    var = torch.stack([f.var((2, 3)).mean(0) for f in features]).mean(0)
    torch.testing.assert_close(model[1].running_mean, mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(model[1].running_var, var, rtol=1e-5, atol=1e-6)
    assert int(model[1].num_batches_tracked) == 3 and model[1].momentum == 0.1


def test_update_bn_leaves_a_layer_as_it_was_for_an_input_with_no_rows():
    # an empty batch counted as a batch of mean 0 and halved the statistics
    torch.manual_seed(0)
    model, probe = _bn_model(), _bn_model()
    batches = [torch.randn(8, 64) for _ in range(2)]
    tk.update_bn(batches, probe)
    tk.update_bn([batches[0], torch.randn(0, 64), batches[1]], model)
    for key, value in probe.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    with pytest.warns(RuntimeWarning, match="saw none of the 1 batches"):
        tk.update_bn([torch.randn(0, 64)], model)  # no rows at all: the statistics are kept
    for key, value in probe.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["batchnorm reached", "batchnorm unreached", "instancenorm"])
def test_update_bn_passes_over_a_norm_layer_whose_statistics_were_removed(kind):
    # reset_running_stats raised on the missing buffers; an InstanceNorm or an unreached layer
    # then raised KeyError, and a reached BatchNorm's batch count was left changed
    torch.manual_seed(0)
    norm = nn.InstanceNorm1d(3, track_running_stats=True) if kind == "instancenorm" else nn.BatchNorm1d(3)
    norm.running_mean = norm.running_var = None  # normalises with each batch's, in every mode
    model = nn.Sequential(nn.Conv1d(2, 3, 1), norm)
    run = (lambda m, x: m[0](x)) if kind == "batchnorm unreached" else None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tk.update_bn([torch.randn(4, 2, 5) for _ in range(3)], model, call_fn=run)
    assert norm.running_mean is None and model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_update_bn_at_weights_measures_a_layer_registered_under_two_names_into_the_model():
    # the weights' statistics under the second name were swapped into the layer: the pass
    # wrote into the caller's weights and left the model's statistics as they were
    class TwoNames(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.BatchNorm1d(4)
            self.b = self.a

        def forward(self, x):
            return self.b(x)

    torch.manual_seed(0)
    model, probe = TwoNames(), TwoNames()
    weights = {k: v.clone() for k, v in TwoNames().state_dict().items()}
    given = {k: v.clone() for k, v in weights.items()}
    batches = [torch.randn(8, 4) for _ in range(3)]
    tk.update_bn(batches, model, weights=weights)
    tk.update_bn(batches, probe)
    torch.testing.assert_close(model.a.running_mean, probe.a.running_mean, rtol=0, atol=1e-6)
    assert all(torch.equal(v, given[k]) for k, v in weights.items())


def test_update_bn_leaves_each_submodule_in_the_mode_it_was_in():
    # a frozen BatchNorm kept in eval mode inside a model in train mode stays so
    model = _bn_model().train()
    model[1].eval()
    tk.update_bn([torch.randn(8, 64)], model)
    assert model.training and not model[1].training
    model.eval()
    model[0].train()
    tk.update_bn([torch.randn(8, 64)], model)
    assert not model.training and model[0].training and not model[1].training



def test_update_bn_at_a_whole_state_dict_measures_into_the_model_and_leaves_the_state_alone():
    # the state's statistics were swapped in and updated from its batch count on, the model's
    # own left reset to mean 0 and variance 1
    model, probe = _bn_model(), _bn_model()
    state = {k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v.clone()
             for k, v in _bn_model().state_dict().items()}
    given = {k: v.clone() for k, v in state.items()}
    probe.load_state_dict(state)
    batches = [torch.randn(8, 64) for _ in range(3)]
    tk.update_bn(batches, model, weights=state)
    tk.update_bn(batches, probe)
    for key, value in probe.state_dict().items():
        if "running" in key or "num_batches" in key:
            torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)
    assert all(torch.equal(state[k], given[k]) for k in state)


class _NormEval(nn.Sequential):
    """A model whose train() keeps its first BatchNorm in eval mode (a frozen backbone's
    statistics, as detection models' norm_eval does)."""

    def __init__(self):
        torch.manual_seed(0)
        super().__init__(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8))
        with torch.no_grad():
            self[1].running_mean.fill_(2.0)
            self[1].running_var.fill_(9.0)

    def train(self, mode: bool = True):
        super().train(mode)
        self[1].eval()
        return self


def _after_frozen_first_norm(model: nn.Module, batches: list) -> torch.Tensor:
    """The second BatchNorm's mean over `batches`, measured with the first in eval mode."""
    with torch.no_grad():
        hidden = [model[3](model[2](model[1].eval()(model[0](x)))) for x in batches]
    return torch.cat(hidden).mean(0)


@pytest.mark.parametrize("how", ["train() keeps it in eval mode", "frozen_norms"])
def test_update_bn_leaves_a_frozen_batchnorm_as_it_is_and_measures_the_next_behind_it(how):
    model = _NormEval() if how.startswith("train") else nn.Sequential(*_NormEval())
    first = {k: v.clone() for k, v in model[1].state_dict().items()}
    batches = [torch.randn(16, 6) for _ in range(3)]
    tk.update_bn(batches, model, frozen_norms=["1"] if how == "frozen_norms" else ())
    assert all(torch.equal(v, first[k]) for k, v in model[1].state_dict().items()), "neither reset nor measured"
    torch.testing.assert_close(model[4].running_mean, _after_frozen_first_norm(model, batches), rtol=0, atol=1e-5)
    with pytest.raises(tk.errors.InvalidArgumentError, match="frozen_norms names '3', which is not a norm layer"):
        tk.update_bn(batches, model, frozen_norms=["3"])


def test_update_bn_names_a_twa_and_a_meta_model():
    # a TWA holds its model outside its module tree: no BatchNorm was found and nothing happened
    twa = tk.TWA(_bn_model(), _checkpoints(3), bits=None)
    with pytest.raises(tk.errors.InvalidTypeError, match=r"got a TWA.*twa.update_bn\(loader\)"):
        tk.update_bn([torch.randn(8, 64)], twa)
    with torch.device("meta"):
        meta = make_model(0)
    with pytest.raises(tk.errors.InvalidArgumentError, match="'0.weight' is on the meta device"):
        tk.update_bn([torch.randn(8, 64)], meta)

def test_update_bn_names_an_empty_tuple_batch():
    with pytest.raises(tk.errors.InvalidArgumentError, match="empty tuple"):
        tk.update_bn([()], _bn_model())


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, a, b):
        return self.bn(a + b)


def test_update_bn_feeds_a_model_whose_hooks_take_what_its_forward_signature_does_not():
    # the batch is judged by the call, not by forward's signature: a pre-hook may rename keywords
    model = _TwoInputs()
    model.register_forward_pre_hook(lambda m, args, kwargs: ((), {"a": kwargs["image"], "b": kwargs["image"]}),
                                    with_kwargs=True)
    x = torch.randn(8, 3)
    tk.update_bn([{"image": x}], model)
    assert torch.allclose(model.bn.running_mean, (2 * x).mean(0))


def test_update_bn_lets_a_type_error_from_inside_the_forward_through_as_it_is():
    class Broken(_TwoInputs):
        def forward(self, a):
            return self.bn(a) + "text"  # the model's own bug, not the batch's layout

    with pytest.raises(TypeError, match="unsupported operand"):
        tk.update_bn([(torch.randn(8, 3), torch.zeros(8))], Broken())


@pytest.mark.parametrize("layout", ["mapping", "three-tuple"])
def test_update_bn_names_a_batch_its_model_does_not_take_with_call_fn_and_keeps_the_statistics(layout):
    # a raw TypeError from inside forward named neither the batch's layout nor call_fn
    model = _TwoInputs()
    a, b = torch.randn(8, 3), torch.randn(8, 3)
    batch = {"a": a, "b": b, "label": torch.zeros(8)} if layout == "mapping" else (a, b, torch.zeros(8))
    with pytest.raises(tk.errors.InvalidArgumentError, match="its forward does not take.*pass call_fn"):
        tk.update_bn([batch], model)
    assert int(model.bn.num_batches_tracked) == 0 and torch.equal(model.bn.running_mean, torch.zeros(3))
    fed = (lambda m, x: m(x["a"], x["b"])) if layout == "mapping" else (lambda m, x: m(*x[:-1]))
    tk.update_bn([batch], model, call_fn=fed)
    assert torch.allclose(model.bn.running_mean, (a + b).mean(0))


def _rezipped(source: Path, target: Path, compression: int, record=lambda name, data: data) -> Path:
    import zipfile

    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", compression) as new:
        for info in old.infolist():
            new.writestr(info.filename, record(info.filename, old.read(info)))
    return target


@pytest.mark.parametrize("variant", ["deflated", "big_endian"])
def test_a_torch_zip_that_cannot_be_mapped_as_stored_is_read_whole_and_right(tmp_path, variant):
    # the streamed reader mapped deflated records (reading compressed bytes as weights) and
    # dropped the pages of byte-swapped ones (reading them unswapped): wrong weights, no error
    import array
    import zipfile

    state = {"a": torch.arange(16.0), "b": torch.arange(16.0) + 100, "c": torch.arange(4.0) + 7}
    torch.save(state, tmp_path / "plain.pt")
    if variant == "deflated":
        path = _rezipped(tmp_path / "plain.pt", tmp_path / "file.pt", zipfile.ZIP_DEFLATED)
    else:
        def big(name, data):
            if name.endswith("/byteorder"):
                return b"big"
            if "/data/" in name:
                values = array.array("f", data)
                values.byteswap()
                return values.tobytes()
            return data
        path = _rezipped(tmp_path / "plain.pt", tmp_path / "file.pt", zipfile.ZIP_STORED, big)
    assert all(torch.equal(load_state_dict(path)[k], v) for k, v in state.items())
    reader = ColumnReader(path)
    for key in reader.keys():
        assert torch.equal(reader.tensor(key), state[key]), key
    sub = tk.Subspace.from_checkpoints([path, tmp_path / "plain.pt"], bits=None)
    torch.testing.assert_close(sub.center, torch.cat([v for v in state.values()]), rtol=0, atol=0)


_MEMORY_PROBE = r"""
import resource, sys, torch, twa_kernels as tk
paths = sys.argv[2:]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sub = tk.Subspace.from_checkpoints(paths, bits=int(sys.argv[1]))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, sub.basis.nbytes)
"""


def test_building_a_subspace_holds_the_packed_basis_not_k_dense_checkpoints(tmp_path):
    d = 4_000_000  # 16 MB per float32 checkpoint
    paths = []
    for i in range(12):
        path = tmp_path / f"c{i:02d}.safetensors"
        tk.save_state_dict({"w": torch.randn(d)}, path)
        paths.append(str(path))
    env = {k: v for k, v in os.environ.items() if k != "TWA_KERNELS_BACKEND"}
    # glibc raises its mmap threshold as large blocks are freed and then keeps freed
    # checkpoints in its heap, so peak RSS swings by hundreds of MB between runs; a fixed
    # threshold returns freed blocks at once and leaves the algorithm's own memory.
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"

    def peak_kb(n):
        out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, "4", *paths[:n]], capture_output=True, text=True,
                             env=env, check=True, cwd=HERE.parent).stdout.split()
        return int(out[0]), int(out[1])

    peak3, _ = peak_kb(3)
    peak12, packed12 = peak_kb(12)
    dense_extra_kb = 9 * d * 4 / 1024  # what holding 9 more dense rows would add
    # growth from 3 to 12 checkpoints is about the 9 extra packed rows (~2.25 MB each)
    assert peak12 - peak3 < dense_extra_kb / 4, (peak3, peak12, packed12)


@pytest.mark.parametrize("form", ["state_dict", "pt", "safetensors"])
def test_two_keys_that_name_one_weight_are_refused_naming_both(tmp_path, form):
    state = dict(_checkpoints(1)[0])
    state["module.0.weight"] = state["0.weight"] + 1
    spec = state if form == "state_dict" else tk.save_state_dict(state, tmp_path / f"c.{form}")
    match = r"keys '0\.weight' and 'module\.0\.weight' both name '0\.weight'"
    with pytest.raises(tk.CheckpointError, match=match):
        tk.TWA(make_model(), [spec, _checkpoints(1)[0]])
    with pytest.raises(tk.CheckpointError, match=match):
        ColumnReader(spec)  # read lazily, column by column


def test_a_model_whose_own_names_start_with_a_wrapper_prefix_reads_back_as_saved(tmp_path):
    # `module.` was removed from every key that had it, so a model with a submodule named
    # `module` read back other names: its weights were skipped or reported missing
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.module, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.module(x))

    model = Holder()
    state = model.state_dict()
    for form in ("pt", "safetensors"):
        path = tk.save_state_dict(state, tmp_path / f"w.{form}")
        assert set(tk.load_state_dict(path)) == set(state)
        assert torch.equal(ColumnReader(path).tensor("module.weight"), state["module.weight"])  # read lazily
    ckpts = [{k: v + i for k, v in state.items()} for i in range(3)]
    twa = tk.TWA(model, ckpts, bits=None)
    with twa.averaged_model() as averaged:
        torch.testing.assert_close(averaged.module.weight, state["module.weight"] + 1)
    wrapped = {f"module.{k}": v for k, v in state.items()}  # a DDP wrapper's: every key prefixed
    assert set(tk.load_state_dict(tk.save_state_dict(wrapped, tmp_path / "ddp.pt"))) == set(state)


def test_a_model_whose_only_child_is_named_module_reads_its_own_checkpoints(tmp_path):
    # every key carries `module.`, which was taken off as a wrapper's: the model's own files
    # were refused as missing 'module.weight'
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = nn.Linear(3, 2)

        def forward(self, x):
            return self.module(x)

    model = Wrapper()
    states = [{k: v + i for k, v in model.state_dict().items()} for i in range(3)]
    files = [tk.save_state_dict(state, tmp_path / f"w{i}.safetensors") for i, state in enumerate(states)]
    for given in (states, files):
        averaged = tk.uniform_average(given, model=model)
        assert set(averaged) == {"module.weight", "module.bias"}
        torch.testing.assert_close(averaged["module.weight"], states[1]["module.weight"])
        twa = tk.TWA(Wrapper(), given, bits=None)
        torch.testing.assert_close(twa.weights()["module.weight"], states[1]["module.weight"])


def test_checkpoints_given_in_the_wrong_shape_get_named_errors(tmp_path):
    state = _checkpoints(1)[0]
    with pytest.raises(tk.errors.InvalidTypeError, match=r"one state_dict .* pass \[state_dict\]"):
        tk.TWA(make_model(), state)
    with pytest.raises(tk.errors.InvalidTypeError, match="checkpoints is None"):
        tk.uniform_average(None)
    with pytest.raises(tk.errors.InvalidTypeError, match="checkpoint #1 is a int"):
        resolve_checkpoints([state, 5])
    (tmp_path / "runs").mkdir()
    with pytest.raises(tk.CheckpointError, match=r"runs: is a directory, not a checkpoint"):
        tk.Subspace.from_checkpoints([state, tmp_path / "runs"])
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=tmp_path / "dcp", no_dist=True)
    with pytest.raises(tk.CheckpointError, match=r"dcp: a torch\.distributed\.checkpoint directory is read column "
                                                 r"by column, by tk\.TWA only.*dcp_to_torch_save"):
        tk.uniform_average([state, tmp_path / "dcp"])
    # a subspace is built column by column, so it reads a DCP directory like any checkpoint
    built = tk.Subspace.from_checkpoints([state, tmp_path / "dcp"], bits=None)
    copy = {k: v.clone() for k, v in state.items()}
    assert torch.equal(built.center, tk.Subspace.from_checkpoints([state, copy], bits=None).center)


def test_pytorch_model_bin_directories_one_file_or_sharded(tmp_path):
    states = _checkpoints(2)
    (tmp_path / "one").mkdir()
    torch.save(states[0], tmp_path / "one" / "pytorch_model.bin")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    keys = list(states[1])
    weight_map = {}
    for i, part in enumerate((keys[:3], keys[3:])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: states[1][k] for k in part}, sharded / name)
        weight_map.update(dict.fromkeys(part, name))
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for directory, want in ((tmp_path / "one", states[0]), (sharded, states[1])):
        got = load_state_dict(directory)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        reader = ColumnReader(directory)
        assert torch.equal(reader.tensor("3.weight"), want["3.weight"])
    assert resolve_checkpoints(tmp_path) == [tmp_path / "one", sharded]
    avg = tk.uniform_average(tmp_path, model=make_model())
    torch.testing.assert_close(avg["0.weight"], (states[0]["0.weight"] + states[1]["0.weight"]) / 2)
    # a shard is a file beside its index, never a path elsewhere
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"0.weight": "../one/x.bin"}}))
    with pytest.raises(tk.CheckpointError, match=r"shard '\.\./one/x\.bin' is not a file name in"):
        load_state_dict(sharded)
    # a shard that is there but is no file is named as such, not as missing
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    first = sharded / "pytorch_model-00001-of-00002.bin"
    first.unlink()
    with pytest.raises(tk.CheckpointError, match=r"lists shard pytorch_model-00001-of-00002\.bin, which is missing"):
        load_state_dict(sharded)
    os.mkfifo(first)
    with pytest.raises(tk.CheckpointError, match=r"00001-of-00002\.bin, which in .* is not a regular file \(a "
                                                 r"directory, a pipe"):
        load_state_dict(sharded)


def test_a_shard_index_nested_too_deeply_is_a_checkpoint_error(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(tk.CheckpointError, match=r"model\.safetensors\.index\.json: not a valid index of shards "
                                                 r"\(its JSON is nested too deeply"):
        load_state_dict(tmp_path)


def test_a_shard_index_larger_than_any_models_is_refused_unread(tmp_path, monkeypatch):
    from twa_kernels.io import files

    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {f"layer{i}.weight": "model.safetensors" for i in range(100)}}))
    monkeypatch.setattr(files, "_MAX_INDEX_BYTES", index.stat().st_size - 1)
    monkeypatch.setattr(files.Path, "read_text", lambda *_: pytest.fail("read an index past the limit"))
    with pytest.raises(tk.CheckpointError, match=r"not a readable index of shards .* more than an index of any model"):
        load_state_dict(tmp_path)


class _Holder(torch.nn.Module):
    """Own names starting with `model.`, as Hugging Face's LlamaForCausalLM has."""

    def __init__(self):
        super().__init__()
        self.model = make_model()
        self.head = torch.nn.Linear(10, 2)


def test_a_leading_model_prefix_is_matched_against_the_models_own_names():
    holder = _Holder()
    own = [{k: v + i for k, v in holder.state_dict().items()} for i in range(2)]
    lightning = [{f"model.{k}": v for k, v in state.items()} for state in own]  # a LightningModule's self.model
    for checkpoints in (own, lightning):
        avg = tk.uniform_average(checkpoints, model=holder)
        assert list(avg) == list(holder.state_dict())
        torch.testing.assert_close(avg["model.0.weight"], own[0]["model.0.weight"] + 0.5)
        twa = tk.TWA(holder, checkpoints, bits=None)
        torch.testing.assert_close(twa.averaged_state_dict()["head.bias"], own[0]["head.bias"] + 0.5)
    # the names alone decide: without a model, keys are kept as they are
    assert "model.model.0.weight" in tk.uniform_average(lightning)


def test_glob_and_directory_order_is_natural(tmp_path):
    for step in (10, 2, 1):
        tk.save_state_dict(_checkpoints(1)[0], tmp_path / f"step={step}.pt")
    want = [tmp_path / f"step={s}.pt" for s in (1, 2, 10)]
    assert resolve_checkpoints(tmp_path) == want
    assert resolve_checkpoints(str(tmp_path / "step=*.pt")) == want


def test_globs_inside_a_list_are_expanded_in_natural_order(tmp_path):
    for name in ("a-10.pt", "a-2.pt", "b-1.pt"):
        tk.save_state_dict(_checkpoints(1)[0], tmp_path / name)
    spec = [str(tmp_path / "b-*.pt"), tmp_path / "a-[0-9]*.pt"]
    assert resolve_checkpoints(spec) == [tmp_path / "b-1.pt", tmp_path / "a-2.pt", tmp_path / "a-10.pt"]
    with pytest.raises(tk.CheckpointError, match=r"glob '.*c-\*.pt' \(checkpoint #1\) matches no files"):
        resolve_checkpoints([tmp_path / "a-2.pt", str(tmp_path / "c-*.pt")])


def test_a_checkpoint_listed_twice_is_refused_as_it_would_count_twice(tmp_path):
    tk.save_state_dict(_checkpoints(1)[0], tmp_path / "a.pt")
    tk.save_state_dict(_checkpoints(1)[0], tmp_path / "b.pt")
    (tmp_path / "link.pt").symlink_to(tmp_path / "a.pt")
    for spec in ([tmp_path / "a.pt", tmp_path / "b.pt", str(tmp_path / "a.pt")],  # one file, two spellings
                 [str(tmp_path / "[ab].pt"), tmp_path / "a.pt"],  # a glob and one of its files
                 [tmp_path / "link.pt", tmp_path / "a.pt"]):  # a link to it
        with pytest.raises(tk.CheckpointError, match=r"listed twice .* would count twice in the average"):
            tk.uniform_average(spec)
    # a live state_dict kept once per epoch: its tensors are the model's own, so every entry
    # is the last state, and their average was the last weights
    model = torch.nn.Linear(3, 2)
    with pytest.raises(tk.CheckpointError, match=r"the 3 state_dicts hold the same tensors in memory"):
        tk.uniform_average([model.state_dict() for _ in range(3)])
    state = _checkpoints(1)[0]  # a state_dict repeated among others is the caller's weighting
    assert len(resolve_checkpoints([state, _checkpoints(1)[0], state])) == 3
    backbone = {"body": torch.ones(4)}  # fine-tunes sharing a frozen backbone's tensors are distinct states
    tunes = [{**backbone, "head": torch.full((2,), float(i))} for i in range(2)]
    assert len(resolve_checkpoints(tunes)) == 2


def test_a_write_through_a_symlink_replaces_the_file_it_points_to_and_keeps_the_link(tmp_path):
    from twa_kernels.io import write_json

    store = tmp_path / "store"
    store.mkdir()
    (store / "report.json").write_text("{}")
    link = tmp_path / "latest.json"
    link.symlink_to(Path("store") / "report.json")  # relative, as `ln -s` makes them
    write_json(link, {"a": 1})
    assert link.is_symlink() and os.readlink(link) == str(Path("store") / "report.json")
    assert json.loads((store / "report.json").read_text()) == {"a": 1}
    dangling = tmp_path / "next.pt"
    dangling.symlink_to(store / "next.pt")  # to a file not written yet
    tk.save_state_dict({"w": torch.ones(2)}, dangling)
    assert dangling.is_symlink() and torch.equal(load_state_dict(store / "next.pt")["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "next.pt", "store"]
    assert sorted(p.name for p in store.iterdir()) == ["next.pt", "report.json"]  # no temporary left


def test_split_holdout_seed_reproduces_and_leaves_the_global_rng_alone():
    data = torch.utils.data.TensorDataset(torch.arange(50))
    state = torch.get_rng_state()
    train, held = tk.split_holdout(data, 0.2, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert list(held.indices) == list(tk.split_holdout(data, 0.2, seed=3)[1].indices)
    assert sorted([*train.indices, *held.indices]) == list(range(50)) and len(held) == 10
    torch.manual_seed(1)
    unseeded = list(tk.split_holdout(data, 0.2)[1].indices)
    assert list(tk.split_holdout(data, 0.2)[1].indices) != unseeded  # None draws from the global RNG, moving it
    torch.manual_seed(1)
    assert list(tk.split_holdout(data, 0.2)[1].indices) == unseeded


def test_split_holdout_names_a_dataset_without_length_or_indexing():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from range(10)

    with pytest.raises(tk.errors.InvalidTypeError, match="split_holdout splits a map-style dataset.*Stream"):
        tk.split_holdout(Stream(), 0.2, seed=0)
    with pytest.raises(tk.errors.InvalidTypeError, match="split_holdout splits a map-style dataset.*dict"):
        tk.split_holdout({"a": 1, "b": 2, "c": 3}, 0.3, seed=1)  # indexed by key: its Subsets failed on use


def test_an_optimizers_state_in_a_folder_of_checkpoints_is_named_with_the_glob_to_pass(tmp_path):
    # it was read as a checkpoint nesting mappings, with the advice to save model.state_dict()
    model = torch.nn.Linear(3, 2)
    for i in (1, 2):
        torch.save(model.state_dict(), tmp_path / f"epoch_{i}.pt")
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    with pytest.raises(tk.CheckpointError, match=r"optimizer.pt: an optimizer's state_dict \(state, param_groups\), "
                                                 r"not a model's; .* pass a glob of the checkpoints"):
        tk.uniform_average(tmp_path, model)


def test_a_copy_of_a_checkpoint_counts_once_in_a_directory_or_a_glob(tmp_path, caplog):
    # a last.pt copied from the newest epoch was averaged twice, weighing double without a word
    import shutil

    folder = tmp_path / "run"
    folder.mkdir()
    for i in (1, 2, 3):
        torch.save({"w": torch.full((300_000,), float(i))}, folder / f"epoch{i}.pt")  # sampled blocks apart
    shutil.copyfile(folder / "epoch3.pt", folder / "last.pt")
    # the same size and the same bytes at the sampled places, one byte apart elsewhere: kept
    near = bytearray((folder / "epoch2.pt").read_bytes())
    near[len(near) // 2 + 100] ^= 1
    (folder / "near.pt").write_bytes(near)
    for spec in (folder, str(folder / "*.pt")):
        caplog.clear()
        with caplog.at_level("WARNING", logger="twa_kernels"):
            found = resolve_checkpoints(spec)
        assert [p.name for p in found] == ["epoch1.pt", "epoch2.pt", "epoch3.pt", "near.pt"]
        assert "leaving out last.pt (the same bytes as epoch3.pt)" in caplog.text
    # named step=N, the copy sorts first: the numbered file is kept in its place, not the
    # alias before the others (EMA then weighed the newest epoch as the oldest)
    steps = tmp_path / "steps"
    steps.mkdir()
    for i in (1, 2, 10):
        torch.save({"w": torch.full((300_000,), float(i))}, steps / f"step={i}.pt")
    shutil.copyfile(steps / "step=10.pt", steps / "last.pt")
    caplog.clear()
    with caplog.at_level("WARNING", logger="twa_kernels"):
        assert [p.name for p in resolve_checkpoints(steps)] == ["step=1.pt", "step=2.pt", "step=10.pt"]
    assert "leaving out last.pt (the same bytes as step=10.pt)" in caplog.text
    assert float(tk.ema_average(steps, decay=0.5)["w"][0]) == pytest.approx((1 * 0.5 + 2 * 0.5) * 0.5 + 10 * 0.5)


def test_a_link_to_a_checkpoint_counts_it_once_in_a_directory_and_is_refused_in_a_list(tmp_path, caplog):
    folder = tmp_path / "run"
    folder.mkdir()
    for i in (1, 2):
        torch.save({"w": torch.full((3,), float(i))}, folder / f"epoch{i}.pt")
    (folder / "a_latest.pt").symlink_to(folder / "epoch2.pt")  # before the epochs in natural order
    os.link(folder / "epoch1.pt", tmp_path / "best.pt")
    with caplog.at_level("WARNING", logger="twa_kernels"):
        found = resolve_checkpoints(folder)
    assert [p.name for p in found] == ["epoch1.pt", "epoch2.pt"], "the target kept, in its own place"
    assert "leaving out a_latest.pt (the same file as epoch2.pt)" in caplog.text
    assert torch.equal(tk.uniform_average(str(folder / "*.pt"))["w"], torch.full((3,), 1.5))  # not 5/3
    with pytest.raises(tk.CheckpointError, match="best.pt is listed twice"):  # a hard link: another path, one file
        resolve_checkpoints([folder / "epoch1.pt", tmp_path / "best.pt"])


def test_a_checkpoint_whose_save_did_not_finish_is_left_out_of_a_directory_with_a_warning(tmp_path, caplog):
    # an interrupted DCP save (data files, no .metadata) or save_pretrained (config.json, no
    # weights) was skipped without a word: the average silently used one checkpoint fewer
    folder = tmp_path / "run"
    for i in (1, 2):
        tk.save_state_dict({"w": torch.full((3,), float(i))}, folder / f"epoch{i}.pt")
    (folder / "step_3").mkdir()
    (folder / "step_3" / "__0_0.distcp").write_bytes(b"partial")
    (folder / "hf_4").mkdir()
    (folder / "hf_4" / "config.json").write_text("{}")
    (folder / "logs").mkdir()  # an unrelated folder: no warning
    with caplog.at_level("WARNING", logger="twa_kernels"):
        found = resolve_checkpoints(folder)
    assert [p.name for p in found] == ["epoch1.pt", "epoch2.pt"]
    assert "leaving out hf_4, step_3, whose save did not finish" in caplog.text
    assert "logs" not in caplog.text
    # a folder named as a checkpoint file (DeepSpeed's epoch=3.ckpt) was left out without a word
    (folder / "epoch=3.ckpt" / "checkpoint").mkdir(parents=True)
    caplog.clear()
    with caplog.at_level("WARNING", logger="twa_kernels"):
        assert [p.name for p in resolve_checkpoints(folder)] == ["epoch1.pt", "epoch2.pt"]
    assert "leaving out epoch=3.ckpt, folders named like checkpoint files" in caplog.text
    assert "convert_zero_checkpoint_to_fp32_state_dict" in caplog.text


def test_a_twa_over_a_directory_lists_it_once(tmp_path, caplog):
    # the build and the frozen parameters' pins each listed the directory: its notes came twice,
    # and a checkpoint saved between the two listings could be pinned from but not averaged
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    model[1].requires_grad_(False)
    for i in range(3):
        tk.save_state_dict({k: v + i for k, v in model.state_dict().items()}, tmp_path / f"epoch={i}.ckpt")
    tk.save_state_dict(model.state_dict(), tmp_path / "last.ckpt")
    with caplog.at_level("WARNING", logger="twa_kernels"):
        tk.TWA(model, tmp_path, bits=None)
    assert caplog.text.count("leaving out last.ckpt") == 1, caplog.text


def test_a_legacy_torch_file_whose_tensor_bytes_look_like_a_zip_directory_is_read(tmp_path):
    # a zip was recognised by a directory signature near the file's end, which a legacy
    # (pickle) file's weights may hold: the lazy reader refused a good file as damaged
    import struct
    import warnings
    import zipfile

    signature = torch.frombuffer(bytearray(struct.pack("<I", 0x06054B50) + bytes(20)), dtype=torch.float32)
    weights = torch.cat([torch.randn(100), signature])
    path = tmp_path / "legacy.pt"
    torch.save({"w": weights}, path, _use_new_zipfile_serialization=False)
    assert zipfile.is_zipfile(path)
    other = tk.save_state_dict({"w": torch.randn(106)}, tmp_path / "other.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(tk.load_state_dict(path)["w"], weights)
        assert torch.equal(ColumnReader(path).tensor("w"), weights)
        tk.Subspace.from_checkpoints([other, path], bits=4, group_size=8)


def test_a_legacy_file_is_noted_as_loaded_whole_once_per_build(tmp_path, caplog):
    # the note came once per read pass: three to six times for one file in one build
    model = make_model()
    states = noisy_checkpoints(model, 3)
    torch.save(states[0], tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with caplog.at_level("WARNING", logger="twa_kernels.columns"):
        tk.TWA(model, [tmp_path / "legacy.pt", *states[1:]], bits=4)
    assert caplog.text.count("legacy.pt: not a zip-format torch file") == 1, caplog.text


@pytest.mark.parametrize("given", [None, 123, b"w.pt", ["w.pt"], {"w": torch.ones(1)}, ""],
                         ids=["None", "int", "bytes", "list", "state_dict", "empty"])
def test_load_state_dict_names_what_it_was_given_instead_of_a_path(given):
    error = tk.CheckpointError if given == "" else tk.errors.InvalidTypeError
    with pytest.raises(error, match="must be a path|reads one checkpoint|is loaded already|path is empty"):
        tk.load_state_dict(given)


def test_save_state_dict_names_an_output_that_is_not_a_path():
    with pytest.raises(tk.errors.InvalidTypeError, match="the output path must be a path"):
        tk.save_state_dict({"w": torch.ones(1)}, None)


def test_an_unfinished_dcp_save_given_as_a_checkpoint_is_named_as_one(tmp_path):
    (tmp_path / "step_3").mkdir()
    (tmp_path / "step_3" / "__0_0.distcp").write_bytes(b"partial")
    with pytest.raises(tk.CheckpointError, match="a checkpoint whose save did not finish"):
        tk.Subspace.from_checkpoints([tmp_path / "step_3", {"w": torch.ones(2)}])


def test_files_that_are_not_what_their_name_or_nesting_says_are_named_as_they_are(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "zip.safetensors")
    with pytest.raises(tk.CheckpointError, match="a torch.save file named .safetensors; rename it to .pt"):
        tk.load_state_dict(tmp_path / "zip.safetensors")
    with pytest.raises(tk.CheckpointError, match="a torch.save file named .safetensors; rename it to .pt"):
        ColumnReader(tmp_path / "zip.safetensors").tensor("w")
    torch.save({"run": {"state_dict": {"w": torch.ones(2)}}}, tmp_path / "nested.pt")
    with pytest.raises(tk.CheckpointError, match=r"holds no tensors at its top level \(it nests mappings under 'run'"):
        tk.load_state_dict(tmp_path / "nested.pt")


def test_the_baselines_refuse_tied_names_that_disagree_as_twa_does():
    # each name was averaged apart, and which one the model kept depended on the key order
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(4, 3), nn.Linear(3, 4, bias=False)
            self.head.weight = self.emb.weight

    ckpts = [{"emb.weight": torch.zeros(4, 3) + i, "head.weight": torch.zeros(4, 3) + 10 * i} for i in (1, 2)]
    for average in (lambda: tk.uniform_average(ckpts, model=Tied()), lambda: tk.ema_average(ckpts, model=Tied()),
                    lambda: tk.greedy_soup(ckpts, lambda state: 0.0, model=Tied()),
                    lambda: tk.TWA(Tied(), ckpts, bits=None)):
        with pytest.raises(tk.CheckpointError, match="'emb.weight' and 'head.weight' are one tied weight in the "
                                                     "model but differ in the checkpoint"):
            average()
    agreeing = [{"emb.weight": torch.zeros(4, 3) + i, "head.weight": torch.zeros(4, 3) + i} for i in (1, 2)]
    assert torch.equal(tk.uniform_average(agreeing, model=Tied())["head.weight"], torch.full((4, 3), 1.5))


def test_one_checkpoint_in_two_formats_and_a_missing_path_are_named(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    for i in range(3):
        torch.save({"w": torch.full((3,), float(i))}, folder / f"epoch_{i}.pt")
    tk.save_state_dict({"w": torch.full((3,), 2.0)}, folder / "epoch_2.safetensors")  # a converted copy
    with pytest.raises(tk.CheckpointError, match=r"epoch_2.pt and epoch_2.safetensors look like one checkpoint in "
                                                 r"two formats.*\*.safetensors"):
        resolve_checkpoints(folder)
    assert len(resolve_checkpoints(str(folder / "*.pt"))) == 3
    with pytest.raises(tk.CheckpointError, match="nothere: no such checkpoint file"):  # not "needs at least 2"
        tk.TWA(nn.Linear(3, 1), str(tmp_path / "nothere"))


def test_a_link_to_nothing_and_an_unreadable_torch_file_are_named_with_the_fix(tmp_path):
    (tmp_path / "loop.pt").symlink_to(tmp_path / "loop.pt")
    (tmp_path / "dangling.pt").symlink_to(tmp_path / "gone.pt")
    for name in ("loop.pt", "dangling.pt"):  # "no such checkpoint file" for a name that is there
        with pytest.raises(tk.CheckpointError, match=rf"{name}: a symbolic link to nothing .* point it at"):
            tk.load_state_dict(tmp_path / name)
    torch.save({"w": torch.ones(1000)}, tmp_path / "cut.pt", _use_new_zipfile_serialization=False)
    data = (tmp_path / "cut.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(tk.CheckpointError, match=r"cut.pt: could not be read as a torch checkpoint .*restore it "
                                                 "from a good copy or save it again"):
        tk.load_state_dict(tmp_path / "cut.pt")


def test_a_checkpoint_rewritten_between_greedy_soups_scoring_and_its_soup_is_named(tmp_path):
    paths = [tk.save_state_dict({"w": torch.full((3,), float(i))}, tmp_path / f"c{i}.pt") for i in range(3)]

    def score(state):
        if score.calls == 2:  # after the last checkpoint is scored, a trainer saves over the first
            tk.save_state_dict({"w": torch.full((3,), 50.0)}, paths[0])
        score.calls += 1
        return -float(state["w"].mean())

    score.calls = 0
    with pytest.raises(tk.CheckpointError, match="c0.pt: changed since it was scored"):
        tk.greedy_soup(paths, score)


def test_update_bn_names_a_batch_of_one_and_keeps_the_statistics():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    before = {k: v.clone() for k, v in model[1].state_dict().items()}
    x = torch.randn(5, 4)
    with pytest.raises(tk.errors.InvalidArgumentError, match="batch of one example.*drop_last=True"):
        tk.update_bn([x[:4], x[4:]], model)
    for key, value in model[1].state_dict().items():
        assert torch.equal(value, before[key]), key


def test_files_written_together_change_together(tmp_path):
    # a figure and the JSON of its numbers: the JSON's failure left a new figure beside the old numbers
    from pathlib import Path

    from twa_kernels.io import atomic_write_together

    figure, numbers = tmp_path / "plane.png", tmp_path / "sub" / "plane.json"
    figure.write_text("old figure")

    def fail(tmp):
        raise OSError(28, "No space left on device")

    with pytest.raises(tk.errors.OutputError, match="cannot write .*plane.json: No space left on device"):
        atomic_write_together({figure: lambda tmp: Path(tmp).write_text("new figure"), numbers: fail})
    assert figure.read_text() == "old figure" and not (tmp_path / "sub").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plane.png"]  # no temporary file left
    atomic_write_together({figure: lambda tmp: Path(tmp).write_text("new figure"),
                           numbers: lambda tmp: Path(tmp).write_text("{}")})
    assert figure.read_text() == "new figure" and numbers.read_text() == "{}"


def test_an_interruption_while_the_folder_is_flushed_never_splits_files_written_together(tmp_path, monkeypatch):
    # the folder was flushed after each rename: a Ctrl-C in the first flush left a new
    # figure beside the old numbers
    from pathlib import Path

    from twa_kernels.io import atomic_write_together, write

    figure, numbers = tmp_path / "plane.png", tmp_path / "plane.json"
    figure.write_text("old figure")
    numbers.write_text("old numbers")

    def interrupted(folder):
        raise KeyboardInterrupt

    monkeypatch.setattr(write, "fsync_directory", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_together({figure: lambda tmp: Path(tmp).write_text("new figure"),
                               numbers: lambda tmp: Path(tmp).write_text("new numbers")})
    assert (figure.read_text(), numbers.read_text()) == ("new figure", "new numbers")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plane.json", "plane.png"]


@pytest.mark.skipif(sys.platform == "win32", reason="the writers' locks are POSIX file locks")
def test_a_write_removes_the_temporary_a_killed_writer_left_but_never_a_live_writers(tmp_path):
    # a writer killed mid-write (the out-of-memory killer) left its hidden temporary, as large as
    # the file, beside the target for good
    from twa_kernels.io import atomic_write

    target = tmp_path / "averaged.safetensors"
    # (the writer fills its temporary by renaming another file onto it, as some writers do)
    writer = ("import os, sys\nfrom pathlib import Path\nfrom twa_kernels.io import atomic_write\n"
              "def write(tmp):\n    Path(tmp + '-').write_bytes(b'x' * 4096)\n    os.replace(tmp + '-', tmp)\n"
              "    print('writing', flush=True)\n    sys.stdin.readline()\n    Path(tmp).write_bytes(b'theirs')\n"
              f"atomic_write({str(target)!r}, write)\n")

    def start_writer() -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", writer], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True)
        assert process.stdout.readline() == "writing\n"
        return process

    def temporaries() -> set[str]:
        return {p.name for p in tmp_path.glob(".averaged.safetensors.*.tmp")}

    killed = start_writer()
    killed.kill()
    killed.wait(timeout=60)
    abandoned = temporaries()
    assert len(abandoned) == 1
    live = start_writer()
    try:
        live_one = temporaries() - abandoned
        unlocked = tmp_path / ".averaged.safetensors.abcd1234.tmp"  # no lock file: written without locks
        unlocked.write_bytes(b"z")
        others = tmp_path / ".other.safetensors.abcd1234.tmp"  # another file's
        others.write_bytes(b"y")
        atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"mine"))
        assert target.read_bytes() == b"mine"
        assert temporaries() == live_one | {unlocked.name} and others.exists()
    finally:
        live.communicate("\n", timeout=60)
    assert live.returncode == 0 and target.read_bytes() == b"theirs"
    assert temporaries() == {unlocked.name}
    assert not list(tmp_path.glob("*.lck"))  # the killed writer's lock file went with its temporary


def test_checkpoints_of_a_larger_model_are_named_wherever_a_model_reads_them():
    # a model built smaller than the one that saved the checkpoints (a config with fewer
    # layers) ran on their first layers without a word: TWA, the averages, interpolate, plane
    def net(layers: int) -> nn.Module:
        return nn.Sequential(nn.Linear(4, 8), *[m for _ in range(layers - 1) for m in (nn.ReLU(), nn.Linear(8, 8))])

    gen = torch.Generator().manual_seed(0)
    larger = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in net(3).state_dict().items()}
              for _ in range(3)]
    data = [(torch.randn(6, 4, generator=gen), torch.randint(0, 8, (6,), generator=gen))]
    calls = {"TWA": lambda: tk.TWA(net(2), larger, bits=4),
             "uniform_average": lambda: tk.uniform_average(larger, model=net(2)),
             "interpolate": lambda: tk.connectivity.interpolate(net(2), larger[0], larger[1], data, bn="none"),
             "plane": lambda: tk.connectivity.plane(net(2), larger, data, grid=2, bn="none")}
    for name, call in calls.items():
        with pytest.warns(UserWarning, match=r"checkpoint #0: 2 floating-point tensor\(s\) that the model has no "
                                             r"place for are left out \(e.g. \['4.weight', '4.bias'\]\)"):
            call()
    # a buffer that an older version of a module saved (GPT-2's attn.bias), under a module the
    # model has, is no sign of a larger model
    older = [{**state, "2.masked_bias": torch.tensor(-1e4)} for state in larger]
    with warnings.catch_warnings():  # checkpoints of the model itself: nothing to say
        warnings.simplefilter("error", UserWarning)
        tk.TWA(net(3), larger, bits=4)
        tk.uniform_average(larger, model=net(3))
        tk.TWA(net(3), older, bits=4)
        tk.TWA(net(3), iter(larger), bits=4)  # a generator (Path.glob) is read by the build and the pins alike
    # a point placed on a plane of the model's own checkpoints, as `points=` or `Plane.locate`
    point = {**larger[0], "6.weight": torch.zeros(8, 8), "6.bias": torch.zeros(8)}
    with pytest.warns(UserWarning, match=r"point 'extra'.*no place for.*'6.weight'"):
        surface = tk.connectivity.plane(net(3), larger, data, grid=2, bn="none", points={"extra": point})
    with pytest.warns(UserWarning, match=r"no place for.*'6.weight'"):
        surface.locate(point)
    # a parameter the model was built without (bias=False) is no entry an older version of a
    # module kept: named too
    no_bias = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.warns(UserWarning, match=r"1 floating-point tensor\(s\) that the model has no place for.*\['0.bias'\]"):
        tk.uniform_average(larger, model=no_bias)
    with pytest.warns(UserWarning, match=r"\['cls_token'\]"):  # a root weight of a model built with one
        tk.uniform_average([{**state, "cls_token": torch.zeros(1, 8)} for state in larger], model=net(3))
    with warnings.catch_warnings():  # a script's own scalar beside the weights is no sign of another model
        warnings.simplefilter("error", UserWarning)
        tk.uniform_average([{**{f"module.{k}": v for k, v in state.items()}, "lr": torch.tensor(0.1)}
                            for state in larger], model=net(3))
    unmeasured = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8, track_running_stats=False))
    measured = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)).state_dict()
    with pytest.warns(UserWarning, match=r"2 floating-point tensor\(s\).*\['1.running_mean', '1.running_var'\]"):
        tk.uniform_average([measured], model=unmeasured)


@pytest.mark.skipif(sys.platform == "win32", reason="the writers' locks are POSIX file locks")
def test_lock_files_left_alone_are_removed_and_a_file_system_without_locks_keeps_everything(tmp_path, monkeypatch):
    import errno

    from twa_kernels.io import atomic_write, write

    target = tmp_path / "m.json"
    orphan = tmp_path / ".m.json.abcd1234.lck"  # its writer died before its temporary existed
    orphan.touch()
    atomic_write(target, lambda tmp: Path(tmp).write_text("{}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(write.fcntl, "flock", no_locks)
    left = [tmp_path / ".m.json.abcd1234.tmp", tmp_path / ".m.json.abcd1234.lck"]
    for path in left:
        path.write_bytes(b"x")
    atomic_write(target, lambda tmp: Path(tmp).write_text("[]"))  # writes unlocked, and removes nothing
    assert target.read_text() == "[]" and all(path.exists() for path in left)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.json", *(p.name for p in left)])
    def broken(fd, operation):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(write.fcntl, "flock", broken)  # named, not retried for ever
    for path in left:
        path.unlink()
    with pytest.raises(tk.errors.OutputError, match="cannot write .*m.json: Input/output error"):
        atomic_write(target, lambda tmp: Path(tmp).write_text("[1]"))
    assert target.read_text() == "[]" and sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]
    monkeypatch.setattr(write, "fcntl", None)  # as on Windows: no lock files at all
    atomic_write(target, lambda tmp: Path(tmp).write_text("null"))
    assert target.read_text() == "null" and sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


@pytest.mark.skipif(sys.platform == "win32", reason="the writers' locks are POSIX file locks")
def test_a_temporary_that_cannot_be_removed_after_a_failed_write_keeps_its_lock_file_for_the_next(tmp_path,
                                                                                                   monkeypatch):
    # the lock file went, and a temporary without one is never taken
    from twa_kernels.io import atomic_write

    target, unlink = tmp_path / "m.json", os.unlink

    def stale_handle(path, *args, **kwargs):
        if str(path).endswith(".tmp"):
            raise OSError(116, "Stale file handle")
        return unlink(path, *args, **kwargs)

    def fails(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("the writer failed")

    monkeypatch.setattr(os, "unlink", stale_handle)
    with pytest.raises(tk.errors.OutputError, match="the writer failed"):
        atomic_write(target, fails)
    monkeypatch.undo()
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".lck", ".tmp"]
    atomic_write(target, lambda tmp: Path(tmp).write_text("{}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]
