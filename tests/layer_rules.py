"""The platform's layer rules, read from docs/ARCHITECTURE.md and checked against the imports of
every module (ast: in-function and type-only imports included). Each broken rule is one line
naming the file, the line and the rule. tests/ is outside the rules.

The rules:
- layer: a module of the platform imports only its own layer and those its row of the table
  lists; `trainables/` import only `paceray.protocol` of the platform;
- third-party: `mlflow` and `ray` are imported only where the table's last column allows (a
  prefix allows what is under it: `ray.train` allows `ray.train.torch`);
- trainables: the denoiser and the difficulty probe never import each other, and the shared
  diffusion library imports neither;
- cycle: no import cycle between modules;
- private: no `_name` imported from another module;
- size: no function body over MAX_BODY_LINES lines and no function over MAX_PARAMS parameters
  (self and cls not counted); click commands are exempt (their options are their parameters).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

MAX_BODY_LINES = 60
MAX_PARAMS = 6
GUARDED = ("mlflow", "ray")  # third-party packages only some layers may import
TRAINABLES = "trainables"
TABLE_START, TABLE_END = "<!-- layers:start -->", "<!-- layers:end -->"


@dataclass(frozen=True)
class Layer:
    name: str
    may_import: frozenset[str]  # other layers
    third_party: tuple[str, ...]  # prefixes of GUARDED packages it may import


@dataclass(frozen=True)
class Import:
    module: str  # the module imported (for `from X import name`, X.name when that is a module)
    line: int
    names: tuple[str, ...]  # the names a `from` import takes


@dataclass(frozen=True)
class Violation:
    file: str
    line: int
    rule: str
    text: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: [{self.rule}] {self.text}"


def read_table(architecture: Path) -> dict[str, Layer]:
    """The layer table between the markers of docs/ARCHITECTURE.md: `| layer | may import | third-party |`."""
    text = architecture.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        raise ValueError(f"{architecture}: no layer table between {TABLE_START} and {TABLE_END}")
    body = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0]
    layers = {}
    for row in body.strip().splitlines()[2:]:  # past the header and its rule
        cells = [c.strip().strip("`") for c in row.strip().strip("|").split("|")]
        name, imports, third = cells[0], cells[1], cells[2]

        def listed(cell: str) -> list[str]:
            return [x.strip().strip("`") for x in cell.split(",") if x.strip().strip("`") not in ("", "—", "-")]

        layers[name] = Layer(name, frozenset(listed(imports)), tuple(listed(third)))
    return layers


def module_name(path: Path, root: Path) -> str:
    """`paceray.tracking.run` for platform/paceray/tracking/run.py, `trainables.denoiser` for its __init__."""
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "platform":
        parts = parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def sources(root: Path) -> Iterator[Path]:
    for top in (root / "platform" / "paceray", root / TRAINABLES):
        yield from sorted(top.rglob("*.py"))


def imports_of(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> Iterator[Import]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, node.lineno, ())
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            names = tuple(a.name for a in node.names)
            if base in GUARDED:  # `from ray import tune` imports ray.tune
                for name in names:
                    yield Import(f"{base}.{name}", node.lineno, ())
                continue
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
            for sub in submodules:
                yield Import(sub, node.lineno, ())
            rest = tuple(n for n in names if f"{base}.{n}" not in known)
            if rest or not submodules:
                yield Import(base, node.lineno, rest)


def layer_of(module: str) -> Optional[str]:
    parts = module.split(".")
    if parts[0] == "paceray":
        return parts[1] if len(parts) > 1 else "base"  # the package's own __init__: a version string
    if parts[0] == TRAINABLES:
        return TRAINABLES
    return None


def allowed_third_party(imported: str, allowances: tuple[str, ...]) -> bool:
    return any(imported == a or imported.startswith(a + ".") for a in allowances)


def check(root: Path, architecture: Optional[Path] = None) -> list[Violation]:
    layers = read_table(architecture or root / "docs" / "ARCHITECTURE.md")
    files = {module_name(p, root): p for p in sources(root)}
    known = set(files)
    graph: dict[str, set[str]] = {m: set() for m in files}
    found: list[Violation] = []
    for module, path in files.items():
        rel = str(path.relative_to(root))
        tree = ast.parse(path.read_text(), filename=rel)
        mine = layer_of(module)
        if mine not in layers:
            found.append(Violation(rel, 1, "layer", f"{module} is in no layer of the table ({mine!r})"))
            continue
        for imp in imports_of(tree, module, path.name == "__init__.py", known):
            found.extend(_import_rules(rel, module, mine, imp, layers))
            if imp.module in known and imp.module != module:
                graph[module].add(imp.module)
            if imp.module in known and imp.module != module:
                for name in imp.names:
                    if name.startswith("_") and not name.startswith("__"):
                        found.append(Violation(rel, imp.line, "private",
                                               f"imports the private name {name} of {imp.module}"))
        found.extend(_size_rules(rel, tree))
    found.extend(_cycles(graph, files, root))
    return sorted(found, key=lambda v: (v.file, v.line, v.rule))


def _import_rules(rel: str, module: str, mine: str, imp: Import, layers: dict[str, Layer]) -> Iterator[Violation]:
    top = imp.module.split(".")[0]
    if top in GUARDED and not allowed_third_party(imp.module, layers[mine].third_party):
        where = [name for name, layer in layers.items() if allowed_third_party(imp.module, layer.third_party)]
        yield Violation(rel, imp.line, "third-party",
                        f"{mine} may not import {imp.module} (only {', '.join(where) or 'no layer'} may)")
    theirs = layer_of(imp.module)
    if theirs is None or theirs == mine:
        if mine == TRAINABLES and theirs == TRAINABLES:
            yield from _trainable_rules(rel, module, imp)
        return
    if mine == TRAINABLES:
        if theirs != "protocol":
            yield Violation(rel, imp.line, "layer", f"trainables import only paceray.protocol, not {imp.module}")
        return
    if theirs not in layers[mine].may_import:
        yield Violation(rel, imp.line, "layer", f"{mine} may not import {theirs} ({imp.module})")


def _trainable_rules(rel: str, module: str, imp: Import) -> Iterator[Violation]:
    me, them = module.split(".")[1:2], imp.module.split(".")[1:2]
    if not me or not them or me == them:
        return
    if them[0] != "diffusion":
        yield Violation(rel, imp.line, "trainables",
                        f"trainables.{me[0]} may not import trainables.{them[0]} (shared code belongs in "
                        f"trainables.diffusion)")


def _is_click_command(fn: ast.AST) -> bool:
    for deco in getattr(fn, "decorator_list", []):
        target = deco.func if isinstance(deco, ast.Call) else deco
        text = ast.unparse(target)
        if text.startswith("click.") or re.search(r"\.(command|group)$", text) or text in ("command", "group"):
            return True
    return False


def _size_rules(rel: str, tree: ast.AST) -> Iterator[Violation]:
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or _is_click_command(fn):
            continue
        a = fn.args
        params = [p.arg for p in [*a.posonlyargs, *a.args, *a.kwonlyargs] if p.arg not in ("self", "cls")]
        if len(params) > MAX_PARAMS:
            yield Violation(rel, fn.lineno, "size", f"{fn.name} takes {len(params)} parameters (at most {MAX_PARAMS}: "
                                                    f"give it a small state object)")
        body = fn.body
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            body = body[1:]  # the docstring
        if body:
            lines = fn.end_lineno - body[0].lineno + 1
            if lines > MAX_BODY_LINES:
                yield Violation(rel, fn.lineno, "size", f"{fn.name}'s body is {lines} lines (at most {MAX_BODY_LINES})")


def _cycles(graph: dict[str, set[str]], files: dict[str, Path], root: Path) -> Iterator[Violation]:
    """Each strongly connected component of more than one module, once (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    for component in components:
        first = component[0]
        yield Violation(str(files[first].relative_to(root)), 1, "cycle",
                        "import cycle between " + ", ".join(component))
