"""The package's shape: no import cycle, no module named like a dependency, short functions."""

import ast
import sys
from pathlib import Path

import finetune

PACKAGE = Path(finetune.__file__).parent
# `accelerate launch finetune/run.py` puts finetune/ first on sys.path: a module named like one
# of these would shadow the real package.
DEPENDENCIES = {"torch", "torchvision", "timm", "datasets", "accelerate", "safetensors",
                "omegaconf", "tqdm", "numpy", "PIL", "matplotlib", "yaml", "huggingface_hub",
                "onnx", "onnxscript", "onnxruntime"}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _packages(module: str) -> set[str]:
    """The packages a module lives in, which importing it runs first: a.b.c -> {a, a.b}."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def import_graph() -> dict[str, set[str]]:
    """finetune module -> the finetune modules it imports, at the top or inside functions,
    with the packages around them (importing ``finetune.models.interface`` runs
    ``finetune/models/__init__.py`` first), but for the packages the importer lives in
    (those are being imported already)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module in modules:
                    edges.add(node.module)
                # `from finetune.models import stages`: a name, or a submodule of the package
                edges |= {f"{node.module}.{a.name}" for a in node.names
                          if f"{node.module}.{a.name}" in modules}
        edges |= {pkg for e in edges for pkg in _packages(e) if pkg in modules}
        graph[name] = edges - {name} - _packages(name) - {"finetune"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert "finetune.train" in graph and "finetune.assemble" in graph["finetune.train"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    # The package as it was: config validated models, which import config.
    graph = import_graph()
    graph["finetune.config"] = graph["finetune.config"] | {"finetune.models"}
    assert find_cycle(graph) is not None
    # A package's own __init__ reached through one of its modules counts as an import.
    assert "finetune.models" in import_graph()["finetune.optim"]


def test_no_module_shadows_a_dependency():
    names = {p.stem for p in PACKAGE.rglob("*.py")} | {p.name for p in PACKAGE.rglob("*")
                                                        if p.is_dir()}
    assert not names & (DEPENDENCIES | set(sys.stdlib_module_names) - {"__main__"}), \
        names & DEPENDENCIES


def test_the_loop_reads_in_one_file_and_functions_stay_short():
    assert len((PACKAGE / "train.py").read_text().splitlines()) < 250
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if node.end_lineno - node.lineno + 1 > 60:
                    long.append(f"{path.name}:{node.name}")
    assert not long
