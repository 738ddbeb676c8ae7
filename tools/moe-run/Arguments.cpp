//===- Arguments.cpp - moe-run's inputs and outputs -----------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the arguments of a run: inputs read from .npy files
// or drawn from a seeded generator (a splitmix64 + Box-Muller stream per
// argument, portable unlike std::normal_distribution), outputs poisoned with
// NaN so an unwritten element shows, and the .npy files of --save-inputs and
// --outputs.
//
//===----------------------------------------------------------------------===//

#include "MoeRun.h"
#include "Npy.h"

#include "flex/Runtime/Core/Element.h"
#include "flex/Runtime/ExpertSlices.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <thread>

using namespace flex;
using namespace flex::moerun;
namespace fs = std::filesystem;

namespace {

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

/// Calls store(i, stddev * sample i) for i in [0, count), the samples split
/// over the host's cores: the stream is counter-based (sample i is a pure
/// function of its index), so the values do not depend on the split. A
/// large layer's weights (hundreds of millions of samples) took seconds per
/// run on one core, longer than the timed calls.
template <typename Store>
void drawNormal(const NormalStream &stream, double stddev, int64_t count,
                Store store) {
  constexpr int64_t kPerThreadMin = 1 << 20;
  int64_t threads =
      std::min<int64_t>(std::max(1u, std::thread::hardware_concurrency()),
                        std::max<int64_t>(1, count / kPerThreadMin));
  auto drawRange = [&](int64_t begin, int64_t end) {
    NormalStream local = stream;
    local.skip(begin);
    for (int64_t i = begin; i < end; ++i)
      store(i, stddev * local.next());
  };
  std::vector<std::thread> workers;
  int64_t chunk = (count + threads - 1) / threads;
  for (int64_t t = 1; t < threads; ++t)
    workers.emplace_back(drawRange, std::min(count, t * chunk),
                         std::min(count, (t + 1) * chunk));
  drawRange(0, std::min(count, chunk));
  for (std::thread &worker : workers)
    worker.join();
}

double randomStd(const std::string &name, const FlexLayerConfig &layer) {
  if (name == "wg" || name == "w1" || name == "w3")
    return 1.0 / std::sqrt(static_cast<double>(layer.model_dim));
  if (name == "w2")
    return 1.0 / std::sqrt(static_cast<double>(layer.hidden_dim));
  if (name == "b1" || name == "b2")
    return 0.1;
  return 1.0; // x, grad_out
}

} // namespace

int64_t ArgumentBuffer::count() const {
  int64_t n = 1;
  for (int64_t dim : shape)
    n *= dim;
  return n;
}

std::vector<double> ArgumentBuffer::values() const {
  std::vector<double> result(count());
  for (int64_t i = 0; i < count(); ++i)
    result[i] = loadElement(data.data(), dtype, i);
  return result;
}

ArgumentBuffer *LayerRun::find(const std::string &name) {
  for (ArgumentBuffer &arg : args)
    if (arg.info.name == name)
      return &arg;
  return nullptr;
}

namespace {

/// Draws a random input (docs/Runtime.md): one global layer on every rank,
/// a rank's experts [L, ...] being its slice of the global [E, ...] stream;
/// tokens differ per rank (rank 0 draws what one rank draws).
void fillRandom(const Options &options, const LayerRun &run,
                ArgumentBuffer &arg) {
  std::string name = arg.info.name;
  arg.source = "random";
  if (name == "grad_l_aux") {
    storeElement(arg.data.data(), arg.dtype, 0, 1.0);
    return;
  }
  bool perRank = name == "x" || name == "grad_out";
  NormalStream stream(options.seed,
                      perRank && ranks.rank > 0
                          ? name + "@rank" + std::to_string(ranks.rank)
                          : name);
  bool expertParam = name == "w1" || name == "w2" || name == "w3" ||
                     name == "b1" || name == "b2";
  double stddev = randomStd(name, run.layer);
  if (expertParam && run.plan.shards() > 1) {
    // A shard is not contiguous in the global [E, ...] stream (w1, w3
    // take columns): draw the global parameter and keep the shard.
    // W shards of h / s units each; b2 [d] is one expert's whole row.
    int64_t globalCount = name == "b2"
                              ? run.plan.layer.experts * run.plan.layer.modelDim
                              : arg.count() * run.world;
    std::vector<double> global(globalCount);
    drawNormal(stream, stddev, globalCount,
               [&](int64_t i, double value) { global[i] = value; });
    std::vector<double> slice = sliceExpertParameter(run.plan.layer, run.world,
                                                     ranks.rank, name, global);
    for (int64_t e = 0; e < arg.count(); ++e)
      storeElement(arg.data.data(), arg.dtype, e, slice[e]);
    return;
  }
  if (expertParam && run.world > 1)
    stream.skip(ranks.rank * arg.count());
  drawNormal(stream, stddev, arg.count(), [&](int64_t i, double value) {
    storeElement(arg.data.data(), arg.dtype, i, value);
  });
}

void saveInputs(const Options &options, const LayerRun &run) {
  std::string saveDir = ranks.dir(options.saveInputsDir);
  fs::create_directories(saveDir);
  for (const ArgumentBuffer &arg : run.args)
    if (arg.source != "output")
      if (Status status = npy::writeFrom(
              (fs::path(saveDir) / (std::string(arg.info.name) + ".npy"))
                  .string(),
              arg.dtype, arg.shape, arg.data.data());
          !status)
        fatal(1, status.message());
}

} // namespace

void flex::moerun::prepareArguments(const Options &options, LayerRun &run) {
  int64_t numArguments = 0;
  checkApi(flexExecutableGetNumArguments(run.exe, &numArguments), "arguments");
  run.args.assign(numArguments, ArgumentBuffer());
  std::vector<std::string> missing;
  for (int64_t i = 0; i < numArguments; ++i) {
    ArgumentBuffer &arg = run.args[i];
    checkApi(flexExecutableGetArgument(run.exe, i, &arg.info), "argument");
    arg.shape.assign(arg.info.shape, arg.info.shape + arg.info.rank);
    arg.dtype = static_cast<DType>(arg.info.dtype);
    arg.data.assign(arg.info.bytes, 0);
    std::string name = arg.info.name;
    bool isInput = arg.info.role == FLEX_ROLE_INPUT ||
                   (arg.info.role == FLEX_ROLE_GRAD_INPUT && options.train);
    if (!isInput) {
      for (int64_t e = 0; e < arg.count(); ++e)
        storeElement(arg.data.data(), arg.dtype, e,
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
    fillRandom(options, run, arg);
  }
  if (!missing.empty()) {
    std::string list;
    for (const std::string &file : missing)
      list += "\n  " + file;
    fatal(2, "--inputs: these input files are missing:" + list);
  }
  if (!options.saveInputsDir.empty())
    saveInputs(options, run);
}

void flex::moerun::writeOutputs(const Options &options, const LayerRun &run) {
  std::string outputsDir = ranks.dir(options.outputsDir);
  fs::create_directories(outputsDir);
  for (const ArgumentBuffer &arg : run.args) {
    bool written = arg.info.role == FLEX_ROLE_OUTPUT ||
                   (options.train && arg.info.role == FLEX_ROLE_GRAD_OUTPUT);
    if (!written)
      continue;
    std::string file =
        (fs::path(outputsDir) / (std::string(arg.info.name) + ".npy")).string();
    if (Status status =
            npy::writeFrom(file, arg.dtype, arg.shape, arg.data.data());
        !status)
      fatal(1, status.message());
  }
}
