//===- GateBench.cpp - The CUDA gate, stage by stage, against its floor ---===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// flex-gate-bench [--iters N] [--router-only]: times cuda::gate's pipelines
// (legacy: one thread per token; tile: the 32-row shared-memory token kernel;
// lanes: a lane group per token, routed in its last block where that applies;
// lane-scan: the lane kernel, then the scan and location kernels; one-block:
// the whole gate in one launch, where it applies; auto: what cuda::gate
// takes) on the same card in one process,
// for the issue-13 shapes, with CUDA events: the whole gate (two events) and
// each launch (an event after each, through the gate's stage hook), medians
// of N runs after warm-up. The floor is reading the logits once and writing
// scores, indices, gates and locations once at the device-to-device copy
// bandwidth measured here. Every pipeline's outputs are compared with the
// legacy one's (integers and floats bit for bit, l_aux to 1e-6); a mismatch
// fails the run (exit 1). A router section times cuda::router's few-token
// kernel and GEMM path (bf16 x, fp32 wg, d 2048, E 64) at T 32 to 2048 and
// reports their largest difference relative to the largest logit.
//
//===----------------------------------------------------------------------===//

#include "GateInternal.h"
#include "RouterInternal.h"

#include "CudaBenchSupport.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

using namespace flex;
using flex::cuda::detail::GatePath;
using flex::cuda::detail::RouterPath;

namespace {

using flex::bench::median;

struct Shape {
  const char *name;
  int64_t tokens, experts, k;
  bool batchPrioritized;
  double noise;
};

/// Device outputs of one gate.
struct Outputs {
  float *scores, *gates, *lAux;
  int32_t *indices, *locations, *capacity, *offsets, *rows;
  Outputs(int64_t T, int64_t E, int64_t k) {
    FLEX_BENCH_CHECK(cudaMalloc(&scores, 4 * T * E));
    FLEX_BENCH_CHECK(cudaMalloc(&gates, 4 * T * k));
    FLEX_BENCH_CHECK(cudaMalloc(&lAux, 4));
    FLEX_BENCH_CHECK(cudaMalloc(&indices, 4 * T * k));
    FLEX_BENCH_CHECK(cudaMalloc(&locations, 4 * T * k));
    FLEX_BENCH_CHECK(cudaMalloc(&capacity, 4));
    FLEX_BENCH_CHECK(cudaMalloc(&offsets, 4 * (E + 1)));
    FLEX_BENCH_CHECK(cudaMalloc(&rows, 4 * E));
  }
  ~Outputs() {
    for (void *p : std::initializer_list<void *>{
             scores, gates, lAux, indices, locations, capacity, offsets, rows})
      cudaFree(p);
  }
  GateOutputs view() const {
    return {scores, indices, locations, gates, capacity, offsets, rows, lAux};
  }
};

/// The stage hook: an event after each launch, from a pool.
struct StageEvents {
  cudaStream_t stream;
  std::vector<cudaEvent_t> pool;
  std::vector<std::string> names;
  size_t used = 0;
  static void record(void *user, const char *stage) {
    auto *self = static_cast<StageEvents *>(user);
    if (self->used == self->pool.size()) {
      cudaEvent_t event;
      FLEX_BENCH_CHECK(cudaEventCreate(&event));
      self->pool.push_back(event);
    }
    FLEX_BENCH_CHECK(cudaEventRecord(self->pool[self->used], self->stream));
    self->names.resize(self->used + 1);
    self->names[self->used++] = stage;
  }
};

double copyBandwidth(cudaStream_t stream) {
  const size_t bytes = size_t{256} << 20;
  void *a = nullptr, *b = nullptr;
  FLEX_BENCH_CHECK(cudaMalloc(&a, bytes));
  FLEX_BENCH_CHECK(cudaMalloc(&b, bytes));
  FLEX_BENCH_CHECK(cudaMemset(a, 1, bytes));
  cudaEvent_t start, stop;
  FLEX_BENCH_CHECK(cudaEventCreate(&start));
  FLEX_BENCH_CHECK(cudaEventCreate(&stop));
  std::vector<double> times;
  for (int i = 0; i < 12; ++i) {
    FLEX_BENCH_CHECK(cudaEventRecord(start, stream));
    FLEX_BENCH_CHECK(
        cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, stream));
    FLEX_BENCH_CHECK(cudaEventRecord(stop, stream));
    FLEX_BENCH_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    FLEX_BENCH_CHECK(cudaEventElapsedTime(&ms, start, stop));
    if (i >= 2)
      times.push_back(ms * 1e-3);
  }
  cudaFree(a);
  cudaFree(b);
  return 2.0 * static_cast<double>(bytes) / median(times); // read + write
}

