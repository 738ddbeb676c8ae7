//===- CalibrateCudaExchange.cpp - The CUDA calibration on several ranks -===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements calibrateCuda's part on W ranks with a device (NCCL)
// communicator: on an exchange stream of the highest priority, as the
// backend's, Flex's own exchange (allToAllBlocks, a block per peer and local
// expert), all_gather, reduce_scatter and all_reduce at two sizes (alpha and
// beta), and the two slowdowns (a GEMM loop beside an exchange loop, each
// timed alone and together); every figure is the slowest rank's.
//
//===----------------------------------------------------------------------===//

#include "CalibrateCudaSupport.h"

#include "flex/Runtime/CostModel/Calibrate.h"

#include <cmath>
#include <cstdlib>

namespace flex::calibrate_cuda {

namespace {

//===----------------------------------------------------------------------===//
// Several ranks: collectives and the slowdowns
//===----------------------------------------------------------------------===//

/// Blocks per peer in the timed exchange: a run per (peer, local expert), as
/// Flex sends them in place (AllToAllLayout::blocks).
constexpr int64_t kBlocksPerPeer = 8;

/// A stream destroyed on scope exit.
struct OwnedStream {
  cudaStream_t stream = nullptr;
  ~OwnedStream() {
    if (stream)
      cudaStreamDestroy(stream);
  }
};

/// Times collectives queued on `stream` through `comm`: a warm-up, then
/// `reps` calls between two events, waited for through the communicator
/// (bounded: a dead peer fails the calibration instead of hanging it).
class CollectiveTimer {
public:
  CollectiveTimer(Communicator &comm, cudaStream_t stream)
      : comm_(comm), stream_(stream) {}
  ~CollectiveTimer() {
    for (cudaEvent_t event : {begin_, end_})
      if (event)
        cudaEventDestroy(event);
  }

