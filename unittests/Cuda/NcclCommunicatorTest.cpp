//===- NcclCommunicatorTest.cpp - The NCCL communicator on 2 GPUs ---------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file tests the NCCL communicator with two ranks as two threads of
// this process, each on its own GPU, started from one shared unique id:
// every collective against host-computed results, and the bounded wait (a
// rank that never joins the collective fails the other with
// CommunicationError naming it, after aborting NCCL). Without two usable
// GPUs every test skips with the reason.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/Comm/NcclCommunicator.h"
#include "flex/Runtime/Core/Half.h"
#include "flex/Runtime/Cuda/CudaBackend.h"

#include <cuda_runtime.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <functional>
#include <thread>
#include <vector>

using namespace flex;
using ::testing::HasSubstr;

namespace {

constexpr int kRanks = 2;

#define FLEX_SKIP_WITHOUT_GPUS(n)                                              \
  do {                                                                         \
    std::string reason;                                                        \
    if (!::flex::isCudaBackendUsable(&reason))                                 \
      GTEST_SKIP() << "no CUDA device: " << reason;                            \
    int count = 0;                                                             \
    cudaGetDeviceCount(&count);                                                \
    if (count < (n))                                                           \
      GTEST_SKIP() << "needs " << (n) << " GPUs, this machine has " << count;  \
  } while (0)

void onRanks(const std::function<void(int)> &fn) {
  std::vector<std::thread> threads;
  for (int r = 0; r < kRanks; ++r)
    threads.emplace_back(fn, r);
  for (std::thread &thread : threads)
    thread.join();
}

/// The communicators of both ranks, each made on its own thread and GPU;
/// with `peerCopies`, their all-to-alls go through the copy engines, with
/// the handshakes over local (thread) communicators.
std::vector<std::shared_ptr<Communicator>> makeRanks(double timeout,
                                                     bool peerCopies = false) {
  NcclUniqueId id;
  Status status = createNcclUniqueId(id);
  EXPECT_TRUE(status.isOk()) << status.message();
  std::vector<std::shared_ptr<Communicator>> hosts;
  if (peerCopies) {
    EXPECT_TRUE(createLocalCommunicators(kRanks, hosts, timeout).isOk());
  }
  std::vector<std::shared_ptr<Communicator>> ranks(kRanks);
  std::vector<Status> results(kRanks);
  onRanks([&](int r) {
    NcclCommunicatorOptions options;
    options.device = r;
    options.timeoutSeconds = timeout;
    if (peerCopies && r < static_cast<int>(hosts.size())) {
      options.peerCopies = true;
      options.hostAllGather = hostAllGatherOver(hosts[r]);
    }
    results[r] = createNcclCommunicator(ranks[r], id, r, kRanks, options);
  });
  for (int r = 0; r < kRanks; ++r)
    EXPECT_TRUE(results[r].isOk()) << "rank " << r << ": "
                                   << results[r].message();
  return ranks;
}

template <typename T> T *deviceCopy(const std::vector<T> &host) {
  void *data = nullptr;
  EXPECT_EQ(cudaMalloc(&data, std::max<size_t>(host.size() * sizeof(T), 1)),
            cudaSuccess);
  EXPECT_EQ(cudaMemcpy(data, host.data(), host.size() * sizeof(T),
                       cudaMemcpyHostToDevice),
            cudaSuccess);
  return static_cast<T *>(data);
}

template <typename T> std::vector<T> hostCopy(const T *device, size_t count) {
  std::vector<T> host(count);
  EXPECT_EQ(cudaMemcpy(host.data(), device, count * sizeof(T),
                       cudaMemcpyDeviceToHost),
            cudaSuccess);
  return host;
}

TEST(NcclCommunicator, IsADeviceCommunicator) {
  FLEX_SKIP_WITHOUT_GPUS(kRanks);
  auto ranks = makeRanks(60);
  ASSERT_TRUE(ranks[0] && ranks[1]);
  EXPECT_EQ(ranks[1]->name(), "nccl");
  EXPECT_EQ(ranks[1]->rank(), 1);
  EXPECT_EQ(ranks[1]->size(), kRanks);
  EXPECT_EQ(ranks[1]->memory(), CommMemory::Device);
}

/// Every collective of both ranks against host-computed results.
void checkCollectives(const std::vector<std::shared_ptr<Communicator>> &ranks) {
  ASSERT_TRUE(ranks[0] && ranks[1]);
  std::vector<std::string> failures(kRanks);
  onRanks([&](int r) {
    auto check = [&](Status status, const char *what) {
      if (!status && failures[r].empty())
        failures[r] = std::string(what) + ": " + status.message();
      return status.isOk();
    };
    ASSERT_EQ(cudaSetDevice(r), cudaSuccess);
    cudaStream_t stream = nullptr;
    ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
    Communicator &comm = *ranks[r];
    check(comm.setStream(stream), "setStream");

    // allToAll with blocks of different sizes at scattered offsets: to p,
    // (r + 1) * (p + 1) * 8 bytes of value 16 * r + p.
    auto bytes = [](int from, int to) { return int64_t{(from + 1) * (to + 1) * 8}; };
    std::vector<int64_t> sendOffsets(kRanks), sendBytes(kRanks),
        recvOffsets(kRanks), recvBytes(kRanks);
    int64_t sendTotal = 0, recvTotal = 0;
    for (int p = 0; p < kRanks; ++p) {
      sendOffsets[p] = sendTotal + 16; // a gap before each block
      sendBytes[p] = bytes(r, p);
      sendTotal += 16 + sendBytes[p];
      recvOffsets[p] = recvTotal + 32;
      recvBytes[p] = bytes(p, r);
      recvTotal += 32 + recvBytes[p];
    }
    std::vector<uint8_t> sendHost(sendTotal, 0xee);
    for (int p = 0; p < kRanks; ++p)
      std::fill_n(sendHost.begin() + sendOffsets[p], sendBytes[p],
                  static_cast<uint8_t>(16 * r + p));
    uint8_t *send = deviceCopy(sendHost);
    uint8_t *recv = deviceCopy(std::vector<uint8_t>(recvTotal, 0));
    check(comm.allToAll(send, sendOffsets.data(), sendBytes.data(), recv,
                        recvOffsets.data(), recvBytes.data(), "a2a-test"),
          "allToAll");

    // allReduceMaxInt32: [r, 10 - r, -r] -> [1, 10, 0].
    int32_t *values = deviceCopy(std::vector<int32_t>{r, 10 - r, -r});
    check(comm.allReduceMaxInt32(values, 3, "max-test"), "allReduceMax");

    // allGather of 40 bytes of value r + 1.
    uint8_t *mine = deviceCopy(std::vector<uint8_t>(40, r + 1));
    uint8_t *gathered = deviceCopy(std::vector<uint8_t>(40 * kRanks, 0));
    check(comm.allGather(mine, 40, gathered, "gather-test"), "allGather");

    // reduceScatterSum f32 and bf16: send[p][i] = r + p + i / 8.
    const int64_t count = 24;
    std::vector<float> sendF(kRanks * count);
    std::vector<uint16_t> sendB(kRanks * count);
    for (int p = 0; p < kRanks; ++p)
      for (int64_t i = 0; i < count; ++i) {
        float v = static_cast<float>(r + p) + static_cast<float>(i) / 8.0f;
        sendF[p * count + i] = v;
        sendB[p * count + i] = floatToBf16(v);
      }
    float *sendFd = deviceCopy(sendF);
    float *recvFd = deviceCopy(std::vector<float>(count, -1.0f));
    uint16_t *sendBd = deviceCopy(sendB);
    uint16_t *recvBd = deviceCopy(std::vector<uint16_t>(count, 0));
    check(comm.reduceScatterSum(sendFd, recvFd, count, DType::F32, "rs-f32"),
          "reduceScatter f32");
    check(comm.reduceScatterSum(sendBd, recvBd, count, DType::BF16, "rs-bf16"),
          "reduceScatter bf16");
    Status i32 = comm.reduceScatterSum(sendFd, recvFd, count, DType::I32, "x");
    EXPECT_EQ(i32.code(), StatusCode::InvalidArgument);
    check(comm.barrier("barrier-test"), "barrier");
    check(comm.synchronizeStream(stream, "sync-test"), "synchronizeStream");

    std::vector<uint8_t> received = hostCopy(recv, recvTotal);
    for (int p = 0; p < kRanks; ++p)
      for (int64_t b = 0; b < recvBytes[p]; ++b)
        ASSERT_EQ(received[recvOffsets[p] + b], 16 * p + r)
            << "rank " << r << " from " << p << " byte " << b;
    EXPECT_EQ(hostCopy(values, 3), (std::vector<int32_t>{1, 10, 0}));
    std::vector<uint8_t> all = hostCopy(gathered, 40 * kRanks);
    for (int p = 0; p < kRanks; ++p)
      for (int b = 0; b < 40; ++b)
        ASSERT_EQ(all[p * 40 + b], p + 1);
    std::vector<float> sumF = hostCopy(recvFd, count);
    std::vector<uint16_t> sumB = hostCopy(recvBd, count);
    for (int64_t i = 0; i < count; ++i) {
      // Block r of every rank p: p + r + i / 8, summed over p.
      float want = 0;
      for (int p = 0; p < kRanks; ++p)
        want += static_cast<float>(p + r) + static_cast<float>(i) / 8.0f;
      EXPECT_FLOAT_EQ(sumF[i], want) << "rank " << r << " i " << i;
      EXPECT_NEAR(bf16ToFloat(sumB[i]), want, 0.02 * want + 0.01);
    }
    for (void *p : {static_cast<void *>(send), static_cast<void *>(recv),
                    static_cast<void *>(values), static_cast<void *>(mine),
                    static_cast<void *>(gathered), static_cast<void *>(sendFd),
                    static_cast<void *>(recvFd), static_cast<void *>(sendBd),
                    static_cast<void *>(recvBd)})
      cudaFree(p);
    cudaStreamDestroy(stream);
  });
  for (int r = 0; r < kRanks; ++r)
    EXPECT_TRUE(failures[r].empty()) << "rank " << r << ": " << failures[r];
}

TEST(NcclCommunicator, CollectivesOnTwoGpus) {
  FLEX_SKIP_WITHOUT_GPUS(kRanks);
  checkCollectives(makeRanks(60));
}

// The same with the all-to-all through the copy engines (the threads share
// one process, so the copies go to peer memory without IPC handles).
TEST(NcclCommunicator, CollectivesOnTwoGpusWithPeerCopies) {
  FLEX_SKIP_WITHOUT_GPUS(kRanks);
  checkCollectives(makeRanks(60, /*peerCopies=*/true));
}

// Several blocks per peer, each landing where the receiver says, in order,
// into a buffer 256 bytes inside its allocation; twice into the same
// buffer, so the second exchange re-records the events.
TEST(NcclCommunicator, PeerCopiesMoveManyBlocksInPlace) {
  FLEX_SKIP_WITHOUT_GPUS(kRanks);
  auto ranks = makeRanks(60, /*peerCopies=*/true);
  ASSERT_TRUE(ranks[0] && ranks[1]);
  std::vector<std::string> failures(kRanks);
  onRanks([&](int r) {
    ASSERT_EQ(cudaSetDevice(r), cudaSuccess);
    cudaStream_t stream = nullptr;
    ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
    Communicator &comm = *ranks[r];
    ASSERT_TRUE(comm.setStream(stream).isOk());
    // To each peer p, three blocks of (k + 1) * 24 bytes; the receiver
    // lays them out in reverse order with gaps.
    const int64_t total = 4096;
    std::vector<Communicator::Block> sendBlocks, recvBlocks;
    std::vector<uint8_t> sendHost(total, 0xee);
    int64_t at = 8;
    for (int p = 0; p < kRanks; ++p)
      for (int k = 0; k < 3; ++k) {
        int64_t bytes = (k + 1) * 24;
        sendBlocks.push_back({p, at, bytes});
        std::fill_n(sendHost.begin() + at, bytes,
                    static_cast<uint8_t>(64 * r + 8 * p + k));
        at += bytes + 40;
      }
    at = 16;
    std::vector<std::pair<Communicator::Block, int>> expected;
    for (int p = kRanks - 1; p >= 0; --p)
      for (int k = 0; k < 3; ++k) {
        int64_t bytes = (k + 1) * 24;
        recvBlocks.push_back({p, at, bytes});
        expected.push_back({{p, at, bytes}, 64 * p + 8 * r + k});
        at += bytes + 56;
      }
    uint8_t *send = deviceCopy(sendHost);
    uint8_t *region = deviceCopy(std::vector<uint8_t>(total + 256, 0xab));
    uint8_t *recv = region + 256;
    for (int round = 0; round < 2; ++round) {
      ASSERT_EQ(cudaMemset(recv, 0xab, total), cudaSuccess);
      Status s = comm.allToAllBlocks(send, sendBlocks, recv, recvBlocks,
                                     "blocks-test");
      if (s)
        s = comm.synchronizeStream(stream, "blocks-test");
      if (!s) {
        failures[r] = s.message();
        break;
      }
      std::vector<uint8_t> got = hostCopy(recv, total);
      std::vector<bool> covered(total, false);
      for (const auto &[block, value] : expected)
        for (int64_t b = 0; b < block.bytes; ++b) {
          covered[block.offset + b] = true;
          if (got[block.offset + b] != value && failures[r].empty())
            failures[r] = "round " + std::to_string(round) + ": from rank " +
                          std::to_string(block.peer) + " byte " +
                          std::to_string(b) + " is " +
                          std::to_string(got[block.offset + b]);
        }
      for (int64_t b = 0; b < total; ++b)
        if (!covered[b] && got[b] != 0xab && failures[r].empty())
          failures[r] = "byte " + std::to_string(b) + " outside the blocks "
                        "was written";
    }
    cudaFree(region);
    cudaFree(send);
    cudaStreamDestroy(stream);
  });
  for (int r = 0; r < kRanks; ++r)
    EXPECT_TRUE(failures[r].empty()) << "rank " << r << ": " << failures[r];
}

// A block count the receiver does not expect fails on both ranks, by name,
// instead of copying the wrong bytes.
TEST(NcclCommunicator, PeerCopiesRejectBlocksThePeerDoesNotExpect) {
  FLEX_SKIP_WITHOUT_GPUS(kRanks);
  auto ranks = makeRanks(60, /*peerCopies=*/true);
  ASSERT_TRUE(ranks[0] && ranks[1]);
  std::vector<Status> results(kRanks);
  // Freed once both ranks' streams are done: a peer's copies may still land.
  std::vector<uint8_t *> buffers(2 * kRanks, nullptr);
  onRanks([&](int r) {
    ASSERT_EQ(cudaSetDevice(r), cudaSuccess);
    cudaStream_t stream = nullptr;
    ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
    ASSERT_TRUE(ranks[r]->setStream(stream).isOk());
    uint8_t *send = buffers[2 * r] = deviceCopy(std::vector<uint8_t>(256, 1));
    uint8_t *recv = buffers[2 * r + 1] =
        deviceCopy(std::vector<uint8_t>(256, 0));
    // Rank 0 sends rank 1 two blocks; rank 1 expects one.
    std::vector<Communicator::Block> sendBlocks = {{0, 0, 16}, {1, 32, 16}};
    std::vector<Communicator::Block> recvBlocks = {{0, 0, 16}, {1, 32, 16}};
    if (r == 0)
      sendBlocks.push_back({1, 64, 16});
    else
      recvBlocks = {{0, 0, 16}, {1, 32, 16}};
    results[r] = ranks[r]->allToAllBlocks(send, sendBlocks, recv, recvBlocks,
                                          "mismatch-test");
    // The communicator is broken now; the stream itself still drains.
    EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    cudaStreamDestroy(stream);
  });
  for (uint8_t *buffer : buffers)
    cudaFree(buffer);
  for (int r = 0; r < kRanks; ++r)
    EXPECT_FALSE(results[r].isOk()) << "rank " << r;
  EXPECT_THAT(results[0].message(), HasSubstr("blocks to rank 1"));
}

// ncclCommSplit: one group of both ranks in reverse order (a gather lists
// rank 1 first), then one group per rank.
TEST(NcclCommunicator, SplitsIntoGroups) {
  FLEX_SKIP_WITHOUT_GPUS(kRanks);
  auto ranks = makeRanks(60);
  ASSERT_TRUE(ranks[0] && ranks[1]);
  std::vector<std::string> failures(kRanks);
  onRanks([&](int r) {
    auto fail = [&](const std::string &what) {
      if (failures[r].empty())
        failures[r] = what;
    };
    ASSERT_EQ(cudaSetDevice(r), cudaSuccess);
    std::shared_ptr<Communicator> reversed, single;
    Status status = ranks[r]->split(0, kRanks - 1 - r, reversed, "split");
    if (!status || !reversed)
      return fail("split: " + status.message());
    if (reversed->size() != kRanks || reversed->rank() != kRanks - 1 - r)
      fail("reversed rank " + std::to_string(reversed->rank()));
    cudaStream_t stream = nullptr;
    ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
    (void)reversed->setStream(stream);
    uint8_t *mine = deviceCopy(std::vector<uint8_t>(8, r + 1));
    uint8_t *all = deviceCopy(std::vector<uint8_t>(8 * kRanks, 0));
    if (Status s = reversed->allGather(mine, 8, all, "gather"); !s)
      fail("gather: " + s.message());
    if (Status s = reversed->synchronizeStream(stream, "sync"); !s)
      fail("sync: " + s.message());
    std::vector<uint8_t> host = hostCopy(all, 8 * kRanks);
    for (int p = 0; p < kRanks; ++p)
      if (host[p * 8] != kRanks - p)
        fail("block " + std::to_string(p) + " holds " +
             std::to_string(host[p * 8]));
    status = ranks[r]->split(r, 0, single, "split per rank");
    if (!status || !single || single->size() != 1 || single->rank() != 0)
      fail("split per rank: " + status.message());
    cudaFree(mine);
    cudaFree(all);
    reversed.reset();
    single.reset();
    cudaStreamDestroy(stream);
  });
  for (int r = 0; r < kRanks; ++r)
    EXPECT_EQ(failures[r], "") << "rank " << r;
}

/// Runs `body` on rank 0 with a stream of its own while rank 1 joins no
/// collective; rank 1 aborts once rank 0 is done (also when an assertion
/// in `body` returned early, so nothing spins forever).
void withRank1Absent(const std::vector<std::shared_ptr<Communicator>> &ranks,
                     const std::function<void(cudaStream_t)> &body) {
  std::atomic<bool> rank0Done{false};
  onRanks([&](int r) {
    ASSERT_EQ(cudaSetDevice(r), cudaSuccess);
    if (r == 1) {
      while (!rank0Done)
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      ranks[1]->abort(Status(StatusCode::CommunicationError, "test over"));
      return;
    }
    cudaStream_t stream = nullptr;
    if (cudaStreamCreate(&stream) == cudaSuccess)
      body(stream);
    else
      ADD_FAILURE() << "cudaStreamCreate";
    rank0Done = true;
    if (stream)
      cudaStreamDestroy(stream);
  });
}

// Rank 1 never joins the all-reduce: rank 0's wait for its stream ends
// after the timeout with an error naming the collective, NCCL aborted.
TEST(NcclCommunicator, AMissingRankTimesOutAndAborts) {
  FLEX_SKIP_WITHOUT_GPUS(kRanks);
  auto ranks = makeRanks(3);
  ASSERT_TRUE(ranks[0] && ranks[1]);
  Status waited;
  withRank1Absent(ranks, [&](cudaStream_t stream) {
    ASSERT_TRUE(ranks[0]->setStream(stream).isOk());
    int32_t *value = deviceCopy(std::vector<int32_t>{1});
    Status queued = ranks[0]->allReduceMaxInt32(value, 1, "lonely all-reduce");
    waited = queued ? ranks[0]->synchronizeStream(stream, "lonely all-reduce")
                    : queued;
    // Broken now: later calls fail at once.
    Status later = ranks[0]->allReduceMaxInt32(value, 1, "after");
    EXPECT_EQ(later.code(), StatusCode::CommunicationError);
    cudaFree(value);
  });
  EXPECT_EQ(waited.code(), StatusCode::CommunicationError);
  EXPECT_THAT(waited.message(), HasSubstr("lonely all-reduce"));
  EXPECT_THAT(waited.message(), HasSubstr("aborted"));
}

// The hang of NVIDIA/nccl#1013: rank 0 queues a collective of a
// communicator split from the world (rank 1 never joins it), then a world
// collective behind it on the same stream. The world's bounded wait must
// end with an error, aborting both communicators together (one at a time,
// the first abort would wait for kernels stuck behind the other), and both
// must refuse later calls.
TEST(NcclCommunicator, ASplitCollectiveThatHangsAbortsTheWholeFamily) {
  FLEX_SKIP_WITHOUT_GPUS(kRanks);
  auto ranks = makeRanks(3);
  ASSERT_TRUE(ranks[0] && ranks[1]);
  std::vector<std::shared_ptr<Communicator>> groups(kRanks);
  std::vector<Status> splits(kRanks);
  onRanks([&](int r) {
    ASSERT_EQ(cudaSetDevice(r), cudaSuccess);
    splits[r] = ranks[r]->split(0, r, groups[r], "split");
  });
  for (int r = 0; r < kRanks; ++r)
    ASSERT_TRUE(splits[r].isOk())
        << "rank " << r << ": " << splits[r].message();
  Status waited, laterWorld, laterGroup;
  withRank1Absent(ranks, [&](cudaStream_t stream) {
    ASSERT_TRUE(ranks[0]->setStream(stream).isOk());
    ASSERT_TRUE(groups[0]->setStream(stream).isOk());
    int32_t *value = deviceCopy(std::vector<int32_t>{1});
    Status queued = groups[0]->allReduceMaxInt32(value, 1, "lonely group");
    if (queued)
      queued = ranks[0]->allReduceMaxInt32(value, 1, "world behind it");
    waited = queued ? ranks[0]->synchronizeStream(stream, "waiting") : queued;
    laterWorld = ranks[0]->allReduceMaxInt32(value, 1, "world after");
    laterGroup = groups[0]->allReduceMaxInt32(value, 1, "group after");
    cudaFree(value);
  });
  EXPECT_EQ(waited.code(), StatusCode::CommunicationError) << waited.message();
  EXPECT_THAT(waited.message(), HasSubstr("aborted"));
  EXPECT_EQ(laterWorld.code(), StatusCode::CommunicationError);
  EXPECT_EQ(laterGroup.code(), StatusCode::CommunicationError);
  EXPECT_THAT(laterGroup.message(), HasSubstr("split from"));
}

TEST(NcclCommunicator, RejectsARankOutOfRange) {
  std::shared_ptr<Communicator> comm;
  Status status = createNcclCommunicator(comm, NcclUniqueId{}, 2, 2);
  EXPECT_FALSE(status.isOk());
  EXPECT_FALSE(comm);
  if (isNcclAvailable()) {
    EXPECT_THAT(status.message(), HasSubstr("out of range"));
  }
}

} // namespace
