//===- Communicator.cpp - The self and local communicators ----------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the Communicator defaults, the collective timeout
// setting, the one-rank "self" communicator and the "local" communicator,
// whose W ranks are W threads of one process meeting in shared memory.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/Comm/Communicator.h"
#include "flex/Runtime/Core/Half.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

namespace flex {

//===----------------------------------------------------------------------===//
// Defaults and shared helpers
//===----------------------------------------------------------------------===//

Communicator::~Communicator() = default;

Status checkBlocks(const std::vector<Communicator::Block> &blocks, int size,
                   std::string_view what) {
  for (const Communicator::Block &block : blocks)
    if (block.peer < 0 || block.peer >= size || block.bytes < 0 ||
        block.offset < 0)
      return Status(StatusCode::InvalidArgument,
                    std::string(what) + ": a block names peer " +
                        std::to_string(block.peer) + " of " +
                        std::to_string(size) + " with " +
                        std::to_string(block.bytes) + " bytes at offset " +
                        std::to_string(block.offset));
  return Status::ok();
}

Status checkSplitColor(int color, std::string_view what) {
  if (color < 0)
    return Status(StatusCode::InvalidArgument,
                  std::string(what) + ": color must be >= 0, got " +
                      std::to_string(color));
  return Status::ok();
}

Status Communicator::allToAllBlocks(const void *send,
                                    const std::vector<Block> &sendBlocks,
                                    void *recv,
                                    const std::vector<Block> &recvBlocks,
                                    std::string_view what) {
  if (memory() != CommMemory::Host)
    return Status(StatusCode::Internal,
                  std::string(what) + ": communicator '" + std::string(name()) +
                      "' on device memory has no allToAllBlocks");
  const int W = size();
  // Per peer, the blocks back to back in their order: the packed layout.
  std::vector<int64_t> sendBytes(W, 0), recvBytes(W, 0);
  auto count = [&](const std::vector<Block> &blocks,
                   std::vector<int64_t> &bytes) -> Status {
    if (Status s = checkBlocks(blocks, W, what); !s)
      return s;
    for (const Block &block : blocks)
      bytes[block.peer] += block.bytes;
    return Status::ok();
  };
  if (Status s = count(sendBlocks, sendBytes); !s)
    return s;
  if (Status s = count(recvBlocks, recvBytes); !s)
    return s;
  std::vector<int64_t> sendOffsets(W, 0), recvOffsets(W, 0);
  for (int p = 1; p < W; ++p) {
    sendOffsets[p] = sendOffsets[p - 1] + sendBytes[p - 1];
    recvOffsets[p] = recvOffsets[p - 1] + recvBytes[p - 1];
  }
  std::vector<char> packedSend(
      static_cast<size_t>(sendOffsets[W - 1] + sendBytes[W - 1]));
  std::vector<char> packedRecv(
      static_cast<size_t>(recvOffsets[W - 1] + recvBytes[W - 1]));
  std::vector<int64_t> at = sendOffsets;
  for (const Block &block : sendBlocks) {
    std::memcpy(packedSend.data() + at[block.peer],
                static_cast<const char *>(send) + block.offset,
                static_cast<size_t>(block.bytes));
    at[block.peer] += block.bytes;
  }
  if (Status s = allToAll(packedSend.data(), sendOffsets.data(),
                          sendBytes.data(), packedRecv.data(),
                          recvOffsets.data(), recvBytes.data(), what);
      !s)
    return s;
  at = recvOffsets;
  for (const Block &block : recvBlocks) {
    std::memcpy(static_cast<char *>(recv) + block.offset,
                packedRecv.data() + at[block.peer],
                static_cast<size_t>(block.bytes));
    at[block.peer] += block.bytes;
  }
  return Status::ok();
}

Status Communicator::setStream(void *stream) {
  if (stream)
    return Status(StatusCode::InvalidArgument,
                  "communicator '" + std::string(name()) +
                      "' works on host memory and takes no stream; pass a "
                      "null stream");
  return Status::ok();
}

Status Communicator::synchronizeStream(void *, std::string_view) {
  return Status::ok();
}

void Communicator::abort(const Status &) {}

Status Communicator::split(int, int, std::shared_ptr<Communicator> &group,
                           std::string_view what) {
  group.reset();
  return Status(StatusCode::Unavailable,
                std::string(what) + ": communicator '" + std::string(name()) +
                    "' cannot split into groups of ranks");
}

Status splitIntoGroups(Communicator &communicator, const RankGroups &groups,
                       std::shared_ptr<Communicator> &group) {
  const int64_t W = communicator.size();
  std::string what = "split into groups of " + std::to_string(groups.size) +
                     " rank(s) " + std::to_string(groups.stride) + " apart";
  if (groups.size < 1 || groups.stride < 1 ||
      W % (groups.size * groups.stride) != 0)
    return Status(StatusCode::InvalidArgument,
                  what + ": size * stride must divide the " +
                      std::to_string(W) + " ranks");
  const int rank = communicator.rank();
  return communicator.split(static_cast<int>(groups.color(rank)),
                            static_cast<int>(groups.index(rank)), group, what);
}

Status getCollectiveTimeout(double &seconds) {
  seconds = kDefaultCollectiveTimeoutSeconds;
  RuntimeOptions options;
  if (Status status =
          RuntimeOptions::fromEnvironment(RuntimeOptions(), options);
      !status)
    return status;
  seconds = options.collectiveTimeoutSeconds;
  return Status::ok();
}

namespace {

Status checkFloatType(DType type, std::string_view what) {
  if (type == DType::I32)
    return Status(StatusCode::InvalidArgument,
                  std::string(what) +
                      ": reduce_scatter sums f32, bf16 or f16, not i32");
  return Status::ok();
}

float loadFloat(const void *data, DType type, int64_t i) {
  switch (type) {
  case DType::F32:
    return static_cast<const float *>(data)[i];
  case DType::BF16:
    return bf16ToFloat(static_cast<const uint16_t *>(data)[i]);
  case DType::F16:
    return f16ToFloat(static_cast<const uint16_t *>(data)[i]);
  case DType::I32:
    break;
  }
  return 0.0f;
}

void storeFloat(void *data, DType type, int64_t i, float value) {
  switch (type) {
  case DType::F32:
    static_cast<float *>(data)[i] = value;
    return;
  case DType::BF16:
    static_cast<uint16_t *>(data)[i] = floatToBf16(value);
    return;
  case DType::F16:
    static_cast<uint16_t *>(data)[i] = floatToF16(value);
    return;
  case DType::I32:
    return;
  }
}

//===----------------------------------------------------------------------===//
// Self: one rank
//===----------------------------------------------------------------------===//

class SelfCommunicator final : public Communicator {
public:
  std::string_view name() const override { return "self"; }
  int rank() const override { return 0; }
  int size() const override { return 1; }

