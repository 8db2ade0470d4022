"""The manual (docs/, mkdocs.yml) builds with ``mkdocs build --strict``, so a broken link or a page left out of the
nav fails the suite; the README stays a five-minute read whose links into the manual, and whose ``pretune``
subcommands, exist."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest

from pretune.cli import COMMANDS
from tests.conftest import ROOT

needs_mkdocs = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
    reason='mkdocs-material is not installed (pip install "pretune[docs]")',
)


def _build(project, site) -> subprocess.CompletedProcess:
    # Not -q: mkdocs then stops counting warnings, and --strict passes a broken link.
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", project / "mkdocs.yml", "-d", site]
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    return subprocess.run(command, cwd=project, capture_output=True, text=True, env=env, timeout=300)


@needs_mkdocs
def test_the_manual_builds_strict(tmp_path):
    out = _build(ROOT, tmp_path / "site")
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "site" / "errors" / "index.html").is_file()
    assert "Packaging" in (tmp_path / "site" / "changelog" / "index.html").read_text()  # CHANGELOG.md included


@needs_mkdocs
def test_a_broken_link_fails_the_build(tmp_path):
    for name in ("mkdocs.yml", "CHANGELOG.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    with open(tmp_path / "docs" / "concepts.md", "a") as page:
        page.write("\nSee [a page that moved](no-such-page.md).\n")
    out = _build(tmp_path, tmp_path / "site")
    assert out.returncode != 0 and "no-such-page.md" in out.stdout + out.stderr


def test_the_readme_is_short_and_what_it_names_exists():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    assert any(link.startswith("docs/") for link in links)
    assert [link for link in links if not link.startswith("http") and not (ROOT / link).exists()] == []
    code = "\n".join(re.findall(r"```bash\n(.*?)```", readme, re.S))
    named = set(re.findall(r"^pretune ([a-z]+)", code, re.M))
    assert named and named <= set(COMMANDS)
