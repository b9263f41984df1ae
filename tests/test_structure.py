"""The package's shape: imports point one way (base -> data -> models -> envs -> rl -> stages -> commands), with no
cycles, no import hidden in a function to dodge one, and no function over 60 lines. Read from the source, so it also sees
imports inside functions (blocks under `if TYPE_CHECKING:` excepted: they never run)."""

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "minirlhf"
LAYERS = {
    "base": ("minirlhf", "minirlhf.registry", "minirlhf.ops", "minirlhf.strict", "minirlhf.sharding", "minirlhf.tracking",
             "minirlhf.modelcard", "minirlhf.checkpoint", "minirlhf.runtime", "minirlhf.config", "minirlhf.flags",
             "minirlhf.metrics", "minirlhf.report", "minirlhf.precision", "minirlhf.training", "minirlhf.distributed", "minirlhf.rundir",
             "minirlhf.runner"),
    "data": ("minirlhf.data",),
    "models": ("minirlhf.models",),
    "envs": ("minirlhf.envs",),
    "rl": ("minirlhf.rl",),
    "stages": ("minirlhf.stages",),
    "commands": ("minirlhf.cli", "minirlhf.tools", "minirlhf.pipeline", "minirlhf.doctor", "minirlhf.feedback",
                 "minirlhf.__main__"),
}
ORDER = list(LAYERS)
LAZY_ALLOWED = {("minirlhf.feedback.commands", "minirlhf.feedback.app"), ("minirlhf.feedback.loop", "minirlhf.feedback.app")}
"""function-local imports kept on purpose: serving needs flask, which importing the CLI (and with it the loop's
config) must not"""


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def layer(module: str) -> int | None:
    """The layer's index in ORDER: a module is in a layer when it is one of its names or inside one of its packages
    (the bare package `minirlhf` is only itself, so a new top-level module must be given a layer); None if none."""
    found = [(len(prefix), i) for i, name in enumerate(ORDER) for prefix in LAYERS[name]
             if module == prefix or (prefix != "minirlhf" and module.startswith(prefix + "."))]
    return max(found)[1] if found else None


def upward(graph: dict[str, list[tuple[str, bool]]]) -> list[str]:
    return [f"{m} -> {t}" for m, ts in graph.items() for t, _ in ts
            if None not in (layer(t), layer(m)) and layer(t) > layer(m)]


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(module: str) -> list[tuple[str, bool]]:
    """(imported module of the package, whether the import sits inside a function) for every import in `module`."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if _type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.extend((a.name, in_function) for a in node.names if a.name.split(".")[0] == "minirlhf")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "minirlhf":
            for a in node.names:  # `from minirlhf import distributed` imports a module, `... import UserError` not
                sub = f"{node.module}.{a.name}"
                found.append((sub if sub in MODULES else node.module, in_function))
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return [(m, f) for m, f in found if m != module]


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    assert [m for m in MODULES if layer(m) is None] == []


def test_imports_only_point_down():
    assert upward(GRAPH) == []


def test_models_and_data_never_import_stages_or_commands():
    bad = [f"{m} -> {t}" for m, ts in GRAPH.items() if layer(m) <= ORDER.index("models") for t, _ in ts
           if t.startswith(("minirlhf.rl", "minirlhf.stages", "minirlhf.cli", "minirlhf.pipeline"))]
    assert bad == []


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of two or more modules (Tarjan, 1972): each one holds a cycle."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            strongconnect(v)
    return found


def test_no_import_cycles():
    assert cycles({m: {t for t, _ in ts if t in MODULES} for m, ts in GRAPH.items()}) == []


def test_no_package_import_hides_in_a_function():
    hidden = [f"{m} -> {t}" for m, ts in GRAPH.items() for t, lazy in ts if lazy and (m, t) not in LAZY_ALLOWED]
    assert hidden == []


@pytest.mark.parametrize("path", sorted(MODULES.values()), ids=lambda p: str(p.relative_to(SRC)))
def test_no_function_is_longer_than_60_lines(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    long = [f"{node.name}: {node.end_lineno - node.lineno + 1} lines" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert long == []


def test_the_checker_sees_cycles_and_hidden_imports(tmp_path, monkeypatch):
    """The walk itself: a function-local import is seen, and so is the cycle it closes."""
    pkg = tmp_path / "minirlhf"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "ops.py").write_text("from minirlhf import cli\n")
    (pkg / "cli.py").write_text("def f():\n    from minirlhf.ops import x\n")
    this = sys.modules[__name__]
    monkeypatch.setattr(this, "SRC", pkg)
    monkeypatch.setattr(this, "MODULES", {module_name(p): p for p in pkg.rglob("*.py")})
    assert imports("minirlhf.cli") == [("minirlhf.ops", True)]
    assert imports("minirlhf.ops") == [("minirlhf.cli", False)]
    assert layer("minirlhf.cli") > layer("minirlhf.ops")
    assert cycles({"minirlhf.cli": {"minirlhf.ops"}, "minirlhf.ops": {"minirlhf.cli"}}) == [["minirlhf.cli",
                                                                                            "minirlhf.ops"]]


def test_the_layer_check_fails_on_an_upward_import_and_an_unplaced_module(tmp_path, monkeypatch):
    """A deliberately wrong import in a temporary module (data importing a stage) is reported, and so is a new
    top-level module that no layer names."""
    pkg = tmp_path / "minirlhf"
    for folder in ("data", "stages"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "stages" / "sft.py").write_text("from minirlhf.data import wrong\n")
    (pkg / "data" / "wrong.py").write_text("from minirlhf.stages import sft\n")
    (pkg / "newthing.py").write_text("")
    this = sys.modules[__name__]
    monkeypatch.setattr(this, "SRC", pkg)
    monkeypatch.setattr(this, "MODULES", {module_name(p): p for p in pkg.rglob("*.py")})
    graph = {m: imports(m) for m in this.MODULES}
    assert upward(graph) == ["minirlhf.data.wrong -> minirlhf.stages.sft"]
    assert [m for m in this.MODULES if layer(m) is None] == ["minirlhf.newthing"]


def test_both_kinds_of_policy_have_the_whole_policy_interface():
    """models.policy.Policy is the one interface the stages use: the LSTM and the causal LM each have all of it."""
    import typing

    from minirlhf.models.causal_lm import CausalLMPolicy
    from minirlhf.models.policy import LSTMPolicy, Policy

    members = [name for name in vars(Policy) if not name.startswith("_")] + list(typing.get_type_hints(Policy))
    methods = [name for name in members if callable(getattr(Policy, name, None))]
    assert {"sample", "teacher_forced", "forward", "save", "frozen_copy"} <= set(methods)
    for cls in (LSTMPolicy, CausalLMPolicy):
        assert all(callable(getattr(cls, m, None)) for m in methods), cls
        assert cls.kind in ("lstm", "causal_lm")
