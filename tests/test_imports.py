"""The package's imports: each module imports what it needs at its top, the modules' top-level
imports form no cycle, and `import twa_kernels` stays free of heavy optional packages."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "twa_kernels"

# The only modules a function may import. Each is optional (not a dependency of the package,
# and imported through _imports.optional where the package brings it as an extra) or part of
# torch and heavy enough that importing it at the top would slow `import twa_kernels` for
# every user who never reaches the function (measured in docs/design.md, "Imports").
LAZY_ALLOWED = {
    "twa_kernels._dcp": "torch.distributed.checkpoint: a build option of torch (MissingDependencyError without it), "
                        "its cost in docs/design.md; only DCP directories need it",
    "torch.utils.cpp_extension": "a build tool (it imports setuptools and drives a compiler), its cost in "
                                 "docs/design.md; only compiling the C++ kernels needs it, not loading a cached build",
    "triton": "optional: the Triton backend only",
    "transformers": "optional and heavy: Hugging Face models only",
    "lightning": "optional and heavy: Lightning checkpoints only",
    "peft": "optional: PEFT adapter files only, for a model peft made, which has imported peft already",
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The modules an import statement names (a relative import resolved against `module`)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, base] if base else anchor)
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def _function_imports(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for outer in ast.walk(tree):
        if isinstance(outer, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(outer):
                if isinstance(node, ast.Import):
                    found += [(node.lineno, alias.name) for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    found.append((node.lineno, "." * node.level + (node.module or "")))
                    if node.module == "twa_kernels":  # `from twa_kernels import _dcp` names the module
                        found += [(node.lineno, f"twa_kernels.{alias.name}") for alias in node.names]
    return found


def _allowed(name: str) -> bool:
    return any(name == allowed or name.startswith(allowed + ".") for allowed in LAZY_ALLOWED)


def test_functions_import_only_optional_or_heavy_modules():
    offenders = []
    for module, path in _modules().items():
        imports = _function_imports(ast.parse(path.read_text(), str(path)))
        lines: dict[int, list[str]] = {}
        for line, name in imports:
            lines.setdefault(line, []).append(name)
        for line, names in lines.items():
            # a line passes when any name it imports is allowed (`from twa_kernels import _dcp`)
            if not any(_allowed(n) for n in names):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {names[0]}")
    assert not offenders, "import at the top of the module, or add a justified entry to LAZY_ALLOWED:\n" + \
        "\n".join(offenders)


def test_the_scan_finds_a_function_level_import():
    tree = ast.parse("import os\ndef f():\n    import json\n    from twa_kernels import _dcp\n")
    assert [name for _, name in _function_imports(tree)] == ["json", "twa_kernels", "twa_kernels._dcp"]


def _top_level_graph() -> dict[str, set[str]]:
    """module -> the package's modules its top-level statements import (imports under
    `if TYPE_CHECKING:` run never and are left out). The package's own __init__ is left out
    as a target: it runs before any of its submodules, whoever imports them."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        edges: set[str] = set()
        stack = list(tree.body)
        while stack:
            node = stack.pop()
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for name in _imported(node, module, path.name == "__init__.py"):
                    if name in modules and name != "twa_kernels" and name != module:
                        edges.add(name)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            elif isinstance(node, (ast.If, ast.Try)):
                stack += [*node.body, *node.orelse, *getattr(node, "finalbody", []),
                          *(s for h in getattr(node, "handlers", []) for s in h.body)]
        graph[module] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                found = visit(nxt, [*path, nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_top_level_imports_form_no_cycle():
    assert _cycle(_top_level_graph()) is None, " -> ".join(_cycle(_top_level_graph()) or [])


# The rows of docs/design.md's "Where the code is" table, from the bottom: a module imports
# modules of its own row and of the rows before it in this order, never of a row after it.
LAYERS = ("shared conventions", "reading and writing", "the ops", "the kernels", "the subspace", "training in it",
          "methods beside TWA", "entry points")
DESIGN = PACKAGE.parent / "docs" / "design.md"


def _layer_of_each_module() -> dict[str, int]:
    """Module name -> its row's place in LAYERS, from the table's backticked paths: `a/b.py`
    names a module, `a/` a package and everything in it."""
    table = DESIGN.read_text().split("## Where the code is", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] in LAYERS:
            rows[cells[0]] = [p for p in re.findall(r"`([^`]+)`", cells[1]) if p.endswith((".py", "/"))]
    assert set(rows) == set(LAYERS), f"design.md's table has the rows {sorted(rows)}"
    layer = {}
    for name in _modules():
        path = name.removeprefix("twa_kernels").lstrip(".").replace(".", "/")
        for rank, title in enumerate(LAYERS):
            for entry in rows[title]:
                folder = entry.rstrip("/") if entry.endswith("/") else None
                if (path + ".py" == entry or (folder and (path == folder or path.startswith(folder + "/")))
                        or (entry.endswith(".py") and "/" in entry and path == entry.rsplit("/", 1)[0])):
                    layer.setdefault(name, rank)
    return layer


def test_every_module_imports_only_its_own_row_and_rows_below_in_the_design_table():
    layer = _layer_of_each_module()
    unlisted = sorted(set(_modules()) - set(layer) - {"twa_kernels", "twa_kernels.__main__"})
    assert not unlisted, f"modules missing from docs/design.md's table: {unlisted}"
    upward = [f"{module} ({LAYERS[layer[module]]}) imports {name} ({LAYERS[layer[name]]})"
              for module, names in _top_level_graph().items() if module in layer
              for name in sorted(names) if name in layer and layer[name] > layer[module]]
    assert not upward, "\n".join(upward)


def test_the_layer_scan_reads_the_table_and_places_packages():
    layer = _layer_of_each_module()
    assert LAYERS[layer["twa_kernels.io.read"]] == LAYERS[layer["twa_kernels.io"]] == "reading and writing"
    assert LAYERS[layer["twa_kernels.backends.triton.kernels"]] == "the kernels"
    assert LAYERS[layer["twa_kernels.geometry.planes"]] == "methods beside TWA"
    assert LAYERS[layer["twa_kernels.twa"]] == "training in it"


def test_the_cycle_scan_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _printed_by_a_fresh_python(code: str) -> str:
    """What `code` prints in a fresh interpreter (nothing imported before it)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=PACKAGE.parent).stdout.strip()


def test_import_stays_free_of_heavy_packages():
    code = ("import sys, twa_kernels; heavy = {m.split('.')[0] for m in sys.modules} & "
            "{'matplotlib', 'transformers', 'lightning', 'mnist1d', 'scipy'}; "
            "heavy |= {m for m in ('torch.distributed.checkpoint', 'torch.utils.cpp_extension') if m in sys.modules}; "
            "print(' '.join(sorted(heavy)))")
    assert _printed_by_a_fresh_python(code) == ""


def test_an_eager_training_step_leaves_dynamo_unimported():
    # queuing the end-of-backward callbacks through torch.compiler.disable imported
    # torch._dynamo at the first backward: 6 ms became 1.2 s
    code = ("import sys, torch, twa_kernels as tk; m = torch.nn.Sequential(torch.nn.Linear(4, 3)); "
            "ck = [{k: v + i for k, v in m.state_dict().items()} for i in range(3)]; "
            "twa = tk.TWA(m, ck, bits=4, group_size=8); twa(torch.randn(2, 4)).sum().backward(); "
            "assert twa.coefficients.grad.abs().sum() > 0; print('torch._dynamo' in sys.modules)")
    assert _printed_by_a_fresh_python(code) == "False"
