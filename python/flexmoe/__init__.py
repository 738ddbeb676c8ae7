# ===- __init__.py - flexmoe: Flex MoE layers for PyTorch ----------------=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# flexmoe runs Flex's compiled MoE layers from PyTorch: MoELayer (Flex's
# parameter layout), moe_layer (Tutel's constructor and forward arguments),
# JIT compilation per token count with plan caches, torch.library ops for
# autograd and torch.compile. docs/Python.md is the guide.
#
# ===----------------------------------------------------------------------=== #

from ._capi import FlexError
from ._compiler import LayerSpec, emit_mlir
from .layer import MoELayer
from .tutel import moe_layer

__version__ = "0.1.0"


def __getattr__(name):
    # flexmoe.checkpoint on first use: importing it here would make
    # `python -m flexmoe.checkpoint` find it already imported (a warning).
    if name == "checkpoint":
        import importlib
        return importlib.import_module(".checkpoint", __name__)
    raise AttributeError(f"module 'flexmoe' has no attribute {name!r}")


def library_info():
    """Which libraries flexmoe loaded and what they can do."""
    from . import _capi, _compiler
    lib = _capi.library()
    comp = _compiler.compiler()
    return {
        "library": str(lib.path),
        "version": lib.version_string,
        "compiler": comp.name if comp else None,
        "per_call_state": lib.per_call_state,
        "nccl": bool(lib.lib.flexHasNccl()),
        "cache_dir": str(_compiler.cache_dir()),
    }


def clear_cache(disk=False):
    """Forgets the compiled plans in memory (and on disk with disk=True)."""
    from . import _compiler, _runtime
    _runtime.clear_runners()
    _compiler.plans.clear(disk)


__all__ = ["MoELayer", "moe_layer", "FlexError", "LayerSpec", "emit_mlir",
           "library_info", "clear_cache"]