  /// Seconds of one `body` (a mean over `reps`, the ranks met first).
  Status time(const std::function<Status()> &body, int reps,
              std::string_view what, double &seconds) {
    if (!begin_) {
      FLEX_CAL_CHECK(cudaEventCreate(&begin_), "event create");
      FLEX_CAL_CHECK(cudaEventCreate(&end_), "event create");
    }
    if (Status s = comm_.barrier(what); !s)
      return s;
    if (Status s = body(); !s) // warm-up
      return s;
    FLEX_CAL_CHECK(cudaEventRecord(begin_, stream_), "event");
    for (int rep = 0; rep < reps; ++rep)
      if (Status s = body(); !s)
        return s;
    FLEX_CAL_CHECK(cudaEventRecord(end_, stream_), "event");
    if (Status s = comm_.synchronizeStream(stream_, what); !s)
      return s;
    float ms = 0;
    FLEX_CAL_CHECK(cudaEventElapsedTime(&ms, begin_, end_), "event time");
    seconds = std::max(1e-9, ms * 1e-3 / reps);
    return Status::ok();
  }

private:
  Communicator &comm_;
  cudaStream_t stream_;
  cudaEvent_t begin_ = nullptr, end_ = nullptr;
};

/// Every rank's `values` replaced by the element-wise largest (the slowest
/// rank's), through a device buffer (the communicator moves device memory);
/// every wait bounded by the communicator's.
Status slowestRankOnDevice(Communicator &comm, cudaStream_t stream,
                           std::vector<double> &values) {
  const int W = comm.size();
  const int64_t bytes = static_cast<int64_t>(values.size() * sizeof(double));
  DeviceBuffer send, recv;
  FLEX_CAL_CHECK(cudaMalloc(&send.data, bytes), "calibration gather");
  FLEX_CAL_CHECK(cudaMalloc(&recv.data, bytes * W), "calibration gather");
  FLEX_CAL_CHECK(
      cudaMemcpy(send.data, values.data(), bytes, cudaMemcpyHostToDevice),
      "calibration gather");
  if (Status s =
          comm.allGather(send.data, bytes, recv.data, "calibration results");
      !s)
    return s;
  // Wait through the communicator first (a dead peer fails it, bounded);
  // then the copy back has nothing left to wait for.
  if (Status s = comm.synchronizeStream(stream, "calibration results"); !s)
    return s;
  std::vector<double> all(values.size() * W);
  FLEX_CAL_CHECK(
      cudaMemcpy(all.data(), recv.data, bytes * W, cudaMemcpyDeviceToHost),
      "calibration gather");
  for (int r = 0; r < W; ++r)
    for (size_t i = 0; i < values.size(); ++i)
      values[i] = std::max(values[i], all[r * values.size() + i]);
  return Status::ok();
}

/// The device memory of calibrateExchanges, owned by its caller so that a
/// failure aborts the communicator (its kernels stop waiting for peers)
/// before the memory is freed (cudaFree waits for the device).
struct ExchangeBuffers {
  DeviceBuffer send, recv, a, b, c, segments;
};

/// Two points of the exchange as the backend runs it: small runs packed
/// into one block per peer (the auto staging packs runs under 8 MiB), large
/// ones in place, a block of 8 MiB per peer and local expert.
struct ExchangeSizes {
  int64_t small = int64_t(64) << 10; ///< bytes per peer, one block
  int64_t largeBlocks = kBlocksPerPeer;
  int64_t large = kBlocksPerPeer * (int64_t(8) << 20); ///< bytes per peer
  int reps = 20;                                       ///< calls per timing
};

/// Flex's exchange of `perPeer` bytes to each of W peers in `blocks` blocks
/// each, in place (allToAllBlocks).
std::function<Status()> exchangeCall(Communicator &comm, void *send, void *recv,
                                     int64_t perPeer, int64_t blocks) {
  auto list = std::make_shared<std::vector<Communicator::Block>>();
  const int64_t block = perPeer / blocks;
  for (int p = 0; p < comm.size(); ++p)
    for (int64_t l = 0; l < blocks; ++l)
      list->push_back({p, (p * blocks + l) * block, block});
  return [&comm, send, recv, list]() {
    return comm.allToAllBlocks(send, *list, recv, *list,
                               "calibration all_to_all");
  };
}

/// seconds = [all_to_all, all_gather, reduce_scatter, all_reduce] at the
/// small size, then at the large one.
Status timeCollectives(Communicator &comm, CollectiveTimer &timer, void *send,
                       void *recv, const ExchangeSizes &sizes,
                       std::vector<double> &seconds) {
  seconds.assign(8, 0.0);
  for (int size = 0; size < 2; ++size) {
    const int64_t perPeer = size == 0 ? sizes.small : sizes.large;
    const int64_t count = perPeer / 4;
    // all_reduce: sync_capacity's, a few values (its time is its alpha).
    const int64_t values = size == 0 ? 1 : count;
    const std::pair<const char *, std::function<Status()>> calls[] = {
        {"calibration a2a", exchangeCall(comm, send, recv, perPeer,
                                         size == 0 ? 1 : sizes.largeBlocks)},
        {"calibration all_gather",
         [&] {
           return comm.allGather(send, perPeer, recv, "calibration all_gather");
         }},
        {"calibration reduce_scatter",
         [&] {
           return comm.reduceScatterSum(send, recv, count, DType::F32,
                                        "calibration reduce_scatter");
         }},
        {"calibration all_reduce", [&] {
           return comm.allReduceMaxInt32(static_cast<int32_t *>(recv), values,
                                         "calibration all_reduce");
         }}};
    for (int kind = 0; kind < 4; ++kind)
      if (Status s = timer.time(calls[kind].second, sizes.reps,
                                calls[kind].first, seconds[4 * size + kind]);
          !s)
        return s;
  }
  return Status::ok();
}

/// CUDA events destroyed on scope exit.
struct OwnedEvents {
  cudaEvent_t events[4] = {};
  ~OwnedEvents() {
    for (cudaEvent_t event : events)
      if (event)
        cudaEventDestroy(event);
  }
};

/// A loop of GEMMs on the compute stream beside a loop of exchanges on the
/// exchange stream, each timed from its first item's start to its last
/// one's end.
class OverlapRun {
public:
  OverlapRun(Communicator &comm, cudaStream_t compute, cudaStream_t exchange,
             std::function<Status()> gemm, std::function<Status()> oneExchange)
      : comm_(comm), compute_(compute), exchange_(exchange),
        gemm_(std::move(gemm)), exchangeCall_(std::move(oneExchange)) {}

