"""The package's imports form no cycle, counting those made only for the type checker
(`if TYPE_CHECKING:`) and those inside functions: a module that needs something of one above it
gets a small Protocol instead (e.g. edge/handler.py's EdgeHost), so the layers read top-down."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sidecar"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (`from . import x` counts module x)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join([*base, node.module] if node.module else base)
                else:
                    target = node.module or ""
                candidates = [target, *(f"{target}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            graph[name].update(c for c in candidates if c in modules and c != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_every_kind_of_import() -> None:
    graph = import_graph()
    assert "sidecar.app" in graph["sidecar.process.worker"]  # inside a function
    assert "sidecar.state" in graph["sidecar.edge.handler"]  # under TYPE_CHECKING
    assert "sidecar.edge.protocol" in graph["sidecar.app"]  # a plain relative import


def test_no_import_cycle() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_a_cycle_is_found() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# -- where Redis's errors stop ------------------------------------------------------------------

# The modules allowed to handle Redis's own errors: the stores (sidecar/stores/boundary.py turns
# them into StoreUnavailable for everything above), the job queue's adapter around saq, the
# runner that drives saq's records, and the embedded Redis's process.
REDIS_ERROR_HANDLERS = ("sidecar.stores", "sidecar.jobs.queue", "sidecar.jobs.runner",
                        "sidecar.process.embedded_redis")
REDIS_ERROR_NAMES = {"RedisError", "REDIS_ERRORS", "ConnectionError", "ResponseError"}


def redis_error_handlers(allowed: tuple[str, ...]) -> dict[str, list[int]]:
    """Module (outside `allowed`) -> the lines where it imports redis's exceptions or names
    REDIS_ERRORS."""
    found: dict[str, list[int]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        if allowed and name.startswith(allowed):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            imported = (isinstance(node, ast.ImportFrom) and node.module is not None
                        and node.module.startswith("redis")
                        and any(alias.name in REDIS_ERROR_NAMES or "exceptions" in node.module
                                for alias in node.names))
            named = isinstance(node, ast.Name) and node.id == "REDIS_ERRORS"
            if imported or named:
                found.setdefault(name, []).append(node.lineno)
    return found


def test_redis_errors_are_handled_only_below_the_stores_boundary() -> None:
    assert redis_error_handlers(REDIS_ERROR_HANDLERS) == {}


def test_a_redis_error_handler_is_found() -> None:
    everywhere = redis_error_handlers(())
    assert "sidecar.jobs.runner" in everywhere and "sidecar.stores.subscriber" in everywhere


def test_only_the_job_queues_adapter_and_runner_import_saq() -> None:
    importers = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [])
            if any(name == "saq" or name.startswith("saq.") for name in names):
                importers.add(_module_name(path))
    assert importers == {"sidecar.jobs.queue", "sidecar.jobs.runner"}
