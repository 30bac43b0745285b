"""The package's shape: imports point one way through the layers, functions stay short, the user-facing
scripts are thin shims, and each shared idea exists once."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "boxrefiner"
# config -> data -> features -> model -> (pictures) -> training / infer -> CLI; a module may import its own layer's
# package and any lower layer. training and infer share a rank but never import each other.
LAYERS = [{"errors", "version"}, {"utils"}, {"config"}, {"boxes"}, {"metrics"}, {"data"}, {"features"},
          {"modeling"}, {"plots"}, {"training", "infer"}, {"bench"}, {"cli"}, {"__init__", "__main__"}]
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}
SHIMS = ["train_box_refiner_optimized.py", "run_optimized_training.py", "test_optimization_performance.py",
         "refine_boxes.py", "evaluate_refiner.py"]


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def part_of(module: str) -> str:
    """The layer name of a dotted module inside the package (boxrefiner.data.coco -> data)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> list[tuple[int, str]]:
    """Every boxrefiner module a file imports (also inside functions and TYPE_CHECKING blocks)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "boxrefiner":
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "boxrefiner"]
    return found


def test_every_module_sits_in_a_layer():
    for path in modules():
        rel = path.relative_to(PACKAGE)
        name = rel.parts[0].removesuffix(".py")
        assert name in RANK, f"{rel}: not in any layer of {LAYERS}"


def test_no_module_imports_a_later_layer_and_training_and_infer_stay_apart():
    wrong = []
    for path in modules():
        rel = path.relative_to(PACKAGE)
        mine = rel.parts[0].removesuffix(".py")
        for line, module in imports_of(path):
            theirs = part_of(module)
            if theirs == "__init__" and module != "boxrefiner":
                continue
            if RANK[theirs] > RANK[mine] or (RANK[theirs] == RANK[mine] and theirs != mine):
                wrong.append(f"{rel}:{line} imports {module}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_layer_check_catches_a_backward_import(tmp_path):
    """The check itself: a data module importing training is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from boxrefiner.training.trainer import train\n")
    assert imports_of(bad) == [(2, "boxrefiner.training.trainer")] and RANK["training"] > RANK["data"]


def test_no_function_is_longer_than_sixty_lines():
    long = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "\n".join(long)


@pytest.mark.parametrize("script", SHIMS)
def test_the_top_level_scripts_are_thin_shims(script):
    tree = ast.parse((ROOT / script).read_text())
    code = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    assert all(isinstance(n, (ast.Import, ast.ImportFrom, ast.If)) for n in code), f"{script} defines code of its own"
    assert sum(isinstance(n, ast.ImportFrom) and (n.module or "").startswith("boxrefiner.cli") for n in code) == 1


def grep(pattern: str) -> list[str]:
    found = []
    for path in modules():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(pattern, line) and not line.lstrip().startswith("#"):
                found.append(f"{path.relative_to(ROOT)}:{number}")
    return found


def test_one_of_each():
    assert grep(r"torch\.load\(") == ["boxrefiner/utils/files.py:" + grep(r"torch\.load\(")[0].split(":")[1]]
    assert [p.split(":")[0] for p in grep(r"hashlib\.sha256\(\)")] == ["boxrefiner/utils/files.py"]
    assert [p.split(":")[0] for p in grep(r"""add_argument\(\s*["']--device["']""")] == ["boxrefiner/cli/common.py"]
    assert [p.split(":")[0] for p in grep(r"sample_ratio=FAST_SAMPLE_RATIO\)")] == ["boxrefiner/config.py"]
    assert set(frame_conversions()) == {"boxrefiner/boxes.py"}, "pixel <-> normalised boxes outside boxes.py"


def frame_conversions() -> list[str]:
    """Files where something is divided or multiplied by a `longest` (side): the frame conversion."""
    found = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Div, ast.Mult)):
                operand = node.right.value if isinstance(node.right, ast.Subscript) else node.right
                if (isinstance(operand, ast.Name) and operand.id == "longest") or (
                        isinstance(operand, ast.Call) and getattr(operand.func, "id", "") == "_per_row"):
                    found.append(str(path.relative_to(ROOT)))
    return found


def test_library_code_does_not_name_command_line_flags():
    flags = re.compile(r"""["'][^"']*(?<![\w-])--(resume|allow-rollback|clear-cache|debug|fast|epochs|device|"""
                       r"""hqsam-checkpoint|cache-dir|box-format)\b""")
    found = [p for p in grep(flags.pattern) if not p.startswith("boxrefiner/cli/")]
    assert not found, found
