"""The commands the README promises run as it says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_test_command() -> str:
    """The pytest invocation that ends the README's 'Install and run the tests' line."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("# 2. Install and run the tests.", 1)[1].split("```", 1)[0]
    return re.search(r"python -m pytest[^\n`]*", block).group(0).strip()


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = [line.strip() for line in ci.splitlines() if line.strip().startswith("python -m pytest")]
    assert commands == [_readme_test_command()]


def test_readme_test_command_prints_the_passed_count(tmp_path: Path) -> None:
    """With the project's own pytest settings the README's flags end in 'N passed' (not -qq's silence)."""
    (tmp_path / "test_one.py").write_text("def test_one():\n    pass\n", encoding="utf-8")
    flags = _readme_test_command().split()[3:]  # after 'python -m pytest'
    done = subprocess.run([sys.executable, "-m", "pytest", *flags, "-c", str(ROOT / "pyproject.toml"),
                           "--rootdir", str(tmp_path), "-p", "no:cacheprovider", str(tmp_path / "test_one.py")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^1 passed in [\d.]+s", done.stdout, re.M), done.stdout