struct PathTimes {
  double total = 0;
  std::vector<std::pair<std::string, double>> stages; // median us
};

PathTimes timePath(cuda::KernelContext &ctx, const float *logits,
                   const Shape &s, const GateAttrs &attrs, const Outputs &out,
                   GatePath path, int iters) {
  cudaStream_t stream = ctx.stream();
  cudaEvent_t start, stop;
  FLEX_BENCH_CHECK(cudaEventCreate(&start));
  FLEX_BENCH_CHECK(cudaEventCreate(&stop));
  auto run = [&](StageEvents *events) {
    Status status = cuda::detail::gateWith(
        ctx, logits, s.tokens, s.experts, attrs, out.view(), path,
        events ? &StageEvents::record : nullptr, events);
    if (!status) {
      std::fprintf(stderr, "gate failed: %s\n", status.message().c_str());
      std::exit(2);
    }
  };
  for (int i = 0; i < 3; ++i)
    run(nullptr);
  FLEX_BENCH_CHECK(cudaStreamSynchronize(stream));
  std::vector<double> totals;
  std::map<std::string, std::vector<double>> perStage;
  std::vector<std::string> order;
  StageEvents events{stream, {}, {}, 0};
  for (int i = 0; i < iters; ++i) {
    FLEX_BENCH_CHECK(cudaEventRecord(start, stream));
    run(nullptr);
    FLEX_BENCH_CHECK(cudaEventRecord(stop, stream));
    FLEX_BENCH_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    FLEX_BENCH_CHECK(cudaEventElapsedTime(&ms, start, stop));
    totals.push_back(ms * 1e3);
    // The same gate with an event after each launch.
    events.used = 0;
    FLEX_BENCH_CHECK(cudaEventRecord(start, stream));
    run(&events);
    FLEX_BENCH_CHECK(cudaStreamSynchronize(stream));
    cudaEvent_t previous = start;
    for (size_t e = 0; e < events.used; ++e) {
      FLEX_BENCH_CHECK(cudaEventElapsedTime(&ms, previous, events.pool[e]));
      if (!perStage.count(events.names[e]))
        order.push_back(events.names[e]);
      perStage[events.names[e]].push_back(ms * 1e3);
      previous = events.pool[e];
    }
  }
  PathTimes times;
  times.total = median(totals);
  for (const std::string &name : order)
    times.stages.push_back({name, median(perStage[name])});
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return times;
}

template <typename T> std::vector<T> download(const T *device, int64_t count) {
  std::vector<T> host(static_cast<size_t>(count));
  FLEX_BENCH_CHECK(cudaMemcpy(host.data(), device, sizeof(T) * count,
                              cudaMemcpyDeviceToHost));
  return host;
}

/// Integers and floats bit for bit (any NaN equals any NaN), l_aux to 1e-6.
std::string compare(const Outputs &a, const Outputs &b, const Shape &s) {
  const int64_t T = s.tokens, E = s.experts, k = std::min(s.k, s.experts);
  auto sameFloats = [](const std::vector<float> &x,
                       const std::vector<float> &y) {
    for (size_t i = 0; i < x.size(); ++i)
      if (std::memcmp(&x[i], &y[i], 4) != 0 &&
          !(std::isnan(x[i]) && std::isnan(y[i])))
        return false;
    return true;
  };
  if (download(a.indices, T * k) != download(b.indices, T * k))
    return "indices differ";
  if (download(a.locations, T * k) != download(b.locations, T * k))
    return "locations differ";
  if (!sameFloats(download(a.gates, T * k), download(b.gates, T * k)))
    return "gates differ";
  if (!sameFloats(download(a.scores, T * E), download(b.scores, T * E)))
    return "scores differ";
  if (download(a.capacity, 1) != download(b.capacity, 1) ||
      download(a.offsets, E + 1) != download(b.offsets, E + 1) ||
      download(a.rows, E) != download(b.rows, E))
    return "capacity/offsets/rows differ";
  float la = download(a.lAux, 1)[0], lb = download(b.lAux, 1)[0];
  if (!(std::abs(la - lb) <= 1e-6 * std::abs(lb)) &&
      !(std::isnan(la) && std::isnan(lb)))
    return "l_aux differs";
  return "ok";
}

