"""Iterative magnitude pruning: masks against torch.nn.utils.prune, sparsity per round,
nesting, exact zeros through SGD+momentum and AdamW, bit-exact rewinding, resuming a killed
run, and the named errors."""

import copy
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader, TensorDataset

import twa_kernels as tk
from twa_kernels.prune import PruningError

from tests.digits import digits_splits, make_model
from tests.helpers import tiny_gpt2

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


def conv_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


@pytest.fixture(scope="module")
def digits():
    train, _, _ = digits_splits()
    x, y = train.tensors
    return TensorDataset(x[:400], y[:400])


def _one_epoch(model, data, seed=0, lr=0.05):
    tk.prune.train_classifier(model, data, epochs=1, lr=lr, seed=seed, batch_size=64)


def test_one_round_matches_torch_global_unstructured():
    model = conv_model()
    reference = copy.deepcopy(model)
    params = [(m, "weight") for m in reference if isinstance(m, (nn.Conv2d, nn.Linear))]
    masks = None
    for amount in (0.3, 0.45):  # the second round prunes within the first round's mask
        masks = tk.prune.global_magnitude_masks(model, amount, masks=masks)
        torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=amount)
        for (name, mask), (module, _) in zip(masks.items(), params):
            assert torch.equal(mask, module.weight_mask.bool()), name
        with tk.prune.apply_masks(model, masks):
            pass  # zero the pruned weights, as torch's reparametrization does for its scores
    assert masks["0.weight"].dtype == torch.bool
    assert set(masks) == {"0.weight", "2.weight", "4.weight"}


def test_five_rounds_reach_the_sparsity_with_nested_masks(tmp_path, digits):
    model = make_model(0)
    result = tk.prune.imp(model, lambda m, r: _one_epoch(m, digits, seed=r), rounds=5, rate=0.2, out_dir=tmp_path)
    sizes = {name: m.numel() for name, m in result.masks[0].items()}
    total = sum(sizes.values())
    kept = sum(int(m.sum()) for m in result.masks[-1].values())
    assert abs(kept - 0.8 ** 5 * total) <= len(sizes), (kept, 0.8 ** 5 * total)
    assert result.sparsity[-1] == pytest.approx(1 - 0.8 ** 5, abs=len(sizes) / total)
    for outer, inner in zip(result.masks, result.masks[1:]):
        for name in outer:
            assert not (inner[name] & ~outer[name]).any(), name  # inner is inside outer
        assert tk.prune.sparsity(inner) > tk.prune.sparsity(outer)
    for r in range(6):
        trained = result.trained(r)
        for name, mask in result.masks[r].items():
            assert torch.equal(trained[name][~mask], torch.zeros_like(trained[name][~mask]))
    # model ends at the last round's trained weights
    for key, value in model.state_dict().items():
        assert torch.equal(value, result.trained(5)[key]), key
    summary = json.loads(json.dumps(result.to_dict()))
    assert summary["out_dir"] == str(tmp_path) and summary["sparsity"] == result.sparsity
    assert summary["files"][5]["trained"] == result.files[5]["trained"] and summary["rewind"] == "init"


def test_layer_scope_prunes_each_tensor_by_the_rate():
    model = conv_model()
    masks = tk.prune.global_magnitude_masks(model, 0.25, scope="layer")
    for name, mask in masks.items():
        assert mask.numel() - int(mask.sum()) == round(0.25 * mask.numel()), name


def test_weights_and_masks_in_another_memory_layout_are_pruned_as_contiguous_ones(tmp_path):
    """A channels_last conv's weight, and a mask given transposed, are ranked and pruned as
    the same tensors in the standard layout are (their flat view is a copy)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(16, 3))
    reference = tk.prune.global_magnitude_masks(model, 0.5)
    model = model.to(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()
    masks = tk.prune.global_magnitude_masks(model, 0.5)
    assert masks.keys() == reference.keys()
    for name in masks:
        assert torch.equal(masks[name], reference[name]), name
    linear = nn.Sequential(nn.Linear(6, 4))
    given = {"0.weight": torch.ones(6, 4, dtype=torch.bool).T}  # transposed: not contiguous
    pruned = tk.prune.global_magnitude_masks(linear, 0.5, masks=given)["0.weight"]
    assert int(pruned.sum()) == 12
    assert torch.equal(pruned, tk.prune.global_magnitude_masks(linear, 0.5)["0.weight"])
    result = tk.prune.imp(model, lambda m, r: None, rounds=2, rate=0.5, out_dir=tmp_path)
    assert result.sparsity[1] == pytest.approx(0.5, abs=0.01) and result.sparsity[2] == pytest.approx(0.75, abs=0.01)


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adamw"])
def test_pruned_weights_stay_exactly_zero_through_training(optimizer, digits):
    torch.manual_seed(0)
    model = make_model(0).double()
    data = TensorDataset(digits.tensors[0].double(), digits.tensors[1])
    if optimizer == "sgd_momentum":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    # dense steps first: the optimizer's momentum / Adam moments are nonzero at every entry
    # when the mask arrives, which is what would move pruned weights if only grads were masked
    loader = DataLoader(data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    masks = tk.prune.global_magnitude_masks(model, 0.6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with tk.prune.apply_masks(model, masks):
        for _ in range(2):
            for x, y in loader:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
    after = model.state_dict()
    assert set(after) == set(before)  # plain keys again
    for name, mask in masks.items():
        assert (after[name][~mask] == 0).all(), name
        assert not torch.equal(after[name][mask], before[name][mask]), name  # kept weights trained
    assert model[0].weight is opt.param_groups[0]["params"][0]  # same parameter objects throughout


def test_rewinding_is_bit_exact_to_init_and_to_step_k(tmp_path, digits):
    for rewind in ("init", 3):
        model = make_model(1).double()
        data = TensorDataset(digits.tensors[0].double(), digits.tensors[1])
        init = {k: v.clone() for k, v in model.state_dict().items()}
        seen = {}

        def train_fn(m, r):
            # what the round starts from, read through the mask: the effective weights
            seen[r] = {n: mod.weight.detach().clone() for n, mod in tk.prune.prunable_weights(m).items()}
            seen[r]["buffers"] = {k: v.clone() for k, v in m.named_buffers() if "mask" not in k}
            opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
            for step, (x, y) in enumerate(DataLoader(data, batch_size=64, shuffle=True,
                                                     generator=torch.Generator().manual_seed(r))):
                opt.zero_grad()
                F.cross_entropy(m(x), y).backward()
                opt.step()
                if r == 0 and step + 1 == 3:
                    seen["step3"] = {k: v.clone() for k, v in m.state_dict().items()}

        result = tk.prune.imp(model, train_fn, rounds=2, rate=0.5, rewind=rewind, out_dir=tmp_path / str(rewind))
        point = init if rewind == "init" else seen["step3"]
        assert not torch.equal(point["0.weight"], init["0.weight"]) or rewind == "init"
        for key, value in result.rewind_state().items():
            assert torch.equal(value, point[key]), key
        for r in (1, 2):
            rewound = result.rewound(r)
            for name, mask in result.masks[r].items():
                assert torch.equal(seen[r][name][mask], point[name][mask]), (rewind, r, name)
                assert torch.equal(rewound[name][mask], point[name][mask])
                assert (seen[r][name][~mask] == 0).all() and (rewound[name][~mask] == 0).all()
            for key, value in seen[r]["buffers"].items():  # BatchNorm statistics rewound too
                assert torch.equal(value, point[key]), key


_KILLED_RUN = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    import twa_kernels as tk
    from digits import make_model
    from test_prune import small_train_fn
    inner = small_train_fn()
    def train_fn(model, r):
        if r == 3:
            os._exit(3)  # killed at the start of round 3: rounds 0-2 are on disk
        inner(model, r)
    tk.prune.imp(make_model(0), train_fn, rounds=5, rate=0.3, out_dir={out!r})
""")


