"""The package's layers: ARCHITECTURE.md's layout table is the order, and every import follows it downwards."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def layout_table() -> list[tuple[str, list[str]]]:
    """(layer, module paths in import order) per row of ARCHITECTURE.md's table between the layout markers."""
    text = (REPO / "ARCHITECTURE.md").read_text(encoding="utf-8")
    table = text.split("<!-- layout:start -->")[1].split("<!-- layout:end -->")[0]
    rows = [line.split("|") for line in table.strip().splitlines()[2:]]
    return [(cells[1].strip(), re.findall(r"`(optqa/[\w/]+\.py)`", cells[2])) for cells in rows]


def module_name(path: str) -> str:
    name = path[:-3].replace("/", ".")
    return name[:-len(".__init__")] if name.endswith(".__init__") else name


def imported_modules(path: Path, package: str) -> tuple[set[str], set[str]]:
    """What ``path`` imports from optqa, at the top or inside a function, as absolute names: ``(modules, maybe)``,
    where ``maybe`` are ``from optqa.x import name`` names that are modules only if such a file exists."""
    modules, maybe = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the module's package
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            modules.add(base)
            maybe |= {f"{base}.{alias.name}" for alias in node.names}  # `from optqa import cli` imports a module
    ours = lambda names: {n for n in names if n == "optqa" or n.startswith("optqa.")}  # noqa: E731
    return ours(modules), ours(maybe)


def test_the_table_names_every_module_once():
    listed = [path for _, paths in layout_table() for path in paths]
    on_disk = sorted(str(p.relative_to(REPO)) for p in (REPO / "optqa").rglob("*.py")
                     if p.name != "__init__.py" or p.parent.name == "optqa")
    assert sorted(listed) == on_disk
    assert len(listed) == len(set(listed))
    assert [layer for layer, _ in layout_table()] == ["foundation", "core library", "checkpoints", "building",
                                                      "compatibility", "sharing", "runs", "entry points"]


def test_every_import_goes_down():
    order = [module_name(path) for _, paths in layout_table() for path in paths]
    rank = {name: i for i, name in enumerate(order)}
    # a subpackage's __init__ holds only its docstring: importing the package is importing nothing above
    packages = {"optqa.checkpoints", "optqa.compat", "optqa.sharing", "optqa.run"}
    upward = []
    for name in order:
        path = REPO / (name.replace(".", "/") + ("/__init__.py" if name == "optqa" else ".py"))
        package = name if name == "optqa" else name.rsplit(".", 1)[0]
        modules, maybe = imported_modules(path, package)
        for target in sorted(modules | (maybe & set(rank))):
            if target in packages or target == "optqa":
                continue  # a package's __init__ is its docstring; `from optqa import __version__`
            if target not in rank:
                upward.append(f"{name} imports {target}, which does not exist")
            elif rank[target] >= rank[name]:
                upward.append(f"{name} imports {target}")
    assert upward == []


def test_subpackages_hold_no_code():
    for package in ("checkpoints", "compat", "sharing", "run"):
        tree = ast.parse((REPO / "optqa" / package / "__init__.py").read_text(encoding="utf-8"))
        assert len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr)  # the docstring alone


def test_the_public_api_resolves_to_the_layers():
    import optqa

    for name in optqa.__all__:
        assert getattr(optqa, name).__module__.startswith("optqa.")
    assert optqa.AutoDeltaModel.__module__ == "optqa.compat.opendelta"


def test_every_mode_has_its_function_in_the_cli():
    from optqa import cli
    from optqa.config import MODES

    assert sorted(name[:-len("_mode")] for name in vars(cli) if name.endswith("_mode")) == sorted(MODES)
