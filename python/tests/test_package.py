# ===- test_package.py - pip install and finding the libraries -----------=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# The package installs with pip from the repository (pure Python, no
# build against torch), finds libflex.so and libflex_compiler.so through
# the environment, its own lib/ directory or the build tree, and says what
# is missing when it cannot.
#
# ===----------------------------------------------------------------------=== #

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import flexmoe
from flexmoe import _capi, _compiler

PYTHON_DIR = Path(flexmoe.__file__).resolve().parents[1]

_SMOKE = r"""
import torch, flexmoe
info = flexmoe.library_info()
layer = flexmoe.MoELayer(16, 24, 4, top_k=2)
y, l_aux = layer(torch.randn(10, 16, requires_grad=True))
(y.sum() + l_aux).backward()
print(info["library"], "|", info["compiler"], "|", flexmoe.__file__)
"""


def _smoke(tmp_path, env_extra, cwd):
    env = {k: v for k, v in os.environ.items()
           if k not in ("FLEX_LIBRARY", "FLEX_COMPILER_LIBRARY",
                        "FLEX_BUILD_DIR", "PYTHONPATH")}
    env.update(env_extra, FLEXMOE_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", _SMOKE],
                         env=env, cwd=cwd, capture_output=True, text=True)
    return out


def _can_build_offline():
    """pip --no-build-isolation builds with this Python's setuptools: its
    own bdist_wheel from 70.1 on, else the wheel package's."""
    try:
        import setuptools
        version = tuple(int(p) for p in setuptools.__version__.split(".")[:2])
        if version >= (70, 1):
            return True
        import wheel
        return wheel is not None
    except Exception:
        return False


def _install(tmp_path):
    if not _can_build_offline():
        pytest.skip("this Python's setuptools is older than 70.1 and has no "
                    "wheel package: pip cannot build the package offline "
                    "(scripts/setup.sh installs a newer setuptools)")
    source = tmp_path / "src"
    shutil.copytree(PYTHON_DIR, source,
                    ignore=shutil.ignore_patterns("tests", "__pycache__",
                                                  "build", "*.egg-info"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(source)], check=True)
    return source, target


def test_pip_install_with_libraries_from_the_environment(tmp_path):
    _, target = _install(tmp_path)
    lib = _capi.library().path
    comp = _compiler.compiler()
    env = {"PYTHONPATH": str(target), "FLEX_LIBRARY": str(lib)}
    if isinstance(comp, _compiler.InProcessCompiler):
        env["FLEX_COMPILER_LIBRARY"] = str(comp.path)
    else:
        env["FLEX_BUILD_DIR"] = str(comp.opt.parents[1])
    out = _smoke(tmp_path, env, tmp_path)
    assert out.returncode == 0, out.stderr
    assert str(target) in out.stdout and str(lib) in out.stdout


def test_libraries_shipped_in_the_package(tmp_path):
    # Libraries copied into flexmoe/lib/ before pip install go into the
    # wheel and are found with no variable set.
    comp = _compiler.compiler()
    if not isinstance(comp, _compiler.InProcessCompiler):
        pytest.skip("no libflex_compiler.so in this build")
    source = tmp_path / "src"
    shutil.copytree(PYTHON_DIR, source,
                    ignore=shutil.ignore_patterns("tests", "__pycache__",
                                                  "build", "*.egg-info"))
    if not _can_build_offline():
        pytest.skip("setuptools older than 70.1 and no wheel package")
    (source / "flexmoe" / "lib").mkdir()
    for path in (_capi.library().path, comp.path):
        shutil.copy(path, source / "flexmoe" / "lib")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(source)], check=True)
    out = _smoke(tmp_path, {"PYTHONPATH": str(target)}, tmp_path)
    assert out.returncode == 0, out.stderr
    assert str(target / "flexmoe" / "lib" / "libflex.so") in out.stdout
    assert "in-process" in out.stdout


def test_missing_library_is_a_clear_error(tmp_path):
    out = _smoke(tmp_path, {"PYTHONPATH": str(PYTHON_DIR),
                            "FLEX_LIBRARY": str(tmp_path / "nope.so")},
                 tmp_path)
    assert out.returncode != 0
    assert "FLEX_LIBRARY=" in out.stderr and "does not name a file" in out.stderr
    # An installed package with no library anywhere says where it looked.
    _, target = _install(tmp_path)
    out = _smoke(tmp_path, {"PYTHONPATH": str(target),
                            "FLEX_BUILD_DIR": str(tmp_path / "no-build")},
                 tmp_path)
    assert out.returncode != 0 and "libflex.so not found" in out.stderr


def test_libraries_on_the_system_path(tmp_path):
    # An installed Flex (cmake --install): found by the loader's search.
    comp = _compiler.compiler()
    if not isinstance(comp, _compiler.InProcessCompiler):
        pytest.skip("no libflex_compiler.so in this build")
    prefix = tmp_path / "prefix" / "lib"
    prefix.mkdir(parents=True)
    for path in (_capi.library().path, comp.path):
        shutil.copy(path, prefix)
    out = _smoke(tmp_path, {"PYTHONPATH": str(PYTHON_DIR),
                            "FLEX_BUILD_DIR": str(tmp_path / "no-build"),
                            "LD_LIBRARY_PATH": str(prefix)}, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("libflex.so | in-process")