def small_train_fn():
    train, _, _ = digits_splits()
    x, y = train.tensors
    return tk.prune.classification_train_fn(TensorDataset(x[:300], y[:300]), epochs=1, seed=7)


def test_killed_run_resumes_after_the_last_finished_round(tmp_path):
    out = tmp_path / "killed"
    code = _KILLED_RUN.format(tests=str(ROOT / "tests"), out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=180, capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr[-2000:]
    manifest = json.loads((out / "imp.json").read_text())
    assert manifest["done"] == 2 and len(manifest["files"]) == 3

    # one thread here (the module's fixture) as in the killed process: the same arithmetic
    inner, rounds_run = small_train_fn(), []

    def train_fn(model, r):
        rounds_run.append(r)
        inner(model, r)

    with pytest.warns(UserWarning, match=r"resuming the run in .* after round 2.*train_fn must train as it did"):
        resumed = tk.prune.imp(make_model(0), train_fn, rounds=5, rate=0.3, out_dir=out)
    full = tk.prune.imp(make_model(0), small_train_fn(), rounds=5, rate=0.3, out_dir=tmp_path / "full")
    assert rounds_run == [3, 4, 5]  # rounds 0-2 were not redone
    assert len(resumed.masks) == len(full.masks) == 6
    for r, (a, b) in enumerate(zip(resumed.masks, full.masks)):
        for name in a:
            assert torch.equal(a[name], b[name]), (r, name)
    for key, value in resumed.trained(5).items():
        assert torch.equal(value, full.trained(5)[key]), key
    # a finished run asked again does nothing and returns the same masks
    with pytest.warns(UserWarning, match="resuming"):
        again = tk.prune.imp(make_model(0), lambda m, r: pytest.fail("retrained"), rounds=5, rate=0.3, out_dir=out)
    assert all(torch.equal(again.masks[5][n], full.masks[5][n]) for n in full.masks[5])
    with pytest.raises(PruningError, match="rate=0.3.*new out_dir"):
        tk.prune.imp(make_model(0), small_train_fn(), rounds=5, rate=0.2, out_dir=out)


@pytest.mark.parametrize("rate", [0.0, 1.0, -0.1, 1.5])
def test_rate_outside_zero_one_is_a_named_error(rate, tmp_path):
    with pytest.raises(PruningError, match=r"rate must lie in \(0, 1\)"):
        tk.prune.imp(make_model(0), lambda m, r: None, rounds=2, rate=rate, out_dir=tmp_path)


@pytest.mark.parametrize("rounds", [0, -1])
def test_rounds_below_one_is_a_named_error(rounds, tmp_path):
    with pytest.raises(PruningError, match="rounds must be an int >= 1"):
        tk.prune.imp(make_model(0), lambda m, r: None, rounds=rounds, out_dir=tmp_path)


def test_train_fn_that_changes_parameter_shapes_is_a_named_error(tmp_path):
    def widen(model, r):
        model[3] = nn.Linear(48, 12)

    with pytest.raises(PruningError, match=r"train_fn changed the model in round 0: '3.weight' was \(10, 48\)"):
        tk.prune.imp(make_model(0), widen, rounds=2, out_dir=tmp_path)


def test_other_bad_inputs_are_named(tmp_path):
    model = make_model(0)
    with pytest.raises(PruningError, match="not prunable.*choose from"):
        tk.prune.global_magnitude_masks(model, 0.2, layers=["1"])  # the BatchNorm
    with pytest.raises(PruningError, match="rewind must be"):
        tk.prune.imp(model, lambda m, r: None, rounds=1, rewind="start", out_dir=tmp_path)
    with pytest.raises(PruningError, match="rewind=1000, but round 0 made only 0 optimizer steps"):
        tk.prune.imp(model, lambda m, r: None, rounds=1, rewind=1000, out_dir=tmp_path / "k")
    with pytest.raises(PruningError, match="has shape"):
        tk.prune.global_magnitude_masks(model, 0.2, masks={"0.weight": torch.ones(3, dtype=torch.bool)})


def test_train_classifier_seed_reproduces_and_leaves_the_global_rng_alone(digits):
    torch.manual_seed(0)
    a = make_model()
    b = copy.deepcopy(a)
    state = torch.get_rng_state()
    _one_epoch(a, digits, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    _one_epoch(b, digits, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(tk.errors.InvalidTypeError, match="seed"):
        tk.prune.classification_train_fn(digits, seed="7")


def test_a_second_run_on_a_folder_a_run_is_writing_is_refused_not_mixed(tmp_path):
    # both wrote their rounds into one folder, and each read back the other's files
    out = tmp_path / "imp"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, time\n"
        f"fd = os.open({str(out)!r}, os.O_RDONLY)\nfcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(tk.errors.OutputError, match="is being written by another tk.prune.imp run running now"):
            tk.prune.imp(make_model(0), lambda m, r: pytest.fail("trained"), rounds=1, out_dir=out)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert list(out.iterdir()) == []  # nothing written by the refused run
    tk.prune.imp(make_model(0), small_train_fn(), rounds=1, out_dir=out)  # the folder is free again
    assert (out / "imp.json").exists()


def test_a_forked_child_of_a_run_does_not_keep_its_folder_locked(tmp_path):
    # a DataLoader's persistent worker shared the lock, and the next imp() on the folder
    # in the same process was refused as another run
    import os
    import time

    from twa_kernels.io import directory_held

    with directory_held(tmp_path, "tk.prune.imp run"):
        child = os.fork()
        if child == 0:
            time.sleep(5)
            os._exit(0)
    try:
        time.sleep(0.5)  # the child has run its fork handler
        with directory_held(tmp_path, "tk.prune.imp run"):
            pass
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)


def test_an_out_dir_that_is_a_file_or_corrupt_resume_state_is_named(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(tk.errors.OutputError, match=r"out_dir '.*afile' cannot be made a directory.*does not exist yet"):
        tk.prune.imp(make_model(0), lambda m, r: None, rounds=1, out_dir=afile)
    out = tmp_path / "run"
    tk.prune.imp(make_model(0), lambda m, r: None, rounds=1, out_dir=out)
    manifest = json.loads((out / "imp.json").read_text())

    def resume_with(text):
        (out / "imp.json").write_text(text)
        with pytest.raises(tk.errors.CheckpointError) as info:
            tk.prune.imp(make_model(0), lambda m, r: None, rounds=2, out_dir=out)
        assert "start the run over, or pass a fresh out_dir" in str(info.value)
        return str(info.value)

    assert "cannot be read as JSON" in resume_with('{"done": 1,')
    assert "holds a JSON list, not an object" in resume_with("[]")
    assert "'done'=5 needs 6 rounds, but it lists 2 round files" in resume_with(json.dumps({**manifest, "done": 5}))
    escape = [{**manifest["files"][0], "trained": "../elsewhere.safetensors"}, manifest["files"][1]]
    assert "is not {mask, rewound, trained} -> file name" in resume_with(json.dumps({**manifest, "files": escape}))
    assert "nested too deeply" in resume_with("[" * 100_000 + "]" * 100_000)
    (out / manifest["files"][1]["trained"]).unlink()
    assert "no such checkpoint file" in resume_with(json.dumps(manifest))


def _nan_weight(state):
    state["0.weight"] = torch.full_like(state["0.weight"], float("nan"))


@pytest.mark.parametrize(
    "kind,edit,message",
    [
        ("mask", lambda s: s.pop("0.weight"), r"lacks the keys \['0.weight'\]"),
        ("mask", lambda s: s.update({"0.weight": torch.full(s["0.weight"].shape, 0.5)}),
         r"mask '0.weight' is torch.float32, not the torch.bool mask"),
        ("mask", lambda s: s.update({"extra": torch.ones(2, dtype=torch.bool)}), r"holds keys \['extra'\]"),
        ("trained", _nan_weight, r"'0.weight' holds NaN or Inf"),
        ("trained", lambda s: s.update({"0.weight": torch.zeros(3, 3)}), r"'0.weight' has shape \(3, 3\)"),
    ],
    ids=["mask missing a layer", "mask of floats", "mask with an extra key", "NaN weights", "wrong shape"],
)
def test_a_changed_round_file_stops_the_resume_naming_file_and_key(tmp_path, kind, edit, message):
    out = tmp_path / "run"
    tk.prune.imp(make_model(0), lambda m, r: None, rounds=1, out_dir=out)
    manifest = json.loads((out / "imp.json").read_text())
    path = out / manifest["files"][1][kind]
    state = tk.load_state_dict(path)
    edit(state)
    tk.save_state_dict(state, path)
    model = make_model(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # a file that passed would change the next round's sparsity or the weights it prunes by
    with pytest.raises(tk.errors.CheckpointError, match=rf"{path.name}: {message}.*IMP run cannot resume: delete"):
        tk.prune.imp(model, lambda m, r: pytest.fail("trained on a bad resume"), rounds=2, out_dir=out)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not list(out.glob("round_02_*"))


def test_gpt2_prunes_its_conv1d_layers_and_leaves_the_tied_lm_head_out():
    model = tiny_gpt2()
    conv1d = [f"{n}.weight" for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert len(conv1d) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of 2 blocks
    with pytest.warns(UserWarning, match=r"pruning leaves out \['lm_head.weight'\]"):
        assert list(tk.prune.prunable_weights(model)) == conv1d
    with pytest.warns(UserWarning, match="leaves out"):
        masks = tk.prune.global_magnitude_masks(model, 0.5)
    assert sorted(masks) == sorted(conv1d) and tk.prune.sparsity(masks) == pytest.approx(0.5, abs=1e-3)
    tokens = torch.randint(0, 30, (2, 8))
    with tk.prune.apply_masks(model, masks):
        attn = model.transformer.h[0].attn.c_attn
        assert torch.equal(attn.weight == 0, ~masks["transformer.h.0.attn.c_attn.weight"])  # the forward's weight
        model(tokens, labels=tokens).loss.backward()
    for name in conv1d:
        assert torch.equal(model.get_parameter(name) == 0, ~masks[name])  # exact zeros after the block
    for bad in (["lm_head"], ["transformer.h.0.attn.c_attn", "lm_head.weight"]):
        with pytest.raises(PruningError, match=r"lm_head.weight is one Parameter with \['transformer.wte'\]"):
            tk.prune.prunable_weights(model, bad)
    with pytest.raises(PruningError, match="tied weights"), \
            tk.prune.apply_masks(model, {"lm_head.weight": torch.ones(30, 16, dtype=torch.bool)}):
        pass
    untied = tiny_gpt2(tie=False)
    assert list(tk.prune.prunable_weights(untied)) == conv1d + ["lm_head.weight"]


def test_the_default_training_loop_takes_a_hugging_face_classifier():
    import transformers  # a test extra

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    model = transformers.BertForSequenceClassification(config)
    data = TensorDataset(torch.randint(0, 30, (32, 8)), torch.arange(32) % 3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tk.prune.train_classifier(model, data, epochs=1, batch_size=16, seed=0)  # its forward returns a ModelOutput
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_the_default_training_loop_takes_hugging_face_style_mapping_items_as_the_same_pairs():
    # items {"input_ids": ..., "labels": ...}: the loop unpacked the mapping's keys and failed
    import transformers  # a test extra

    transformers.logging.set_verbosity_error()
    config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    ids, labels = torch.randint(0, 30, (32, 8)), torch.arange(32) % 3
    trained = []
    for data in (TensorDataset(ids, labels), [{"input_ids": i, "labels": y} for i, y in zip(ids, labels)]):
        torch.manual_seed(0)
        model = transformers.BertForSequenceClassification(config)
        tk.prune.train_classifier(model, data, epochs=1, batch_size=16, seed=0)
        trained.append(model.state_dict())
    for name, value in trained[0].items():
        torch.testing.assert_close(trained[1][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_train_classifier_names_an_iterable_dataset():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([(torch.randn(4), torch.tensor(0))])

    with pytest.raises(tk.errors.InvalidArgumentError, match="Stream has no length to shuffle"):
        tk.prune.train_classifier(nn.Linear(4, 3), Stream())


def test_train_classifier_names_an_optimizer_factory_that_is_not_one():
    data = TensorDataset(torch.randn(8, 4), torch.arange(8) % 3)
    with pytest.raises(tk.errors.InvalidTypeError, match="optimizer factory returned NoneType, not a torch.optim"):
        tk.prune.train_classifier(nn.Linear(4, 3), data, optimizer=lambda params: None)
    with pytest.raises(tk.errors.InvalidTypeError, match="optimizer must be a factory, params -> optimizer"):
        tk.prune.train_classifier(nn.Linear(4, 3), data, optimizer=torch.optim.SGD(nn.Linear(1, 1).parameters()))


def test_layers_are_named_by_module_or_weight_whatever_the_modules_names():
    model = nn.Sequential()
    model.gate_weight, model.out = nn.Linear(4, 4), nn.Linear(4, 2)
    for layers in (["gate_weight"], ["gate_weight.weight"]):
        assert set(tk.prune.global_magnitude_masks(model, 0.5, layers=layers)) == {"gate_weight.weight"}
    assert set(tk.prune.global_magnitude_masks(nn.Linear(4, 2), 0.5, layers=[""])) == {"weight"}


@pytest.mark.parametrize("settings, error", [
    (dict(lr=float("nan")), "lr must be a finite number"),  # trained every weight to NaN
    (dict(lr=float("inf")), "lr must be a finite number"),
    (dict(weight_decay=float("nan")), "weight_decay must be a finite number"),
    (dict(lr=-1.0), "lr must be > 0"),
    (dict(epochs=1.5), "epochs must be an int >= 1"),
    (dict(epochs=-1), "epochs must be an int >= 1"),
    (dict(batch_size=0), "batch_size must be an int >= 1"),
])
def test_train_classifier_names_a_setting_that_would_train_to_nan_or_fail_in_torch(settings, error):
    model = nn.Linear(4, 3)
    before = copy.deepcopy(model.state_dict())
    data = TensorDataset(torch.randn(16, 4), torch.arange(16) % 3)
    with pytest.raises(tk.errors.TWAKernelsError, match=error):
        tk.prune.train_classifier(model, data, **settings)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(tk.errors.InvalidArgumentError, match="no parameters to train"):
        tk.prune.train_classifier(nn.ReLU(), data)


def test_train_classifier_and_its_train_fn_name_empty_data_and_a_nan_rate():
    # an empty loader made no step and left the model untrained without a word
    empty = TensorDataset(torch.randn(0, 4), torch.zeros(0, dtype=torch.long))
    with pytest.raises(tk.errors.InvalidArgumentError, match="data is empty"):
        tk.prune.train_classifier(nn.Linear(4, 3), empty, epochs=1)
    # classification_train_fn forwards its settings to the same checks
    data = TensorDataset(torch.randn(16, 4), torch.arange(16) % 3)
    train_fn = tk.prune.classification_train_fn(data, epochs=1, lr=float("nan"))
    with pytest.raises(tk.errors.InvalidArgumentError, match="lr must be a finite number"):
        train_fn(nn.Linear(4, 3), 0)


def test_train_classifier_takes_items_with_more_than_inputs_and_labels():
    x, y = torch.randn(16, 4), torch.arange(16) % 3
    plain, extra = nn.Linear(4, 3), nn.Linear(4, 3)
    extra.load_state_dict(plain.state_dict())
    tk.prune.train_classifier(plain, TensorDataset(x, y), epochs=2, seed=0)
    tk.prune.train_classifier(extra, TensorDataset(x, y, torch.arange(16)), epochs=2, seed=0)  # example ids too
    assert torch.equal(plain.weight, extra.weight)


def test_train_classifier_and_imp_take_the_pair_of_tensors_that_distill_returns(tmp_path):
    # a DataLoader took the pair (x, y) for a dataset of two items and failed in round 0
    x, y = torch.randn(16, 4), torch.arange(16) % 3
    pair, dataset = nn.Linear(4, 3), nn.Linear(4, 3)
    dataset.load_state_dict(pair.state_dict())
    tk.prune.train_classifier(pair, (x, y), epochs=2, batch_size=4, seed=0)
    tk.prune.train_classifier(dataset, TensorDataset(x, y), epochs=2, batch_size=4, seed=0)
    assert torch.equal(pair.weight, dataset.weight)
    tk.prune.imp(nn.Linear(4, 3), tk.prune.classification_train_fn([x, y], epochs=1, seed=0), rounds=1,
                 out_dir=tmp_path / "imp")
    # refused before imp writes anything
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"shapes \(16, 4\) and \(15,\)"):
        tk.prune.classification_train_fn((x, y[:15]), epochs=1)


def test_a_seed_governs_dropout_too_and_leaves_the_global_rng_alone():
    data = TensorDataset(torch.randn(32, 4), torch.arange(32) % 3)

    def trained(global_seed):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 3))
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        tk.prune.train_classifier(model, data, epochs=2, batch_size=8, seed=0)
        assert torch.equal(torch.get_rng_state(), state)
        return model.state_dict()

    first, second = trained(1), trained(2)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_sparsity_and_masked_state_dict_take_bool_masks_of_their_entries_only():
    P = tk.prune
    assert P.sparsity({"a": torch.tensor([True, False]), "b": torch.tensor([False, False])}) == 0.75
    with pytest.raises(PruningError, match="undefined"):
        P.sparsity({})  # no weights is not "all pruned"
    with pytest.raises(PruningError, match="not a bool mask"):
        P.sparsity({"a": torch.tensor([2, 0])})  # counted as values before
    state = {"w": torch.ones(3, 4), "b": torch.ones(3)}
    with pytest.raises(PruningError, match=r"masks\['b'\] has shape \(2, 3\)"):
        P.masked_state_dict(state, {"b": torch.ones(2, 3, dtype=torch.bool)})  # broadcast it to (2, 3)
    with pytest.raises(PruningError, match=r"masks\['x'\] masks no entry"):
        P.masked_state_dict(state, {"x": torch.ones(3, dtype=torch.bool)})
    masked = P.masked_state_dict(state, {"w": torch.eye(3, 4, dtype=torch.bool)})
    assert masked["w"].sum() == 3 and torch.equal(masked["b"], state["b"])
    with pytest.raises(PruningError, match="masks must be a mapping.*got a Sequential"):
        P.sparsity(nn.Sequential(nn.Linear(2, 2)))  # an AttributeError from inside before


@pytest.mark.parametrize("amount, message", [
    (-1, r"amount=-1 is a count of weights to prune and must be >= 0"),
    (57, r"amount=57 weights to prune, but only 56 are left"),
    (1.5, r"amount=1.5 is a fraction and must lie in \[0, 1\]"),
    (float("nan"), r"amount=nan is a fraction"),
    (True, r"amount must be a float in \[0, 1\] or an int count, got True"),
])
def test_an_amount_out_of_range_is_named_with_its_kind(amount, message):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))  # 56 weights
    with pytest.raises(PruningError, match=message):
        tk.prune.global_magnitude_masks(model, amount)
    assert tk.prune.sparsity(tk.prune.global_magnitude_masks(model, 56)) == 1.0

def test_weights_holding_nan_are_named_not_ranked():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[2].weight[0, :3] = float("nan")
    with pytest.raises(PruningError, match=r"2\.weight holds 3 NaN or infinite value\(s\)"):
        tk.prune.global_magnitude_masks(model, 0.5)
    # a NaN already pruned away is not ranked again
    kept = torch.ones(2, 8, dtype=torch.bool)
    kept[0, :3] = False
    masks = tk.prune.global_magnitude_masks(model, 0.5, masks={"2.weight": kept}, layers=["2"])
    assert not masks["2.weight"][0, :3].any()


def test_weights_on_the_meta_device_are_named():
    model = nn.Sequential(nn.Linear(4, 8)).to("meta")
    with pytest.raises(PruningError, match=r"0\.weight is on the meta device"):
        tk.prune.global_magnitude_masks(model, 0.5)


def test_weights_on_the_meta_device_are_named_by_imp_before_out_dir_is_made(tmp_path):
    # named only when round 0's weights were saved, after out_dir was made
    model = nn.Sequential(nn.Linear(4, 8)).to("meta")
    with pytest.raises(PruningError, match=r"0\.weight is on the meta device.*before imp"):
        tk.prune.imp(model, lambda m, r: None, rounds=1, out_dir=tmp_path / "imp")
    assert not (tmp_path / "imp").exists()


def test_attention_projections_left_out_are_named():
    # nn.MultiheadAttention's in_proj_weight (three quarters of its weights) was left out silently
    model = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16)
    with pytest.warns(UserWarning, match=r"pruning leaves out \['self_attn.in_proj_weight'\]"):
        masks = tk.prune.global_magnitude_masks(model, 0.5)
    assert "self_attn.out_proj.weight" in masks and "self_attn.in_proj_weight" not in masks
    with pytest.warns(UserWarning, match=r"factorize leaves out \['self_attn.in_proj_weight'\]"):
        tk.factorize(nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16), depth=2)


def test_numpy_numbers_are_taken_as_pythons():
    # numpy's floats and ints were refused with messages about their range
    import numpy as np

    for given, same in ((np.float32(0.5), 0.5), (np.int64(10), 10)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8))
        want = tk.prune.global_magnitude_masks(model, same)
        assert torch.equal(tk.prune.global_magnitude_masks(model, given)["0.weight"], want["0.weight"])