  Status allToAll(const void *send, const int64_t *sendOffsets,
                  const int64_t *sendBytes, void *recv,
                  const int64_t *recvOffsets, const int64_t *recvBytes,
                  std::string_view what) override {
    if (sendBytes[0] != recvBytes[0])
      return Status(
          StatusCode::InvalidArgument,
          std::string(what) + ": rank 0 sends " + std::to_string(sendBytes[0]) +
              " bytes to itself but expects " + std::to_string(recvBytes[0]));
    std::memcpy(static_cast<char *>(recv) + recvOffsets[0],
                static_cast<const char *>(send) + sendOffsets[0],
                static_cast<size_t>(sendBytes[0]));
    return Status::ok();
  }
  Status allReduceMaxInt32(int32_t *, int64_t, std::string_view) override {
    return Status::ok();
  }
  Status allGather(const void *send, int64_t bytes, void *recv,
                   std::string_view) override {
    std::memmove(recv, send, static_cast<size_t>(bytes));
    return Status::ok();
  }
  Status reduceScatterSum(const void *send, void *recv, int64_t count,
                          DType type, std::string_view what) override {
    if (Status status = checkFloatType(type, what); !status)
      return status;
    std::memmove(recv, send, static_cast<size_t>(count) * dtypeSize(type));
    return Status::ok();
  }
  Status barrier(std::string_view) override { return Status::ok(); }
  Status split(int color, int, std::shared_ptr<Communicator> &group,
               std::string_view what) override {
    group.reset();
    if (Status status = checkSplitColor(color, what); !status)
      return status;
    group = std::make_shared<SelfCommunicator>();
    return Status::ok();
  }
};

//===----------------------------------------------------------------------===//
// Local: W threads of one process
//===----------------------------------------------------------------------===//

using Clock = std::chrono::steady_clock;

enum class CollectiveKind : uint8_t {
  AllToAll,
  AllReduceMax,
  AllGather,
  ReduceScatter,
  Barrier
};

/// What one rank brings to a collective; the others read it in place.
struct Post {
  CollectiveKind kind = CollectiveKind::Barrier;
  std::string what;
  const void *send = nullptr;
  const int64_t *sendOffsets = nullptr;
  const int64_t *sendBytes = nullptr;
  const int64_t *recvBytes = nullptr;
  int64_t count = 0; ///< elements or bytes, per collective
  DType type = DType::F32;
  const int32_t *values = nullptr;
};

/// The state the W ranks share: one post each and a barrier with a
/// deadline. A collective is: post, meet, read the others' posts, meet (so
/// no rank reuses its buffers while another still reads them).
struct LocalGroup {
  LocalGroup(int size, double timeoutSeconds)
      : size(size), timeoutSeconds(timeoutSeconds), posts(size),
        splitGroups(size), arrived(size, false) {}

