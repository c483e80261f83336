"""Every exception class the package defines belongs to the one family of library errors."""

import importlib
import inspect
import pkgutil
import sys

import pytest
import torch

import twa_kernels as tk
from twa_kernels.errors import TWAKernelsError


def _package_exception_classes() -> list[type]:
    found = []
    for info in pkgutil.walk_packages(tk.__path__, "twa_kernels."):
        if info.name.endswith("__main__") or ".triton" in info.name:
            continue  # __main__ runs the CLI; the Triton backend needs Triton (checked in its own tests)
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == module.__name__:
                found.append(cls)
    return found


def test_the_package_defines_exception_classes():
    names = {cls.__name__ for cls in _package_exception_classes()}
    assert {"CheckpointError", "FitError", "BuildError", "BasisMismatchError"} <= names


@pytest.mark.parametrize("cls", _package_exception_classes(), ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_every_library_error_derives_from_the_base_and_a_builtin(cls):
    assert issubclass(cls, TWAKernelsError)
    builtin_bases = [b for b in cls.__mro__ if b.__module__ == "builtins" and b not in (object, BaseException, Exception)]
    assert builtin_bases or cls is TWAKernelsError, f"{cls.__name__} should also derive from the builtin it replaces"


def test_a_bad_argument_is_both_a_library_error_and_a_value_error():
    with pytest.raises(TWAKernelsError) as info:
        tk.quantize(torch.zeros(2, 8), bits=3)
    assert isinstance(info.value, ValueError)


def _public_functions_taking_a_model_first() -> list:
    """Every public function of the package whose first parameter is the model."""
    found = {}
    for info in pkgutil.walk_packages(tk.__path__, "twa_kernels."):
        if info.name.endswith("__main__") or ".triton" in info.name or info.name.split(".")[-1].startswith("_"):
            continue
        module = importlib.import_module(info.name)
        for name in getattr(module, "__all__", []):
            function = getattr(module, name)
            if inspect.isfunction(function) and not name.startswith("_"):
                first = next(iter(inspect.signature(function).parameters), None)
                if first in ("model", "module"):
                    found[f"{function.__module__}.{function.__name__}"] = function
    return sorted(found.items())


@pytest.mark.parametrize("name, function", _public_functions_taking_a_model_first(), ids=lambda v: v
                         if isinstance(v, str) else "")
def test_every_function_taking_a_model_names_one_that_is_not_a_module(name, function):
    # None where the model belongs: a bare AttributeError from deep inside, before
    required = [p for p in inspect.signature(function).parameters.values()
                if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    with pytest.raises(TWAKernelsError, match=r"must be an nn.Module, got NoneType"):
        result = function(*[None] * len(required))
        if hasattr(result, "__enter__"):  # a context manager checks when it is entered
            with result:
                pass


def test_the_model_check_covers_the_methods():
    names = {name for name, _ in _public_functions_taking_a_model_first()}
    assert {"twa_kernels.decor.update", "twa_kernels.prune.apply_masks", "twa_kernels.factorization.factorize",
            "twa_kernels.geometry.interpolation.interpolate"} <= names


def _interpolation_and_plane():
    from twa_kernels import connectivity as C

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    states = [{k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(3)]
    return (C.interpolate(model, states[0], states[1], data, steps=2, bn="none"),
            C.plane(model, states, data, grid=2, bn="none"))


def test_a_value_of_the_wrong_kind_gets_a_library_error_naming_the_fix(tmp_path):
    # each of these raised AttributeError or TypeError from inside the call, or went through
    from twa_kernels import connectivity as C
    from twa_kernels.decor import decorrelate
    from twa_kernels.factorization import check_optimizer
    from twa_kernels.io import write_json

    line, grid = _interpolation_and_plane()
    cases = [
        (lambda: C.plot_interpolation(line, tmp_path / "i.png"), "a mapping of labels to interpolations"),
        (lambda: C.plot_interpolation({"a": grid}, tmp_path / "i.png"), "holding other values"),
        (lambda: C.plot_plane(line, tmp_path / "p.png"), "plot_plane takes the result of"),
        (lambda: check_optimizer(torch.nn.Linear(2, 2), None), "check_optimizer takes a torch.optim.Optimizer"),
        (lambda: decorrelate(torch.nn.Linear(2, 2), skip=5), "skip must be a module name"),
        (lambda: tk.TWA(torch.nn.Linear(2, 2), [torch.nn.Linear(2, 2).state_dict() for _ in range(2)], progress="no"),
         "progress must be True, False or None"),
        (lambda: write_json(tmp_path / "s.json", {"a": {1, 2}}), "convert tensors with .tolist"),
        (lambda: tk.TWA(torch.nn.Linear(2, 2), [torch.nn.Linear(2, 2).state_dict() for _ in range(2)])
         .load_state_dict(5), "TWA.load_state_dict takes a state_dict"),
        (lambda: tk.uniform_average([]), "no checkpoints given: pass the checkpoints to average"),
    ]
    for call, message in cases:
        with pytest.raises(TWAKernelsError, match=message):
            call()
    with pytest.raises(tk.errors.InvalidArgumentError, match="write None where a value is not finite"):
        write_json(tmp_path / "n.json", {"a": float("nan")}, allow_nan=False)
    assert not any(tmp_path.iterdir())  # nothing written by any of them


def test_an_eigenvalue_result_writes_strict_json():
    import json

    from twa_kernels.geometry.sharpness import EigenResult

    data = EigenResult(float("nan"), [1.0, float("inf")], False).to_dict()
    assert data == {"value": None, "trace": [1.0, None], "converged": False}
    json.dumps(data, allow_nan=False)


def test_a_warning_is_located_at_the_first_line_outside_the_library_and_torch():
    # frames compiled under the package's and torch's folders stand for library and framework
    # code between the user's call and the warning
    import os
    import warnings

    from twa_kernels import errors

    inner = compile("def warns():\n    errors.warn_at_caller('inside', RuntimeWarning)\n",
                    os.path.join(os.path.dirname(tk.__file__), "_inner.py"), "exec")
    outer = compile("def calls():\n    warns()\n", os.path.join(os.path.dirname(torch.__file__), "_outer.py"), "exec")
    namespace = {"errors": errors}
    exec(inner, namespace)
    exec(outer, namespace)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        namespace["calls"]()
    assert [(w.filename, w.category) for w in caught] == [(__file__, RuntimeWarning)]


class _NormOutsideForward(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.unused = torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)

    def forward(self, x):
        return self.body(x)


def test_a_library_warning_points_at_the_users_call_whichever_path_raised_it():
    # update_bn's warning counted a fixed number of frames to the user: called through
    # TWA.update_bn it pointed inside twa.py, and Python's "default" filter then showed it once
    # for every call site a user had
    import warnings

    from tests.helpers import noisy_checkpoints

    torch.manual_seed(0)
    model = _NormOutsideForward()
    twa = tk.TWA(model, noisy_checkpoints(model, 3), bits=8)
    batches = [torch.randn(8, 4) for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tk.update_bn(batches, model)
        twa.update_bn(batches)
    unreached = [w for w in caught if "saw none of the" in str(w.message)]
    assert len(unreached) == 2 and {w.filename for w in unreached} == {__file__}, [(w.filename, w.lineno)
                                                                                    for w in unreached]


def test_the_library_warns_only_through_warn_at_caller():
    import ast
    from pathlib import Path

    package = Path(tk.__file__).parent
    direct = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("warnings.warn", "warn"):
                direct.append(f"{path.relative_to(package)}:{node.lineno}")
    assert direct == [], "use errors.warn_at_caller, which points the warning at the user's line"


def test_a_warning_raised_while_the_library_is_imported_points_at_the_users_import(tmp_path):
    # the import system's frames between the user's `import` and the library are not counted
    # by stacklevel: the walk that passed them counted them, and pointed inside __init__.py
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "user_script.py"
    script.write_text("import sys\nimport twa_kernels\n")
    package_root = str(Path(tk.__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": package_root, "TWA_KERNELS_CPU_ISA": "avx9000"})
    assert done.returncode == 0 and f"{script}:2: RuntimeWarning: TWA_KERNELS_CPU_ISA='avx9000' is not a " \
        "setting" in done.stderr, done.stderr[-2000:]


def test_a_framework_stub_without_a_file_does_not_break_warnings(monkeypatch):
    # test suites put bare module objects in sys.modules for optional dependencies
    import types
    import warnings

    from twa_kernels.errors import warn_at_caller

    monkeypatch.setitem(sys.modules, "accelerate", types.ModuleType("accelerate"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_at_caller("here", UserWarning)
    assert [w.filename for w in caught] == [__file__]
