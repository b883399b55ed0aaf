"""The laptop's install (README, "Watch a run"): the package from pyproject.toml with only the
light requirements, into an empty venv, gives `magvit-job status RUN --html run.html` without
torch or numpy. Needs the package registry (pip)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.crafted_runs import crafted_run, write_run
from tests.helpers import ROOT

pytestmark = pytest.mark.timeout(600)


def test_the_package_installs_without_torch_and_writes_the_run_page(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT / "job", source / "job", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", source)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    for args in (["--no-deps", str(source)], ["-r", str(ROOT / "requirements-status.txt")]):
        installed = subprocess.run([*pip, *args], capture_output=True, text=True, timeout=500)
        assert installed.returncode == 0, installed.stderr[-3000:]
    for heavy in ("torch", "numpy", "matplotlib"):
        probe = subprocess.run([str(venv / "bin" / "python"), "-c", f"import {heavy}"], capture_output=True)
        assert probe.returncode != 0, f"{heavy} is installed: the test would prove nothing"

    run = write_run(tmp_path / "run", crafted_run("completed", val_losses=(0.3, 0.2)))
    page = tmp_path / "run.html"
    result = subprocess.run([str(venv / "bin" / "magvit-job"), "status", str(run), "--html", str(page)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "health:          completed (exit 0)" in result.stdout
    html = page.read_text()
    assert "completed · epoch 2/10" in html and html.count('data-series="val_loss"') == 2
