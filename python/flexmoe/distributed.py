# ===- distributed.py - Flex communicators from torch.distributed --------=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# This file builds the communicator a multi-rank layer's plan runs through
# from a torch.distributed process group, one per (group, device kind), made
# when the first forward of a layer of that group runs:
# - GPU ranks: NCCL. Rank 0 of the group makes the NCCL id
#   (flexNcclGetUniqueId), the group broadcasts its 128 bytes
#   (broadcast_object_list), and every rank calls flexCommunicatorCreateNccl
#   on its current CUDA device.
# - CPU ranks: the group's own collectives (gloo, under torchrun or
#   init_process_group("gloo")) through flexCommunicatorCreateCallbacks:
#   Flex's all_to_all, all_gather, reduce_scatter (an all_reduce of an fp32
#   copy), all_reduce (max) and barrier call torch.distributed on tensors
#   over the plan's host buffers, no copies where the buffers are contiguous
#   per peer. For correctness and CI on CPUs, not speed. The waits are
#   gloo's (init_process_group's timeout): the callback communicator has no
#   timeout of its own. Grouped collectives (r < s with experts sharded over
#   ranks; 2DH) cannot run this way and fail with a message saying so.
#
# ===----------------------------------------------------------------------=== #

import ctypes
import threading

from . import _capi, _ops
from ._capi import FlexError

_lock = threading.Lock()
_names = {}  # id(group) -> name


def group_name(group, world_size, device=None):
    """The name of `group`'s communicator for layers on `device` (made on
    first use): "w<W>-<n>" on GPUs, "w<W>-<n>-cpu" on CPUs."""
    cpu = device is not None and getattr(device, "type", device) == "cpu"
    with _lock:
        key = (id(group), cpu)
        name = _names.get(key)
        if name is None:
            name = _names[key] = (f"w{world_size}-{len(_names)}" +
                                  ("-cpu" if cpu else ""))
        if name not in _ops.communicators:
            _ops.communicators[name] = (create_host_communicator(group) if cpu
                                        else create_communicator(group))
        return name


def _need_process_group():
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise FlexError(
            "FLEX_STATUS_FAILED_PRECONDITION",
            "flexmoe: a layer for several ranks needs torch.distributed "
            "initialized (torchrun, then dist.init_process_group('nccl') "
            "on GPUs or dist.init_process_group('gloo') on CPUs)")


def create_communicator(group=None):
    """A FlexCommunicator handle over `group` (None: the default group),
    for executables of the CUDA context."""
    import torch
    import torch.distributed as dist
    lib = _capi.library()
    _need_process_group()
    if not lib.lib.flexHasNccl():
        raise FlexError(
            "FLEX_STATUS_UNAVAILABLE",
            f"flexmoe: {lib.path} has no NCCL communicator (it was built "
            f"without CUDA or NCCL): layers on several GPUs need it (layers "
            f"on CPU tensors run over the process group's own collectives)")
    if not torch.cuda.is_available():
        raise FlexError("FLEX_STATUS_UNAVAILABLE",
                        "flexmoe: layers on several ranks need CUDA devices")
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    unique_id = ctypes.create_string_buffer(128)
    if rank == 0:
        lib.check(lib.lib.flexNcclGetUniqueId(unique_id),
                  "flexNcclGetUniqueId")
    box = [unique_id.raw if rank == 0 else None]
    source = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast_object_list(box, src=source, group=group)
    unique_id = ctypes.create_string_buffer(box[0], 128)
    comm = ctypes.c_void_p()
    lib.check(
        lib.lib.flexCommunicatorCreateNccl(unique_id, rank, size,
                                           torch.cuda.current_device(),
                                           ctypes.byref(comm)),
        "flexCommunicatorCreateNccl")
    return comm


# -------------------------------------------------------- CPU ranks (gloo) --

_MESSAGE = ctypes.c_char_p
_I64P = ctypes.POINTER(ctypes.c_int64)
_ALL_TO_ALL = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p,
                               ctypes.c_void_p, _I64P, _I64P, ctypes.c_void_p,
                               _I64P, _I64P, ctypes.c_void_p, ctypes.c_int64)
_ALL_GATHER = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p,
                               ctypes.c_void_p, ctypes.c_int64,
                               ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_int64)
_REDUCE_SCATTER = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_int64, ctypes.c_int32,
                                   ctypes.c_void_p, ctypes.c_int64)
_ALL_REDUCE_MAX = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_int64,
                                   ctypes.c_void_p, ctypes.c_int64)
_BARRIER = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p,
                            ctypes.c_int64)
_DESTROY = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class CollectiveCallbacks(ctypes.Structure):
    """FlexCollectiveCallbacks (include/flex-c/Flex.h)."""
    _fields_ = [("struct_size", ctypes.c_uint32), ("user", ctypes.c_void_p),
                ("all_to_all", _ALL_TO_ALL), ("all_gather", _ALL_GATHER),
                ("reduce_scatter_sum", _REDUCE_SCATTER),
                ("all_reduce_max_i32", _ALL_REDUCE_MAX),
                ("barrier", _BARRIER), ("destroy", _DESTROY)]


def _host_bytes(address, count):
    """A uint8 tensor over `count` bytes of host memory at `address` (a
    null address is fine for no bytes)."""
    import torch
    if count == 0:
        return torch.empty(0, dtype=torch.uint8)
    if not address:
        raise ValueError(f"a null buffer for {count} bytes")
    return torch.frombuffer((ctypes.c_uint8 * count).from_address(address),
                            dtype=torch.uint8)


