//===- PeerCopyExchange.cpp - All-to-all through the copy engines ---------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// See PeerCopyExchange.h for the protocol.
//
//===----------------------------------------------------------------------===//

#include "PeerCopyExchange.h"

#include <cuda.h> // types only: the driver call is looked up at run time
#include <cuda_runtime.h>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <thread>

namespace flex {
namespace {

Status cudaFailure(cudaError_t error, const std::string &what) {
  cudaGetLastError();
  return Status(StatusCode::CommunicationError,
                what + ": " + cudaGetErrorName(error) + " (" +
                    cudaGetErrorString(error) + ")");
}

#define FLEX_PEER_CUDA(call, what)                                             \
  do {                                                                         \
    if (cudaError_t e_ = (call); e_ != cudaSuccess)                            \
      return cudaFailure(e_, what);                                            \
  } while (0)

/// The host: its name and this boot (containers may share a name).
uint64_t hostFingerprint() {
  char name[256] = {};
  gethostname(name, sizeof name - 1);
  std::string id = name;
  std::ifstream boot("/proc/sys/kernel/random/boot_id");
  std::string line;
  if (boot && std::getline(boot, line))
    id += "/" + line;
  return std::hash<std::string>()(id);
}

/// This process, distinct from any other on the host even across PID
/// namespaces: ranks that share it share pointers and events directly.
uint64_t processToken() {
  static const uint64_t token = [] {
    std::random_device random;
    return (static_cast<uint64_t>(random()) << 32) ^ random() ^
           static_cast<uint64_t>(getpid());
  }();
  return token;
}

/// What each rank shares once.
struct SetupInfo {
  uint64_t host = 0;
  uint64_t process = 0;
  int32_t device = 0;
  int32_t ok = 1;
  uint64_t readyRaw = 0, doneRaw = 0; ///< the events, for this process
  cudaIpcEventHandle_t ready{}, done{};
  /// A small allocation peers in other processes open once, to prove
  /// they can reach this GPU's memory before the first exchange.
  cudaIpcMemHandle_t probe{};
};

/// What each rank shares per exchange, before the copies.
struct ReceiveInfo {
  int32_t ok = 1;
  int32_t blocks = 0;
  uint64_t base = 0;  ///< the receive allocation's base, in its process
  int64_t offset = 0; ///< recv - base
  cudaIpcMemHandle_t handle{};
};

struct WireBlock {
  int64_t peer = 0, offset = 0, bytes = 0;
};

using AddressRangeFn = CUresult (*)(CUdeviceptr *, size_t *, CUdeviceptr);

AddressRangeFn addressRange() {
  static AddressRangeFn fn = [] {
    void *found = nullptr;
    cudaDriverEntryPointQueryResult result;
#if CUDART_VERSION >= 12050
    cudaError_t error = cudaGetDriverEntryPointByVersion(
        "cuMemGetAddressRange", &found, 12000, cudaEnableDefault, &result);
#else
    cudaError_t error = cudaGetDriverEntryPoint("cuMemGetAddressRange", &found,
                                                cudaEnableDefault, &result);
#endif
    if (error != cudaSuccess || result != cudaDriverEntryPointSuccess)
      found = nullptr;
    return reinterpret_cast<AddressRangeFn>(found);
  }();
  return fn;
}

std::string bytesOf(const cudaIpcMemHandle_t &handle) {
  return std::string(handle.reserved, sizeof handle.reserved);
}

} // namespace

Status PeerCopyExchange::create(int rank, int size, int device,
                                HostAllGather allGather,
                                std::unique_ptr<PeerCopyExchange> &exchange) {
  exchange.reset();
  std::unique_ptr<PeerCopyExchange> made(new PeerCopyExchange());
  made->rank_ = rank;
  made->size_ = size;
  made->device_ = device;
  made->allGather_ = std::move(allGather);
  // Local set-up; a failure is shared below so every rank fails alike.
  SetupInfo mine;
  mine.host = hostFingerprint();
  mine.process = processToken();
  mine.device = device;
  std::string failure;
  void *probe = nullptr;
  auto local = [&]() -> Status {
    FLEX_PEER_CUDA(cudaSetDevice(device), "cudaSetDevice");
    if (!addressRange())
      return Status(StatusCode::Unavailable,
                    "the driver has no cuMemGetAddressRange");
    const unsigned flags = cudaEventDisableTiming | cudaEventInterprocess;
    cudaEvent_t ready = nullptr, done = nullptr;
    FLEX_PEER_CUDA(cudaEventCreateWithFlags(&ready, flags), "cudaEventCreate");
    made->ready_ = ready;
    FLEX_PEER_CUDA(cudaEventCreateWithFlags(&done, flags), "cudaEventCreate");
    made->done_ = done;
    FLEX_PEER_CUDA(cudaIpcGetEventHandle(&mine.ready, ready),
                   "cudaIpcGetEventHandle");
    FLEX_PEER_CUDA(cudaIpcGetEventHandle(&mine.done, done),
                   "cudaIpcGetEventHandle");
    mine.readyRaw = reinterpret_cast<uint64_t>(ready);
    mine.doneRaw = reinterpret_cast<uint64_t>(done);
    FLEX_PEER_CUDA(cudaMalloc(&probe, 256), "cudaMalloc");
    FLEX_PEER_CUDA(cudaIpcGetMemHandle(&mine.probe, probe),
                   "cudaIpcGetMemHandle");
    for (int q = 0; q < size; ++q) {
      cudaStream_t stream = nullptr;
      cudaEvent_t joined = nullptr;
      if (q == rank) { // this rank's own blocks go on the caller's stream
        made->streams_.push_back(nullptr);
        made->joined_.push_back(nullptr);
        continue;
      }
      FLEX_PEER_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
                     "cudaStreamCreate");
      made->streams_.push_back(stream);
      FLEX_PEER_CUDA(cudaEventCreateWithFlags(&joined, cudaEventDisableTiming),
                     "cudaEventCreate");
      made->joined_.push_back(joined);
    }
    return Status::ok();
  };
  if (Status s = local(); !s) {
    mine.ok = 0;
    failure = s.message();
  }
  std::vector<SetupInfo> all(size);
  if (Status s = made->allGather_(&mine, sizeof mine, all.data(),
                                  "peer copies: set-up");
      !s) {
    if (probe)
      cudaFree(probe);
    return s;
  }
  // Every pair must share a host; peers of this process need peer access,
  // the others' events open through IPC.
  made->peerReady_.assign(size, nullptr);
  made->peerDone_.assign(size, nullptr);
  made->samePeerProcess_.assign(size, false);
  auto connect = [&]() -> Status {
    for (int q = 0; q < size; ++q) {
      if (!all[q].ok)
        return Status(StatusCode::Unavailable,
                      "rank " + std::to_string(q) + " could not set up");
      if (all[q].host != mine.host)
        return Status(StatusCode::Unavailable,
                      "rank " + std::to_string(q) +
                          " is on another host; peer copies need one host");
      if (q == rank)
        continue;
      if (all[q].process == mine.process) {
        made->samePeerProcess_[q] = true;
        made->peerReady_[q] = reinterpret_cast<cudaEvent_t>(all[q].readyRaw);
        made->peerDone_[q] = reinterpret_cast<cudaEvent_t>(all[q].doneRaw);
        int can = 0;
        FLEX_PEER_CUDA(cudaDeviceCanAccessPeer(&can, device, all[q].device),
                       "cudaDeviceCanAccessPeer");
        if (!can)
          return Status(StatusCode::Unavailable,
                        "GPU " + std::to_string(device) +
                            " cannot access GPU " +
                            std::to_string(all[q].device));
        cudaError_t e = cudaDeviceEnablePeerAccess(all[q].device, 0);
        if (e != cudaSuccess && e != cudaErrorPeerAccessAlreadyEnabled)
          return cudaFailure(e, "cudaDeviceEnablePeerAccess");
        cudaGetLastError();
        continue;
      }
      // Can this GPU reach q's memory? (Without peer access this fails
      // here, not in the first exchange.)
      void *reached = nullptr;
      FLEX_PEER_CUDA(cudaIpcOpenMemHandle(&reached, all[q].probe,
                                          cudaIpcMemLazyEnablePeerAccess),
                     "opening rank " + std::to_string(q) +
                         "'s memory (cudaIpcOpenMemHandle)");
      cudaIpcCloseMemHandle(reached);
      cudaEvent_t ready = nullptr, done = nullptr;
      FLEX_PEER_CUDA(cudaIpcOpenEventHandle(&ready, all[q].ready),
                     "cudaIpcOpenEventHandle (rank " + std::to_string(q) + ")");
      made->peerReady_[q] = ready;
      FLEX_PEER_CUDA(cudaIpcOpenEventHandle(&done, all[q].done),
                     "cudaIpcOpenEventHandle (rank " + std::to_string(q) + ")");
      made->peerDone_[q] = done;
    }
    return Status::ok();
  };
  int32_t ok = mine.ok;
  if (ok)
    if (Status s = connect(); !s) {
      ok = 0;
      failure = s.message();
    }
  std::vector<int32_t> oks(size);
  Status gathered = made->allGather_(&ok, sizeof ok, oks.data(),
                                     "peer copies: set-up outcome");
  // Every peer has opened and closed the probe by now.
  if (probe)
    cudaFree(probe);
  if (!gathered)
    return gathered;
  for (int q = 0; q < size; ++q)
    if (!oks[q])
      return Status(StatusCode::Unavailable,
                    "peer copies (FLEX_A2A_TRANSPORT=ce): rank " +
                        std::to_string(rank) + ": " +
                        (ok ? "rank " + std::to_string(q) + " failed to set up"
                            : failure));
  exchange = std::move(made);
  return Status::ok();
}

