"""Dependency direction (docs/architecture.md): each package is imported in a fresh interpreter and the
modules it pulled in are inspected through sys.modules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "engine": ["celery", "redis", "fastapi", "pydantic", "prometheus_client", "worker", "services"],
    "dgtext": ["torch", "engine", "worker", "services", "celery", "redis", "fastapi", "pydantic",
               "prometheus_client"],
    "services": ["torch", "engine", "worker"],
}


def imported_top_level_modules(package: str) -> set[str]:
    """Import every module of `package` in a subprocess and return the top-level names in sys.modules."""
    code = (
        "import importlib, json, pkgutil, sys\n"
        f"pkg = importlib.import_module({package!r})\n"
        "for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "    if not info.name.split('.')[-1].startswith('__'):\n"
        "        importlib.import_module(info.name)\n"
        "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise AssertionError(f"importing {package} failed:\n{done.stderr[-3000:]}")
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_allowed_dependencies(package: str) -> None:
    if not (ROOT / package / "__init__.py").is_file():
        pytest.skip(f"{package}/ does not exist yet")
    pulled_in = imported_top_level_modules(package)
    offenders = sorted(set(FORBIDDEN[package]) & pulled_in)
    assert not offenders, f"{package} pulls in {offenders}"


def test_the_check_detects_a_forbidden_import() -> None:
    # the same probe on a package known to import torch must see it, or the checks above prove nothing
    assert "torch" in imported_top_level_modules("engine")
