# ===- _compiler.py - The layer's IR, the JIT compiler and the plan caches -=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# This file turns a layer configuration into plan JSON: it emits the layer's
# `moe.layer` IR (the text flex::layerConfigToMlir writes), compiles it
# in-process through libflex_compiler.so (MLIR linked in statically, loaded
# with ctypes and handed to libflex.so's flexSetCompiler), and keeps the
# plans in an in-memory and an on-disk cache (docs/Python.md, "JIT and
# caches"). Without that library it falls back to the moe-opt and
# moe-translate tools of a build tree.
#
# ===----------------------------------------------------------------------=== #

import ctypes
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path

from . import _capi
from ._capi import FlexError

# Raised when an on-disk entry's format changes.
CACHE_FORMAT = 1

DTYPE_NAMES = ("f32", "bf16", "f16")


def capacity_mode(factor):
    """Tutel's capacity factor as Flex's mode ([cap-1]): f > 0 fixed, f = 0
    dropless, f < 0 bounded by |f|."""
    factor = float(factor)
    if math.isnan(factor) or math.isinf(factor):
        raise ValueError(f"capacity_factor must be a finite number, got "
                         f"{factor}")
    if factor > 0:
        return "fixed", factor
    if factor == 0:
        return "dropless", 1.0
    return "bounded", -factor


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One compiled plan's layer: flex::LayerConfig (docs/PlanFormat.md,
    `layer`) plus how it is compiled (training, world size, variants).
    `tokens` is T on this rank; `experts` is E over all ranks."""
    tokens: int
    model_dim: int
    hidden_dim: int
    experts: int
    top_k: int
    capacity_mode: str = "fixed"  # fixed | dropless | bounded
    capacity_factor: float = 1.0
    gated: bool = False
    activation: str = "relu"
    bias: bool = False
    dtype: str = "f32"  # f32 | bf16 | f16
    router_fp32: bool = False
    batch_prioritized: bool = False
    normalize_gate: bool = False
    gate_noise: float = 0.0
    seed: int = 0
    training: bool = True
    world_size: int = 1
    variants: tuple = ()  # r<R>d<D> names; () = the compiler's default
    ranks_per_node: int = 0  # > 0: the 2DH exchange for nodes of that many
    # The gather-fused variants (--moert-fuse-dispatch; the cost model picks
    # per call); False compiles the plan without them.
    fuse_dispatch: bool = True
    # The glu-fused variants of gated layers (--moert-fuse-glu; the cost
    # model picks per call); False compiles the plan without them. Always
    # passed to the compiler, so that this default, not the compiler's,
    # decides.
    fuse_glu: bool = True
    # The backward-fused variants of training plans
    # (--moert-fuse-activation-backward: fc2's input gradient and the
    # activation's backward in one step; the cost model picks per call).
    # Off until the fused step has run on a GPU; passed either way.
    fuse_activation_backward: bool = False
    # The combine-fused variants (--moert-fuse-combine: fc2 and the combine
    # in one step, the combine summed in the GEMM's store; the cost model
    # picks per call). Off until the fused store has run on a GPU; passed
    # either way.
    fuse_combine: bool = False

    def key(self):
        """A stable text of every field: the in-memory cache key and, hashed
        with the library version, the on-disk one."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def pipeline(self):
        """The C API's compile options text (docs/CAPI.md)."""
        parts = []
        if self.variants:
            parts.append("variants=" + ",".join(self.variants))
        if self.ranks_per_node:
            parts.append(f"ranks_per_node={self.ranks_per_node}")
        if not self.fuse_dispatch:
            parts.append("fuse_dispatch=false")
        parts.append("fuse_glu=true" if self.fuse_glu else "fuse_glu=false")
        parts.append("fuse_combine=" +
                     ("true" if self.fuse_combine else "false"))
        parts.append("fuse_activation_backward=" +
                     ("true" if self.fuse_activation_backward else "false"))
        return " ".join(parts)


def _tensor(shape, element):
    return "tensor<" + "".join(f"{d}x" for d in shape) + element + ">"


def _scientific(value):
    # %.16e is C++'s std::scientific with precision 17: the same digits.
    return f"{value:.16e}"