  /// `gemms` GEMMs beside `exchanges` exchanges: interleaved (one of each
  /// while both last) so that each starts beside the other, or, with
  /// `gemmsFirst`, every GEMM queued before the first exchange.
  Status run(int gemms, int exchanges, bool gemmsFirst, double &gemmSeconds,
             double &exchangeSeconds) {
    cudaEvent_t *e = events_.events;
    if (!e[0])
      for (int i = 0; i < 4; ++i)
        FLEX_CAL_CHECK(cudaEventCreate(&e[i]), "event create");
    if (Status s = comm_.barrier("calibration overlap"); !s)
      return s;
    FLEX_CAL_CHECK(cudaEventRecord(e[0], compute_), "event");
    FLEX_CAL_CHECK(cudaEventRecord(e[2], exchange_), "event");
    if (gemmsFirst)
      for (int i = 0; i < gemms; ++i)
        if (Status s = gemm_(); !s)
          return s;
    for (int i = 0; i < std::max(gemms, exchanges); ++i) {
      if (i < exchanges)
        if (Status s = exchangeCall_(); !s)
          return s;
      if (!gemmsFirst && i < gemms)
        if (Status s = gemm_(); !s)
          return s;
    }
    FLEX_CAL_CHECK(cudaEventRecord(e[1], compute_), "event");
    FLEX_CAL_CHECK(cudaEventRecord(e[3], exchange_), "event");
    if (Status s = comm_.synchronizeStream(exchange_, "calibration overlap");
        !s)
      return s;
    FLEX_CAL_CHECK(cudaStreamSynchronize(compute_), "calibration overlap");
    float ms = 0;
    FLEX_CAL_CHECK(cudaEventElapsedTime(&ms, e[0], e[1]), "event");
    gemmSeconds = ms * 1e-3;
    FLEX_CAL_CHECK(cudaEventElapsedTime(&ms, e[2], e[3]), "event");
    exchangeSeconds = ms * 1e-3;
    return Status::ok();
  }

private:
  Communicator &comm_;
  cudaStream_t compute_, exchange_;
  std::function<Status()> gemm_, exchangeCall_;
  OwnedEvents events_;
};

/// The two slowdowns, appended to `seconds` (the slowest rank's reduction
/// follows): compute beside an exchange, an exchange beside compute, then 1
/// for each whose measured loop outlasted the loop meant to cover it.
Status measureSlowdowns(cuda::KernelContext &ctx, Communicator &comm,
                        cudaStream_t exchange, CollectiveTimer &timer,
                        ExchangeBuffers &buffers, const ExchangeSizes &sizes,
                        bool quick, std::vector<double> &seconds) {
  // A loop of one large bf16 grouped GEMM on the compute stream beside a
  // loop of large exchanges, each long enough to cover the other; each
  // side's time together over its time alone.
  Shape gemm{8, quick ? 1024 : 2048, 4096, 4096, DType::BF16, false};
  const size_t elem = dtypeSize(gemm.dtype);
  const size_t aBytes = gemm.groups * gemm.m * gemm.k * elem;
  const size_t bBytes = gemm.groups * gemm.k * gemm.n * elem;
  FLEX_CAL_CHECK(cudaMalloc(&buffers.a.data, aBytes), "calibration A");
  FLEX_CAL_CHECK(cudaMalloc(&buffers.b.data, bBytes), "calibration B");
  FLEX_CAL_CHECK(
      cudaMalloc(&buffers.c.data, gemm.groups * gemm.m * gemm.n * elem),
      "calibration C");
  FLEX_CAL_CHECK(
      cudaMalloc(&buffers.segments.data, (2 * 64 + 1) * sizeof(int32_t)),
      "calibration segments");
  if (Status s = fillRandom(buffers.a.data, aBytes); !s)
    return s;
  if (Status s = fillRandom(buffers.b.data, bBytes); !s)
    return s;
  auto *segments = static_cast<int32_t *>(buffers.segments.data);
  Timer computeTimer(ctx.stream());
  double gemmAlone = 0;
  if (Status s = timeGemm(ctx, computeTimer, gemm, buffers.a.data,
                          buffers.b.data, buffers.c.data, segments, gemmAlone);
      !s)
    return s;
  cuda::ExpertRowSpace space; // over the segments timeGemm wrote
  space.offsets = segments;
  space.rows = segments + gemm.groups + 1;
  space.experts = gemm.groups;
  space.rowBound = gemm.groups * gemm.m;
  space.staticCapacity = gemm.m;
  space.padded = true;
  auto oneGemm = [&ctx, &buffers, gemm, space] {
    return cuda::groupedGemm(ctx, {buffers.a.data, gemm.dtype},
                             {buffers.b.data, gemm.dtype}, {},
                             {buffers.c.data, gemm.dtype}, gemm.k, gemm.n,
                             space, GroupedGemmOptions{});
  };
  auto bigExchange = exchangeCall(comm, buffers.send.data, buffers.recv.data,
                                  sizes.large, sizes.largeBlocks);
  double exchangeAlone = 0;
  if (Status s =
          timer.time(bigExchange, sizes.reps, "calibration a2a", exchangeAlone);
      !s)
    return s;
  // The loop counts below come from these: the slowest rank's, on every
  // rank alike (a rank with one exchange more would wait for a peer that
  // never sends).
  std::vector<double> alone{gemmAlone, exchangeAlone};
  if (Status s = slowestRankOnDevice(comm, exchange, alone); !s)
    return s;
  gemmAlone = alone[0];
  exchangeAlone = alone[1];
  OverlapRun overlap(comm, ctx.stream(), exchange, oneGemm, bigExchange);
  // Compute beside an exchange: exchanges for three times the GEMMs' time.
  const int gemms = quick ? 3 : 10;
  const int cover =
      static_cast<int>(std::ceil(3.0 * gemms * gemmAlone / exchangeAlone)) + 1;
  double gemmBeside = 0, exchangeLoop = 0;
  if (Status s = overlap.run(gemms, cover, /*gemmsFirst=*/false, gemmBeside,
                             exchangeLoop);
      !s)
    return s;
  // An exchange beside compute: GEMMs for twelve times the exchanges' time
  // alone (slowed up to 12x, they stay covered; checked below).
  const int exchanges = quick ? 2 : 5;
  const int gemmCover = static_cast<int>(std::ceil(12.0 * exchanges *
                                                   exchangeAlone / gemmAlone)) +
                        1;
  double gemmLoop = 0, exchangeBeside = 0;
  if (Status s = overlap.run(gemmCover, exchanges, /*gemmsFirst=*/true,
                             gemmLoop, exchangeBeside);
      !s)
    return s;
  seconds.push_back(gemmBeside / (gemms * gemmAlone));
  seconds.push_back(exchangeBeside / (exchanges * exchangeAlone));
  seconds.push_back(exchangeLoop >= gemmBeside ? 0.0 : 1.0);
  seconds.push_back(gemmLoop >= exchangeBeside ? 0.0 : 1.0);
  return Status::ok();
}

/// The ranks of this host: the launcher's word (torchrun, Open MPI, MPICH,
/// Slurm), else all W of them (one host, as the lent machines are).
int64_t ranksPerNodeFromLauncher(int64_t W) {
  for (const char *name : {"LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE",
                           "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"})
    if (const char *value = std::getenv(name)) {
      const long n = std::strtol(value, nullptr, 10);
      if (n >= 1 && n <= W && W % n == 0)
        return n;
    }
  return W;
}

/// The profile's collectives, slowdowns and notes from the slowest rank's
/// `seconds` (timeCollectives' 8, then measureSlowdowns' 4).
void writeExchangeProfile(const Communicator &comm,
                          const RuntimeOptions &runtime,
                          const ExchangeSizes &sizes,
                          const std::vector<double> &seconds,
                          DeviceProfile &profile, std::string &notes) {
  const int W = comm.size();
  profile.worldSize = W;
  profile.ranksPerNode = ranksPerNodeFromLauncher(W);
  profile.collectives.clear();
  const double others = W - 1;
  // The bytes that leave this rank, as getStepWork counts them; all_reduce
  // (sync_capacity) counts its values once.
  const double small = static_cast<double>(sizes.small);
  const double large = static_cast<double>(sizes.large);
  const double bytes0[] = {small * others, small * others, small * others, 4.0};
  const double bytes1[] = {large * others, large * others, large * others,
                           large};
  const std::string transport =
      runtime.a2aTransport == AllToAllTransport::CopyEngine ? "ce" : "nccl";
  for (int kind = 0; kind < 4; ++kind) {
    CollectivePoint point;
    point.kind = static_cast<CollectiveKind>(kind);
    point.worldSize = point.groupSize = W;
    // The exchange's own transport (the copy engines or NCCL's kernels);
    // the other collectives always run through NCCL.
    point.transport = kind == 0 ? transport : std::string(comm.name());
    fitCollectivePoint(bytes0[kind], seconds[kind], bytes1[kind],
                       seconds[4 + kind], point);
    profile.collectives.push_back(point);
  }
  profile.overlapSlowdown = std::max(1.0, seconds[8]);
  profile.exchangeSlowdown = std::max(1.0, seconds[9]);
  notes = "W = " + std::to_string(W) +
          " GPUs: gemm through cuda::groupedGemm (cuBLAS, fp32 "
          "accumulation, no TF32) on rank 0's GPU; collectives timed on a "
          "highest-priority stream through the '" +
          std::string(comm.name()) + "' communicator (exchange transport " +
          transport + "), the slowest rank's mean of " +
          std::to_string(sizes.reps) +
          " calls: all_to_all at 64 KiB per peer in one block and at " +
          std::to_string(sizes.large >> 20) + " MiB per peer in " +
          std::to_string(sizes.largeBlocks) +
          " blocks of 8 MiB (as the backend packs small runs and sends large "
          "ones in place); overlap: a bf16 grouped GEMM loop beside an "
          "exchange loop, each side's time together over alone";
  if (seconds[10] > 0)
    notes += "; the exchanges ended before the GEMMs on some rank: "
             "compute_slowdown is a lower bound";
  if (seconds[11] > 0)
    notes += "; the GEMMs ended before the exchanges on some rank: "
             "exchange_slowdown is a lower bound";
}

/// The collectives' points and the two slowdowns on `comm`'s W ranks, on
/// an exchange stream of the highest priority as the backend's (its blocks
/// start as soon as SMs free up).
Status measureExchanges(cuda::KernelContext &ctx, Communicator &comm,
                        const RuntimeOptions &runtime, bool quick,
                        ExchangeBuffers &buffers, DeviceProfile &profile,
                        std::string &notes) {
  const int W = comm.size();
  if (comm.memory() != CommMemory::Device)
    return Status(StatusCode::InvalidArgument,
                  "CUDA calibration on " + std::to_string(W) +
                      " ranks needs a device (NCCL) communicator, got '" +
                      std::string(comm.name()) + "'");
  int least = 0, greatest = 0;
  FLEX_CAL_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest),
                 "stream priorities");
  OwnedStream exchange;
  FLEX_CAL_CHECK(cudaStreamCreateWithPriority(&exchange.stream,
                                              cudaStreamNonBlocking, greatest),
                 "exchange stream");
  if (Status s = comm.setStream(exchange.stream); !s)
    return s;
  // The communicator outlives this stream: it forgets it first.
  struct StreamReset {
    Communicator &comm;
    ~StreamReset() { (void)comm.setStream(nullptr); }
  } reset{comm};
  ExchangeSizes sizes;
  if (quick) {
    sizes.largeBlocks = 2;
    sizes.large = 2 * (int64_t(8) << 20);
    sizes.reps = 5;
  }
  FLEX_CAL_CHECK(cudaMalloc(&buffers.send.data, sizes.large * W),
                 "calibration send");
  FLEX_CAL_CHECK(cudaMalloc(&buffers.recv.data, sizes.large * W),
                 "calibration recv");
  if (Status s = fillRandom(buffers.send.data, sizes.large * W); !s)
    return s;
  CollectiveTimer timer(comm, exchange.stream);
  std::vector<double> seconds;
  if (Status s = timeCollectives(comm, timer, buffers.send.data,
                                 buffers.recv.data, sizes, seconds);
      !s)
    return s;
  if (Status s = measureSlowdowns(ctx, comm, exchange.stream, timer, buffers,
                                  sizes, quick, seconds);
      !s)
    return s;
  if (Status s = slowestRankOnDevice(comm, exchange.stream, seconds); !s)
    return s;
  writeExchangeProfile(comm, runtime, sizes, seconds, profile, notes);
  return Status::ok();
}

} // namespace

/// measureExchanges, the communicator aborted on a failure before the
/// memory goes.
Status calibrateExchanges(cuda::KernelContext &ctx, Communicator &comm,
                          const RuntimeOptions &runtime, bool quick,
                          DeviceProfile &profile, std::string &notes) {
  ExchangeBuffers buffers;
  Status status =
      measureExchanges(ctx, comm, runtime, quick, buffers, profile, notes);
  if (!status)
    comm.abort(status);
  return status;
}

} // namespace flex::calibrate_cuda
