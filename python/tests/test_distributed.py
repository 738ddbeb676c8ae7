# ===- test_distributed.py - Layers over torch.distributed ranks ---------=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# A layer for W ranks is built anywhere (experts sharded [E / W, ...]) and
# its first forward without a process group says clearly why it cannot
# run. On CPU ranks (gloo, here in CI) and on two or more GPUs (NCCL): each
# rank's output, l_aux and gradients equal those of one rank holding every
# expert, for every variant (expert-parallel, pipelined, data-parallel,
# and the automatic choice: ranks that chose apart would exchange
# mismatched blocks and fail or differ).
#
# ===----------------------------------------------------------------------=== #

import json
import os
import socket
import sys

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


def _end_rank():
    """The end of a spawned rank whose results are written: every rank past
    its last collective (a barrier), then out without the interpreter's
    teardown. Two CI runs saw a rank abort there after writing its results
    ("terminate called without an active exception": torch's gloo threads
    met by static destructors while the peer closed its side)."""
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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


# The runs each rank makes: (a2a_ffn_overlap_degree, adaptive_r, capacity
# factor); None lets the layer choose (the cost model).
RUNS = [(None, None, 1.0), (1, 1, 1.0), (2, 1, 1.0), (1, 0, 1.0),
        (None, None, 0.0), (2, 1, 0.0)]


def _rank_main(rank, world, port, result_dir, device):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo",
                            rank=rank, world_size=world)
    errors = {}
    for i, (degree, r, factor) in enumerate(RUNS):
        torch.manual_seed(i)  # the same full layer and inputs on every rank
        E, T, d, h = 4 * world, 64, 32, 48
        full = flexmoe.MoELayer(d, h, E, top_k=2, bias=True,  # one rank
                                capacity_factor=factor, world_size=1,
                                rank=0).to(device)
        xs = torch.randn(world, T, d, device=device)
        grads_out = torch.randn(world, T, d, device=device)
        mine = flexmoe.MoELayer(d, h, E, top_k=2, bias=True,
                                capacity_factor=factor).to(device)
        L = E // world
        with torch.no_grad():  # this rank's slice of the same parameters
            mine.wg.copy_(full.wg)
            for name in ("w1", "w2", "b1", "b2"):
                getattr(mine, name).copy_(
                    getattr(full, name)[rank * L:(rank + 1) * L])
        x = xs[rank].clone().requires_grad_()
        y, l_aux = mine(x, adaptive_r=r, a2a_ffn_overlap_degree=degree)
        ((y * grads_out[rank]).sum() + l_aux).backward()
        # One rank holding every expert, on this rank's tokens, then the
        # expert gradients summed over the ranks' tokens.
        xr = xs[rank].clone().requires_grad_()
        ref, ref_l = full(xr)
        ((ref * grads_out[rank]).sum() + ref_l).backward()
        e = {"out": rel_l2(y, ref), "grad_x": rel_l2(x.grad, xr.grad),
             "l_aux": abs(float(l_aux) - float(ref_l)),
             "grad_wg": rel_l2(mine.wg.grad, full.wg.grad)}
        for name in ("w1", "w2", "b1", "b2"):
            g = getattr(full, name).grad
            dist.all_reduce(g)
            e["grad_" + name] = rel_l2(getattr(mine, name).grad,
                                       g[rank * L:(rank + 1) * L])
        errors[i] = e
    torch.save(errors,
               os.path.join(result_dir, f"rank{rank}.pt"))
    _end_rank()


def _check_ranks(result_dir, world):
    results = [torch.load(os.path.join(result_dir, f"rank{rank}.pt"))
               for rank in range(world)]
    assert all(len(result) == len(RUNS) for result in results)
    for rank, result in enumerate(results):
        for i, errors in result.items():
            for name, err in errors.items():
                assert err <= 1e-5, f"rank {rank} run {RUNS[i]} {name}: {err}"


def test_two_cpu_ranks_match_one(tmp_path):
    import torch.multiprocessing as mp
    world = 2
    mp.spawn(_rank_main, args=(world, _free_port(), str(tmp_path), "cpu"),
             nprocs=world, join=True)
    _check_ranks(str(tmp_path), world)


