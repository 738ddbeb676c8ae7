//===- Options.cpp - moe-run's command line -------------------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements moe-run's usage text and the parsing of its flags
// into Options; docs/Runtime.md documents the same flags.
//
//===----------------------------------------------------------------------===//

#include "MoeRun.h"

#include <cerrno>
#include <cstdlib>
#include <iostream>
#include <string>

using namespace flex::moerun;

namespace {

const char *const kUsage = R"(usage: moe-run <plan.json | layer.mlir> [options]
       mpirun -np W moe-run <plan.json> [options]
       [mpirun -np W] moe-run --calibrate PROFILE.json [--quick] [--json]
                      [--device cuda] [plan.json ...]
       RANK=r WORLD_SIZE=W MASTER_ADDR=host MASTER_PORT=p moe-run ...

Runs one MoE layer: loads a plan (a .mlir layer is compiled first, which
needs the compiler library), fills its inputs, runs forward (and backward
with --train) and prints per-step times. A plan for W ranks (world.size)
runs under an MPI launcher with W processes, one rank each; rank 0 prints
the times (the largest over ranks) and the check. With --device cuda each
rank uses GPU (local rank mod GPU count) and the NCCL communicator; such
ranks may also be started without MPI, torchrun-style, from RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT (rank 0 listens on that port, or
on FLEX_RENDEZVOUS_PORT, or under torchrun on MASTER_PORT + 1).

options:
  --seed N          seed of the random inputs (default 0)
  --inputs DIR      read inputs from DIR/<argument>.npy (every input must be
                    there; grad_out and grad_l_aux fall back to random / 1.0)
  --save-inputs DIR write the inputs used to DIR/<argument>.npy
  --outputs DIR     write out.npy, l_aux.npy (and grad_*.npy with --train)
  --train           run backward too (needs a training plan)
  --check           compare with the fp64 reference ([num-1]: relative L2
                    <= 1e-5 for f32, 2e-2 for bf16/f16)
  --variant V       variant name or index, or auto: the cost model picks it
                    per call (default: FLEX_VARIANT, else auto when the plan
                    has several variants)
  --profile FILE    the device profile auto and --explain predict with
                    (from --calibrate; default FLEX_PROFILE; missing, stale
                    or corrupt: the built-in profile, and --explain says why)
  --explain         print per variant the predicted per-stage and total
                    time, the measured time and error, and which variant was
                    chosen and why (docs/CostModel.md)
  --iters N         timed iterations (default 1)
  --warmup N        untimed calls before the timed ones (default 1, so the
                    first call's one-time costs are not timed; --graph makes
                    at least 2: the eager run and the one that records)
  --settle N        with auto: a call in which it measures a variant it
                    explores is not timed (at most N such calls; each is
                    followed by the warm-up again), so the timed calls run
                    its settled choice; the report counts them (0: off,
                    the default)
  --device D        cpu (default) or cuda: with cuda the arguments live in
                    device memory (inputs copied in, outputs copied back for
                    --outputs and --check) and times come from CUDA events
  --graph           cuda: record each pass as a CUDA graph and replay it
                    where the backend can (a fixed capacity; a dynamic
                    routing whose grouped GEMMs size themselves on the
                    device; an aligned layout's forward; others run step by
                    step); per-step times then come from the first, eager
                    run, and the report counts the replayed passes
  --require-graph   --graph, and exit 1 unless every timed pass replayed
  --require-forward-graph
                    --graph, and exit 1 unless every timed forward replayed
  --no-align        on W ranks, do not start each call together: by default
                    the ranks meet in a host barrier before every forward and
                    backward, so a pass's time is not the wait for a rank
                    whose host resumed later after the previous call's
                    synchronize (see bench/RESULTS.md, Run 11)
  --check-nan       reject NaN/Inf in inputs and outputs
  --check-overlap   accepted for old scripts: the loader always rejects
                    workspace buffers that share bytes while both are live
  --json            print one JSON object instead of text
  --calibrate FILE  measure the cost model's device profile on this machine
                    (GEMM throughput, memory bandwidth, launch cost; under
                    mpirun the collectives' alpha and beta too) and write it
                    to FILE (docs/CostModel.md). With --device cuda: the
                    current GPU, one rank. Plans given with it (one-rank
                    plans, any number) are run and timed, and each step
                    kind's fixed cost and rate are fitted to their steps
  --quick           with --calibrate: small shapes, a fraction of a second
  --help            this text
  --cuda-devices    (alone) print how many CUDA devices are usable and exit

random inputs (a splitmix64 + Box-Muller stream per argument, seeded by
--seed and the argument name): x ~ N(0, 1); wg, w1, w3 ~ N(0, 1/d);
w2 ~ N(0, 1/h) (std 1/sqrt(fan_in)); b1, b2 ~ N(0, 0.01); grad_out ~ N(0, 1);
grad_l_aux = 1. Values are rounded to the argument's dtype. On W ranks every
rank draws the global parameters ([E, ...]) and keeps its experts
r*L .. r*L+L-1; x and grad_out are drawn per rank (rank 0 as on one rank).
--inputs, --save-inputs and --outputs then use DIR/rank<r>/.

.npy files: f32 '<f4', f16 '<f2', i32 '<i4'; bf16 is written as '<f4' (exact)
and read from '<u2' (raw bits) or '<f4'/'<f8' (rounded to nearest even).
exit status: 0 ok; 1 the run or the check failed (a failed collective or
transport included); 2 bad usage or bad input: a layer that does not
compile or verify, a bad plan, a missing file.
)";

[[noreturn]] void usageError(const std::string &message) {
  std::cerr << "moe-run: " << message << "\n(moe-run --help for usage)\n";
  std::exit(2);
}

int64_t parseInteger(const std::string &flag, const std::string &text,
                     int64_t min) {
  errno = 0;
  char *end = nullptr;
  long long value = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end || errno == ERANGE || value < min)
    usageError(flag + " needs an integer >= " + std::to_string(min) +
               ", got '" + text + "'");
  return value;
}

} // namespace

