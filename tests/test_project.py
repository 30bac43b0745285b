"""Promises of the repository itself: CI runs exactly the README's test command, and the package's
metadata lists what the requirements files list."""

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command():
    test_command = next(c for c in readme_commands() if "pytest" in c and c.startswith("python3 -m venv"))
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_readme_demo_command_installs_the_package_and_uses_the_embedded_default():
    demo = next(c for c in readme_commands() if c.startswith("python3 -m venv") and "configs/demo.yaml" in c)
    assert "pip install ." in demo and "boxrefiner train" in demo and (ROOT / "configs" / "demo.yaml").is_file()


def requirement_lines(name: str) -> list[str]:
    lines = [line.split("#")[0].strip() for line in (ROOT / name).read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("-r")]


def test_the_package_depends_on_requirements_txt_and_its_dev_extra_is_requirements_dev():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    assert project["project"]["scripts"] == {"boxrefiner": "boxrefiner.cli.main:main"}
    assert sorted(project["project"]["optional-dependencies"]["dev"]) == sorted(requirement_lines("requirements-dev.txt"))
    assert requirement_lines("requirements.txt")  # every runtime dependency, in one place