  const int size;
  const double timeoutSeconds;
  std::vector<Post> posts;
  /// split: the group each color's first rank makes, by that rank.
  std::vector<std::shared_ptr<LocalGroup>> splitGroups;

  std::mutex mutex;
  std::condition_variable wakeup;
  std::vector<bool> arrived;
  int arrivedCount = 0;
  uint64_t generation = 0;
  bool broken = false;
  std::string brokenReason;

  Status brokenStatus() const {
    return Status(StatusCode::CommunicationError,
                  "the local communicator failed earlier: " + brokenReason);
  }

  /// Marks the group broken and wakes every waiting rank.
  Status breakWith(std::string reason) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!broken) {
      broken = true;
      brokenReason = reason;
      wakeup.notify_all();
    }
    return Status(StatusCode::CommunicationError, std::move(reason));
  }

  Status meet(int rank, std::string_view what, Clock::time_point deadline) {
    std::unique_lock<std::mutex> lock(mutex);
    if (broken)
      return brokenStatus();
    uint64_t myGeneration = generation;
    arrived[rank] = true;
    if (++arrivedCount == size) {
      arrivedCount = 0;
      arrived.assign(size, false);
      ++generation;
      wakeup.notify_all();
      return Status::ok();
    }
    while (generation == myGeneration) {
      if (broken)
        return brokenStatus();
      if (wakeup.wait_until(lock, deadline) == std::cv_status::timeout &&
          generation == myGeneration && !broken) {
        std::string missing;
        for (int r = 0; r < size; ++r)
          if (!arrived[r])
            missing += (missing.empty() ? "" : ", ") + std::to_string(r);
        broken = true;
        brokenReason =
            "rank " + std::to_string(rank) + ": " + std::string(what) +
            ": timed out after " + std::to_string(timeoutSeconds) +
            " s (FLEX_COLLECTIVE_TIMEOUT_S) waiting for rank(s) " + missing;
        wakeup.notify_all();
        return Status(StatusCode::CommunicationError, brokenReason);
      }
    }
    return Status::ok();
  }
};

class LocalCommunicator final : public Communicator {
public:
  LocalCommunicator(std::shared_ptr<LocalGroup> group, int rank)
      : group_(std::move(group)), rank_(rank) {}