Options flex::moerun::parseOptions(int argc, char **argv) {
  Options options;
  std::vector<std::string> files; // the plan, or with --calibrate its plans
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc)
        usageError(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--help" || arg == "-h") {
      std::cout << kUsage;
      std::exit(0);
    } else if (arg == "--seed") {
      std::string text = value();
      errno = 0;
      char *end = nullptr;
      unsigned long long seed = std::strtoull(text.c_str(), &end, 10);
      if (text.empty() || *end || errno == ERANGE || text[0] == '-')
        usageError("--seed needs an integer in [0, 2^64), got '" + text + "'");
      options.seed = seed;
    } else if (arg == "--inputs") {
      options.inputsDir = value();
    } else if (arg == "--save-inputs") {
      options.saveInputsDir = value();
    } else if (arg == "--outputs") {
      options.outputsDir = value();
    } else if (arg == "--variant") {
      options.variant = value();
    } else if (arg == "--profile") {
      options.profile = value();
    } else if (arg == "--explain") {
      options.explain = true;
    } else if (arg == "--iters") {
      options.iters = parseInteger(arg, value(), 1);
    } else if (arg == "--warmup") {
      options.warmup = parseInteger(arg, value(), 0);
    } else if (arg == "--settle") {
      options.settle = parseInteger(arg, value(), 0);
    } else if (arg == "--train") {
      options.train = true;
    } else if (arg == "--check") {
      options.check = true;
    } else if (arg == "--json") {
      options.json = true;
    } else if (arg == "--check-nan") {
      options.checkNan = true;
    } else if (arg == "--check-overlap") {
      // Plan format 2: the liveness check always runs.
    } else if (arg == "--device") {
      options.device = value();
      if (options.device != "cpu" && options.device != "cuda")
        usageError("--device needs cpu or cuda, got '" + options.device + "'");
    } else if (arg == "--graph") {
      options.graph = true;
    } else if (arg == "--require-graph") {
      options.graph = options.requireGraph = true;
    } else if (arg == "--require-forward-graph") {
      options.graph = options.requireForwardGraph = true;
    } else if (arg == "--no-align") {
      options.align = false;
    } else if (arg == "--calibrate") {
      options.calibrate = value();
    } else if (arg == "--quick") {
      options.quick = true;
    } else if (!arg.empty() && arg[0] == '-') {
      usageError("unknown option '" + arg + "'");
    } else {
      files.push_back(arg);
    }
  }
  if (!options.calibrate.empty()) {
    options.calibratePlans = std::move(files);
    return options;
  }
  if (files.size() > 1)
    usageError("more than one input file: '" + files[0] + "' and '" + files[1] +
               "'");
  if (!files.empty())
    options.path = files.front();
  if (options.quick)
    usageError("--quick goes with --calibrate");
  if (options.path.empty())
    usageError("no plan or layer file given");
  if (options.graph && options.device != "cuda")
    usageError("--graph needs --device cuda");
  return options;
}