def _contiguous(offsets, sizes):
    """Whether the per-peer runs lie back to back in peer order."""
    return all(offsets[p] + sizes[p] == offsets[p + 1]
               for p in range(len(sizes) - 1))


class HostCollectives:
    """Flex's host collectives over a torch.distributed group (gloo). Each
    method returns 0, or writes the exception's text into Flex's message
    buffer and returns 1 (the step then fails naming it)."""

    def __init__(self, group):
        import torch.distributed as dist
        self.dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        # The ctypes functions must outlive the communicator: kept here,
        # and this object in _host_collectives for the process's life.
        self.struct = CollectiveCallbacks(
            ctypes.sizeof(CollectiveCallbacks), None,
            _ALL_TO_ALL(self._guard(self.all_to_all)),
            _ALL_GATHER(self._guard(self.all_gather)),
            _REDUCE_SCATTER(self._guard(self.reduce_scatter_sum)),
            _ALL_REDUCE_MAX(self._guard(self.all_reduce_max)),
            _BARRIER(self._guard(self.barrier)), _DESTROY())

    @staticmethod
    def _guard(method):
        def call(_user, *args):
            message, size = args[-2], args[-1]
            try:
                method(*args[:-2])
                return 0
            except BaseException as error:  # a C caller cannot take one
                text = f"{type(error).__name__}: {error}".encode(
                    errors="replace")[:max(0, size - 1)]
                if message and size > 0:
                    ctypes.memmove(message, text + b"\0", len(text) + 1)
                return 1
        return call

    def all_to_all(self, send, send_offsets, send_bytes, recv, recv_offsets,
                   recv_bytes):
        import torch
        W = self.size
        send, recv = send or 0, recv or 0
        so = [send_offsets[p] for p in range(W)]
        sb = [send_bytes[p] for p in range(W)]
        ro = [recv_offsets[p] for p in range(W)]
        rb = [recv_bytes[p] for p in range(W)]
        if _contiguous(so, sb):
            inp = _host_bytes(send + so[0], sum(sb))
        else:
            inp = torch.cat([_host_bytes(send + so[p], sb[p])
                             for p in range(W)])
        direct = _contiguous(ro, rb)
        out = (_host_bytes(recv + ro[0], sum(rb)) if direct else
               torch.empty(sum(rb), dtype=torch.uint8))
        self.dist.all_to_all_single(out, inp, rb, sb, group=self.group)
        if not direct:
            start = 0
            for p in range(W):
                _host_bytes(recv + ro[p], rb[p]).copy_(out[start:start +
                                                             rb[p]])
                start += rb[p]

    def all_gather(self, send, count, recv):
        if count == 0:
            return
        out = _host_bytes(recv, count * self.size)
        # The list form, which every backend has, written in place: each
        # peer's block is a view of `recv`.
        self.dist.all_gather(list(out.chunk(self.size)),
                             _host_bytes(send, count), group=self.group)

    def reduce_scatter_sum(self, send, recv, count, dtype):
        """As an all_reduce of an fp32 copy (every backend has it; `send`
        is Flex's and stays as it is), this rank's part rounded once."""
        import torch
        if count == 0:
            return
        types = {_capi.DTYPE_F32: torch.float32,
                 _capi.DTYPE_BF16: torch.bfloat16,
                 _capi.DTYPE_F16: torch.float16}
        torch_type = types[dtype]
        element = torch.tensor([], dtype=torch_type).element_size()
        full = _host_bytes(send, count * self.size * element).view(torch_type)
        summed = full.to(torch.float32, copy=True)
        self.dist.all_reduce(summed, group=self.group)
        mine = summed[self.rank * count:(self.rank + 1) * count]
        _host_bytes(recv, count * element).view(torch_type).copy_(mine)

    def all_reduce_max(self, values, count):
        import torch
        if count == 0:
            return
        tensor = _host_bytes(values, count * 4).view(torch.int32)
        self.dist.all_reduce(tensor, op=self.dist.ReduceOp.MAX,
                             group=self.group)

    def barrier(self):
        self.dist.barrier(group=self.group)


_host_collectives = []  # every HostCollectives made: they must stay alive


def create_host_communicator(group=None):
    """A FlexCommunicator handle for executables of the cpu context, over
    `group`'s own collectives (None: the default group; gloo)."""
    import torch.distributed as dist
    _need_process_group()
    lib = _capi.library()
    create = getattr(lib.lib, "flexCommunicatorCreateCallbacks", None)
    if create is None:
        raise FlexError(
            "FLEX_STATUS_UNAVAILABLE",
            f"flexmoe: {lib.path} is older than flexCommunicatorCreateCallbacks"
            f": layers on CPU ranks need a newer libflex.so")
    create.restype = ctypes.c_int32
    create.argtypes = [ctypes.POINTER(CollectiveCallbacks), ctypes.c_int32,
                       ctypes.c_int32, ctypes.c_char_p,
                       ctypes.POINTER(ctypes.c_void_p)]
    collectives = HostCollectives(group)
    _host_collectives.append(collectives)
    backend = dist.get_backend(group)
    comm = ctypes.c_void_p()
    lib.check(
        create(ctypes.byref(collectives.struct), collectives.rank,
               collectives.size,
               f"torch.distributed {backend}".encode(), ctypes.byref(comm)),
        "flexCommunicatorCreateCallbacks")
    return comm
