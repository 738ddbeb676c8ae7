# ===- _capi.py - ctypes declarations of the Flex C API ------------------=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# This file binds include/flex-c/Flex.h with ctypes: the structs, the
# functions flexmoe calls, where the shared libraries are found, and errors
# of the C API turned into FlexError with the library's message.
#
# Why ctypes (docs/Python.md, "The binding"): libflex.so has a C ABI, so a
# pure Python package loads it with no build against a torch or Python ABI;
# one wheel works with any torch and any Python 3.
#
# ===----------------------------------------------------------------------=== #

import ctypes
import os
import threading
from pathlib import Path

# FlexStatus, flex::StatusCode.
STATUS_NAMES = [
    "OK", "INVALID_ARGUMENT", "NOT_FOUND", "OUT_OF_RANGE",
    "FAILED_PRECONDITION", "UNAVAILABLE", "NUMERIC_ERROR", "IO_ERROR",
    "INVALID_PLAN", "INTERNAL", "COMMUNICATION_ERROR"
]
STATUS_OK = 0
STATUS_NOT_FOUND = 2
STATUS_UNAVAILABLE = 5

DTYPE_F32, DTYPE_BF16, DTYPE_F16, DTYPE_I32 = 0, 1, 2, 3
ROLE_INPUT, ROLE_OUTPUT, ROLE_GRAD_INPUT, ROLE_GRAD_OUTPUT = 0, 1, 2, 3
CAPACITY_FIXED, CAPACITY_DROPLESS, CAPACITY_BOUNDED = 0, 1, 2
EXPERT_FFN, EXPERT_GATED = 0, 1
ACTIVATIONS = {"relu": 0, "gelu": 1, "silu": 2}

RUN_CHECK_NONFINITE = 0x1
RUN_NO_TIMING = 0x2
RUN_CUDA_GRAPH = 0x4
# The per-call seed flag of the extended FlexRunOptions (per-call state).
RUN_SEED = 0x8

MAX_RANK = 8


class FlexError(RuntimeError):
    """A failed call of the Flex C API: `status` is the FlexStatus name,
    the message is the library's (flexGetLastError)."""

    def __init__(self, status, message):
        self.status = status
        super().__init__(f"{status}: {message}" if status else message)


class LayerConfig(ctypes.Structure):
    _fields_ = [
        ("tokens", ctypes.c_int64),
        ("model_dim", ctypes.c_int64),
        ("hidden_dim", ctypes.c_int64),
        ("experts", ctypes.c_int64),
        ("top_k", ctypes.c_int64),
        ("capacity_mode", ctypes.c_int32),
        ("expert_kind", ctypes.c_int32),
        ("capacity_factor", ctypes.c_double),
        ("activation", ctypes.c_int32),
        ("dtype", ctypes.c_int32),
        ("bias", ctypes.c_int32),
        ("router_fp32", ctypes.c_int32),
        ("batch_prioritized", ctypes.c_int32),
        ("normalize_gate", ctypes.c_int32),
        ("gate_noise", ctypes.c_double),
        ("seed", ctypes.c_uint64),
    ]


class ArgumentInfo(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("dtype", ctypes.c_int32),
        ("role", ctypes.c_int32),
        ("rank", ctypes.c_int32),
        ("shape", ctypes.c_int64 * MAX_RANK),
        ("bytes", ctypes.c_int64),
    ]


class Binding(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("data", ctypes.c_void_p),
        ("bytes", ctypes.c_int64),
    ]


class RunOptionsV1(ctypes.Structure):
    """FlexRunOptions of the first C API: flags and stream."""
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("stream", ctypes.c_void_p),
    ]


class RunOptions(ctypes.Structure):
    """FlexRunOptions with per-call state: the forward's saved state lives in
    `workspace`, and the backward given the same workspace computes that
    forward's gradients; `seed` is the gate noise's seed of this call
    (flag RUN_SEED). Used only when the library knows these fields
    (Library.per_call_state)."""
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("stream", ctypes.c_void_p),
        ("workspace", ctypes.c_void_p),
        ("workspace_bytes", ctypes.c_int64),
        ("seed", ctypes.c_uint64),
    ]


class CompileOptions(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("world_size", ctypes.c_int32),
        ("rank", ctypes.c_int32),
        ("training", ctypes.c_int32),
        ("pipeline", ctypes.c_char_p),
    ]


