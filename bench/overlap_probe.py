"""How much an exchange slows the expert GEMMs that run beside it, and how
fast it moves, for the two transports a single host offers: NCCL's kernels
(which take SMs) and the copy engines (which take none). Decides whether a
copy-engine exchange is worth building (bench/RESULTS.md, Runs 5-7: the GEMMs
beside NCCL's all-to-all run ~15% slower, the largest term of C1's exposed
communication after the first and last chunk).

    torchrun --standalone --nproc_per_node W bench/overlap_probe.py nccl [OUT.json]
    NCCL_P2P_USE_CUDA_MEMCPY=1 torchrun ... bench/overlap_probe.py nccl [OUT.json]
    python3 bench/overlap_probe.py ce [OUT.json]          (one process, all GPUs)

Workload, C1 on W GPUs: a GEMM chain of [ROWS, 4096] x [4096, 4096] bf16
(~2.5 ms) and an all-to-all of 256 MiB per rank (bf16, each peer's block
EXCHANGE / W). Three timings each (median of REPS after warm-ups):
GEMMs alone, exchange alone, both at once (exchange on its own stream).
Printed: ms of each, the exchange's GB/s (bytes each rank sends, its own
block included, over the time) and the GEMMs' slowdown beside it."""
import json
import os
import statistics
import sys
import time

import torch

ROWS, DIM, CHAIN = 16384, 4096, 4
EXCHANGE = 256 << 20  # bytes each rank sends, its own block included
REPS, WARMUP = 10, 3


def gemm_chain(a, w):
    out = a
    for _ in range(CHAIN):
        out = out @ w
    return out


def nccl_mode(out_path):
    import torch.distributed as dist
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    rank, world = dist.get_rank(), dist.get_world_size()
    count = EXCHANGE // 2
    count -= count % world
    send = torch.randn(count, device="cuda").to(torch.bfloat16)
    recv = torch.empty_like(send)
    a = torch.randn(ROWS, DIM, device="cuda").to(torch.bfloat16) / 8
    w = torch.randn(DIM, DIM, device="cuda").to(torch.bfloat16) / 64
    main = torch.cuda.current_stream()

    def timed(fn):
        times = []
        for i in range(WARMUP + REPS):
            dist.barrier()
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(main)
            extra = fn()
            end.record(main)
            torch.cuda.synchronize()
            if i >= WARMUP:
                times.append((start.elapsed_time(end),
                              extra.elapsed_time(end) if extra else 0.0))
        return times

    gemm = timed(lambda: (gemm_chain(a, w), None)[1])
    a2a = timed(lambda: (dist.all_to_all_single(recv, send), None)[1])

    def both():
        work = dist.all_to_all_single(recv, send, async_op=True)
        gemm_chain(a, w)
        gemm_done = torch.cuda.Event(enable_timing=True)
        gemm_done.record(main)
        work.wait()
        return gemm_done
    overlap = timed(both)
    row = {
        "transport": "nccl" + ("-ce" if os.environ.get(
            "NCCL_P2P_USE_CUDA_MEMCPY") == "1" else ""),
        "world": world,
        "gemm_ms": statistics.median([t for t, _ in gemm]),
        "exchange_ms": statistics.median([t for t, _ in a2a]),
        "both_ms": statistics.median([t for t, _ in overlap]),
        # start -> GEMMs done = total minus (GEMMs done -> end).
        "gemm_beside_ms": statistics.median([t - tail for t, tail in overlap]),
    }
    # The slowest rank's numbers.
    vals = torch.tensor([row[k] for k in ("gemm_ms", "exchange_ms", "both_ms",
                                          "gemm_beside_ms")], device="cuda")
    dist.all_reduce(vals, op=dist.ReduceOp.MAX)
    for k, v in zip(("gemm_ms", "exchange_ms", "both_ms", "gemm_beside_ms"),
                    vals.tolist()):
        row[k] = v
    if rank == 0:
        report([row], out_path)
    dist.destroy_process_group()


