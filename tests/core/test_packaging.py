"""Packaging facts: what pyproject.toml, LICENSE, MANIFEST.in and requirements/ promise.

All but one read files in the tree; one builds the sdist and the wheel and reads them.
"""

from __future__ import annotations

import email.parser
import hashlib
import importlib.metadata
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[2]
# The Apache License 2.0 as the Apache Software Foundation publishes it (LICENSE-2.0.txt).
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"
CORE = {"jax", "jaxlib", "numpy"}
FRAMEWORKS = {"flax": {"flax", "optax"}, "equinox": {"equinox"}}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _names(requirements: list[str]) -> set[str]:
    return {Requirement(r).name for r in requirements}


def _pins(path: pathlib.Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"{path.name}: {line!r} is not an exact pin"
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_py_typed_is_shipped():
    assert (ROOT / "jbn" / "py.typed").is_file()
    assert "py.typed" in _pyproject()["tool"]["setuptools"]["package-data"]["jbn"]


def test_license_is_the_apache_2_text():
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:6] == ["Apache", "License", "Version", "2.0,", "January", "2004"]
    assert hashlib.sha256(text.encode()).hexdigest() == APACHE_2_SHA256
    project = _pyproject()["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]


def test_core_dependencies_are_jax_and_numpy_only():
    assert _names(_pyproject()["project"]["dependencies"]) == CORE


def test_extras():
    extras = _pyproject()["project"]["optional-dependencies"]
    assert {"flax", "equinox", "all", "test", "demo", "docs", "dev"} <= set(extras)
    for extra, names in FRAMEWORKS.items():
        assert _names(extras[extra]) == names
    assert Requirement(extras["all"][0]).extras == {"flax", "equinox"}
    dev = set().union(*(Requirement(r).extras for r in extras["dev"] if r.startswith("jbn[")))
    assert {"test", "demo", "all"} <= dev
    assert {"ruff", "basedpyright"} <= _names(extras["dev"])


def test_only_jbn_is_packaged():
    config = _pyproject()["tool"]["setuptools"]["packages"]["find"]
    assert config["include"] == ["jbn", "jbn.*"]
    manifest = (ROOT / "MANIFEST.in").read_text().split("\n")
    for folder in ("tests", "benchmarks", "mnist_demo"):  # the sdist ships none of the tests
        assert f"prune {folder}" in manifest


def test_minimum_pins_are_the_lower_bounds():
    # make test-min installs requirements/minimum.txt: each framework's pin there must be the
    # lower bound pyproject.toml states (2.0.2 counts as 2.0).
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    pins = _pins(ROOT / "requirements" / "minimum.txt")
    for req in map(Requirement, project["dependencies"] + extras["flax"] + extras["equinox"]):
        assert req.name in pins, f"{req.name} missing from requirements/minimum.txt"
        pinned = Version(pins[req.name])
        (lower,) = [Version(s.version) for s in req.specifier if s.operator == ">="]
        assert pinned in req.specifier
        assert pinned.release[: len(lower.release)] == lower.release, (req, pinned)


def test_lock_pins_everything_dev_and_docs_need():
    pins = _pins(ROOT / "requirements" / "lock.txt")
    wanted = CORE | {"flax", "optax", "equinox", "pytest", "hypothesis", "ruff", "basedpyright"}
    wanted |= {"matplotlib", "tqdm", "mkdocs-material", "mkdocstrings", "setuptools", "pip"}
    assert wanted <= set(pins)
    assert "jbn" not in pins and "torch" not in pins


#: The tree the packages are built from: the library and, as bait, all the rest a clone holds
#: (the demo, its MNIST data, the tests): none of that may end up in the wheel or the sdist.
BUILD_TREE = ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "Makefile", "train_mnist.py")
BUILD_DIRS = ("jbn", "mnist_demo", "data", "tests", "benchmarks", "requirements")
WHEEL_LIMIT = 1 << 20  # 1 MiB


def test_sdist_and_wheel_hold_the_library_only(tmp_path):
    # setuptools' PEP 517 backend, which `pip wheel .` calls, without pip's overhead.
    try:
        setuptools_version = Version(importlib.metadata.version("setuptools"))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("setuptools is not installed")
    if setuptools_version < Version("77"):
        pytest.skip(f"setuptools {setuptools_version} < 77 cannot build a license expression")
    # Build from a copy, so that the build leaves nothing in the tree.
    src = tmp_path / "src"
    src.mkdir()
    for name in BUILD_TREE:
        shutil.copy(ROOT / name, src / name)
    for name in BUILD_DIRS:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    assert list((src / "data" / "mnist").glob("*.gz")), "the bait: the MNIST files are in the tree"
    out = tmp_path / "dist"
    code = (
        # build_sdist changes sys.argv: the directory is read first.
        "import sys\nfrom setuptools import build_meta\nout = sys.argv[1]\n"
        "build_meta.build_sdist(out)\nbuild_meta.build_wheel(out)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, cwd=src, capture_output=True)
    (sdist,) = out.glob("jbn-*.tar.gz")
    with tarfile.open(sdist) as t:
        members = [m.split("/", 1)[1] for m in t.getnames() if "/" in m]
    library = {"jbn", "jbn.egg-info", "LICENSE", "MANIFEST.in", "PKG-INFO", "README.md"}
    assert {m.split("/")[0] for m in members if m} == library | {"pyproject.toml", "setup.cfg"}
    assert not any(m.endswith(".gz") or m.startswith("data") for m in members)
    (wheel,) = out.glob("jbn-*.whl")
    assert wheel.stat().st_size < WHEEL_LIMIT, f"{wheel.name}: {wheel.stat().st_size} bytes"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = email.parser.Parser().parsestr(z.read(metadata_name).decode())
    assert "jbn/py.typed" in names and "jbn/__init__.py" in names
    assert not any(n.endswith(".gz") or "mnist" in n for n in names)
    assert any(re.search(r"\.dist-info/licenses/LICENSE$", n) for n in names)
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"jbn"}
    assert len(metadata.get_all("Classifier")) >= 3
    assert "Equinox" in metadata["Summary"] and "JAX" in metadata["Summary"]
    assert metadata["License-Expression"] == "Apache-2.0"
    core = [r for r in metadata.get_all("Requires-Dist") if "extra ==" not in r]
    assert _names(core) == CORE
