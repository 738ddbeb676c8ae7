//===- moe-run.cpp - Run, time and check one MoE layer plan ---------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements moe-run: it loads a plan (or compiles a .mlir layer
// through flexCompileLayer when a compiler is linked), fills the inputs from
// .npy files or a seeded generator, runs forward (and with --train backward)
// through the C API, prints per-step times, and with --check compares every
// output with the fp64 reference. Under mpirun (or a torchrun-style launch:
// RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) it runs a multi-rank plan, one
// rank per process (rank 0 prints); with --device cuda each rank takes one
// GPU and the NCCL communicator. docs/Runtime.md documents the options.
//
//===----------------------------------------------------------------------===//

#include "Npy.h"

#include "flex-c/Flex.h"
#include "flex/Reference/ReferenceMoE.h"
#include "flex/Runtime/Comm/MpiCommunicator.h"
#include "flex/Runtime/Comm/TcpRendezvous.h"
#include "flex/Runtime/Cpu/Half.h"
#include "flex/Runtime/Executor.h"
#include "flex/Runtime/ExpertSlices.h"
#include "flex/Runtime/PlanLoader.h"

#ifdef FLEX_HAVE_COMPILER_CAPI
extern "C" FlexStatus flexCompilerRegister(void);
#endif
#ifdef FLEX_MOE_RUN_HAVE_CUDA
#include <cuda_runtime.h>
#endif
#ifdef FLEX_HAVE_MPI
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#endif

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

using namespace flex;
namespace fs = std::filesystem;

namespace {

const char *const kUsage = R"(usage: moe-run <plan.json | layer.mlir> [options]
       mpirun -np W moe-run <plan.json> [options]
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
  --variant V       variant name or index (default: FLEX_VARIANT, else the
                    plan's default)
  --iters N         timed iterations (default 1; with N > 1 one untimed
                    warm-up run comes first)
  --device D        cpu (default) or cuda: with cuda the arguments live in
                    device memory (inputs copied in, outputs copied back for
                    --outputs and --check) and times come from CUDA events
  --graph           cuda: record each pass as a CUDA graph and replay it
                    (plans with a fixed capacity and padded layout; others
                    run step by step); per-step times then come from the
                    first, eager run
  --no-align        on W ranks, do not start each call together: by default
                    the ranks meet in a host barrier before every forward and
                    backward, so a pass's time is not the wait for a rank
                    whose host resumed later after the previous call's
                    synchronize (see bench/RESULTS.md, Run 11)
  --check-nan       reject NaN/Inf in inputs and outputs
  --check-overlap   also reject workspace buffers that share bytes while
                    both are live (checks the compiler's memory plan)
  --json            print one JSON object instead of text
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
exit status: 0 ok, 1 run or check failed, 2 bad usage or input.
)";

struct Options {
  std::string path;
  uint64_t seed = 0;
  std::string inputsDir, saveInputsDir, outputsDir, variant;
  bool train = false, check = false, json = false, checkNan = false;
  bool checkOverlap = false;
  int64_t iters = 1;
  std::string device = "cpu";
  bool graph = false;
  bool align = true;
};

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

Options parseOptions(int argc, char **argv) {
  Options options;
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
        usageError("--seed needs an integer in [0, 2^64), got '" + text +
                   "'");
      options.seed = seed;
    } else if (arg == "--inputs") {
      options.inputsDir = value();
    } else if (arg == "--save-inputs") {
      options.saveInputsDir = value();
    } else if (arg == "--outputs") {
      options.outputsDir = value();
    } else if (arg == "--variant") {
      options.variant = value();
    } else if (arg == "--iters") {
      options.iters = parseInteger(arg, value(), 1);
    } else if (arg == "--train") {
      options.train = true;
    } else if (arg == "--check") {
      options.check = true;
    } else if (arg == "--json") {
      options.json = true;
    } else if (arg == "--check-nan") {
      options.checkNan = true;
    } else if (arg == "--check-overlap") {
      options.checkOverlap = true;
    } else if (arg == "--device") {
      options.device = value();
      if (options.device != "cpu" && options.device != "cuda")
        usageError("--device needs cpu or cuda, got '" + options.device + "'");
    } else if (arg == "--graph") {
      options.graph = true;
    } else if (arg == "--no-align") {
      options.align = false;
    } else if (!arg.empty() && arg[0] == '-') {
      usageError("unknown option '" + arg + "'");
    } else if (options.path.empty()) {
      options.path = arg;
    } else {
      usageError("more than one input file: '" + options.path + "' and '" +
                 arg + "'");
    }
  }
  if (options.path.empty())
    usageError("no plan or layer file given");
  if (options.graph && options.device != "cuda")
    usageError("--graph needs --device cuda");
  return options;
}

//===----------------------------------------------------------------------===//
// Random inputs
//===----------------------------------------------------------------------===//

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

