# ===- _runtime.py - Contexts, executables and per-forward state ---------=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# This file wraps the C API's handles: a context per device, an executable
# per loaded plan, and a Runner per (plan, device) that runs forwards and
# backwards on caller-owned memory with the workspace the caller allocated.
#
# Several forwards may be in flight before their backwards (activation
# checkpointing, pipeline micro-batches). A forward's saved state lives in
# its workspace, which the caller allocates (torch's allocator) and hands to
# the backward. With a libflex.so whose FlexRunOptions carries the workspace
# (Library.per_call_state) one executable serves them all; with an older one
# a Runner keeps one executable per forward in flight (docs/Python.md,
# "Forwards in flight").
#
# ===----------------------------------------------------------------------=== #

import collections
import ctypes
import threading
import warnings

from . import _capi
from ._capi import FlexError

_contexts = {}
_contexts_lock = threading.Lock()


def context(device):
    """The context of a device: "cpu", or ("cuda", index)."""
    with _contexts_lock:
        handle = _contexts.get(device)
        if handle is None:
            lib = _capi.library()
            backend = b"cpu" if device == "cpu" else b"cuda"
            out = ctypes.c_void_p()
            if device != "cpu":
                import torch
                with torch.cuda.device(device[1]):
                    status = lib.lib.flexContextCreate(backend,
                                                       ctypes.byref(out))
            else:
                status = lib.lib.flexContextCreate(backend, ctypes.byref(out))
            lib.check(status, "flexContextCreate")
            handle = _contexts[device] = out
        return handle


class Executable:
    """A plan loaded on a context (flexExecutableCreateFromPlan)."""

    def __init__(self, ctx, plan):
        self.lib = _capi.library()
        self.plan = plan
        handle = ctypes.c_void_p()
        text = plan.text.encode()
        self.lib.check(
            self.lib.lib.flexExecutableCreateFromPlan(ctx, text, len(text),
                                                      ctypes.byref(handle)),
            "flexExecutableCreateFromPlan")
        self.handle = handle
        self.variant = None
        self._entries = (self.lib.lib.flexExecutableBackward,
                         self.lib.lib.flexExecutableForward)

    def close(self):
        if self.handle:
            self.lib.lib.flexExecutableDestroy(self.handle)
            self.handle = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def check(self, status, what):
        self.lib.check(status, what, self.handle)

    def select_variant(self, name):
        """A variant by name; "" is the executor's own choice (auto for
        several variants), restored after a call that named one."""
        if not name and self.variant not in (None, "auto"):
            name = "auto"
        if name and name != self.variant:
            self.check(
                self.lib.lib.flexExecutableSelectVariantByName(
                    self.handle, name.encode()),
                "flexExecutableSelectVariantByName")
            self.variant = name

    def run_workspace_bytes(self, name):
        """The workspace bytes a call of variant `name` ("" = the executor's
        own choice) needs: the variant's own, or under auto the largest
        within the option max_workspace_mib (docs/Runtime.md, "Workspaces
        per variant"); the plan's whole workspace with an older library."""
        size = self.lib.run_workspace_size
        if size is None:
            return None
        self.select_variant(name)
        nbytes = ctypes.c_int64()
        self.check(size(self.handle, ctypes.byref(nbytes)),
                   "flexExecutableGetRunWorkspaceSize")
        return nbytes.value

    def set_workspace(self, address, nbytes):
        self.check(
            self.lib.lib.flexExecutableSetWorkspace(self.handle, address,
                                                    nbytes),
            "flexExecutableSetWorkspace")

    def set_communicator(self, comm):
        self.check(
            self.lib.lib.flexExecutableSetCommunicator(self.handle, comm),
            "flexExecutableSetCommunicator")

    def run(self, forward, bindings, addresses, sizes, options):
        """One call of the C API on `bindings` (a Bindings), its entries'
        addresses and sizes written first: `sizes` None is the plan's own.
        The Runner's lock serializes the calls of one executable (and the
        writes into a Bindings that several calls share)."""
        data = bindings.data
        data[1::3] = addresses
        data[2::3] = bindings.sizes if sizes is None else sizes
        status = self._entries[forward](self.handle, bindings.array,
                                        bindings.count, options)
        if status:
            self.check(status, "flexExecutableForward"
                       if forward else "flexExecutableBackward")


class Bindings:
    """The C API's binding array (FlexBinding[]) for one list of argument
    names, made once: a call writes only the addresses (and, when they are
    not the plan's, the sizes) through `data`, the array seen as int64
    triples (name, data, bytes), with one slice assignment each. `checks`
    is the caller's (flexmoe._ops: what to check of each entry)."""

    __slots__ = ("names", "array", "data", "sizes", "count", "checks")

    def __init__(self, names, sizes):
        self.names = tuple(names)
        self.count = len(self.names)
        self.array = (_capi.Binding * self.count)()
        for entry, name in zip(self.array, self.names):
            entry.name = name.encode()  # kept alive by the array
        self.data = (ctypes.c_int64 * (3 * self.count)).from_buffer(
            self.array)
        self.sizes = tuple(sizes)
        self.checks = None


# Bindings.data reads FlexBinding as three 8-byte fields.
assert ctypes.sizeof(_capi.Binding) == 3 * ctypes.sizeof(ctypes.c_int64)


# At most this many forwards wait for their backward on one Runner without
# per-call state; the oldest is dropped past it (its backward then fails,
# saying so). The executor of the per-call ABI keeps a bound of its own.
MAX_PENDING_FORWARDS = 64
_warned_seed = False