/// cuda::router's paths for bf16 x and an fp32 wg (d 2048, E 64, the
/// decode layer's router): the few-token kernel with its split-sum kernel
/// and with the splits added in its last block, and the GEMM path; median
/// times and the largest difference between the first and the GEMM (the
/// two few-token forms must agree bit for bit).
void benchRouter(cuda::KernelContext &ctx, int iters) {
  const int64_t d = 2048, E = 64;
  std::printf("\nrouter, bf16 x, f32 wg, d %lld, E %lld (us)\n%8s %10s %10s "
              "%10s %12s\n",
              static_cast<long long>(d), static_cast<long long>(E), "T",
              "few-token", "last-split", "gemm", "max diff/max");
  std::mt19937_64 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> weights(d * E);
  for (float &w : weights)
    w = normal(rng) * 0.02f;
  float *wg = nullptr;
  FLEX_BENCH_CHECK(cudaMalloc(&wg, 4 * d * E));
  FLEX_BENCH_CHECK(
      cudaMemcpy(wg, weights.data(), 4 * d * E, cudaMemcpyHostToDevice));
  cudaStream_t stream = ctx.stream();
  cudaEvent_t start, stop;
  FLEX_BENCH_CHECK(cudaEventCreate(&start));
  FLEX_BENCH_CHECK(cudaEventCreate(&stop));
  for (int64_t T : {32, 128, 256, 512, 2048}) {
    std::vector<uint16_t> bits(T * d);
    for (uint16_t &b : bits) { // bf16: the top half of an fp32
      float v = normal(rng);
      uint32_t u;
      std::memcpy(&u, &v, 4);
      b = static_cast<uint16_t>(u >> 16);
    }
    void *x = nullptr;
    float *logits[3] = {};
    FLEX_BENCH_CHECK(cudaMalloc(&x, 2 * T * d));
    FLEX_BENCH_CHECK(
        cudaMemcpy(x, bits.data(), 2 * T * d, cudaMemcpyHostToDevice));
    double us[3];
    const RouterPath routerPaths[3] = {RouterPath::FewTokens,
                                       RouterPath::FewTokensLastSplit,
                                       RouterPath::Gemm};
    for (int p = 0; p < 3; ++p) {
      FLEX_BENCH_CHECK(cudaMalloc(&logits[p], 4 * T * E));
      auto run = [&] {
        Status status =
            cuda::detail::routerWith(ctx, {x, DType::BF16}, {wg, DType::F32},
                                     logits[p], T, d, E, routerPaths[p]);
        if (!status) {
          std::fprintf(stderr, "router failed: %s\n", status.message().c_str());
          std::exit(2);
        }
      };
      for (int i = 0; i < 3; ++i)
        run();
      std::vector<double> times;
      for (int i = 0; i < iters; ++i) {
        FLEX_BENCH_CHECK(cudaEventRecord(start, stream));
        run();
        FLEX_BENCH_CHECK(cudaEventRecord(stop, stream));
        FLEX_BENCH_CHECK(cudaEventSynchronize(stop));
        float ms = 0;
        FLEX_BENCH_CHECK(cudaEventElapsedTime(&ms, start, stop));
        times.push_back(ms * 1e3);
      }
      us[p] = median(times);
    }
    std::vector<float> a = download(logits[0], T * E),
                       split = download(logits[1], T * E),
                       b = download(logits[2], T * E);
    if (std::memcmp(a.data(), split.data(), 4 * a.size()) != 0) {
      std::fprintf(stderr,
                   "router: the last-split sums differ from the "
                   "split-sum kernel's at T %lld\n",
                   static_cast<long long>(T));
      std::exit(1);
    }
    double diff = 0.0, largest = 0.0;
    for (size_t i = 0; i < a.size(); ++i) {
      diff = std::max(diff, static_cast<double>(std::abs(a[i] - b[i])));
      largest = std::max(largest, static_cast<double>(std::abs(b[i])));
    }
    std::printf("%8lld %10.1f %10.1f %10.1f %12.2e\n",
                static_cast<long long>(T), us[0], us[1], us[2], diff / largest);
    cudaFree(x);
    for (float *l : logits)
      cudaFree(l);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaFree(wg);
}

} // namespace

