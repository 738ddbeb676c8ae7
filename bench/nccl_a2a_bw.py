"""NCCL's own all-to-all bandwidth through torch.distributed, for comparison
with Flex's all_to_all steps (bench/gpu_multi.sh). One process per GPU:
    torchrun --standalone --nproc_per_node 2 bench/nccl_a2a_bw.py [OUT.json]
Per message size (bytes each rank sends in total), the mean time of
all_to_all_single over 20 runs after 5 warm-ups, the algorithm bandwidth
(bytes sent per rank / time) and the bus bandwidth (x (W-1)/W, as
nccl-tests reports it). Rank 0 prints a table and writes the JSON."""
import json
import os
import sys

import torch
import torch.distributed as dist


def main():
    # NVLink multicast stays off on the shared machines.
    for name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                 "NVSHMEM_DISABLE_NVLS"):
        os.environ.setdefault(name, "0" if name == "NCCL_NVLS_ENABLE" else "1")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for mib in (1, 4, 16, 64, 256, 512):
        count = mib * (1 << 20) // 2  # bf16 elements sent per rank
        count -= count % world
        send = torch.randn(count, device="cuda").to(torch.bfloat16)
        recv = torch.empty_like(send)
        for _ in range(5):
            dist.all_to_all_single(recv, send)
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        runs = 20
        start.record()
        for _ in range(runs):
            dist.all_to_all_single(recv, send)
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / runs
        # The slowest rank's time is the collective's.
        t = torch.tensor([ms], device="cuda")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        ms = t.item()
        nbytes = count * 2
        algbw = nbytes / (ms * 1e-3) / 1e9
        results.append({"bytes": nbytes, "ms": ms, "algbw_GBps": algbw,
                        "busbw_GBps": algbw * (world - 1) / world})
    if rank == 0:
        print(f"NCCL all_to_all_single, {world} ranks (torch {torch.__version__}, "
              f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))})")
        print(f"{'MiB':>8} {'ms':>9} {'algbw GB/s':>11} {'busbw GB/s':>11}")
        for r in results:
            print(f"{r['bytes'] / (1 << 20):8.0f} {r['ms']:9.3f} "
                  f"{r['algbw_GBps']:11.1f} {r['busbw_GBps']:11.1f}")
        if len(sys.argv) > 1:
            with open(sys.argv[1], "w") as f:
                json.dump({"world": world, "results": results}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
