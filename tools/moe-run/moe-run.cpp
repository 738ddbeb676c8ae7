//===- moe-run.cpp - Run, time and check one MoE layer plan ---------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements moe-run's entry: it finds this process's rank, parses
// the flags and runs the layer (RunCommand.cpp). moe-run loads a plan (or
// compiles a .mlir layer through flexCompileLayer when a compiler is
// linked), fills the inputs from .npy files or a seeded generator, runs
// forward (and with --train backward) through the C API, prints per-step
// times, and with --check compares every output with the fp64 reference.
// Under mpirun (or a torchrun-style launch: RANK, WORLD_SIZE, MASTER_ADDR,
// MASTER_PORT) it runs a multi-rank plan, one rank per process (rank 0
// prints); with --device cuda each rank takes one GPU and the NCCL
// communicator. With --calibrate it measures the cost model's device
// profile instead (Calibrate.cpp). docs/Runtime.md documents the options.
//
//===----------------------------------------------------------------------===//

#include "MoeRun.h"

#include "flex/Runtime/Comm/MpiCommunicator.h"

#ifdef FLEX_HAVE_COMPILER_CAPI
extern "C" FlexStatus flexCompilerRegister(void);
#endif
#ifdef FLEX_MOE_RUN_HAVE_CUDA
#include <cuda_runtime.h>
#endif

#include <iostream>
#include <string>

using namespace flex;
using namespace flex::moerun;

namespace {

/// How many CUDA devices this process sees (for scripts and tests that need
/// GPUs).
int cudaDeviceCount() {
  int count = 0;
#ifdef FLEX_MOE_RUN_HAVE_CUDA
  if (cudaGetDeviceCount(&count) != cudaSuccess)
    count = 0;
#endif
  return count;
}

/// One GPU per rank: the local rank's (or the rank's) modulo the count,
/// before the context takes the current device.
void pickRankDevice(const Options &options) {
#ifdef FLEX_MOE_RUN_HAVE_CUDA
  if (options.device == "cuda" && ranks.size > 1) {
    int count = 0;
    if (cudaGetDeviceCount(&count) == cudaSuccess && count > 0) {
      int local = localRankFromEnvironment();
      cudaSetDevice((local >= 0 ? local : ranks.rank) % count);
    } else {
      cudaGetLastError();
    }
  }
#else
  (void)options;
#endif
}

} // namespace

int main(int argc, char **argv) {
  if (argc == 2 && std::string(argv[1]) == "--cuda-devices") {
    std::cout << cudaDeviceCount() << "\n";
    return 0;
  }
  startRanks(&argc, &argv);
  Options options = parseOptions(argc, argv);
  if (ranks.environment && options.device != "cuda")
    fatal(2, "started torchrun-style (RANK, WORLD_SIZE) without MPI: such "
             "ranks talk through NCCL, so they need --device cuda; start CPU "
             "ranks with mpirun");
  pickRankDevice(options);
#ifdef FLEX_HAVE_COMPILER_CAPI
  flexCompilerRegister();
#endif
  int code = options.calibrate.empty() ? runCommand(options)
                                        : calibrateCommand(options);
  finalizeMpi();
  return code;
}
