"""The distribution claims one import name, ``jobmesh``, and every module loads once.

The repository keeps ``router/``, ``agent/`` and ``controller/`` at its top
level; they are installed as ``jobmesh.router``, ``jobmesh.agent`` and
``jobmesh.controller`` (``jobmesh/router`` and the others are symlinks to
them). With the repository root on ``sys.path`` (pytest, ``python -m`` from a
checkout) a bare ``import router.x`` would still find a second copy of the
same file: two module objects, two sets of Prometheus collectors. These tests
build the real wheel and look inside it, import it from outside the
checkout, and fail if any module of ours is loaded under a bare name.
"""

from __future__ import annotations

import json
import os
import pkgutil
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import jobmesh

ROOT = Path(__file__).resolve().parents[2]  # tests/integration/ -> the checkout
COMPONENTS = ("router", "agent", "controller")

pytestmark = pytest.mark.timeout(300)

# the end of a probe: every loaded module and its file, as JSON
PRINT_MODULES = ("print(json.dumps({n: getattr(m, '__file__', None)"
                 " for n, m in sys.modules.items()}))\n")


def bare_copies(modules: dict[str, object]) -> list[str]:
    """Names in ``modules`` that load one of our files under a name outside ``jobmesh``."""
    ours = [str(ROOT / c) for c in COMPONENTS] + [str(ROOT / "jobmesh")]
    found = []
    for name, module in modules.items():
        if name == "jobmesh" or name.startswith("jobmesh."):
            continue
        path = getattr(module, "__file__", None) or ""
        if any(path.startswith(prefix + os.sep) for prefix in ours):
            found.append(name)
    return sorted(found)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip install .` would install, built without touching the network.

    Built from a copy of what the build reads (the symlinks stay symlinks), so
    setuptools' build/ directory is not left in the checkout.
    """
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("jobmesh", *COMPONENTS):
        shutil.copytree(ROOT / name, src / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--wheel-dir", str(out), str(src)],
                   check=True, cwd=out, capture_output=True, timeout=240)
    (path,) = out.glob("jobmesh-*.whl")
    return path


def test_the_wheel_names_only_jobmesh_at_the_top(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert whl.read(top_level).decode().split() == ["jobmesh"]
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"jobmesh"}
    for component in COMPONENTS:
        assert f"jobmesh/{component}/__init__.py" in names
    assert "jobmesh/controller/catalog/migrations/0001_catalog.sql" in names
    # the status page is served from the package: its templates and static files
    assert "jobmesh/controller/web/templates/overview.html" in names
    assert "jobmesh/controller/web/static/live.js" in names


def test_the_wheel_imports_from_outside_the_checkout(wheel: Path, tmp_path: Path) -> None:
    """Unpacked as pip would install it, beside our dependencies, with the checkout off sys.path."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as whl:
        whl.extractall(site)
    deps = [p for p in sys.path if p.endswith("site-packages")]
    probe = (
        "import importlib, json, sys\n"
        "mods = ['jobmesh', 'jobmesh.router.server', 'jobmesh.agent.restore',"
        " 'jobmesh.controller.main', 'jobmesh.controller.catalog.db']\n"
        "files = {m: importlib.import_module(m).__file__ for m in mods}\n"
        "bare = []\n"
        "for name in ('router', 'agent', 'controller'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "        bare.append(name)\n"
        "    except ModuleNotFoundError:\n"
        "        pass\n"
        "print(json.dumps({'files': files, 'bare': bare}))\n")
    env = {"PATH": os.environ.get("PATH", ""),
           "PYTHONPATH": os.pathsep.join([str(site), *deps])}
    proc = subprocess.run([sys.executable, "-s", "-c", probe], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["bare"] == []
    assert all(f.startswith(str(site)) for f in result["files"].values()), result["files"]


def test_every_module_loads_under_jobmesh_only() -> None:
    """Import every module of ours with the checkout on sys.path, as pytest has it."""
    probe = (
        "import importlib, json, pkgutil, sys\n"
        "import jobmesh\n"
        "names = [m.name for m in pkgutil.walk_packages(jobmesh.__path__, 'jobmesh.')\n"
        "         if m.name != 'jobmesh.__main__']\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        + PRINT_MODULES)
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout)
    assert len([n for n in loaded if n.startswith("jobmesh.")]) > 80
    assert bare_copies({n: type("M", (), {"__file__": f}) for n, f in loaded.items()}) == []


def test_the_guard_sees_a_bare_import() -> None:
    """The check above can fail: a bare ``router.protocol`` beside ``jobmesh.router.protocol``."""
    probe = ("import json, sys\n"
             "import jobmesh.router.protocol, router.protocol\n"
             + PRINT_MODULES)
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout)
    assert bare_copies({n: type("M", (), {"__file__": f}) for n, f in loaded.items()}) == [
        "router", "router.protocol"]


def test_nothing_this_test_run_loaded_is_a_bare_copy() -> None:
    """This very process (every test module collected so far) holds no second copies."""
    assert bare_copies(dict(sys.modules)) == []
    subpackages = {m.name for m in pkgutil.iter_modules(jobmesh.__path__) if m.ispkg}
    assert set(COMPONENTS) <= subpackages
