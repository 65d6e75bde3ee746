"""The project's modules form a tree a reader can follow: no import circle, and no module leans on an entry script.

Every import of every project .py file is read with ``ast`` (imports inside functions included: a circle hidden in a
function is still a circle a reader must untangle). Tests are not modules of the project and may import scripts.
"""
import ast

from conftest import ROOT

# the scripts a user runs: what two of them share lives in a module that neither is
ENTRY_SCRIPTS = {"train", "val", "demo", "app", "export", "bench", "bench_demo", "crossval", "calibrate", "ship",
                  "draw_augmentations"}
# thin entries that are the loop with another objective, and benchmarks that import what they measure
ALLOWED_SCRIPT_IMPORTS = {("train-ldl", "train"), ("train-mt", "train"), ("bench", "train"), ("bench_demo", "demo")}
NOT_PROJECT = {"tests", ".venv", ".git", "shared"}


def module_name(path):
    """``preprocessing/align.py`` -> ``preprocessing.align``; a package's ``__init__.py`` is the package."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files():
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))
            if not NOT_PROJECT & set(path.relative_to(ROOT).parts[:-1])}


def imported_names(tree, module, is_package):
    """Every dotted name an import statement of ``tree`` names, relative imports resolved against ``module``."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1] if package else []
                base = ".".join(anchor + ([base] if base else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def project_module(name, modules):
    """The longest prefix of a dotted name that is a project module, or None for a library."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def import_graph():
    files = project_files()
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets = {project_module(name, files) for name in imported_names(tree, module, path.name == "__init__.py")}
        graph[module] = sorted(targets - {None, module})
    return graph


def circles(graph):
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, []):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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


def test_the_graph_sees_the_project():
    """A guard for the two tests below: they pass vacuously if the walk misses the modules or their imports."""
    graph = import_graph()
    assert {"train", "val", "defaults", "preprocessing.align", "train-ldl"} <= set(graph)
    assert "train" in graph["train-ldl"] and "defaults" in graph["train"]
    assert "preprocessing.common" in graph["preprocessing.utkface"]


def test_circles_are_found():
    assert circles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert circles({"a": ["b"], "b": []}) == []


def test_no_import_circle():
    graph = import_graph()
    found = circles(graph)
    edges = [f"{source} -> {target}" for component in found for source in component
             for target in graph[source] if target in component]
    assert not found, f"import circles among {found}: {', '.join(edges)}"


def test_no_module_imports_an_entry_script():
    graph = import_graph()
    bad = [f"{source} -> {target}" for source, targets in sorted(graph.items()) for target in targets
           if target in ENTRY_SCRIPTS and (source, target) not in ALLOWED_SCRIPT_IMPORTS]
    assert not bad, f"entry scripts imported by other modules (move what they share into a module): {', '.join(bad)}"