def test_imp_names_a_train_fn_that_is_not_callable_before_writing_anything(tmp_path):
    with pytest.raises(PruningError, match="train_fn must be callable"):
        tk.prune.imp(nn.Linear(4, 3), None, rounds=1, out_dir=tmp_path / "imp")
    assert not (tmp_path / "imp").exists() or not any((tmp_path / "imp").iterdir())


def test_a_refused_apply_masks_leaves_every_weight_as_it_was_and_a_module_name_is_a_key():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {"0.weight": torch.zeros(4, 4, dtype=torch.bool), "2.weight": torch.zeros(3, 3, dtype=torch.bool)}
    with pytest.raises(PruningError, match=r"masks\['2.weight'\] has shape \(3, 3\)"):
        with tk.prune.apply_masks(model, bad):
            pass
    # the first mask was held and written back on the way out: layer 0 was zeroed
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(PruningError, match="not a bool mask"):
        with tk.prune.apply_masks(model, {"0.weight": torch.full((4, 4), 0.3)}):
            pass
    with tk.prune.apply_masks(model, {"0": torch.zeros(4, 4, dtype=torch.bool)}):  # KeyError '0' before
        pass
    assert model[0].weight.abs().sum() == 0
    # one weight under two names: both masks were held, their AND applied without a word
    two = {"2": torch.ones(2, 4, dtype=torch.bool), "2.weight": torch.zeros(2, 4, dtype=torch.bool)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match=r"masks '2' and '2.weight' name the same weight"):
        with tk.prune.apply_masks(model, two):
            pass
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_masked_block_gives_the_parameters_back_in_their_own_order():
    # the weight came back after the bias: an optimizer's state saved before the block
    # loaded positionally onto the wrong tensors after it
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    params, keys = list(model.named_parameters()), list(model.state_dict())
    with tk.prune.apply_masks(model, {"0.weight": torch.ones(4, 4, dtype=torch.bool)}):
        pass
    assert list(model.named_parameters()) == params and list(model.state_dict()) == keys