PeerCopyExchange::~PeerCopyExchange() {
  cudaSetDevice(device_);
  // Copies still queued may wait for a peer that is gone: wait a bounded
  // time, and leave the peers' buffers mapped rather than unmap them under
  // a copy.
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  bool drained = true;
  for (cudaStream_t stream : streams_)
    while (stream && cudaStreamQuery(stream) == cudaErrorNotReady) {
      if (std::chrono::steady_clock::now() >= deadline) {
        drained = false;
        break;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  cudaGetLastError();
  if (drained)
    for (auto &[peer, opened] : opened_)
      cudaIpcCloseMemHandle(opened.second);
  for (int q = 0; q < static_cast<int>(peerReady_.size()); ++q)
    if (!samePeerProcess_[q] && q != rank_) {
      if (peerReady_[q])
        cudaEventDestroy(peerReady_[q]);
      if (peerDone_[q])
        cudaEventDestroy(peerDone_[q]);
    }
  for (cudaStream_t stream : streams_)
    if (stream)
      cudaStreamDestroy(stream);
  for (cudaEvent_t event : joined_)
    if (event)
      cudaEventDestroy(event);
  if (ready_)
    cudaEventDestroy(ready_);
  if (done_)
    cudaEventDestroy(done_);
}

Status PeerCopyExchange::describeReceiveBuffer(void *recv, uint64_t &base,
                                               int64_t &offset,
                                               std::string &handle,
                                               std::string_view what) {
  CUdeviceptr start = 0;
  size_t bytes = 0;
  if (addressRange()(&start, &bytes, reinterpret_cast<CUdeviceptr>(recv)) !=
      CUDA_SUCCESS)
    return Status(StatusCode::InvalidArgument,
                  std::string(what) +
                      ": the receive buffer is not device memory from "
                      "cudaMalloc, which peer copies need");
  base = static_cast<uint64_t>(start);
  offset = reinterpret_cast<char *>(recv) - reinterpret_cast<char *>(start);
  if (!anotherProcess())
    return Status::ok(); // peers use `base` itself
  // Asked every time: an allocation freed and made again at the same
  // address has a new handle.
  cudaIpcMemHandle_t made;
  FLEX_PEER_CUDA(cudaIpcGetMemHandle(&made, reinterpret_cast<void *>(start)),
                 std::string(what) + ": cudaIpcGetMemHandle");
  handle = bytesOf(made);
  return Status::ok();
}

Status PeerCopyExchange::peerAllocation(int q, uint64_t base,
                                        const std::string &handle,
                                        char *&mapped, std::string_view what) {
  if (samePeerProcess_[q]) {
    mapped = reinterpret_cast<char *>(base);
    return Status::ok();
  }
  auto known = opened_.find(q);
  if (known != opened_.end()) {
    if (known->second.first == handle) {
      mapped = known->second.second;
      return Status::ok();
    }
    // q receives into another allocation now: unmap the old one once this
    // rank's earlier copies into it are done.
    FLEX_PEER_CUDA(cudaStreamSynchronize(streams_[q]),
                   std::string(what) + ": finishing the copies to rank " +
                       std::to_string(q));
    cudaIpcCloseMemHandle(known->second.second);
    opened_.erase(known);
  }
  cudaIpcMemHandle_t ipc;
  std::memcpy(ipc.reserved, handle.data(), sizeof ipc.reserved);
  void *opened = nullptr;
  FLEX_PEER_CUDA(
      cudaIpcOpenMemHandle(&opened, ipc, cudaIpcMemLazyEnablePeerAccess),
      std::string(what) + ": cudaIpcOpenMemHandle (rank " + std::to_string(q) +
          ")");
  mapped = static_cast<char *>(opened);
  opened_.emplace(q, std::make_pair(handle, mapped));
  return Status::ok();
}

Status PeerCopyExchange::allToAllBlocks(
    void *streamHandle, const void *send,
    const std::vector<Communicator::Block> &sendBlocks, void *recv,
    const std::vector<Communicator::Block> &recvBlocks, std::string_view what) {
  auto stream = static_cast<cudaStream_t>(streamHandle);
  const std::string at = "rank " + std::to_string(rank_) + ": " +
                         std::string(what) + " (peer copies)";
  // 1. This rank's receive side, after `ready` is recorded; a local
  //    failure still takes part in the gathers, so every rank fails alike.
  ReceiveInfo mine;
  mine.blocks = static_cast<int32_t>(recvBlocks.size());
  std::string failure;
  auto prepare = [&]() -> Status {
    for (const auto *blocks : {&sendBlocks, &recvBlocks})
      if (Status s = checkBlocks(*blocks, size_, what); !s)
        return s;
    FLEX_PEER_CUDA(cudaSetDevice(device_), at + ": cudaSetDevice");
    std::string handle;
    if (Status s =
            describeReceiveBuffer(recv, mine.base, mine.offset, handle, at);
        !s)
      return s;
    std::memcpy(mine.handle.reserved, handle.data(), handle.size());
    FLEX_PEER_CUDA(cudaEventRecord(ready_, stream), at + ": cudaEventRecord");
    return Status::ok();
  };
  if (Status s = prepare(); !s) {
    mine.ok = 0;
    failure = s.message();
  }
  std::vector<ReceiveInfo> infos(size_);
  if (Status s = allGather_(&mine, sizeof mine, infos.data(), what); !s)
    return s;
  int32_t most = 0;
  for (const ReceiveInfo &info : infos)
    most = std::max(most, info.blocks);
  std::vector<WireBlock> wire(std::max<int32_t>(most, 1));
  for (size_t i = 0; i < recvBlocks.size(); ++i)
    wire[i] = {recvBlocks[i].peer, recvBlocks[i].offset, recvBlocks[i].bytes};
  std::vector<WireBlock> tables(wire.size() * size_);
  if (Status s = allGather_(
          wire.data(), static_cast<int64_t>(wire.size() * sizeof(WireBlock)),
          tables.data(), what);
      !s)
    return s;
  for (int q = 0; q < size_; ++q)
    if (!infos[q].ok)
      return Status(StatusCode::CommunicationError,
                    mine.ok ? at + ": rank " + std::to_string(q) + " failed"
                            : failure);

  // 2. The copies: the k-th block this rank sends to q lands in the k-th
  //    block q receives from this rank.
  auto enqueue = [&]() -> Status {
    for (int q = 0; q < size_; ++q) {
      std::vector<const Communicator::Block *> out;
      for (const Communicator::Block &block : sendBlocks)
        if (block.peer == q && block.bytes > 0)
          out.push_back(&block);
      std::vector<const WireBlock *> in;
      for (int32_t i = 0; i < infos[q].blocks; ++i) {
        const WireBlock &block = tables[q * wire.size() + i];
        if (block.peer == rank_ && block.bytes > 0)
          in.push_back(&block);
      }
      if (out.size() != in.size())
        return Status(StatusCode::InvalidArgument,
                      at + ": this rank sends " + std::to_string(out.size()) +
                          " blocks to rank " + std::to_string(q) +
                          ", which receives " + std::to_string(in.size()));
      if (out.empty())
        continue;
      char *target = nullptr;
      if (q == rank_) {
        target = static_cast<char *>(recv);
      } else {
        std::string handle(infos[q].handle.reserved,
                           sizeof infos[q].handle.reserved);
        if (Status s = peerAllocation(q, infos[q].base, handle, target, at); !s)
          return s;
        target += infos[q].offset;
      }
      cudaStream_t copies = q == rank_ ? stream : streams_[q];
      if (q != rank_) {
        FLEX_PEER_CUDA(cudaStreamWaitEvent(copies, ready_, 0),
                       at + ": cudaStreamWaitEvent");
        FLEX_PEER_CUDA(cudaStreamWaitEvent(copies, peerReady_[q], 0),
                       at + ": waiting for rank " + std::to_string(q));
      }
      for (size_t k = 0; k < out.size(); ++k) {
        if (out[k]->bytes != in[k]->bytes)
          return Status(StatusCode::InvalidArgument,
                        at + ": block " + std::to_string(k) + " to rank " +
                            std::to_string(q) + " has " +
                            std::to_string(out[k]->bytes) + " bytes; rank " +
                            std::to_string(q) + " expects " +
                            std::to_string(in[k]->bytes));
        FLEX_PEER_CUDA(
            cudaMemcpyAsync(target + in[k]->offset,
                            static_cast<const char *>(send) + out[k]->offset,
                            static_cast<size_t>(out[k]->bytes),
                            cudaMemcpyDeviceToDevice, copies),
            at + ": copying to rank " + std::to_string(q));
      }
      if (q != rank_) {
        FLEX_PEER_CUDA(cudaEventRecord(joined_[q], copies),
                       at + ": cudaEventRecord");
        FLEX_PEER_CUDA(cudaStreamWaitEvent(stream, joined_[q], 0),
                       at + ": cudaStreamWaitEvent");
      }
    }
    FLEX_PEER_CUDA(cudaEventRecord(done_, stream), at + ": cudaEventRecord");
    return Status::ok();
  };
  int32_t ok = 1;
  if (Status s = enqueue(); !s) {
    ok = 0;
    failure = s.message();
  }
  // 3. Every `done` is recorded: wait for the blocks landing here.
  std::vector<int32_t> oks(size_);
  if (Status s = allGather_(&ok, sizeof ok, oks.data(), what); !s)
    return s;
  for (int q = 0; q < size_; ++q)
    if (!oks[q])
      return Status(StatusCode::CommunicationError,
                    ok ? at + ": rank " + std::to_string(q) + " failed"
                       : failure);
  for (int q = 0; q < size_; ++q)
    if (q != rank_)
      FLEX_PEER_CUDA(cudaStreamWaitEvent(stream, peerDone_[q], 0),
                     at + ": waiting for rank " + std::to_string(q));
  return Status::ok();
}

} // namespace flex