  std::string_view name() const override { return "local"; }
  int rank() const override { return rank_; }
  int size() const override { return group_->size; }

  Status allToAll(const void *send, const int64_t *sendOffsets,
                  const int64_t *sendBytes, void *recv,
                  const int64_t *recvOffsets, const int64_t *recvBytes,
                  std::string_view what) override {
    Post post;
    post.kind = CollectiveKind::AllToAll;
    post.send = send;
    post.sendOffsets = sendOffsets;
    post.sendBytes = sendBytes;
    post.recvBytes = recvBytes;
    return collective(std::move(post), what, [&]() -> Status {
      // Every rank checks every pair, so all fail alike before any reads.
      const std::vector<Post> &posts = group_->posts;
      for (int from = 0; from < group_->size; ++from)
        for (int to = 0; to < group_->size; ++to)
          if (posts[from].sendBytes[to] != posts[to].recvBytes[from])
            return Status(StatusCode::InvalidArgument,
                          std::string(what) + ": rank " + std::to_string(from) +
                              " sends " +
                              std::to_string(posts[from].sendBytes[to]) +
                              " bytes to rank " + std::to_string(to) +
                              ", which expects " +
                              std::to_string(posts[to].recvBytes[from]));
      for (int p = 0; p < group_->size; ++p) {
        const Post &peer = group_->posts[p];
        std::memcpy(static_cast<char *>(recv) + recvOffsets[p],
                    static_cast<const char *>(peer.send) +
                        peer.sendOffsets[rank_],
                    static_cast<size_t>(recvBytes[p]));
      }
      return Status::ok();
    });
  }

  Status allReduceMaxInt32(int32_t *values, int64_t count,
                           std::string_view what) override {
    Post post;
    post.kind = CollectiveKind::AllReduceMax;
    post.values = values;
    post.count = count;
    // Every rank reads every rank's values: results are written only after
    // the second meeting.
    std::vector<int32_t> result(values, values + count);
    Status status = collective(std::move(post), what, [&]() -> Status {
      for (int p = 0; p < group_->size; ++p)
        for (int64_t i = 0; i < count; ++i)
          result[i] = std::max(result[i], group_->posts[p].values[i]);
      return Status::ok();
    });
    if (status)
      std::copy(result.begin(), result.end(), values);
    return status;
  }

  Status allGather(const void *send, int64_t bytes, void *recv,
                   std::string_view what) override {
    Post post;
    post.kind = CollectiveKind::AllGather;
    post.send = send;
    post.count = bytes;
    return collective(std::move(post), what, [&]() -> Status {
      for (int p = 0; p < group_->size; ++p)
        std::memcpy(static_cast<char *>(recv) + p * bytes,
                    group_->posts[p].send, static_cast<size_t>(bytes));
      return Status::ok();
    });
  }

  Status reduceScatterSum(const void *send, void *recv, int64_t count,
                          DType type, std::string_view what) override {
    if (Status status = checkFloatType(type, what); !status)
      return status;
    Post post;
    post.kind = CollectiveKind::ReduceScatter;
    post.send = send;
    post.count = count;
    post.type = type;
    return collective(std::move(post), what, [&]() -> Status {
      // In rank order, so every run gives the same bits.
      const int64_t first = rank_ * count;
      for (int64_t i = 0; i < count; ++i) {
        float sum = 0.0f;
        for (int p = 0; p < group_->size; ++p)
          sum += loadFloat(group_->posts[p].send, type, first + i);
        storeFloat(recv, type, i, sum);
      }
      return Status::ok();
    });
  }

  Status barrier(std::string_view what) override {
    Post post;
    post.kind = CollectiveKind::Barrier;
    return collective(std::move(post), what,
                      []() -> Status { return Status::ok(); });
  }