def test_a_masked_channels_last_convolution_keeps_its_layout_and_values():
    # the masked weight came out contiguous: each forward converted it back to channels_last
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3)).to(memory_format=torch.channels_last)
    mask = torch.rand(8, 3, 3, 3) > 0.5
    want = torch.where(mask, model[0].weight.detach(), 0.0)
    with tk.prune.apply_masks(model, {"0.weight": mask}):
        masked = model[0].weight
        assert masked.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(masked, want)
    assert torch.equal(model[0].weight, want)


def test_masks_naming_no_weight_or_not_bool_are_refused_by_the_pruning_round():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(PruningError, match=r"masks\['0.weigth'\] names no weight of the model"):
        tk.prune.global_magnitude_masks(model, 0.5, masks={"0.weigth": torch.ones(8, 4, dtype=torch.bool)})
    with pytest.raises(PruningError, match="not a bool mask"):
        tk.prune.global_magnitude_masks(model, 0.5, masks={"0.weight": torch.full((8, 4), 0.3)})


def test_a_prior_mask_of_a_weight_pruning_leaves_alone_is_refused_as_apply_masks_refuses_it():
    # the embedding's mask was dropped from the result, which the docstring says lies inside `masks`
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    prior = {"0.weight": torch.rand(10, 4, generator=torch.Generator().manual_seed(0)) > 0.5}
    with pytest.raises(PruningError) as by_apply, tk.prune.apply_masks(model, prior):
        pass
    with pytest.raises(PruningError) as by_round:
        tk.prune.global_magnitude_masks(model, 0.25, masks=prior)
    assert str(by_round.value) == str(by_apply.value)
    assert "['0.weight'] are not prunable Linear/Conv/Conv1D weights" in str(by_round.value)
    tied = tiny_gpt2()
    with pytest.warns(UserWarning, match="leaves out"), \
            pytest.raises(PruningError, match=r"lm_head.weight is one Parameter with \['transformer.wte'\]"):
        tk.prune.global_magnitude_masks(tied, 0.25, masks={"lm_head.weight": torch.ones(30, 16, dtype=torch.bool)})


