"""Promises of the repository itself: CI runs exactly the README's test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command():
    test_command = next(c for c in readme_commands() if "pytest" in c and c.startswith("python3 -m venv"))
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_readme_demo_command_uses_the_embedded_default():
    demo = next(c for c in readme_commands() if c.startswith("python3 -m venv") and "configs/demo.yaml" in c)
    assert "requirements.txt" in demo and (ROOT / "configs" / "demo.yaml").is_file()
