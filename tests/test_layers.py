"""The import layering (pyproject's ``[tool.importlinter]``) and the absence of import cycles.

The project installs ``backends/``, ``converters/``, ``apps/`` and ``shaders/`` under the one
import name ``ondevice`` (pyproject's ``package-dir``), which import-linter cannot see in an
editable checkout. So the tests lay the package out as it is installed, in a temporary
directory, and run import-linter's own command (and grimp, its graph) on that copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def stage(dest: Path) -> Path:
    """Copy the package into ``dest`` in its installed layout; returns the package folder."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping = config["tool"]["setuptools"]["package-dir"]
    pkg = dest / "ondevice"
    shutil.copytree(ROOT / mapping["ondevice"], pkg,
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name, folder in mapping.items():
        if name != "ondevice":
            target = dest / name.replace(".", "/")
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(ROOT / folder, target, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return pkg


def lint(dest: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(dest))
    return subprocess.run([str(LINT), str(dest / "pyproject.toml"), "--no-cache"], cwd=dest,
                          env=env, capture_output=True, text=True, timeout=300)


def cycles(dest: Path) -> list[tuple[str, ...]]:
    """Import cycles between modules of the staged package (function-level imports count)."""
    code = (
        "import grimp, json\n"
        "g = grimp.build_graph('ondevice', include_external_packages=False)\n"
        "out = []\n"
        "for m in sorted(g.modules):\n"
        "    for i in sorted(g.find_modules_directly_imported_by(m)):\n"
        "        if 'ondevice' in (m, i):\n"
        "            continue\n"  # the package's own __init__ is the public facade
        "        chain = g.find_shortest_chain(importer=i, imported=m)\n"
        "        if chain and 'ondevice' not in chain:\n"
        "            out.append([m, *chain])\n"
        "print(json.dumps(out))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=dest, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(dest)), timeout=300, check=True)
    import json

    return [tuple(c) for c in json.loads(p.stdout)]


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    if not LINT.is_file():
        pytest.fail("import-linter is not installed (it is in the test extra)")
    dest = tmp_path_factory.mktemp("layers")
    stage(dest)
    return dest


def test_layers_are_kept(staged):
    p = lint(staged)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 kept, 0 broken" in p.stdout


def test_no_import_cycles(staged):
    assert cycles(staged) == []


def test_only_the_apps_import_the_package_facade(staged):
    """``ondevice/__init__`` (the public facade, which also reaches the policy) is for users
    and the apps; inside the package modules import what they use from its own module."""
    code = ("import grimp\n"
            "g = grimp.build_graph('ondevice', include_external_packages=False)\n"
            "print('\\n'.join(sorted(m for m in g.find_modules_that_directly_import('ondevice')"
            " if not m.startswith('ondevice.apps'))))\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=staged, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(staged)), timeout=300, check=True)
    assert p.stdout.split() == []


def test_a_bad_import_breaks_the_contract(tmp_path):
    pkg = stage(tmp_path)
    # The block manager (kv, pure Python, below the engine) reaching up into the engine.
    blocks = pkg / "kv" / "blocks.py"
    blocks.write_text(blocks.read_text() + "\nfrom ..engine import scheduler  # noqa\n")
    p = lint(tmp_path)
    assert p.returncode != 0
    assert "BROKEN" in p.stdout and "ondevice.kv.blocks -> ondevice.engine" in p.stdout


def test_a_cycle_is_found(tmp_path):
    pkg = stage(tmp_path)
    # Two modules of one layer importing each other (import-linter's layers allow that).
    (pkg / "policy" / "estimate.py").write_text(
        (pkg / "policy" / "estimate.py").read_text() + "\nfrom . import decide  # noqa\n")
    found = cycles(tmp_path)
    assert any({"ondevice.policy.estimate", "ondevice.policy.decide"} <= set(c) for c in found)