def emit_mlir(spec):
    """The layer as `moe` dialect text, as flex::layerConfigToMlir writes it
    (lib/Compiler/Compiler.cpp); what a reader can hand to moe-opt."""
    x = spec.dtype
    router = "f32" if spec.router_fp32 else x
    T, d, h, E = spec.tokens, spec.model_dim, spec.hidden_dim, spec.experts
    bias = spec.bias and not spec.gated
    args = [("x", _tensor([T, d], x)), ("wg", _tensor([d, E], router)),
            ("w1", _tensor([E, d, h], x)), ("w2", _tensor([E, h, d], x))]
    if spec.gated:
        args.append(("w3", _tensor([E, d, h], x)))
    if bias:
        args += [("b1", _tensor([E, h], x)), ("b2", _tensor([E, d], x))]
    out = _tensor([T, d], x)
    text = "func.func @layer(" + ", ".join(f"%{n}: {t}" for n, t in args)
    text += f") -> ({out}, tensor<f32>) {{\n  %out, %aux = moe.layer "
    text += "gated" if spec.gated else f"ffn<{spec.activation}>"
    text += " %x, %wg, %w1, %w2"
    if spec.gated:
        text += " up(%w3)"
    if bias:
        text += " bias(%b1, %b2)"
    text += f" {{top_k = {spec.top_k}, capacity = #moe.capacity<"
    text += spec.capacity_mode
    if spec.capacity_mode != "dropless":
        text += " " + _scientific(spec.capacity_factor)
    text += ">"
    if spec.normalize_gate:
        text += ", normalize"
    if spec.batch_prioritized:
        text += ", batch_prioritized"
    if spec.gate_noise != 0.0:
        text += f", gate_noise = {_scientific(spec.gate_noise)} : f64"
    if spec.seed != 0:
        signed = spec.seed - (1 << 64) if spec.seed >= (1 << 63) else spec.seed
        text += f", seed = {signed} : i64"
    text += "} : (" + ", ".join(t for _, t in args)
    text += f") -> ({out}, tensor<f32>)\n  return %out, %aux : {out}, "
    text += "tensor<f32>\n}\n"
    return text


# --------------------------------------------------------------------------
# Compilers
# --------------------------------------------------------------------------


class InProcessCompiler:
    """libflex_compiler.so: flexCompilerGetHooks -> flexSetCompiler, then
    flexCompileLayerToPlan. The CDLL stays loaded: libflex.so calls into it."""

    def __init__(self, lib, path):
        self.path = Path(path)
        self.dll = ctypes.CDLL(str(path))
        get_hooks = self.dll.flexCompilerGetHooks
        get_hooks.restype = ctypes.c_int
        get_hooks.argtypes = [ctypes.POINTER(_capi.CompilerHooks)]
        version = getattr(self.dll, "flexCompilerGetVersion", None)
        if version is not None:
            version.restype = ctypes.c_uint32
            if version() != lib.version:
                raise FlexError(
                    "", f"{path} was built for C API {version()}, but "
                    f"{lib.path} is C API {lib.version}; use libraries of "
                    f"one build")
        self.hooks = _capi.CompilerHooks()
        self.hooks.struct_size = ctypes.sizeof(_capi.CompilerHooks)
        lib.check(get_hooks(ctypes.byref(self.hooks)), "flexCompilerGetHooks")
        lib.check(lib.lib.flexSetCompiler(ctypes.byref(self.hooks)),
                  "flexSetCompiler")
        self.name = f"in-process ({self.path.name})"

    def compile(self, lib, spec, mlir):
        options = _capi.CompileOptions(
            ctypes.sizeof(_capi.CompileOptions), spec.world_size, 0,
            int(spec.training),
            spec.pipeline().encode() if spec.pipeline() else None)
        data = mlir.encode()
        plan = ctypes.c_void_p()
        lib.check(
            lib.lib.flexCompileLayerToPlan(data, len(data),
                                           ctypes.byref(options),
                                           ctypes.byref(plan)),
            "flexCompileLayerToPlan")
        try:
            return ctypes.string_at(plan.value).decode()
        finally:
            lib.lib.flexFreeString(plan)