_Status = ctypes.c_int
_CompileMlir = ctypes.CFUNCTYPE(_Status, ctypes.c_void_p, ctypes.c_char_p,
                                ctypes.c_size_t,
                                ctypes.POINTER(CompileOptions),
                                ctypes.POINTER(ctypes.c_void_p),
                                ctypes.POINTER(ctypes.c_void_p))
_CompileConfig = ctypes.CFUNCTYPE(_Status, ctypes.c_void_p,
                                  ctypes.POINTER(LayerConfig),
                                  ctypes.POINTER(CompileOptions),
                                  ctypes.POINTER(ctypes.c_void_p),
                                  ctypes.POINTER(ctypes.c_void_p))


class CompilerHooks(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("compile_mlir", _CompileMlir),
        ("compile_config", _CompileConfig),
        ("user_data", ctypes.c_void_p),
    ]


_P = ctypes.c_void_p
_I64P = ctypes.POINTER(ctypes.c_int64)
# name: (restype, argtypes) of every function flexmoe calls.
_SIGNATURES = {
    "flexGetVersion": (ctypes.c_uint32, []),
    "flexGetVersionString": (ctypes.c_char_p, []),
    "flexGetLastError": (ctypes.c_char_p, []),
    "flexContextCreate": (_Status, [ctypes.c_char_p, ctypes.POINTER(_P)]),
    "flexContextDestroy": (_Status, [_P]),
    "flexExecutableCreateFromPlan":
    (_Status, [_P, ctypes.c_char_p, ctypes.c_size_t,
               ctypes.POINTER(_P)]),
    "flexExecutableDestroy": (_Status, [_P]),
    "flexExecutableGetLastError": (ctypes.c_char_p, [_P]),
    "flexExecutableGetLayerConfig": (_Status,
                                     [_P, ctypes.POINTER(LayerConfig)]),
    "flexExecutableGetNumArguments": (_Status, [_P, _I64P]),
    "flexExecutableGetArgument":
    (_Status, [_P, ctypes.c_int64, ctypes.POINTER(ArgumentInfo)]),
    "flexExecutableGetWorkspaceSize": (_Status, [_P, _I64P, _I64P]),
    "flexExecutableSetWorkspace": (_Status, [_P, _P, ctypes.c_int64]),
    "flexExecutableGetNumVariants": (_Status, [_P, _I64P]),
    "flexExecutableGetVariantName":
    (_Status, [_P, ctypes.c_int64, ctypes.POINTER(ctypes.c_char_p)]),
    "flexExecutableSelectVariantByName": (_Status, [_P, ctypes.c_char_p]),
    "flexExecutableGetSelectedVariant": (_Status, [_P, _I64P]),
    "flexExecutableForward":
    (_Status, [_P, ctypes.POINTER(Binding), ctypes.c_int64, _P]),
    "flexExecutableBackward":
    (_Status, [_P, ctypes.POINTER(Binding), ctypes.c_int64, _P]),
    "flexExecutableGetWorldSize": (_Status,
                                   [_P, ctypes.POINTER(ctypes.c_int32)]),
    "flexExecutableSetCommunicator": (_Status, [_P, _P]),
    "flexSetCompiler": (_Status, [ctypes.POINTER(CompilerHooks)]),
    "flexHasCompiler": (ctypes.c_int32, []),
    "flexCompileLayerToPlan":
    (_Status, [ctypes.c_char_p, ctypes.c_size_t,
               ctypes.POINTER(CompileOptions),
               ctypes.POINTER(ctypes.c_void_p)]),
    "flexFreeString": (None, [ctypes.c_void_p]),
    "flexHasNccl": (ctypes.c_int32, []),
    "flexNcclGetUniqueId": (_Status, [ctypes.c_char_p]),
    "flexCommunicatorCreateNccl":
    (_Status, [ctypes.c_char_p, ctypes.c_int32, ctypes.c_int32,
               ctypes.c_int32, ctypes.POINTER(_P)]),
    "flexCommunicatorDestroy": (_Status, [_P]),
}

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_ROOT = PACKAGE_DIR.parent.parent  # python/flexmoe -> the repository


