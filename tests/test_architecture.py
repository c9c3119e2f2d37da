"""The house's floor plan, checked from the source: which stage may import which, and no import cycles.

Every `import` statement of every module is parsed (module level and inside functions alike: a lazy import is
still a dependency), relative imports resolved, and the graph checked against the layering of design.md §3:

    manifests  <  store  <  extract, train  <  serve  <  probecache (CLI, the front door)
    lm (model + tokenisation)  <  extract, serve
    cluster (where fanned-out work runs: dask clusters)  <  extract, train

A stage never imports the front door; store and manifests import no higher stage; train imports neither the
extract stage nor transformers (not even through another of our modules, not even lazily); no module cycle
exists. And what a stage does not need is not loaded when it is imported: extract, store and serve load no
scikit-learn, matplotlib or dask (module-level imports, followed through our modules; a function-level import
of an optional part is fine).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("manifests", "store", "lm", "cluster", "extract", "train", "serve")
FRONT_DOOR = "probecache"
# the stages each stage may import (itself always)
ALLOWED = {
    "manifests": set(),
    "store": {"manifests"},
    "lm": set(),
    "cluster": set(),
    "extract": {"manifests", "store", "lm", "cluster"},
    "train": {"manifests", "store", "lm", "cluster"},
    "serve": {"manifests", "store", "lm", "train", "cluster"},
}
# third-party packages a stage may never import, directly or through any of our modules it imports
NEVER = {"train": {"transformers"}, "store": {"transformers", "sklearn", "matplotlib"},
         "manifests": {"torch", "transformers", "zarr"}}
# third-party packages importing a stage's modules must not load (module-level imports, followed)
NOT_AT_IMPORT = {stage: {"sklearn", "scipy", "matplotlib", "dask", "distributed"}
                 for stage in ("store", "lm", "cluster", "extract", "serve")}


def module_files() -> dict[str, Path]:
    """probecache.<stage>.<module> -> file, for every stage folder and the front door."""
    found = {}
    for folder in (*STAGES, FRONT_DOOR):
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            package = FRONT_DOOR if folder == FRONT_DOOR else f"{FRONT_DOOR}.{folder}"
            found[".".join([package, *parts])] = path
    return found


def imports_of(name: str, path: Path, module_level: bool = False) -> set[str]:
    """Absolute names of everything ``path`` imports (``from x import y`` gives x and x.y); ``module_level``: only
    what importing the module runs (not inside functions or classes, nor under ``if TYPE_CHECKING``)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out: set[str] = set()
    for node in (_module_level(tree.body) if module_level else ast.walk(tree)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names)
    return out


def _module_level(body: list[ast.stmt]):
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        yield node
        for field in ("body", "orelse", "finalbody", "handlers"):
            for child in getattr(node, field, []):
                yield from _module_level([child] if isinstance(child, ast.stmt) else child.body)


def _graph(module_level: bool) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    files = module_files()
    internal, external = {}, {}
    for name, path in files.items():
        names = imports_of(name, path, module_level)
        internal[name] = {n for n in names if n in files and n != name}
        external[name] = {n.split(".")[0] for n in names if not n.startswith(FRONT_DOOR)}
    return internal, external


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> our modules it imports, module -> top-level third-party packages it imports), lazy imports too."""
    return _graph(module_level=False)


@pytest.fixture(scope="module")
def import_time_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """The same for what importing each module runs."""
    return _graph(module_level=True)


def stage_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else FRONT_DOOR


def test_stages_import_only_lower_stages(graph):
    internal, _ = graph
    wrong = sorted(f"{m} imports {d}" for m, deps in internal.items() for d in deps
                   if stage_of(m) != FRONT_DOOR and stage_of(d) != stage_of(m)
                   and stage_of(d) not in ALLOWED[stage_of(m)])
    assert not wrong, "layering broken (see this file's docstring):\n" + "\n".join(wrong)


def reachable(start: str, internal: dict[str, set[str]]) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for dep in internal[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def forbidden_reached(graph, forbidden_by_stage: dict[str, set[str]]) -> list[str]:
    internal, external = graph
    wrong = []
    for module in internal:
        forbidden = forbidden_by_stage.get(stage_of(module), set())
        for dep in sorted(reachable(module, internal)):
            if hits := external[dep] & forbidden:
                wrong.append(f"{module} reaches {', '.join(sorted(hits))} through {dep}")
    return wrong


def test_forbidden_packages_are_never_imported(graph):
    wrong = forbidden_reached(graph, NEVER)
    assert not wrong, "\n".join(wrong)


def test_optional_parts_are_not_loaded_at_import(import_time_graph):
    wrong = forbidden_reached(import_time_graph, NOT_AT_IMPORT)
    assert not wrong, "import them where they are used:\n" + "\n".join(wrong)


def test_no_import_cycles(graph):
    internal, _ = graph
    # a package's __init__ importing its own submodules is not a cycle of dependence
    edges = {m: {d for d in deps if not m.startswith(d + ".") and not d.startswith(m + ".")}
             for m, deps in internal.items()}
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(edges[module]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join([*path[path.index(dep):], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_what_it_checks(graph, import_time_graph):
    """The graphs are not empty or blind: known edges are found, lazy imports only in the full graph."""
    internal, external = graph
    assert "probecache.store.errors" in internal["probecache.store.reader"]
    assert "torch" in external["probecache.store.reader"]
    assert "dask" in external["probecache.extract.launchers"]  # imported inside run_dask
    assert "dask" not in import_time_graph[1]["probecache.extract.launchers"]
    assert any(stage_of(d) == "extract" for d in internal["probecache.cli"])
    assert len(internal) > 60


def declared_distributions() -> tuple[set[str], set[str]]:
    """(core dependencies, optional extras' dependencies) of pyproject.toml, as normalised distribution names."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]

    def names(requirements) -> set[str]:
        import re

        return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].strip().lower().replace("_", "-") for r in requirements}

    extras = set().union(*(names(v) for k, v in project["optional-dependencies"].items() if k != "dev"))
    return names(project["dependencies"]), extras


def test_every_third_party_import_is_declared(graph, import_time_graph):
    """What a stage imports is a declared dependency (core for what importing the stage loads; core or an extra
    for a function-level import of an optional part). A package present here only through the dev extra or as
    another package's dependency would break `pip install probecache` elsewhere."""
    import sys
    from importlib.metadata import packages_distributions

    core, extras = declared_distributions()
    dist_of = {m: {d.lower().replace("_", "-") for d in ds} for m, ds in packages_distributions().items()}
    optional = {"boto3"}  # used only when installed (store/roots.py checks with find_spec): never required
    wrong = []
    for (internal, external), allowed, when in ((import_time_graph, core, "at import"),
                                                (graph, core | extras, "anywhere")):
        for module in internal:
            for top in sorted(external[module] - set(sys.stdlib_module_names) - {"__future__"} - optional):
                dists = dist_of.get(top)
                if dists is None or not dists & allowed:
                    wrong.append(f"{module} imports {top} ({when}) from {sorted(dists or ['nothing installed'])}")
    assert not wrong, "declare these in pyproject.toml:\n" + "\n".join(sorted(set(wrong)))