class ToolCompiler:
    """moe-opt | moe-translate of a build tree, in a subprocess: the
    fallback where no libflex_compiler.so is found (slower: two processes
    per plan)."""

    def __init__(self, bin_dir):
        self.opt = Path(bin_dir) / "moe-opt"
        self.translate = Path(bin_dir) / "moe-translate"
        self.name = f"tools ({bin_dir})"

    def compile(self, lib, spec, mlir):
        passes = []
        if spec.world_size > 1:
            variants = ",".join(spec.variants) or _default_variants(spec)
            passes.append(f"--moe-multiversion=ranks={spec.world_size} "
                          f"variants={variants}")
        if spec.ranks_per_node:
            passes.append(f"--moe-a2a-2dh=ranks-per-node={spec.ranks_per_node}")
        training = "true" if spec.training else "false"
        fuse = "true" if spec.fuse_dispatch else "false"
        glu = "true" if spec.fuse_glu else "false"
        backward = "true" if spec.fuse_activation_backward else "false"
        combine = "true" if spec.fuse_combine else "false"
        passes.append(f"--moe-lower-to-plan=training={training} "
                      f"fuse-dispatch={fuse} fuse-glu={glu} "
                      f"fuse-combine={combine} "
                      f"fuse-activation-backward={backward}")
        lowered = subprocess.run([str(self.opt), "-", *passes], input=mlir,
                                 capture_output=True, text=True)
        if lowered.returncode != 0:
            raise FlexError("FLEX_STATUS_INVALID_ARGUMENT", lowered.stderr)
        plan = subprocess.run([str(self.translate), "--moert-to-plan"],
                              input=lowered.stdout, capture_output=True,
                              text=True)
        if plan.returncode != 0:
            raise FlexError("FLEX_STATUS_INVALID_ARGUMENT", plan.stderr)
        return plan.stdout


def _default_variants(spec):
    """The compiler's default variants (flex::compileLayerToPlan): the full
    exchange and data parallel."""
    W, E = spec.world_size, spec.experts
    exchange = W // E if E < W and W % E == 0 else 1
    return f"r{exchange}d1,r0d1"


_compiler = None
_compiler_lock = threading.Lock()


def compiler():
    """The process's compiler, found at first use (docs/Python.md, "Finding
    the libraries"); None when there is none."""
    global _compiler
    with _compiler_lock:
        if _compiler is None:
            lib = _capi.library()
            path = _capi.find_library("FLEX_COMPILER_LIBRARY",
                                      "libflex_compiler.so",
                                      ["lib", "lib/Compiler"])
            if path is not None:
                try:
                    _compiler = InProcessCompiler(lib, path)
                except OSError as error:  # e.g. half written by a build
                    if os.environ.get("FLEX_COMPILER_LIBRARY"):
                        raise
                    warnings.warn(f"flexmoe: cannot load {path} ({error});"
                                  f" trying the build tree's tools")
                    path = None
            if path is None:
                build = Path(
                    os.environ.get("FLEX_BUILD_DIR",
                                   _capi.SOURCE_ROOT / "build"))
                if (build / "bin" / "moe-opt").is_file():
                    _compiler = ToolCompiler(build / "bin")
                else:
                    _compiler = False
        return _compiler or None


# --------------------------------------------------------------------------
# Plan caches
# --------------------------------------------------------------------------


def cache_dir():
    """FLEXMOE_CACHE_DIR, else $XDG_CACHE_HOME/flexmoe, else
    ~/.cache/flexmoe; None when FLEXMOE_CACHE_DIR is "off" or "0"."""
    value = os.environ.get("FLEXMOE_CACHE_DIR")
    if value in ("off", "0"):
        return None
    if value:
        return Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flexmoe"


class CompiledPlan:
    """A plan's JSON and what flexmoe reads of it without an executable: the
    arguments, the workspace size and alignment, the variants."""

    def __init__(self, spec, text, source, seconds):
        self.spec = spec
        self.text = text
        self.source = source  # "compiled", "disk" or "memory"
        self.compile_seconds = seconds
        doc = json.loads(text)
        self.arguments = {a["name"]: a for a in doc["arguments"]}
        self.workspace_bytes = int(doc["workspace"]["bytes"])
        self.workspace_alignment = int(doc["workspace"]["alignment"])
        self.variants = [v["name"] for v in doc["variants"]]
        # The bytes each variant runs on (docs/PlanFormat.md; the whole
        # workspace in a plan from before per-variant workspaces).
        self.variant_workspace_bytes = {
            v["name"]: int(v.get("workspace_bytes", self.workspace_bytes))
            for v in doc["variants"]
        }
        self.world_size = int(doc.get("world", {}).get("size", 1))