def test_a_model_that_is_not_a_module_is_named():
    for call in (lambda: tk.prune.prunable_weights(None), lambda: tk.prune.global_magnitude_masks("model", 0.5)):
        with pytest.raises(tk.errors.InvalidTypeError, match="the model to prune must be an nn.Module, got"):
            call()


def test_a_ctrl_c_in_round_0_then_imp_again_on_the_same_model_rewinds_to_its_initialisation(tmp_path):
    # the rerun took the half-trained weights for the initialisation (no imp.json yet)
    steps = {"n": 0}
    inner = small_train_fn()

    def interrupted(model, r):
        def stop(optimizer, args, kwargs):
            steps["n"] += 1
            if steps["n"] == 3:
                raise KeyboardInterrupt

        handle = register_optimizer_step_post_hook(stop)  # Ctrl-C after 3 steps
        try:
            inner(model, r)
        finally:
            handle.remove()

    model = make_model(0)
    with pytest.raises(KeyboardInterrupt):
        tk.prune.imp(model, interrupted, rounds=1, rate=0.3, out_dir=tmp_path / "run")
    again = tk.prune.imp(model, small_train_fn(), rounds=1, rate=0.3, out_dir=tmp_path / "run")
    straight = tk.prune.imp(make_model(0), small_train_fn(), rounds=1, rate=0.3, out_dir=tmp_path / "straight")
    for key, value in straight.rewind_state().items():
        assert torch.equal(again.rewind_state()[key], value), key
    assert all(torch.equal(again.masks[1][n], straight.masks[1][n]) for n in straight.masks[1])