/// N(0, 1) samples, a pure function of (seed, name, index).
struct NormalStream {
  uint64_t state;
  NormalStream(uint64_t seed, const std::string &name) {
    uint64_t hash = 0xcbf29ce484222325ull; // FNV-1a of the name
    for (char c : name)
      hash = (hash ^ static_cast<uint8_t>(c)) * 0x100000001b3ull;
    state = splitmix64(seed ^ splitmix64(hash));
  }
  /// Skips n samples (each takes two states).
  void skip(int64_t n) { state += 2 * static_cast<uint64_t>(n); }
  double next() {
    uint64_t a = splitmix64(state++), b = splitmix64(state++);
    double u1 = ((a >> 11) + 0.5) * 0x1p-53, u2 = ((b >> 11) + 0.5) * 0x1p-53;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
  }
};

double randomStd(const std::string &name, const FlexLayerConfig &layer) {
  if (name == "wg" || name == "w1" || name == "w3")
    return 1.0 / std::sqrt(static_cast<double>(layer.model_dim));
  if (name == "w2")
    return 1.0 / std::sqrt(static_cast<double>(layer.hidden_dim));
  if (name == "b1" || name == "b2")
    return 0.1;
  return 1.0; // x, grad_out
}

void storeValue(uint8_t *data, DType dtype, int64_t i, double value) {
  switch (dtype) {
  case DType::F32: {
    float v = static_cast<float>(value);
    std::memcpy(data + 4 * i, &v, 4);
    break;
  }
  case DType::BF16: {
    uint16_t v = cpu::floatToBf16(static_cast<float>(value));
    std::memcpy(data + 2 * i, &v, 2);
    break;
  }
  case DType::F16: {
    uint16_t v = cpu::floatToF16(static_cast<float>(value));
    std::memcpy(data + 2 * i, &v, 2);
    break;
  }
  case DType::I32: {
    int32_t v = static_cast<int32_t>(value);
    std::memcpy(data + 4 * i, &v, 4);
    break;
  }
  }
}

double loadValue(const uint8_t *data, DType dtype, int64_t i) {
  switch (dtype) {
  case DType::F32: {
    float v;
    std::memcpy(&v, data + 4 * i, 4);
    return v;
  }
  case DType::BF16: {
    uint16_t v;
    std::memcpy(&v, data + 2 * i, 2);
    return cpu::bf16ToFloat(v);
  }
  case DType::F16: {
    uint16_t v;
    std::memcpy(&v, data + 2 * i, 2);
    return cpu::f16ToFloat(v);
  }
  case DType::I32: {
    int32_t v;
    std::memcpy(&v, data + 4 * i, 4);
    return v;
  }
  }
  return 0;
}

//===----------------------------------------------------------------------===//
// Running
//===----------------------------------------------------------------------===//

struct ArgumentBuffer {
  FlexArgumentInfo info;
  std::vector<int64_t> shape;
  DType dtype;
  std::vector<uint8_t> data;
  std::string source; ///< "random", "file", "output"

  int64_t count() const {
    int64_t n = 1;
    for (int64_t dim : shape)
      n *= dim;
    return n;
  }
  std::vector<double> values() const {
    std::vector<double> result(count());
    for (int64_t i = 0; i < count(); ++i)
      result[i] = loadValue(data.data(), dtype, i);
    return result;
  }
};

//===----------------------------------------------------------------------===//
// Ranks
//===----------------------------------------------------------------------===//

/// This process among the ranks of an MPI launch (rank 0 of 1 otherwise),
/// with the fp64 reductions the summary and --check need.
struct Ranks {
  int rank = 0;
  int size = 1;
  bool mpi = false; ///< MPI is running
  /// A torchrun-style launch: the reductions below go through rank 0 over
  /// TCP (set up once the NCCL communicator is).
  bool environment = false;
  std::unique_ptr<TcpRendezvous> tcp;

  /// Every rank's values through the TCP rendezvous, [size][n].
  std::vector<double> tcpGather(const std::vector<double> &values) const;