int main(int argc, char **argv) {
  int iters = 25;
  bool routerOnly = false;
  for (int i = 1; i < argc; ++i)
    if (!std::strcmp(argv[i], "--router-only"))
      routerOnly = true;
    else if (!std::strcmp(argv[i], "--iters") && i + 1 < argc)
      iters = std::max(1, std::atoi(argv[++i]));
  std::unique_ptr<cuda::KernelContext> ctx;
  if (Status s = cuda::KernelContext::create(ctx); !s) {
    std::fprintf(stderr, "no CUDA device: %s\n", s.message().c_str());
    return 2;
  }
  cudaDeviceProp prop{};
  FLEX_BENCH_CHECK(cudaGetDeviceProperties(&prop, 0));
  const double bandwidth = copyBandwidth(ctx->stream());
  std::printf("gpu: %s, copy bandwidth %.0f GB/s (read + write), %d runs\n",
              prop.name, bandwidth * 1e-9, iters);
  if (routerOnly) {
    benchRouter(*ctx, iters);
    return 0;
  }

  const std::vector<Shape> shapes = {
      {"C3 T16384 E64 k6", 16384, 64, 6, false, 0.0},
      {"C3 T16384 E64 k6 bp", 16384, 64, 6, true, 0.0},
      {"C3 T16384 E64 k6 noise", 16384, 64, 6, false, 1.0},
      {"top1 T16384 E32 k1", 16384, 32, 1, false, 0.0},
      {"T16384 E256 k8", 16384, 256, 8, false, 0.0},
      {"T16384 E8 k2", 16384, 8, 2, false, 0.0},
      {"T2048 E64 k6", 2048, 64, 6, false, 0.0},
      {"T680 E64 k6", 680, 64, 6, false, 0.0},
      {"T512 E64 k6", 512, 64, 6, false, 0.0},
      {"decode T256 E64 k6", 256, 64, 6, false, 0.0},
      {"decode T256 E64 k6 bp", 256, 64, 6, true, 0.0},
      {"T128 E64 k8", 128, 64, 8, false, 0.0},
      {"T32 E64 k6", 32, 64, 6, false, 0.0},
  };
  const std::pair<GatePath, const char *> paths[] = {
      {GatePath::Legacy, "legacy"},      {GatePath::Tile, "tile"},
      {GatePath::Lanes, "lanes"},        {GatePath::LanesScan, "lane-scan"},
      {GatePath::OneBlock, "one-block"}, {GatePath::Auto, "auto"}};
  constexpr int kPaths = sizeof(paths) / sizeof(paths[0]);
  struct Row {
    std::string name;
    double us[kPaths];
    double floor;
    std::string match;
  };
  std::vector<Row> table;
  bool allMatch = true;
  for (const Shape &s : shapes) {
    const int64_t T = s.tokens, E = s.experts, k = std::min(s.k, s.experts);
    std::mt19937_64 rng(7 + static_cast<uint64_t>(E * 131 + k));
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> host(static_cast<size_t>(T * E));
    for (float &v : host)
      v = normal(rng);
    for (int64_t t = 0; t < T; t += 7) // exact ties
      host[t * E + E - 1] = host[t * E];
    float *logits = nullptr;
    FLEX_BENCH_CHECK(cudaMalloc(&logits, 4 * T * E));
    FLEX_BENCH_CHECK(
        cudaMemcpy(logits, host.data(), 4 * T * E, cudaMemcpyHostToDevice));
    GateAttrs attrs;
    attrs.topK = s.k;
    attrs.capacityMode = CapacityMode::Fixed;
    attrs.capacityFactor = 1.0;
    attrs.batchPrioritized = s.batchPrioritized;
    attrs.noise = s.noise;
    attrs.seed = 11;
    const bool oneBlock = cuda::detail::gateOneBlockApplies(
        T, E, s.k, s.batchPrioritized && T > 0);
    std::printf("\n%s (fused paths %s, one-block %s)\n", s.name,
                cuda::detail::gateFusedApplies(E, s.k) ? "apply" : "n/a",
                oneBlock ? "applies" : "n/a");
    Row row{s.name, {}, (8.0 * T * E + 12.0 * T * k) / bandwidth * 1e6, "ok"};
    std::unique_ptr<Outputs> reference;
    for (int p = 0; p < kPaths; ++p) {
      row.us[p] = -1.0;
      if (paths[p].first == GatePath::OneBlock && !oneBlock)
        continue;
      auto out = std::make_unique<Outputs>(T, E, k);
      PathTimes times =
          timePath(*ctx, logits, s, attrs, *out, paths[p].first, iters);
      row.us[p] = times.total;
      std::printf("  %-9s total %8.1f us:", paths[p].second, times.total);
      for (auto &[name, us] : times.stages)
        std::printf("  %s %.1f", name.c_str(), us);
      std::printf("\n");
      if (!reference) {
        reference = std::move(out);
        continue;
      }
      std::string match = compare(*out, *reference, s);
      if (match != "ok") {
        row.match = std::string(paths[p].second) + ": " + match;
        allMatch = false;
      }
    }
    table.push_back(row);
    cudaFree(logits);
  }
  std::printf("\n%-24s", "shape (us)");
  for (const auto &path : paths)
    std::printf(" %9s", path.second);
  std::printf(" %8s %9s  %s\n", "floor", "auto/flr", "paths==legacy");
  for (const Row &r : table) {
    std::printf("%-24s", r.name.c_str());
    for (double us : r.us)
      if (us < 0)
        std::printf(" %9s", "-");
      else
        std::printf(" %9.1f", us);
    std::printf(" %8.1f %9.1f  %s\n", r.floor, r.us[kPaths - 1] / r.floor,
                r.match.c_str());
  }
  benchRouter(*ctx, iters);
  return allMatch ? 0 : 1;
}