@pytest.mark.parametrize("failure", ["rewind past the steps", "ctrl-c saving round 0", "ctrl-c saving round 1"])
def test_a_round_that_fails_after_training_leaves_the_model_as_before_it_and_none_of_its_files(
        tmp_path, monkeypatch, failure):
    # a failure after round 0's training (the rewind check, a save cut short) left the model
    # trained and no imp.json: the rerun took the trained weights for the initialisation
    from twa_kernels import prune as prune_module

    model, out = make_model(0), tmp_path / "run"
    init = {k: v.clone() for k, v in model.state_dict().items()}
    rewind, broken = ("init", {"ctrl-c saving round 0": "round_00_trained", "ctrl-c saving round 1":
                                "round_01_trained"}.get(failure))
    if failure == "rewind past the steps":
        rewind = 10_000
    real_save = prune_module.save_state_dict

    def save(state, path):
        if broken and Path(path).name.startswith(broken):
            raise KeyboardInterrupt
        return real_save(state, path)

    monkeypatch.setattr(prune_module, "save_state_dict", save)
    with pytest.raises((KeyboardInterrupt, PruningError)):
        tk.prune.imp(model, small_train_fn(), rounds=1, rate=0.3, rewind=rewind, out_dir=out)
    monkeypatch.setattr(prune_module, "save_state_dict", real_save)
    finished = ["imp.json", *(f"round_00_{kind}.safetensors" for kind in ("mask", "rewound", "trained")),
                "rewind.safetensors"] if broken == "round_01_trained" else []
    assert sorted(p.name for p in out.iterdir()) == sorted(finished)
    before = init if not finished else tk.load_state_dict(out / "round_00_trained.safetensors")
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    again = tk.prune.imp(model if not finished else make_model(0), small_train_fn(), rounds=1, rate=0.3,
                         out_dir=out)
    straight = tk.prune.imp(make_model(0), small_train_fn(), rounds=1, rate=0.3, out_dir=tmp_path / "straight")
    for key, value in straight.trained(1).items():
        assert torch.equal(again.trained(1)[key], value), key