  void maxInPlace(std::vector<double> &values) const {
    if (tcp && size > 1) {
      std::vector<double> all = tcpGather(values);
      for (int r = 0; r < size; ++r)
        for (size_t i = 0; i < values.size(); ++i)
          values[i] = std::max(values[i], all[r * values.size() + i]);
      return;
    }
#ifdef FLEX_HAVE_MPI
    if (mpi && size > 1)
      MPI_Allreduce(MPI_IN_PLACE, values.data(),
                    static_cast<int>(values.size()), MPI_DOUBLE, MPI_MAX,
                    MPI_COMM_WORLD);
#endif
    (void)values;
  }
  void sumInPlace(std::vector<double> &values) const {
    if (tcp && size > 1) {
      std::vector<double> all = tcpGather(values);
      for (size_t i = 0; i < values.size(); ++i) {
        double sum = 0; // in rank order, as MPI_SUM on one host
        for (int r = 0; r < size; ++r)
          sum += all[r * values.size() + i];
        values[i] = sum;
      }
      return;
    }
#ifdef FLEX_HAVE_MPI
    if (mpi && size > 1)
      MPI_Allreduce(MPI_IN_PLACE, values.data(),
                    static_cast<int>(values.size()), MPI_DOUBLE, MPI_SUM,
                    MPI_COMM_WORLD);
#endif
    (void)values;
  }
  /// Every rank's `values` (one size on all ranks), in rank order.
  std::vector<double> gather(const std::vector<double> &values) const {
    if (tcp && size > 1)
      return tcpGather(values);
    std::vector<double> all(values.size() * size);
#ifdef FLEX_HAVE_MPI
    if (mpi && size > 1) {
      MPI_Allgather(values.data(), static_cast<int>(values.size()), MPI_DOUBLE,
                    all.data(), static_cast<int>(values.size()), MPI_DOUBLE,
                    MPI_COMM_WORLD);
      return all;
    }
#endif
    return values;
  }
  /// Returns once every rank has called it.
  void barrier() const {
    if (tcp && size > 1) {
      (void)tcpGather({0.0});
      return;
    }
#ifdef FLEX_HAVE_MPI
    if (mpi && size > 1)
      MPI_Barrier(MPI_COMM_WORLD);
#endif
  }
  /// `dir` on one rank, `dir/rank<r>` on many.
  std::string dir(const std::string &dir) const {
    return size > 1 ? (fs::path(dir) / ("rank" + std::to_string(rank))).string()
                    : dir;
  }
};

Ranks ranks;

std::vector<double> Ranks::tcpGather(const std::vector<double> &values) const {
  std::vector<double> all(values.size() * size);
  Status status = tcp->allGather(
      values.data(), static_cast<int64_t>(values.size() * sizeof(double)),
      all.data(), "moe-run results");
  if (!status) {
    std::cerr << "moe-run: rank " << rank << ": " << status.message() << "\n";
    std::exit(1);
  }
  return all;
}

[[noreturn]] void fatal(int code, const std::string &message) {
  std::cerr << "moe-run: "
            << (ranks.size > 1 ? "rank " + std::to_string(ranks.rank) + ": "
                               : std::string())
            << message << "\n";
#ifdef FLEX_HAVE_MPI
  // The other ranks may wait in a collective: end them too.
  if (ranks.mpi && ranks.size > 1) {
    std::cerr.flush();
    MPI_Abort(MPI_COMM_WORLD, code);
  }
#endif
  std::exit(code);
}

void checkApi(FlexStatus status, const char *what) {
  if (status != FLEX_STATUS_OK)
    fatal(status == FLEX_STATUS_INVALID_PLAN || status == FLEX_STATUS_IO_ERROR ||
                  status == FLEX_STATUS_UNAVAILABLE ||
                  status == FLEX_STATUS_NOT_FOUND
              ? 2
              : 1,
          std::string(what) + " failed (" + flexStatusName(status) +
              "): " + flexGetLastError());
}

std::string readFile(const std::string &path) {
  std::ifstream file(path, std::ios::binary);
  if (!file)
    fatal(2, "cannot open '" + path + "'");
  std::ostringstream text;
  text << file.rdbuf();
  return text.str();
}

struct StepTimes {
  std::vector<std::string> ops;
  std::vector<double> totalMicros; ///< summed over stepRuns runs
  int64_t stepRuns = 0;
  std::vector<double> runs; ///< whole-pass time of each timed run

  /// Adds the last run's step times (when it has them) and, when `timed`,
  /// its whole-pass time.
  void add(FlexExecutable exe, bool timed) {
    int64_t count = 0;
    checkApi(flexExecutableGetNumStepTimings(exe, &count), "step timings");
    if (count > 0 && (ops.empty() || static_cast<int64_t>(ops.size()) == count)) {
      if (ops.empty()) {
        ops.resize(count);
        totalMicros.assign(count, 0);
      }
      for (int64_t i = 0; i < count; ++i) {
        const char *op = nullptr;
        double micros = 0;
        checkApi(flexExecutableGetStepTiming(exe, i, &op, &micros),
                 "step timing");
        ops[i] = op;
        totalMicros[i] += micros;
      }
      ++stepRuns;
    }
    if (timed) {
      double total = 0;
      checkApi(flexExecutableGetLastRunMicros(exe, &total), "run time");
      runs.push_back(total);
    }
  }
  double stepMean(size_t i) const {
    return stepRuns ? totalMicros[i] / static_cast<double>(stepRuns) : 0.0;
  }
  double mean() const {
    double sum = 0;
    for (double run : runs)
      sum += run;
    return runs.empty() ? 0.0 : sum / static_cast<double>(runs.size());
  }
  double quantile(double q) const {
    if (runs.empty())
      return 0.0;
    std::vector<double> sorted = runs;
    std::sort(sorted.begin(), sorted.end());
    return sorted[static_cast<size_t>(q * static_cast<double>(sorted.size() - 1) + 0.5)];
  }
};

/// Device copies of the arguments for --device cuda.
struct DeviceBuffers {
  std::vector<void *> data;
  ~DeviceBuffers() {
#ifdef FLEX_MOE_RUN_HAVE_CUDA
    for (void *p : data)
      if (p)
        cudaFree(p);
#endif
  }
};