class Runner:
    """Runs one plan on one device. `forward` and `backward` take the
    bindings, the aligned workspace address and its size, the stream (CUDA),
    the seed and the variant."""

    def __init__(self, plan, device, communicator=None):
        self.lib = _capi.library()
        self.plan = plan
        self.device = device
        self.ctx = context(device)
        self.communicator = communicator
        self.per_call_state = self.lib.per_call_state
        self.lock = threading.Lock()
        self.free = []  # executables with no forward pending
        self.pending = collections.OrderedDict()  # workspace -> executable
        self.shared = self._new_executable() if self.per_call_state else None
        self.sizes = {}  # workspace_bytes' by variant name
        # One options struct, refilled under the lock by each call (the
        # library reads it during the call only).
        self.options = (_capi.RunOptions(ctypes.sizeof(_capi.RunOptions))
                        if self.per_call_state else
                        _capi.RunOptionsV1(ctypes.sizeof(_capi.RunOptionsV1)))
        # Its address, as the C API's argument (kept alive by self.options).
        self.options_address = ctypes.addressof(self.options)

    def workspace_bytes(self, variant):
        """The workspace a call of `variant` needs (Executable.
        run_workspace_bytes), asked once per variant name."""
        nbytes = self.sizes.get(variant)
        if nbytes is None:
            with self.lock:
                exe = self.shared or (self.free[-1] if self.free else None)
                if exe is None:
                    exe = self._new_executable()
                    self.free.append(exe)
                nbytes = exe.run_workspace_bytes(variant)
            if nbytes is None:
                nbytes = self.plan.workspace_bytes
            self.sizes[variant] = nbytes
        return nbytes

    def _new_executable(self):
        exe = Executable(self.ctx, self.plan)
        if self.communicator is not None:
            exe.set_communicator(self.communicator)
        return exe

    def _options(self, stream, seed, workspace, nbytes):
        """The call's options, in self.options (their address returned):
        call with the lock held."""
        options = self.options
        options.stream = stream
        if not self.per_call_state:
            options.flags = _capi.RUN_NO_TIMING
            return self.options_address
        options.workspace, options.workspace_bytes = workspace, nbytes
        if seed is None:
            options.flags, options.seed = _capi.RUN_NO_TIMING, 0
        else:
            options.flags = _capi.RUN_NO_TIMING | _capi.RUN_SEED
            options.seed = seed & 0xFFFFFFFFFFFFFFFF
        return self.options_address

    def forward(self, bindings, addresses, sizes, workspace, nbytes, stream,
                seed, variant, keep_state):
        """bindings: a Bindings, with the addresses (and sizes, None for
        the plan's) of this call's tensors; keep_state: a backward will
        follow (a training plan)."""
        global _warned_seed
        if seed is not None and not self.per_call_state and not _warned_seed:
            _warned_seed = True
            warnings.warn(f"flexmoe: {self.lib.path} has no per-call seed "
                          f"(FLEX_RUN_SEED): the gate noise is the plan's, "
                          f"the same at every step")
        with self.lock:
            options = self._options(stream, seed, workspace, nbytes)
            if self.per_call_state:
                self.shared.select_variant(variant)
                self.shared.run(True, bindings, addresses, sizes, options)
                return
            exe = self._take(workspace, nbytes, keep_state)
            exe.select_variant(variant)
            try:
                exe.run(True, bindings, addresses, sizes, options)
            except Exception:
                self.pending.pop(workspace, None)
                self.free.append(exe)
                raise
            if not keep_state:
                self.free.append(exe)

    def _take(self, workspace, nbytes, keep_state):
        # A pending forward on this address is dead: its workspace was
        # freed, and torch's allocator handed the memory out again.
        dead = self.pending.pop(workspace, None)
        if dead is not None:
            self.free.append(dead)
        if len(self.pending) >= MAX_PENDING_FORWARDS:
            _, oldest = self.pending.popitem(last=False)
            self.free.append(oldest)
        exe = self.free.pop() if self.free else self._new_executable()
        exe.set_workspace(workspace, nbytes)
        if keep_state:
            self.pending[workspace] = exe
        return exe

    def backward(self, bindings, addresses, sizes, workspace, nbytes, stream,
                 variant):
        with self.lock:
            options = self._options(stream, None, workspace, nbytes)
            if self.per_call_state:
                self.shared.run(False, bindings, addresses, sizes, options)
                return
            exe = self.pending.pop(workspace, None)
            if exe is None:
                raise FlexError(
                    "FLEX_STATUS_FAILED_PRECONDITION",
                    "flexmoe: no forward is pending on this workspace: its "
                    "backward ran already, or more than "
                    f"{MAX_PENDING_FORWARDS} forwards of this layer were in "
                    "flight (the oldest are dropped)")
            try:
                exe.run(False, bindings, addresses, sizes, options)
            finally:
                self.free.append(exe)


_runners = {}
_runners_lock = threading.Lock()


def runner(plan, device, communicator=None):
    key = (plan.spec, device, id(communicator) if communicator else 0)
    with _runners_lock:
        r = _runners.get(key)
        if r is None:
            r = _runners[key] = Runner(plan, device, communicator)
        return r


# Bumped by clear_runners: what callers cached of a runner is stale then.
generation = 0


def clear_runners():
    global generation
    with _runners_lock:
        _runners.clear()
        generation += 1