def _candidates(env_var, file_name, build_subdirs):
    """Where a library may be, in the order docs/Python.md gives: the
    environment variable, the package (flexmoe/lib/, flexmoe/), then the
    build tree (FLEX_BUILD_DIR, else <repository>/build); find_library
    tries the system's library path after them."""
    value = os.environ.get(env_var)
    if value:
        return [Path(value)], True
    paths = [PACKAGE_DIR / "lib" / file_name, PACKAGE_DIR / file_name]
    build = Path(os.environ.get("FLEX_BUILD_DIR", SOURCE_ROOT / "build"))
    paths += [build / sub / file_name for sub in build_subdirs]
    return paths, False


def find_library(env_var, file_name, build_subdirs):
    """The first existing path of `_candidates`, or None. A variable naming a
    missing file is an error rather than a silent fallback."""
    paths, explicit = _candidates(env_var, file_name, build_subdirs)
    for path in paths[:-len(build_subdirs)] if not explicit else paths:
        if path.is_file():
            return path
    # In a build tree, the newest: an older build may have left the
    # library in a directory the current one no longer writes.
    built = [p for p in paths[-len(build_subdirs):] if p.is_file()]
    if built and not explicit:
        return max(built, key=lambda p: p.stat().st_mtime)
    if explicit:
        raise FlexError(
            "", f"{env_var}={paths[0]} does not name a file; unset it to "
            f"search the package and the build tree")
    # Last, the loader's own search (LD_LIBRARY_PATH, ld.so.cache): an
    # installed Flex (cmake --install, docs/Embedding.md).
    try:
        ctypes.CDLL(file_name)
        return Path(file_name)
    except OSError:
        return None


class Library:
    """libflex.so (target FlexCAPIShared), loaded once per process."""

    def __init__(self, path):
        self.path = Path(path)
        # Local symbols: the compiler's hooks are passed by hand, and
        # nothing of the runtime's C++ should meet torch's in one namespace.
        self.lib = ctypes.CDLL(str(path))
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        self.version = self.lib.flexGetVersion()
        self.version_string = self.lib.flexGetVersionString().decode()
        self.per_call_state = self._detect_per_call_state()
        # Per-variant workspaces (a libflex.so from before them has none:
        # every call then needs the plan's whole workspace).
        self.run_workspace_size = getattr(self.lib,
                                          "flexExecutableGetRunWorkspaceSize",
                                          None)
        if self.run_workspace_size is not None:
            self.run_workspace_size.restype = _Status
            self.run_workspace_size.argtypes = [_P, _I64P]
        self.compiler = None  # set by _compiler.install_compiler
        self.lock = threading.Lock()

    def _detect_per_call_state(self):
        """Whether FlexRunOptions has workspace, workspace_bytes and seed
        (docs/CAPI.md says how a caller tells). FLEXMOE_PER_CALL_STATE=0
        forces the fallback (one executable per forward in flight)."""
        if os.environ.get("FLEXMOE_PER_CALL_STATE", "") == "0":
            return False
        probe = getattr(self.lib, "flexGetRunOptionsSize", None)
        if probe is None:
            return False
        probe.restype, probe.argtypes = ctypes.c_uint32, []
        return probe() >= ctypes.sizeof(RunOptions)

    def error(self):
        return (self.lib.flexGetLastError() or b"").decode(errors="replace")

    def check(self, status, what, exe=None):
        """Raises FlexError for a failed status, with the executable's
        message when there is one (the thread's otherwise)."""
        if status == STATUS_OK:
            return
        name = ("FLEX_STATUS_" + STATUS_NAMES[status]
                if 0 <= status < len(STATUS_NAMES) else f"status {status}")
        message = ""
        if exe is not None:
            message = (self.lib.flexExecutableGetLastError(exe) or
                       b"").decode(errors="replace")
        message = message or self.error() or f"{what} failed"
        raise FlexError(name, message)


_library = None
_library_lock = threading.Lock()


def library():
    """The process's libflex.so, loaded at first use."""
    global _library
    with _library_lock:
        if _library is None:
            path = find_library("FLEX_LIBRARY", "libflex.so",
                                ["lib", "lib/CAPI"])
            if path is None:
                raise FlexError(
                    "", "libflex.so not found: set FLEX_LIBRARY to its path, "
                    "copy it into " + str(PACKAGE_DIR / "lib") +
                    ", or build the target FlexCAPIShared in "
                    "<repository>/build (FLEX_BUILD_DIR names another build)")
            _library = Library(path)
        return _library