class PlanCache:
    """Plans by LayerSpec: in memory, then on disk (keyed by a hash of the
    spec, the library's version and CACHE_FORMAT), then compiled. A disk
    entry that does not load (corrupt, truncated, from an incompatible
    runtime) is compiled again and replaced, with a warning."""

    def __init__(self):
        self.memory = {}
        self.lock = threading.Lock()
        self.stats = {"memory": 0, "disk": 0, "compiled": 0, "corrupt": 0}
        # Bumped by clear: what callers cached of a plan is stale then.
        self.generation = 0

    def disk_path(self, spec):
        directory = cache_dir()
        if directory is None:
            return None
        lib = _capi.library()
        digest = hashlib.sha256(
            f"{CACHE_FORMAT}\n{lib.version_string}\n{spec.key()}".encode())
        return directory / f"plan-{digest.hexdigest()[:32]}.json"

    def get(self, spec):
        with self.lock:
            plan = self.memory.get(spec)
            if plan is not None:
                self.stats["memory"] += 1
                return plan
            plan = self._load_disk(spec) or self._compile(spec)
            self.memory[spec] = plan
            return plan

    def count_memory_hit(self):
        """A caller found a plan of this cache's generation in its own cache
        (flexmoe's per-call cache, _ops._call): counted as a memory hit."""
        with self.lock:
            self.stats["memory"] += 1

    def _load_disk(self, spec):
        path = self.disk_path(spec)
        if path is None or not path.is_file():
            return None
        try:
            text = path.read_text()
            plan = CompiledPlan(spec, text, "disk", 0.0)
            _validate(plan)
        except Exception as error:  # any damage: compile again
            self.stats["corrupt"] += 1
            warnings.warn(f"flexmoe: plan cache entry {path} is unusable "
                          f"({type(error).__name__}: {error}); compiling "
                          f"the layer again")
            return None
        self.stats["disk"] += 1
        return plan

    def _compile(self, spec):
        lib = _capi.library()
        comp = compiler()
        if comp is None:
            raise FlexError(
                "FLEX_STATUS_UNAVAILABLE",
                "no Flex compiler found and the plan is not in the cache "
                f"({self.disk_path(spec)}): set FLEX_COMPILER_LIBRARY to "
                "libflex_compiler.so, or build it (target "
                "FlexCompilerShared), or copy plans compiled elsewhere into "
                "FLEXMOE_CACHE_DIR")
        start = time.perf_counter()
        text = comp.compile(lib, spec, emit_mlir(spec))
        plan = CompiledPlan(spec, text, "compiled",
                            time.perf_counter() - start)
        self.stats["compiled"] += 1
        self._store(spec, text)
        return plan

    def _store(self, spec, text):
        path = self.disk_path(spec)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Atomic: another process never reads half a file.
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        except OSError as error:
            warnings.warn(f"flexmoe: cannot write the plan cache {path}: "
                          f"{error}")

    def clear(self, disk=False):
        with self.lock:
            self.memory.clear()
            self.generation += 1
            directory = cache_dir()
            if disk and directory is not None and directory.is_dir():
                for entry in directory.glob("plan-*.json"):
                    entry.unlink(missing_ok=True)


def _validate(plan):
    """Loads the plan on the CPU context (the runtime's full verification):
    a cache entry that loads computes the layer."""
    from . import _runtime
    _runtime.Executable(_runtime.context("cpu"), plan).close()
    spec = plan.spec
    layer = json.loads(plan.text)["layer"]
    expected = {
        "tokens": spec.tokens, "model_dim": spec.model_dim,
        "hidden_dim": spec.hidden_dim, "experts": spec.experts,
        "dtype": spec.dtype
    }
    for field, value in expected.items():
        if layer.get(field) != value:
            raise ValueError(f"the plan's layer has {field} = "
                             f"{layer.get(field)}, expected {value}")
    if plan.world_size != max(1, spec.world_size):
        raise ValueError(f"plan for {plan.world_size} ranks, expected "
                         f"{spec.world_size}")


plans = PlanCache()