@pytest.mark.parametrize("wrap", ["DataParallel", "compile"])
def test_a_wrapped_models_run_resumes_from_its_own_files(tmp_path, wrap):
    # its round files hold module./_orig_mod. keys, which the resume's reader used to unwrap
    def wrapped():
        model = make_model(0)
        return nn.DataParallel(model) if wrap == "DataParallel" else torch.compile(model, backend="eager")

    first = tk.prune.imp(wrapped(), small_train_fn(), rounds=1, rate=0.3, out_dir=tmp_path / "run")
    rounds_run = []
    resumed = tk.prune.imp(wrapped(), lambda m, r: rounds_run.append(r) or small_train_fn()(m, r), rounds=2,
                           rate=0.3, out_dir=tmp_path / "run")
    assert rounds_run == [2] and resumed.sparsity[:2] == first.sparsity
    assert set(resumed.trained(2)) == set(wrapped().state_dict())


def test_parametrized_lazy_and_replaced_layers_are_named_or_left_out(tmp_path):
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    torch.nn.utils.parametrizations.weight_norm(model[0])
    with pytest.warns(UserWarning, match=r"leaves out \['0.weight'\]: each is computed by a parametrization"):
        assert list(tk.prune.prunable_weights(model)) == ["2.weight"]
    with pytest.raises(PruningError, match="0.weight is computed by a parametrization"):
        tk.prune.prunable_weights(model, ["0"])
    with pytest.raises(PruningError, match="0.weight is a lazy layer's weight.*run one forward pass"):
        tk.prune.global_magnitude_masks(nn.Sequential(nn.LazyLinear(4)), 0.5)

    plain = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    del plain[0].weight
    plain[0].register_buffer("weight", torch.randn(16, 64))  # a stored tensor, but not one that trains
    with pytest.warns(UserWarning, match=r"leaves out \['0.weight'\]: each is a buffer, not an nn.Parameter"):
        assert list(tk.prune.prunable_weights(plain)) == ["2.weight"]

    def fresh_head(model, r):  # a new layer of the same shape escaped the masks
        model[2] = nn.Linear(16, 10)

    with pytest.raises(PruningError, match=r"train_fn replaced the layer of 2.weight in round 0"):
        tk.prune.imp(nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)), fresh_head, rounds=1,
                     rate=0.3, out_dir=tmp_path / "replaced")


@pytest.mark.parametrize("hook, source, fix", [
    (torch.nn.utils.spectral_norm, "spectral_norm's hook from weight_orig", "remove_spectral_norm"),
    (torch.nn.utils.weight_norm, "weight_norm's hook from weight_g and weight_v", "remove_weight_norm"),
])
@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_weights_torchs_older_norm_hooks_compute_are_left_out_like_parametrized_ones(hook, source, fix, tmp_path):
    # their `weight` is a tensor the hook writes before each forward: a mask on it never reached
    # weight_orig (apply_masks failed in torch, and imp in its first pruned round)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    hook(model[1])
    with pytest.warns(UserWarning, match=rf"pruning leaves out \['1.weight'\]: each is computed by torch.nn.utils."
                                         rf"{source}.*{fix}"):
        assert list(tk.prune.prunable_weights(model)) == ["3.weight"]
    with pytest.raises(PruningError, match=rf"1.weight is computed by torch.nn.utils.{source}.*leave it out of "
                                           rf"layers \(or masks\), or remove the hook first.*{fix}"):
        tk.prune.prunable_weights(model, ["1"])
    with pytest.warns(UserWarning, match="pruning leaves out"):
        result = tk.prune.imp(model, small_train_fn(), rounds=1, rate=0.5, out_dir=tmp_path / "run")
    assert list(result.masks[1]) == ["3.weight"] and result.sparsity[1] == pytest.approx(0.5, abs=0.01)
    assert torch.equal(model[3].weight == 0, ~result.masks[1]["3.weight"])


def test_warnings_of_a_pruning_call_point_at_the_callers_line(tmp_path):
    # stacklevel=2 pointed every warning that global_magnitude_masks or imp passed on into prune.py
    model = tiny_gpt2()
    with pytest.warns(UserWarning, match="pruning leaves out") as seen:
        tk.prune.prunable_weights(model)
        tk.prune.global_magnitude_masks(model, 0.5)
        tk.prune.imp(model, lambda m, r: None, rounds=1, out_dir=tmp_path / "run")
    assert {w.filename for w in seen} == {__file__}


def test_train_fn_options_are_checked_when_it_is_made_and_sgd_options_beside_an_optimizer_are_refused(tmp_path):
    data = TensorDataset(torch.randn(16, 4), torch.arange(16) % 3)
    with pytest.raises(PruningError, match=r"got \['learning_rate'\], which train_classifier does not take; its "
                                           r"options are \['lr', "):
        tk.prune.classification_train_fn(data, epochs=1, learning_rate=0.1)
    adam = lambda params: torch.optim.Adam(params)  # noqa: E731
    with pytest.raises(PruningError, match=r"optimizer= and \['lr'\], which set the default SGD only"):
        tk.prune.classification_train_fn(data, epochs=1, optimizer=adam, lr=0.1)
    model = nn.Linear(4, 3)
    before = copy.deepcopy(model.state_dict())
    for options in (dict(lr=0.1), dict(momentum=0.0, weight_decay=0.0)):
        with pytest.raises(tk.errors.InvalidArgumentError, match=re.escape(f"optimizer= and {sorted(options)}")):
            tk.prune.train_classifier(model, data, epochs=1, optimizer=adam, **options)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    tk.prune.train_classifier(model, data, epochs=1, optimizer=adam)  # the optimizer alone trains
    assert not torch.equal(model.weight, before["weight"])


