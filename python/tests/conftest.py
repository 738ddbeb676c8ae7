# ===- conftest.py - pytest set-up of the flexmoe tests -------------------=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# The tests import flexmoe from the source tree (python/), write plans to a
# cache of their own (never ~/.cache) and poison every output the library
# writes, so an element it leaves unwritten cannot pass.
#
# ===----------------------------------------------------------------------=== #

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
if not os.environ.get("FLEXMOE_CACHE_DIR"):
    _cache = tempfile.mkdtemp(prefix="flexmoe-test-")
    os.environ["FLEXMOE_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

from flexmoe import _ops  # noqa: E402

_ops.POISON_OUTPUTS = True


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(1234)
    yield


def pytest_report_header(config):
    import flexmoe
    info = flexmoe.library_info()
    return [f"flexmoe: torch {torch.__version__}, " +
            ", ".join(f"{k}={v}" for k, v in info.items())]