  Status split(int color, int key, std::shared_ptr<Communicator> &group,
               std::string_view what) override {
    group.reset();
    // Every rank learns every (color, key); the first rank of each color
    // makes the shared state of its group, the others pick it up.
    const int W = group_->size;
    int32_t mine[2] = {color, key};
    std::vector<int32_t> all(2 * static_cast<size_t>(W));
    if (Status status = allGather(mine, sizeof(mine), all.data(), what);
        !status)
      return status;
    std::vector<std::pair<int32_t, int>> members; // (key, rank)
    for (int p = 0; p < W; ++p) {
      if (all[2 * p] < 0)
        return Status(StatusCode::InvalidArgument,
                      std::string(what) + ": rank " + std::to_string(p) +
                          " passed color " + std::to_string(all[2 * p]) +
                          "; colors must be >= 0");
      if (all[2 * p] == color)
        members.push_back({all[2 * p + 1], p});
    }
    std::sort(members.begin(), members.end());
    const int leader = std::min_element(members.begin(), members.end(),
                                        [](auto a, auto b) {
                                          return a.second < b.second;
                                        })
                           ->second;
    int newRank = 0;
    while (members[newRank].second != rank_)
      ++newRank;
    if (leader == rank_)
      group_->splitGroups[rank_] = std::make_shared<LocalGroup>(
          static_cast<int>(members.size()), group_->timeoutSeconds);
    if (Status status = barrier(what); !status)
      return status;
    std::shared_ptr<LocalGroup> shared = group_->splitGroups[leader];
    // Nobody makes the next split's groups before every rank took its own.
    if (Status status = barrier(what); !status)
      return status;
    group = std::make_shared<LocalCommunicator>(std::move(shared), newRank);
    return Status::ok();
  }

  void abort(const Status &status) override {
    (void)group_->breakWith(status.message());
  }

private:
  template <typename Body>
  Status collective(Post post, std::string_view what, Body &&body) {
    auto deadline = Clock::now() +
                    std::chrono::duration_cast<Clock::duration>(
                        std::chrono::duration<double>(group_->timeoutSeconds));
    post.what = std::string(what);
    const CollectiveKind kind = post.kind;
    const int64_t count = post.count;
    const DType type = post.type;
    group_->posts[rank_] = std::move(post);
    if (Status status = group_->meet(rank_, what, deadline); !status)
      return status;
    // Every rank must be in the same collective with the same sizes.
    for (int p = 0; p < group_->size; ++p) {
      const Post &peer = group_->posts[p];
      bool sameSizes = kind == CollectiveKind::AllToAll ||
                       kind == CollectiveKind::Barrier ||
                       (peer.count == count && peer.type == type);
      if (peer.kind != kind || !sameSizes)
        return group_->breakWith(
            "rank " + std::to_string(rank_) + ": " + std::string(what) +
            ": rank " + std::to_string(p) + " is in another collective ('" +
            peer.what + "'" +
            (peer.kind == kind ? ", count " + std::to_string(peer.count) +
                                     " vs " + std::to_string(count)
                               : std::string()) +
            "); every rank must run the same collectives in the same order");
    }
    // A body fails only on what every rank sees alike (before reading), so
    // no rank leaves while another still reads its buffers.
    Status result = body();
    if (!result)
      return group_->breakWith(result.message());
    return group_->meet(rank_, what, deadline);
  }

  std::shared_ptr<LocalGroup> group_;
  int rank_;
};

} // namespace

std::shared_ptr<Communicator> createSelfCommunicator() {
  return std::make_shared<SelfCommunicator>();
}

Status
createLocalCommunicators(int size,
                         std::vector<std::shared_ptr<Communicator>> &ranks,
                         double timeoutSeconds) {
  ranks.clear();
  if (size < 1)
    return Status(StatusCode::InvalidArgument,
                  "a local communicator needs at least 1 rank; got " +
                      std::to_string(size));
  if (timeoutSeconds < 0)
    if (Status status = getCollectiveTimeout(timeoutSeconds); !status)
      return status;
  auto group = std::make_shared<LocalGroup>(size, timeoutSeconds);
  for (int r = 0; r < size; ++r)
    ranks.push_back(std::make_shared<LocalCommunicator>(group, r));
  return Status::ok();
}

} // namespace flex