def _sharded_main(rank, world, port, result_dir, experts, r=None):
    """One layer of `experts` experts over `world` CPU ranks (each expert
    sharded over s = W / E ranks, its hidden columns split), against one
    rank holding the whole layer; or the error it gives."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    T, d, h = 16, 16, 24
    full = flexmoe.MoELayer(d, h, experts, top_k=1, world_size=1, rank=0)
    mine = flexmoe.MoELayer(d, h, experts, top_k=1)
    s, q, e = world // experts, rank % (world // experts), rank // (world //
                                                                    experts)
    cols = slice(q * (h // s), (q + 1) * (h // s))
    with torch.no_grad():
        mine.wg.copy_(full.wg)
        mine.w1.copy_(full.w1[e:e + 1, :, cols])
        mine.w2.copy_(full.w2[e:e + 1, cols, :])
    xs = torch.randn(world, T, d)
    result = {}
    try:
        x = xs[rank].clone().requires_grad_()
        y, l_aux = mine(x, adaptive_r=r)
        (y.square().sum() + l_aux).backward()
        xr = xs[rank].clone().requires_grad_()
        ref, ref_l = full(xr)
        (ref.square().sum() + ref_l).backward()
        g1, g2 = full.w1.grad, full.w2.grad
        dist.all_reduce(g1)
        dist.all_reduce(g2)
        result = {"out": rel_l2(y, ref), "grad_x": rel_l2(x.grad, xr.grad),
                  "l_aux": abs(float(l_aux) - float(ref_l)),
                  "grad_w1": rel_l2(mine.w1.grad, g1[e:e + 1, :, cols]),
                  "grad_w2": rel_l2(mine.w2.grad, g2[e:e + 1, cols, :])}
    except FlexError as error:
        result = {"error": str(error)}
    torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))
    _end_rank()


@pytest.mark.parametrize("world,experts,r", [(2, 1, None), (4, 2, 0),
                                              (4, 2, 2)])
def test_cpu_ranks_shard_experts(tmp_path, world, experts, r):
    """Fewer experts than ranks: each expert's hidden columns split over
    s = W / E ranks; data parallel (r = 0) and whole experts gathered in
    each group of s (r = s) run over the whole group's collectives."""
    import torch.multiprocessing as mp
    mp.spawn(_sharded_main,
             args=(world, _free_port(), str(tmp_path), experts, r),
             nprocs=world, join=True)
    for rank in range(world):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert "error" not in result, result
        assert len(result) == 5
        for name, err in result.items():
            assert err <= 1e-5, f"rank {rank} {name}: {err}"


def test_cpu_ranks_cannot_split_into_groups(tmp_path):
    """r = 1 < s = 2 exchanges within sub-groups of ranks, which the
    process group's own collectives cannot form: a clear error on every
    rank, and no hang."""
    import torch.multiprocessing as mp
    mp.spawn(_sharded_main, args=(4, _free_port(), str(tmp_path), 2, 1),
             nprocs=4, join=True)
    for rank in range(4):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert "MPI or NCCL" in result.get("error", ""), result


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="needs 2 or more CUDA devices (the lead runs it on "
                    "the GPU machine)")
def test_two_gpus_match_one(tmp_path):
    import torch.multiprocessing as mp
    world = 2
    mp.spawn(_rank_main, args=(world, _free_port(), str(tmp_path), "cuda"),
             nprocs=world, join=True)
    _check_ranks(str(tmp_path), world)


# -- the training example: saved on N ranks, reloaded on M ------------------

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "examples", "python")
LM_ARGS = ["--layers", "1", "--d-model", "32", "--hidden", "32",
           "--experts", "4", "--batch", "4", "--seq", "16", "--vocab", "32",
           "--eval-batch", "8", "--log-every", "100"]


def _train_main(rank, world, port, argv, result_dir):
    import sys
    sys.path.insert(0, EXAMPLES)
    import train_lm
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      RANK=str(rank), WORLD_SIZE=str(world))
    code = train_lm.main(argv)
    with open(os.path.join(result_dir, f"code{rank}.txt"), "w") as f:
        f.write(str(code))
    _end_rank()


def _run_lm(tmp_path, world, argv):
    """train_lm.main(argv) on `world` ranks (spawned, gloo) or in this
    process; its exit codes."""
    if world == 1:
        import sys
        sys.path.insert(0, EXAMPLES)
        import train_lm
        return [train_lm.main(argv)]
    import torch.multiprocessing as mp
    out = tmp_path / f"codes{_free_port()}"
    out.mkdir()
    mp.spawn(_train_main, args=(world, _free_port(), argv, str(out)),
             nprocs=world, join=True)
    return [int((out / f"code{r}.txt").read_text()) for r in range(world)]