def ce_mode(out_path):
    """One process drives every GPU; cross-device copies go through
    cudaMemcpyPeerAsync, which the copy engines carry."""
    world = torch.cuda.device_count()
    if world < 2:
        sys.exit("overlap_probe.py ce: needs 2 GPUs or more")
    for g in range(world):
        for p in range(world):
            if g != p and not torch.cuda.can_device_access_peer(g, p):
                sys.exit(f"GPU {g} cannot access GPU {p}: no peer copies")
    block = EXCHANGE // world // 2  # bf16 elements per peer block
    sends = [torch.randn(world, block, device=f"cuda:{g}").to(torch.bfloat16)
             for g in range(world)]
    recvs = [torch.empty(world, block, device=f"cuda:{g}", dtype=torch.bfloat16)
             for g in range(world)]
    a = [torch.randn(ROWS, DIM, device=f"cuda:{g}").to(torch.bfloat16) / 8
         for g in range(world)]
    w = [torch.randn(DIM, DIM, device=f"cuda:{g}").to(torch.bfloat16) / 64
         for g in range(world)]
    # One stream per (GPU, peer) on each side: the copies to different peers
    # run at once. torch orders a cross-device copy_ against the current
    # stream of both devices, so both are side streams here, never the
    # GEMMs' stream.
    copy_streams = [[torch.cuda.Stream(device=g) for _ in range(world)]
                    for g in range(world)]
    land_streams = [[torch.cuda.Stream(device=p) for p in range(world)]
                    for _ in range(world)]
    mains = [torch.cuda.current_stream(g) for g in range(world)]

    def send_all():
        for g in range(world):
            with torch.cuda.device(g):
                ready = torch.cuda.Event()
                ready.record(mains[g])
                for p in range(world):
                    copy_streams[g][p].wait_event(ready)
        for g in range(world):
            for p in range(world):
                with torch.cuda.stream(copy_streams[g][p]), \
                        torch.cuda.stream(land_streams[g][p]):
                    recvs[p][g].copy_(sends[g][p], non_blocking=True)

    def land_all():
        # The receiver waits for every block that lands on it.
        for g in range(world):
            for p in range(world):
                with torch.cuda.device(p):
                    done = torch.cuda.Event()
                    done.record(land_streams[g][p])
                    mains[p].wait_event(done)

    def exchange():
        send_all()
        land_all()

    def timed(fn):
        """(wall ms, GEMM ms) per timed run; the GEMM time when `fn`
        returns each GPU's GEMMs-done event."""
        rows = []
        for i in range(WARMUP + REPS):
            for g in range(world):
                torch.cuda.synchronize(g)
            starts = []
            for g in range(world):
                e = torch.cuda.Event(enable_timing=True)
                e.record(mains[g])
                starts.append(e)
            t0 = time.perf_counter()
            gemm_done = fn()
            for g in range(world):
                torch.cuda.synchronize(g)
            wall = (time.perf_counter() - t0) * 1e3
            beside = 0.0
            if gemm_done:
                beside = max(starts[g].elapsed_time(gemm_done[g])
                             for g in range(world))
            if i >= WARMUP:
                rows.append((wall, beside))
        return rows

    def gemm_only():
        done = []
        for g in range(world):
            with torch.cuda.device(g), torch.cuda.stream(mains[g]):
                gemm_chain(a[g], w[g])
            e = torch.cuda.Event(enable_timing=True)
            e.record(mains[g])
            done.append(e)
        return done

    def both():
        # Copies first (their streams run beside the GEMMs), then GEMMs; the
        # wall time ends when both are done.
        send_all()
        done = gemm_only()
        land_all()
        return done

    gemm = timed(gemm_only)
    ex = timed(exchange)
    overlap = timed(both)
    # Check the exchange moved the right blocks (fresh values, poisoned
    # targets) before trusting its times.
    for g in range(world):
        recvs[g].fill_(float("nan"))
        sends[g].copy_(torch.randn(world, block, device=f"cuda:{g}"))
    exchange()
    for g in range(world):
        torch.cuda.synchronize(g)
    for g in range(world):
        for p in range(world):
            if not torch.equal(recvs[p][g].cpu(), sends[g][p].cpu()):
                sys.exit(f"block {g} -> {p} arrived wrong")
    row = {
        "transport": "copy-engine",
        "world": world,
        "gemm_ms": statistics.median([b for _, b in gemm]),
        "exchange_ms": statistics.median([t for t, _ in ex]),
        "both_ms": statistics.median([t for t, _ in overlap]),
        "gemm_beside_ms": statistics.median([b for _, b in overlap]),
        "note": "exchange and both are host wall times over all GPUs",
    }
    report([row], out_path)


def report(rows, out_path):
    print(f"{'transport':>12} {'W':>2} {'gemm ms':>8} {'exch ms':>8} "
          f"{'GB/s':>6} {'both ms':>8} {'gemm beside':>12} {'slowdown':>9}")
    for r in rows:
        gbps = EXCHANGE / (r["exchange_ms"] * 1e-3) / 1e9
        slow = r["gemm_beside_ms"] / r["gemm_ms"] - 1
        r["exchange_GBps"], r["gemm_slowdown"] = gbps, slow
        print(f"{r['transport']:>12} {r['world']:>2} {r['gemm_ms']:8.3f} "
              f"{r['exchange_ms']:8.3f} {gbps:6.0f} {r['both_ms']:8.3f} "
              f"{r['gemm_beside_ms']:12.3f} {slow * 100:8.1f}%")
    if out_path:
        with open(out_path, "w") as f:
            json.dump(rows, f, indent=1)


def main():
    for name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                 "NVSHMEM_DISABLE_NVLS"):
        os.environ.setdefault(name, "0" if name == "NCCL_NVLS_ENABLE" else "1")
    if len(sys.argv) < 2 or sys.argv[1] not in ("nccl", "ce"):
        sys.exit(__doc__)
    out_path = sys.argv[2] if len(sys.argv) > 2 else None
    (nccl_mode if sys.argv[1] == "nccl" else ce_mode)(out_path)


if __name__ == "__main__":
    main()
