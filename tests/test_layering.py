"""The architecture as a test: imports point down the layer order only, and `import lmforge` stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lmforge"

# Bottom to top. A module may import its own part or any part on a lower layer, never one on its own
# layer or above: that is what keeps the tree free of import circles. A new part must be placed here.
LAYERS: list[set[str]] = [
    {"errors"},
    {"files"},
    {"config", "options", "tokenizer", "device", "plots"},
    {"estimate", "nn", "data", "word2vec"},
    {"models"},
    {"checkpoint"},
    {"train", "generate"},
    {"compress"},
    {"peft"},
    {"interop"},
    {"evaluate", "align", "inspect"},
    {"serve", "rag"},
    {"recipes"},
    {"cli"},
]
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def part_of(module: str) -> str:
    """lmforge.peft.lora -> peft; lmforge.checkpoint -> checkpoint."""
    return module.split(".")[1]


def lmforge_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every lmforge import in a file, at the top or inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmforge."):
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("lmforge.")]
    return found


def source_files() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if p != PACKAGE / "__init__.py"]  # the root loads lazily


def test_every_part_has_a_layer():
    parts = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in source_files()}
    assert parts - set(RANK) == set(), "place each new part of lmforge in LAYERS"


def test_imports_point_down_the_layers_only():
    wrong = []
    for path in source_files():
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for line, module in lmforge_imports(path):
            theirs = part_of(module)
            if theirs != own and RANK[theirs] >= RANK[own]:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} ({own}, layer {RANK[own]}) imports {module} "
                             f"(layer {RANK[theirs]})")
    assert wrong == []


def test_the_layer_check_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from lmforge.recipes.pretrain import pretrain\n")
    assert [part_of(m) for _, m in lmforge_imports(bad)] == ["recipes"]
    assert RANK["recipes"] > RANK["models"]


def imported_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_import_lmforge_is_light():
    loaded = imported_after("import lmforge")
    assert "matplotlib" not in loaded
    assert {m for m in loaded if m.startswith("lmforge.")} == set()


def test_import_of_a_lower_layer_loads_nothing_above_it():
    loaded = {part_of(m) for m in imported_after("import lmforge.models") if m.startswith("lmforge.")}
    assert all(RANK[part] <= RANK["models"] for part in loaded), loaded
    assert "matplotlib" not in imported_after("import lmforge.cli; lmforge.cli.build_parser()")


def test_lazy_names_resolve_to_their_homes():
    import lmforge
    from lmforge.recipes.pretrain import pretrain

    assert lmforge.pretrain is pretrain
    assert set(lmforge.__all__) <= set(dir(lmforge))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lmforge.nope  # noqa: B018


def test_the_cli_loads_the_optional_extras_only_for_their_commands():
    """`lmforge --help` and every other command work without the optional extras or the test oracles installed."""
    loaded = {m.split(".")[0] for m in imported_after("import lmforge.cli; lmforge.cli.build_parser()")}
    optional = {"fastapi", "uvicorn", "starlette", "faiss", "rank_bm25", "gensim", "vaderSentiment", "trl"}
    assert loaded.isdisjoint(optional), loaded & optional
