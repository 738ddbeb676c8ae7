# ===- test_distributed.py - Layers over torch.distributed ranks ---------=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# On the CPU: a layer for W ranks is built anywhere (experts sharded
# [E / W, ...]) and its first forward says clearly why it cannot run. On
# two or more GPUs: each rank's output, l_aux and gradients equal those of
# one rank holding every expert (the communicator from torch.distributed:
# rank 0's NCCL id broadcast to the group).
#
# ===----------------------------------------------------------------------=== #

import os
import socket

import pytest
import torch
import torch.distributed as dist

import flexmoe
from flexmoe import FlexError, distributed
from reference import rel_l2


def test_sharded_shapes():
    for rank in range(4):
        layer = flexmoe.MoELayer(16, 24, 8, top_k=2, bias=True,
                                 world_size=4, rank=rank)
        assert tuple(layer.w1.shape) == (2, 16, 24)
        assert tuple(layer.b1.shape) == (2, 24)
        assert layer.first_expert == 2 * rank
        assert tuple(layer.wg.shape) == (16, 8)  # replicated
    assert layer.variants == ("r1d1", "r0d1")
    overlap = flexmoe.MoELayer(16, 24, 8, world_size=4, rank=0,
                               a2a_ffn_overlap_degree=2)
    assert overlap.variants == ("r1d2", "r1d1", "r0d1")
    assert overlap.variant_name(adaptive_r=0) == "r0d1"
    assert overlap.variant_name(adaptive_r=1, a2a_ffn_overlap_degree=4) \
        == "r1d4"
    assert "r1d4" in overlap.variants  # a new plan holds it


def test_cpu_ranks_get_a_clear_error():
    layer = flexmoe.MoELayer(16, 24, 4, top_k=2, world_size=2, rank=0)
    with pytest.raises(FlexError, match="torch.distributed initialized"):
        layer(torch.randn(8, 16))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_communicator_needs_gpus(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present: the GPU test covers it")
        with pytest.raises(FlexError, match="NCCL|CUDA"):
            distributed.create_communicator()
    finally:
        dist.destroy_process_group()


def _rank_main(rank, world, port, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same full layer and inputs on every rank
    E, T, d, h = 4 * world, 64, 32, 48
    full = flexmoe.MoELayer(d, h, E, top_k=2, bias=True).cuda()
    xs = torch.randn(world, T, d, device="cuda")
    grads_out = torch.randn(world, T, d, device="cuda")
    mine = flexmoe.MoELayer(d, h, E, top_k=2, bias=True).cuda()
    L = E // world
    with torch.no_grad():  # this rank's slice of the same parameters
        mine.wg.copy_(full.wg)
        for name in ("w1", "w2", "b1", "b2"):
            getattr(mine, name).copy_(getattr(full, name)[rank * L:(rank + 1)
                                                         * L])
    x = xs[rank].clone().requires_grad_()
    y, l_aux = mine(x)
    ((y * grads_out[rank]).sum() + l_aux).backward()
    # One rank holding every expert, on this rank's tokens, then the
    # expert gradients summed over the ranks' tokens.
    xr = xs[rank].clone().requires_grad_()
    ref, ref_l = full(xr)
    ((ref * grads_out[rank]).sum() + ref_l).backward()
    errors = {"out": rel_l2(y, ref), "grad_x": rel_l2(x.grad, xr.grad),
              "l_aux": abs(float(l_aux) - float(ref_l)),
              "grad_wg": rel_l2(mine.wg.grad, full.wg.grad)}
    for name in ("w1", "w2", "b1", "b2"):
        g = getattr(full, name).grad
        dist.all_reduce(g)
        errors["grad_" + name] = rel_l2(
            getattr(mine, name).grad, g[rank * L:(rank + 1) * L])
    torch.save(errors, os.path.join(result_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="needs 2 or more CUDA devices (the lead runs it on "
                    "the GPU machine)")
def test_two_gpus_match_one(tmp_path):
    import torch.multiprocessing as mp
    world = 2
    mp.spawn(_rank_main, args=(world, _free_port(), str(tmp_path)),
             nprocs=world, join=True)
    for rank in range(world):
        errors = torch.load(tmp_path / f"rank{rank}.pt")
        for name, err in errors.items():
            assert err <= 1e-5, f"rank {rank} {name}: {err}"