def test_the_default_training_loop_takes_pairs_whose_inputs_are_a_mapping():
    # ({"x": ...}, label) items: the loop called .to() on the dict and failed; the mapping is
    # the model's one argument, as update_bn and `twa fit` pass it
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x):
            return self.linear(x["x"] if isinstance(x, dict) else x)

    x, y = torch.randn(16, 4), torch.arange(16) % 3
    plain, keyword = Keyword(), Keyword()
    keyword.load_state_dict(plain.state_dict())
    tk.prune.train_classifier(plain, TensorDataset(x, y), epochs=2, seed=0)
    tk.prune.train_classifier(keyword, [({"x": xi}, yi) for xi, yi in zip(x, y)], epochs=2, seed=0)
    torch.testing.assert_close(keyword.linear.weight, plain.linear.weight)
    # the loader collates a batch of strings into a tuple of them
    with pytest.raises(tk.errors.InvalidArgumentError, match=r"inputs are a tuple.*a tensor or a mapping of tensors"):
        tk.prune.train_classifier(Keyword(), [("text", 0)] * 4, epochs=1)


def test_a_layer_used_twice_stays_pruned_under_both_of_its_names(tmp_path):
    # the state_dict holds a layer used twice under both names; masked under the first only,
    # the unmasked copy was loaded last and undid the pruning
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(8, 3))
    masks = tk.prune.global_magnitude_masks(model, 0.5)
    assert set(masks) == {"0.weight", "4.weight"}
    state = tk.prune.masked_state_dict(model.state_dict(), masks)
    assert torch.equal(state["2.weight"], state["0.weight"])
    model.load_state_dict(state)
    assert (shared.weight[~masks["0.weight"]] == 0).all()
    data = TensorDataset(torch.randn(32, 8), torch.randint(0, 3, (32,)))
    train = tk.prune.classification_train_fn(data, epochs=1, seed=0, batch_size=16)
    result = tk.prune.imp(model, train, rounds=1, rate=0.5, out_dir=tmp_path, progress=False)
    rewound, mask = result.rewound(1), result.masks[1]["0.weight"]
    assert (rewound["0.weight"][~mask] == 0).all() and (rewound["2.weight"][~mask] == 0).all()


def test_a_round_of_some_layers_keeps_the_masks_of_the_others():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    first = tk.prune.global_magnitude_masks(model, 0.5)
    second = tk.prune.global_magnitude_masks(model, 0.2, masks=first, layers=["2"])
    assert torch.equal(second["0.weight"], first["0.weight"])  # it was dropped: layer 0 trained dense again
    assert int(second["2.weight"].sum()) < int(first["2.weight"].sum())


def test_one_layer_name_given_as_a_string_is_that_layer_not_its_characters():
    # "10" was read as layers "1" and "0"
    model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(11)])
    assert list(tk.prune.prunable_weights(model, "10")) == ["10.weight"]
    masks = tk.prune.global_magnitude_masks(model, 0.5, layers="10")
    assert list(masks) == ["10.weight"]


def test_rounds_a_run_did_not_finish_and_a_nul_out_dir_are_named(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3))
    data = TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    train = tk.prune.classification_train_fn(data, epochs=1, seed=0, batch_size=4)
    result = tk.prune.imp(model, train, rounds=1, out_dir=tmp_path, progress=False)
    for bad in (2, -1, 1.0):
        with pytest.raises(PruningError, match=r"round must be an int from 0 to 1"):
            result.trained(bad)
    with pytest.raises(tk.errors.OutputError, match="NUL"):
        tk.prune.imp(model, train, rounds=1, out_dir=str(tmp_path / "a\0b"), progress=False)


def test_a_last_batch_of_one_is_left_out_for_batchnorm_and_a_batch_of_one_is_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    data = TensorDataset(torch.randn(9, 4), torch.randint(0, 3, (9,)))  # batches of 4, 4 and 1
    tk.prune.train_classifier(model, data, epochs=1, batch_size=4, seed=0)
    assert int(model[1].num_batches_tracked) == 2
    with pytest.raises(tk.errors.InvalidArgumentError, match="batch of one example reached a BatchNorm layer"):
        tk.prune.train_classifier(model, data, epochs=1, batch_size=1, seed=0)


def test_twa_over_pruned_checkpoints_keeps_zeros_with_a_dense_basis_and_the_masks_restore_them():
    # docs/methods/pruning-and-distillation.md: a packed basis stores a group's zeros within its
    # quantisation step, so pruned entries come back small but nonzero
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    masks = tk.prune.global_magnitude_masks(model, 0.5)
    checkpoints = [tk.prune.masked_state_dict({k: v + 0.05 * torch.randn_like(v) for k, v in
                                               model.state_dict().items()}, masks) for _ in range(5)]
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    worst = {}
    for bits in (None, 8, 4):
        twa = tk.TWA(model, checkpoints, bits=bits)
        optimizer = torch.optim.SGD(twa.parameters(), lr=0.5)
        for _ in range(10):
            F.cross_entropy(twa(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
        state = twa.averaged_state_dict()
        worst[bits] = max(float(state[k][~m].abs().max() / state[k].abs().max()) for k, m in masks.items())
        restored = tk.prune.masked_state_dict(state, masks)
        assert all(bool((restored[k][~m] == 0).all()) for k, m in masks.items())
    assert worst[None] == 0.0
    assert 0 < worst[8] < 1e-3 and 0 < worst[4] < 2e-2, worst
