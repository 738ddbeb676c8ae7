# ===- distributed.py - Flex communicators from torch.distributed --------=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# This file builds the NCCL communicator a multi-rank layer's plan runs
# through from a torch.distributed process group: rank 0 of the group makes
# the NCCL id (flexNcclGetUniqueId), the group broadcasts its 128 bytes
# (broadcast_object_list), and every rank calls flexCommunicatorCreateNccl
# on its current CUDA device. One communicator per group, made when the
# first layer of that group is built. CPU ranks have no path from PyTorch
# (the CPU backend's communicator is MPI's): moe-run under mpirun runs them.
#
# ===----------------------------------------------------------------------=== #

import ctypes
import threading

from . import _capi, _ops
from ._capi import FlexError

_lock = threading.Lock()
_names = {}  # id(group) -> name


def group_name(group, world_size):
    """The name of `group`'s communicator (made on first use): "w<W>-<n>"."""
    with _lock:
        name = _names.get(id(group))
        if name is None:
            name = _names[id(group)] = f"w{world_size}-{len(_names)}"
        if name not in _ops.communicators:
            _ops.communicators[name] = create_communicator(group)
        return name


def create_communicator(group=None):
    """A FlexCommunicator handle over `group` (None: the default group),
    for executables of the CUDA context."""
    import torch
    import torch.distributed as dist
    lib = _capi.library()
    if not (dist.is_available() and dist.is_initialized()):
        raise FlexError(
            "FLEX_STATUS_FAILED_PRECONDITION",
            "flexmoe: a layer for several ranks needs torch.distributed "
            "initialized (torchrun, then dist.init_process_group('nccl'))")
    if not lib.lib.flexHasNccl():
        raise FlexError(
            "FLEX_STATUS_UNAVAILABLE",
            f"flexmoe: {lib.path} has no NCCL communicator (it was built "
            f"without CUDA or NCCL), and layers on several ranks run on GPUs "
            f"only; CPU ranks run with moe-run under mpirun")
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
