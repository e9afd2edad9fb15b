"""The package's shape: imports run one way (no circle, counting imports inside functions too), no private name is
imported from another module, and modules stay small. Read from the sources with `ast`; nothing is imported."""
import ast, pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = {"ftlab": ROOT / "ftlab", "ftlab.kernels": ROOT / "kernels"}
LIMIT = 650        # lines; the generated module index is not code anyone edits


def modules() -> dict[str, pathlib.Path]:
    "Every module of the package by dotted name (a package by its own name, from its __init__.py)."
    out = {}
    for prefix, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            if path.name == "_modidx.py" or "kernels" in path.relative_to(folder).parts[:1] and prefix == "ftlab": continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__": parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


def imports(name: str, path: pathlib.Path, known: set[str]) -> list[tuple[str, list[str]]]:
    "(imported ftlab module, names taken from it) for every import statement, at any depth of the module."
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.split(".")[0] == "ftlab"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "ftlab": continue
            for a in node.names:   # `from pkg import submodule` is an import of the submodule
                sub = f"{mod}.{a.name}"
                out.append((sub, []) if sub in known else (mod, [a.name]))
    return out


def graph():
    mods = modules()
    edges, private = {m: set() for m in mods}, []
    for name, path in mods.items():
        for target, names in imports(name, path, set(mods)):
            # `import ftlab.a.b` needs ftlab.a.b; the parent packages run first but are not what the code uses
            while target not in mods and "." in target: target = target.rsplit(".", 1)[0]
            if target != name and target in mods and target != "ftlab": edges[name].add(target)
            private += [f"{name} imports {n} from {target}" for n in names
                        if n.startswith("_") and not n.startswith("__") and target != name]
    return edges, private


def cycles(edges: dict[str, set]) -> list[list[str]]:
    "Strongly connected components with more than one module (Tarjan)."
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    def visit(v):
        index[v] = low[v] = counter[0]; counter[0] += 1; stack.append(v); on.add(v)
        for w in edges[v]:
            if w not in index: visit(w); low[v] = min(low[v], low[w])
            elif w in on: low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1: out.append(sorted(comp))
    for v in sorted(edges):
        if v not in index: visit(v)
    return out


def test_the_graph_sees_the_package():
    edges, _ = graph()
    assert {"ftlab.config", "ftlab.methods", "ftlab.methods.registry", "ftlab.run", "ftlab.kernels.lora"} <= set(edges)
    assert "ftlab.methods.registry" in edges["ftlab.methods.sft"]        # relative and absolute imports both resolve
    assert "ftlab.inference" in edges["ftlab.run"]


def test_no_import_circle():
    edges, _ = graph()
    assert cycles(edges) == []


def test_no_private_name_crosses_a_module():
    _, private = graph()
    assert private == []


def test_registry_imports_no_method_family():
    edges, _ = graph()
    families = {m for m in edges if m.startswith("ftlab.methods.") and m not in ("ftlab.methods.registry", "ftlab.methods.common")}
    assert not edges["ftlab.methods.registry"] & (families | {"ftlab.methods"})


def test_modules_stay_small():
    big = {n: len(p.read_text().splitlines()) for n, p in modules().items() if len(p.read_text().splitlines()) > LIMIT}
    assert big == {}