#ifdef FLEX_MOE_RUN_HAVE_CUDA
void checkCudaCall(cudaError_t error, const std::string &what) {
  if (error != cudaSuccess)
    fatal(1, what + " failed: " + cudaGetErrorName(error) + " (" +
                 cudaGetErrorString(error) + ")");
}
#endif

} // namespace

int main(int argc, char **argv) {
  // For scripts and tests that need GPUs: how many this process sees.
  if (argc == 2 && std::string(argv[1]) == "--cuda-devices") {
    int count = 0;
#ifdef FLEX_MOE_RUN_HAVE_CUDA
    if (cudaGetDeviceCount(&count) != cudaSuccess)
      count = 0;
#endif
    std::cout << count << "\n";
    return 0;
  }
  // Under mpirun (or mpiexec, srun) each process is one rank.
  if (isLaunchedByMpi()) {
    Status status = initMpi(&argc, &argv);
    if (status.code() == StatusCode::Unavailable) {
      const char *size = std::getenv("OMPI_COMM_WORLD_SIZE");
      if (!size)
        size = std::getenv("PMI_SIZE");
      if (size && std::string(size) != "1")
        fatal(2, "started by an MPI launcher with " + std::string(size) +
                     " processes, but " + status.message());
    } else if (!status) {
      fatal(2, status.message());
    } else {
      ranks.mpi = true;
#ifdef FLEX_HAVE_MPI
      MPI_Comm_rank(MPI_COMM_WORLD, &ranks.rank);
      MPI_Comm_size(MPI_COMM_WORLD, &ranks.size);
#endif
    }
  } else if (isLaunchedByEnvironment()) {
    // torchrun-style: the rank and size come from the environment.
    RendezvousInfo info;
    if (Status status = readRendezvousEnvironment(info); !status)
      fatal(2, status.message());
    ranks.rank = info.rank;
    ranks.size = info.size;
    ranks.environment = true;
  }
  Options options = parseOptions(argc, argv);
  if (ranks.environment && options.device != "cuda")
    fatal(2, "started torchrun-style (RANK, WORLD_SIZE) without MPI: such "
             "ranks talk through NCCL, so they need --device cuda; start CPU "
             "ranks with mpirun");
#ifdef FLEX_MOE_RUN_HAVE_CUDA
  // One GPU per rank: the local rank's (or the rank's) modulo the count,
  // before the context takes the current device.
  if (options.device == "cuda" && ranks.size > 1) {
    int count = 0;
    if (cudaGetDeviceCount(&count) == cudaSuccess && count > 0) {
      int local = localRankFromEnvironment();
      cudaSetDevice((local >= 0 ? local : ranks.rank) % count);
    } else {
      cudaGetLastError();
    }
  }
#endif
#ifdef FLEX_HAVE_COMPILER_CAPI
  flexCompilerRegister();
#endif

  // The plan text: read, or compiled from MLIR.
  std::string planText;
  bool isMlir = fs::path(options.path).extension() == ".mlir";
  if (isMlir) {
    std::string mlir = readFile(options.path);
    FlexCompileOptions compileOptions{};
    compileOptions.struct_size = sizeof(FlexCompileOptions);
    compileOptions.world_size = ranks.size;
    compileOptions.rank = ranks.rank;
    compileOptions.training = options.train ? 1 : 0;
    char *json = nullptr;
    FlexStatus status = flexCompileLayerToPlan(mlir.data(), mlir.size(),
                                               &compileOptions, &json);
    if (status == FLEX_STATUS_UNAVAILABLE)
      fatal(2, "cannot run '" + options.path + "': " + flexGetLastError());
    checkApi(status, ("compiling '" + options.path + "'").c_str());
    planText = json;
    flexFreeString(json);
  } else {
    planText = readFile(options.path);
  }

  FlexContext context = nullptr;
  {
    FlexStatus status = flexContextCreate(options.device.c_str(), &context);
    if (status == FLEX_STATUS_UNAVAILABLE)
      fatal(2, "--device " + options.device + ": " + flexGetLastError());
    checkApi(status, ("creating the " + options.device + " context").c_str());
  }
  const bool onDevice = options.device == "cuda";
  FlexExecutable exe = nullptr;
  {
    FlexStatus status = flexExecutableCreateFromPlan(
        context, planText.data(), planText.size(), &exe);
    if (status != FLEX_STATUS_OK)
      fatal(2, "cannot load '" + options.path + "' (" +
                   flexStatusName(status) + "): " + flexGetLastError());
  }
  // The C++ view of the same plan, for what the C API does not expose (the
  // capacity alignment of the variant, for the reference).
  Plan plan;
  PlanCheckOptions checkOptions;
  checkOptions.checkWorkspaceOverlap = options.checkOverlap;
  if (Status status = parsePlan(planText, plan, checkOptions); !status)
    fatal(2, "'" + options.path + "': " + status.message());

  // The ranks: a plan for W ranks needs W processes.
  int32_t world = 1;
  checkApi(flexExecutableGetWorldSize(exe, &world), "world size");
  if (ranks.mpi || ranks.environment) {
    // GPU ranks exchange device memory through NCCL, CPU ranks through MPI.
    FlexCommunicator communicator = nullptr;
    if (onDevice && world > 1) {
      FlexStatus status =
          ranks.environment
              ? flexCommunicatorCreateNcclFromEnv(-1, &communicator)
              : flexCommunicatorCreateNcclFromMpi(nullptr, -1, &communicator);
      if (status == FLEX_STATUS_UNAVAILABLE)
        fatal(2, "--device cuda on " + std::to_string(world) +
                     " ranks: " + flexGetLastError());
      checkApi(status, "creating the NCCL communicator");
    } else {
      checkApi(flexCommunicatorCreateMpi(nullptr, &communicator),
               "creating the MPI communicator");
    }
    if (ranks.environment) {
      // moe-run's own reductions (times, --check) meet at the same port.
      RendezvousInfo info;
      Status status = readRendezvousEnvironment(info);
      if (status)
        status = TcpRendezvous::connect(info, ranks.tcp);
      if (!status)
        fatal(1, status.message());
    }
    FlexStatus status = flexExecutableSetCommunicator(exe, communicator);
    flexCommunicatorDestroy(communicator);
    // A plan for other ranks is bad usage (2); a failed transport, such as
    // a sub-communicator that could not be split, a failed run (1).
    if (status != FLEX_STATUS_OK)
      fatal(status == FLEX_STATUS_COMMUNICATION_ERROR ||
                    status == FLEX_STATUS_INTERNAL
                ? 1
                : 2,
            "'" + options.path + "': " + flexGetLastError());
  } else if (world > 1) {
    fatal(2, "'" + options.path + "' runs on " + std::to_string(world) +
                 " ranks (world.size); start it with mpirun -np " +
                 std::to_string(world) + " moe-run ..." +
                 (flexHasMpi() ? ""
                               : " (this moe-run was built without MPI: "
                                 "install an MPI and reconfigure)"));
  }

  if (!options.variant.empty()) {
    FlexStatus status =
        flexExecutableSelectVariantByName(exe, options.variant.c_str());
    if (status == FLEX_STATUS_NOT_FOUND) {
      int64_t index = resolveVariant(plan, options.variant);
      if (index < 0)
        fatal(2, "--variant '" + options.variant +
                     "' names no variant: " + flexGetLastError());
      status = flexExecutableSelectVariant(exe, index);
    }
    checkApi(status, "selecting the variant");
  }
  int64_t variant = 0;
  checkApi(flexExecutableGetSelectedVariant(exe, &variant), "variant");
  const char *variantName = nullptr;
  checkApi(flexExecutableGetVariantName(exe, variant, &variantName), "name");

  FlexLayerConfig layer;
  checkApi(flexExecutableGetLayerConfig(exe, &layer), "layer");
  int32_t training = 0;
  checkApi(flexExecutableIsTraining(exe, &training), "training");
  if (options.train && !training)
    fatal(2, "--train needs a training plan; '" + options.path +
                 "' was compiled for inference (training false)");

  // Arguments: fill inputs, poison outputs so an unwritten element shows.
  int64_t numArguments = 0;
  checkApi(flexExecutableGetNumArguments(exe, &numArguments), "arguments");
  std::vector<ArgumentBuffer> args(numArguments);
  std::vector<std::string> missing;
  for (int64_t i = 0; i < numArguments; ++i) {
    ArgumentBuffer &arg = args[i];
    checkApi(flexExecutableGetArgument(exe, i, &arg.info), "argument");
    arg.shape.assign(arg.info.shape, arg.info.shape + arg.info.rank);
    arg.dtype = static_cast<DType>(arg.info.dtype);
    arg.data.assign(arg.info.bytes, 0);
    std::string name = arg.info.name;
    bool isInput = arg.info.role == FLEX_ROLE_INPUT ||
                   (arg.info.role == FLEX_ROLE_GRAD_INPUT && options.train);
    if (!isInput) {
      for (int64_t e = 0; e < arg.count(); ++e)
        storeValue(arg.data.data(), arg.dtype, e,
                   std::numeric_limits<double>::quiet_NaN());
      arg.source = "output";
      continue;
    }
    std::string file =
        options.inputsDir.empty()
            ? std::string()
            : (fs::path(ranks.dir(options.inputsDir)) / (name + ".npy"))
                  .string();
    if (!file.empty() && fs::exists(file)) {
      if (Status status = npy::readAs(file, arg.dtype, arg.shape, arg.data);
          !status)
        fatal(2, "input '" + name + "': " + status.message());
      arg.source = "file";
      continue;
    }
    if (!file.empty() && arg.info.role == FLEX_ROLE_INPUT) {
      missing.push_back(file);
      continue;
    }
    arg.source = "random";
    if (name == "grad_l_aux") {
      storeValue(arg.data.data(), arg.dtype, 0, 1.0);
      continue;
    }
    // One global layer on every rank: a rank's experts [L, ...] are its
    // slice of the global [E, ...] stream. Tokens differ per rank (rank 0
    // draws what one rank draws).
    bool perRank = name == "x" || name == "grad_out";
    NormalStream stream(options.seed,
                        perRank && ranks.rank > 0
                            ? name + "@rank" + std::to_string(ranks.rank)
                            : name);
    bool expertParam = name == "w1" || name == "w2" || name == "w3" ||
                       name == "b1" || name == "b2";
    double stddev = randomStd(name, layer);
    if (expertParam && plan.shards() > 1) {
      // A shard is not contiguous in the global [E, ...] stream (w1, w3
      // take columns): draw the global parameter and keep the shard.
      // W shards of h / s units each; b2 [d] is one expert's whole row.
      int64_t globalCount = name == "b2"
                                ? plan.layer.experts * plan.layer.modelDim
                                : arg.count() * world;
      std::vector<double> global(globalCount);
      for (double &value : global)
        value = stddev * stream.next();
      std::vector<double> slice =
          sliceExpertParameter(plan.layer, world, ranks.rank, name, global);
      for (int64_t e = 0; e < arg.count(); ++e)
        storeValue(arg.data.data(), arg.dtype, e, slice[e]);
      continue;
    }
    if (expertParam && world > 1)
      stream.skip(ranks.rank * arg.count());
    for (int64_t e = 0; e < arg.count(); ++e)
      storeValue(arg.data.data(), arg.dtype, e, stddev * stream.next());
  }
  if (!missing.empty()) {
    std::string list;
    for (const std::string &file : missing)
      list += "\n  " + file;
    fatal(2, "--inputs: these input files are missing:" + list);
  }
  if (!options.saveInputsDir.empty()) {
    std::string saveDir = ranks.dir(options.saveInputsDir);
    fs::create_directories(saveDir);
    for (const ArgumentBuffer &arg : args)
      if (arg.source != "output")
        if (Status status = npy::writeFrom(
                (fs::path(saveDir) / (std::string(arg.info.name) + ".npy"))
                    .string(),
                arg.dtype, arg.shape, arg.data.data());
            !status)
          fatal(1, status.message());
  }

  // With --device cuda every argument gets device memory: inputs are
  // copied in, outputs start as the same NaN poison.
  DeviceBuffers device;
  std::vector<FlexBinding> bindings;
  for (ArgumentBuffer &arg : args) {
    void *data = arg.data.data();
    if (onDevice) {
#ifdef FLEX_MOE_RUN_HAVE_CUDA
      void *buffer = nullptr;
      checkCudaCall(cudaMalloc(&buffer, std::max<int64_t>(arg.info.bytes, 1)),
                    std::string("cudaMalloc for '") + arg.info.name + "'");
      device.data.push_back(buffer);
      checkCudaCall(cudaMemcpy(buffer, arg.data.data(), arg.info.bytes,
                               cudaMemcpyHostToDevice),
                    std::string("copying '") + arg.info.name + "' in");
      data = buffer;
#else
      fatal(2, "--device cuda: moe-run was built without CUDA");
#endif
    }
    bindings.push_back({arg.info.name, data, arg.info.bytes});
  }
  FlexRunOptions runOptions{};
  runOptions.struct_size = sizeof(FlexRunOptions);
  runOptions.flags = (options.checkNan ? FLEX_RUN_CHECK_NONFINITE : 0) |
                     (options.graph ? FLEX_RUN_CUDA_GRAPH : 0);

  // Runs: warm-up when iterating (with --graph two: the eager run and the
  // one that records), then the timed ones. The eager runs' step times are
  // kept, as a replayed graph has none.
  StepTimes forwardTimes, backwardTimes;
  int64_t warmup = options.graph ? 2 : (options.iters > 1 ? 1 : 0);
  for (int64_t iter = 0; iter < warmup + options.iters; ++iter) {
    bool timed = iter >= warmup;
    // Each call synchronizes (for its times), so the ranks' hosts resume at
    // different moments; without the barrier the first collective of the
    // next pass absorbs that skew.
    if (options.align)
      ranks.barrier();
    checkApi(flexExecutableForward(exe, bindings.data(), bindings.size(),
                                   &runOptions),
             "forward");
    if (timed || options.graph)
      forwardTimes.add(exe, timed);
    if (options.train) {
      if (options.align)
        ranks.barrier();
      checkApi(flexExecutableBackward(exe, bindings.data(), bindings.size(),
                                      &runOptions),
               "backward");
      if (timed || options.graph)
        backwardTimes.add(exe, timed);
    }
  }
#ifdef FLEX_MOE_RUN_HAVE_CUDA
  if (onDevice) {
    checkCudaCall(cudaDeviceSynchronize(), "waiting for the device");
    for (size_t i = 0; i < args.size(); ++i)
      checkCudaCall(cudaMemcpy(args[i].data.data(), device.data[i],
                               args[i].info.bytes, cudaMemcpyDeviceToHost),
                    std::string("copying '") + args[i].info.name + "' back");
  }
#endif

  // Times: the largest over ranks (a step ends when its slowest rank does).
  for (StepTimes *times : {&forwardTimes, &backwardTimes}) {
    ranks.maxInPlace(times->totalMicros);
    ranks.maxInPlace(times->runs);
  }

  if (!options.outputsDir.empty()) {
    std::string outputsDir = ranks.dir(options.outputsDir);
    fs::create_directories(outputsDir);
    for (const ArgumentBuffer &arg : args) {
      bool written = arg.info.role == FLEX_ROLE_OUTPUT ||
                     (options.train && arg.info.role == FLEX_ROLE_GRAD_OUTPUT);
      if (!written)
        continue;
      std::string file =
          (fs::path(outputsDir) / (std::string(arg.info.name) + ".npy"))
              .string();
      if (Status status =
              npy::writeFrom(file, arg.dtype, arg.shape, arg.data.data());
          !status)
        fatal(1, status.message());
    }
  }

  // --check: every output and gradient against the fp64 reference.
  struct CheckResult {
    std::string name;
    double error;
    bool pass;
  };
  std::vector<CheckResult> checks;
  double tolerance = static_cast<DType>(layer.dtype) == DType::F32 ? 1e-5 : 2e-2;
  double routingMargin = std::numeric_limits<double>::quiet_NaN();
  bool checkFailed = false;
  if (options.check) {
    auto find = [&](const std::string &name) -> ArgumentBuffer * {
      for (ArgumentBuffer &arg : args)
        if (arg.info.name == name)
          return &arg;
      return nullptr;
    };
    auto valuesOf = [&](const char *name) {
      ArgumentBuffer *arg = find(name);
      return arg ? arg->values() : std::vector<double>();
    };
    // On W ranks: the one-rank layer on this rank's tokens with the global
    // weights (every rank's slice, gathered). With per-rank capacity that
    // is exactly what the W-rank layer computes for these tokens.
    auto global = [&](const char *name) {
      return world > 1 ? assembleExpertParameter(plan.layer, world, name,
                                                 ranks.gather(valuesOf(name)))
                       : valuesOf(name);
    };
    LayerConfig config = plan.layer;
    reference::LayerInputs inputs;
    inputs.x = valuesOf("x");
    inputs.wg = valuesOf("wg");
    inputs.w1 = global("w1");
    inputs.b1 = global("b1");
    inputs.w2 = global("w2");
    inputs.b2 = global("b2");
    inputs.w3 = global("w3");
    reference::ReferenceOptions refOptions;
    for (const Step &step : plan.variants[variant].forward)
      if (step.op == StepOp::Gate) {
        refOptions.capacityAlignment = step.attrs.capacityAlignment;
        // The gate's attributes are what the plan runs.
        config.gateNoise = step.attrs.noise;
        config.seed = step.attrs.seed;
      }
    reference::LayerForward forward;
    reference::LayerGradients grads;
    if (options.train) {
      grads = reference::referenceBackward(config, inputs,
                                           valuesOf("grad_out"),
                                           valuesOf("grad_l_aux").at(0),
                                           refOptions, &forward);
    } else {
      forward = reference::referenceForward(config, inputs, refOptions);
    }
    routingMargin = reference::routingMargins(config, forward.routing).logitGap;
    // An expert weight's gradient sums over every rank's tokens: the
    // reference's, summed over ranks, in this rank's slice.
    // A b2 replicated over the shards of an expert gets its whole gradient
    // on each of them.
    auto expertGradient = [&](const char *name, std::vector<double> grad) {
      if (world == 1 || grad.empty())
        return grad;
      ranks.sumInPlace(grad);
      return sliceExpertParameter(plan.layer, world, ranks.rank, name, grad);
    };
    grads.w1 = expertGradient("w1", grads.w1);
    grads.b1 = expertGradient("b1", grads.b1);
    grads.w2 = expertGradient("w2", grads.w2);
    grads.b2 = expertGradient("b2", grads.b2);
    grads.w3 = expertGradient("w3", grads.w3);
    auto compare = [&](const char *name, const std::vector<double> &want) {
      if (!find(name))
        return;
      double error = reference::relativeL2(valuesOf(name), want);
      checks.push_back({name, error, error <= tolerance});
    };
    compare("out", forward.out);
    compare("l_aux", {forward.lAux});
    if (options.train) {
      compare("grad_x", grads.x);
      compare("grad_wg", grads.wg);
      compare("grad_w1", grads.w1);
      compare("grad_b1", grads.b1);
      compare("grad_w2", grads.w2);
      compare("grad_b2", grads.b2);
      compare("grad_w3", grads.w3);
    }
    // Each result is the worst over ranks (NaN counts as infinite).
    std::vector<double> worst;
    for (const CheckResult &check : checks)
      worst.push_back(std::isnan(check.error)
                          ? std::numeric_limits<double>::infinity()
                          : check.error);
    worst.push_back(-routingMargin);
    ranks.maxInPlace(worst);
    routingMargin = -worst.back();
    for (size_t i = 0; i < checks.size(); ++i) {
      checks[i].error = worst[i];
      checks[i].pass = worst[i] <= tolerance;
      checkFailed |= !checks[i].pass;
    }
  }

  auto layerSummary = [&]() {
    std::ostringstream text;
    text << "T=" << layer.tokens << " d=" << layer.model_dim
         << " h=" << layer.hidden_dim << " E=" << layer.experts
         << " k=" << layer.top_k << " "
         << toString(static_cast<CapacityMode>(layer.capacity_mode))
         << (layer.capacity_mode != FLEX_CAPACITY_DROPLESS
                 ? "(" + std::to_string(layer.capacity_factor).substr(0, 4) +
                       ")"
                 : "")
         << " " << toString(static_cast<ExpertKind>(layer.expert_kind))
         << " " << toString(static_cast<DType>(layer.dtype));
    if (world > 1 && plan.shards() > 1)
      text << " W=" << world << " (each expert sharded over " << plan.shards()
           << " ranks)";
    else if (world > 1)
      text << " W=" << world << " (L=" << layer.experts / world
           << " experts per rank)";
    return text.str();
  };
  auto finish = [&](int code) {
    flexExecutableDestroy(exe);
    flexContextDestroy(context);
    finalizeMpi();
    return code;
  };
  // Rank 0 speaks for all: times and check results are over every rank.
  if (ranks.rank != 0)
    return finish(checkFailed ? 1 : 0);

  if (options.json) {
    nlohmann::ordered_json out;
    out["plan"] = options.path;
    out["layer"] = layerSummary();
    out["variant"] = variantName;
    out["iters"] = options.iters;
    out["seed"] = options.seed;
    out["device"] = options.device;
    out["graph"] = options.graph;
    out["aligned"] = options.align && ranks.size > 1;
    out["ranks"] = ranks.size;
    auto steps = [&](const StepTimes &times) {
      nlohmann::ordered_json list = nlohmann::ordered_json::array();
      for (size_t i = 0; i < times.ops.size(); ++i)
        list.push_back({{"index", i},
                        {"op", times.ops[i]},
                        {"mean_us", times.stepMean(i)}});
      return list;
    };
    auto pass = [&](const StepTimes &times) {
      return nlohmann::ordered_json{{"mean_us", times.mean()},
                                    {"median_us", times.quantile(0.5)},
                                    {"min_us", times.quantile(0.0)},
                                    {"max_us", times.quantile(1.0)},
                                    {"steps", steps(times)}};
    };
    out["forward"] = pass(forwardTimes);
    if (options.train)
      out["backward"] = pass(backwardTimes);
    if (options.check) {
      nlohmann::ordered_json list = nlohmann::ordered_json::array();
      for (const CheckResult &check : checks)
        list.push_back({{"name", check.name},
                        {"relative_l2",
                         std::isfinite(check.error)
                             ? nlohmann::ordered_json(check.error)
                             : nlohmann::ordered_json("inf")},
                        {"pass", check.pass}});
      out["check"] = {{"tolerance", tolerance},
                      {"routing_margin", routingMargin},
                      {"pass", !checkFailed},
                      {"results", list}};
    }
    std::cout << out.dump(2) << "\n";
  } else {
    std::printf("plan     %s\n", options.path.c_str());
    std::printf("layer    %s\n", layerSummary().c_str());
    std::printf("variant  %s (%lld)   iters %lld   seed %llu   device %s%s\n",
                variantName, static_cast<long long>(variant),
                static_cast<long long>(options.iters),
                static_cast<unsigned long long>(options.seed),
                options.device.c_str(), options.graph ? " (graph)" : "");
    if (ranks.size > 1)
      std::printf("ranks    %d (MPI); times are the largest over ranks, the "
                  "check the worst rank's\n",
                  ranks.size);
    auto table = [&](const char *title, const StepTimes &times) {
      double total = times.mean();
      std::printf("%s: %.1f us per call (median %.1f, min %.1f, max %.1f)\n",
                  title, total, times.quantile(0.5), times.quantile(0.0),
                  times.quantile(1.0));
      for (size_t i = 0; i < times.ops.size(); ++i) {
        double mean = times.stepMean(i);
        std::printf("  %2zu %-20s %10.1f us %5.1f%%\n", i, times.ops[i].c_str(),
                    mean, total > 0 ? 100.0 * mean / total : 0.0);
      }
    };
    table("forward", forwardTimes);
    if (options.train)
      table("backward", backwardTimes);
    if (options.check) {
      std::printf("check vs fp64 reference (relative L2, tolerance %.0e):\n",
                  tolerance);
      for (const CheckResult &check : checks)
        std::printf("  %-10s %.3e  %s\n", check.name.c_str(), check.error,
                    check.pass ? "ok" : "FAIL");
      if (checkFailed && routingMargin < 1e-5)
        std::printf("  note: the routing margin is %.1e, close to a tie that "
                    "fp32 cannot resolve; try another --seed\n",
                    routingMargin);
      std::printf("check %s\n", checkFailed ? "FAILED" : "passed");
    }
  }
  return finish(checkFailed ? 1 : 0);
}