def test_a_layer_moved_to_another_device_takes_another_communicator():
    layer = flexmoe.MoELayer(16, 24, 4, world_size=2, rank=0)
    layer.group_name, layer._group_device = "w2-0", "cuda"  # as if run there
    layer.float()  # .to(...) runs _apply: here the experts are on the CPU
    assert layer.group_name == ""
    layer.group_name, layer._group_device = "w2-0-cpu", "cpu"
    layer.float()
    assert layer.group_name == "w2-0-cpu"


def test_training_saves_on_two_ranks_and_reloads_on_one(tmp_path):
    """The example trains on two CPU ranks and saves; the checkpoint is
    converted to one rank and reloaded there, and back to two: the
    evaluation loss is the same every time."""
    from flexmoe import checkpoint
    two, one, back = tmp_path / "two", tmp_path / "one", tmp_path / "back"
    assert _run_lm(tmp_path, 2, LM_ARGS + ["--steps", "3", "--save",
                                           str(two)]) == [0, 0]
    saved = json.loads((two / "eval.json").read_text())
    assert saved["world_size"] == 2 and saved["chunks"] == 4
    # Loaded as it is on one rank: refused, naming the conversion.
    with pytest.raises(ValueError, match="flexmoe.checkpoint convert"):
        _run_lm(tmp_path, 1, LM_ARGS + ["--steps", "0", "--load", str(two)])
    assert checkpoint.main(["convert", str(two / "rank0.pt"),
                            str(two / "rank1.pt"), "-w", "1", "-o",
                            str(one / "rank{rank}.pt")]) == 0
    assert _run_lm(tmp_path, 1, LM_ARGS + [
        "--steps", "0", "--load", str(one), "--expect",
        str(two / "eval.json")]) == [0]
    assert checkpoint.main(["convert", str(one / "rank0.pt"), "-w", "2",
                            "-o", str(back / "rank{rank}.pt")]) == 0
    assert _run_lm(tmp_path, 2, LM_ARGS + [
        "--steps", "0", "--load", str(back), "--expect",
        str(two / "eval.json")]) == [0, 0]


def test_two_ranks_take_the_steps_one_rank_takes(tmp_path):
    """Data parallel over the ranks as the example does it (dense and
    router gradients averaged, expert gradients / W): from one checkpoint,
    two SGD steps on two CPU ranks, each on half of one global batch, give
    the model one rank gives on the whole batch. Dropless (no capacity that
    depends on the call's tokens) and no l_aux term (a rank's l_aux is not
    a share of the whole batch's)."""
    from flexmoe import checkpoint
    init, init2, one, two, two1 = (tmp_path / n for n in
                                   ("init", "init2", "one", "two", "two1"))
    base = LM_ARGS + ["--capacity-factor", "0", "--aux-weight", "0",
                      "--optimizer", "sgd", "--lr", "0.5",
                      "--global-batch", "8"]
    assert _run_lm(tmp_path, 1, base + ["--steps", "0", "--save",
                                        str(init)]) == [0]
    assert checkpoint.main(["convert", str(init / "rank0.pt"), "-w", "2",
                            "-o", str(init2 / "rank{rank}.pt")]) == 0
    assert _run_lm(tmp_path, 1, base + ["--steps", "2", "--load", str(init),
                                        "--save", str(one)]) == [0]
    assert _run_lm(tmp_path, 2, base + ["--steps", "2", "--load", str(init2),
                                        "--save", str(two)]) == [0, 0]
    before = json.loads((init / "eval.json").read_text())["eval_loss"]
    after = json.loads((one / "eval.json").read_text())["eval_loss"]
    assert after < before - 1e-3  # the steps moved the model
    assert checkpoint.main(["convert", str(two / "rank0.pt"),
                            str(two / "rank1.pt"), "-w", "1", "-o",
                            str(two1 / "rank{rank}.pt")]) == 0
    # The two-rank model, back on one rank, evaluates as the one-rank one.
    assert _run_lm(tmp_path, 1, base + ["--steps", "0", "--load", str(two1),
                                        "--expect",
                                        str(one / "eval.json")]) == [0]
