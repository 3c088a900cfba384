"""The package's imports point down its layers only (the layers are listed in ``preannotate``'s docstring)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import preannotate

PACKAGE = Path(preannotate.__file__).parent


def layers() -> list[list[str]]:
    """The module prefixes of each layer, bottom first, as the package docstring lists them."""
    found: dict[int, list[str]] = {}
    for number, body in re.findall(r"^(\d)\. \w+: ((?:.|\n)*?)\n   —", preannotate.__doc__, re.M):
        found[int(number)] = re.findall(r"`(preannotate[\w.]*)`", body)
    assert sorted(found) == list(range(1, len(found) + 1)) and len(found) >= 6, found
    return [found[n] for n in sorted(found)]


def layer_of(module: str, prefixes: list[list[str]]) -> int | None:
    """The layer of the longest prefix naming ``module``."""
    best = None
    for number, names in enumerate(prefixes, start=1):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best[1])):
                best = (number, name)
    return best[0] if best else None


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imported(path: Path, module: str) -> set[str]:
    """Every ``preannotate`` module ``path`` imports, at the top or inside a function (a lazy import is an arrow
    too)."""
    every, names = modules(), set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base
                                                                                                    else []))
            for alias in node.names:  # `from preannotate.formats import masks` imports the module masks
                names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in every else base)
    return {name for name in names if name in every and name != module}


def test_every_module_has_a_layer():
    prefixes = layers()
    assert [module for module in modules() if module != "preannotate" and layer_of(module, prefixes) is None] == []


def test_no_import_points_up_the_layers():
    prefixes = layers()
    upward = []
    for module, path in sorted(modules().items()):
        own = layer_of(module, prefixes)
        if own is None:
            continue
        for target in sorted(imported(path, module)):
            theirs = layer_of(target, prefixes)
            if theirs is not None and theirs > own:
                upward.append(f"{module} (layer {own}) imports {target} (layer {theirs})")
    assert upward == []


def test_the_checker_sees_an_upward_import(tmp_path):
    """The test above can fail: a lower module importing a higher one is reported."""
    prefixes = layers()
    source = tmp_path / "shapes.py"
    source.write_text("def f():\n    from preannotate.serving import core\n")
    assert "preannotate.serving.core" in imported(source, "preannotate.shapes")
    assert layer_of("preannotate.serving.core", prefixes) > layer_of("preannotate.shapes", prefixes)
    # the mask codecs are formats, a layer above the shapes (a mask shape's outline is theirs to trace)
    assert layer_of("preannotate.formats.masks", prefixes) > layer_of("preannotate.shapes", prefixes)
