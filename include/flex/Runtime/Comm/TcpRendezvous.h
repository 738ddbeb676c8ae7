//===- TcpRendezvous.h - A small TCP meeting point for W ranks --*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares TcpRendezvous, the bootstrap channel of ranks started
// without MPI (torchrun-style: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in
// the environment). Rank 0 listens on the port, every other rank connects
// (retrying until rank 0 is up) and introduces itself; afterwards allGather
// of small byte blocks runs through rank 0 (a star: fine for an NCCL id or a
// few numbers, not for tensors). Every wait has a deadline, and every error
// names the address, the port and the ranks that did not answer.
//
// POSIX sockets only; no CUDA, no MPI. The NCCL communicator shares its
// unique id through it; moe-run reduces its check results through it.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_COMM_TCPRENDEZVOUS_H
#define FLEX_RUNTIME_COMM_TCPRENDEZVOUS_H

#include "flex/Runtime/Status.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace flex {

/// Where and who: what a launcher puts in the environment.
struct RendezvousInfo {
  std::string address; ///< MASTER_ADDR: rank 0's host
  int port = 0;        ///< the port rank 0 listens on
  int rank = 0;        ///< RANK
  int size = 1;        ///< WORLD_SIZE
  int localRank = -1;  ///< LOCAL_RANK, -1 when not set
};

/// Reads RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and LOCAL_RANK. The port
/// is FLEX_RENDEZVOUS_PORT when set; else MASTER_PORT, plus 1 under torchrun
/// (TORCHELASTIC_RUN_ID set: torchrun's own store holds MASTER_PORT).
/// InvalidArgument naming the variable that is missing or malformed.
Status readRendezvousEnvironment(RendezvousInfo &info);

/// Whether RANK and WORLD_SIZE are set with WORLD_SIZE > 1 (a torchrun-style
/// launch of several ranks).
bool isLaunchedByEnvironment();

/// The local rank of this process among the ranks of its host, from the
/// variables of torchrun (LOCAL_RANK), Open MPI, MPICH/Intel MPI or Slurm;
/// -1 when none is set.
int localRankFromEnvironment();

class TcpRendezvous {
public:
  /// Meets the other ranks: rank 0 listens on info.port and waits for the
  /// size - 1 others, which connect to info.address:info.port. At most
  /// `timeoutSeconds` (< 0: FLEX_COLLECTIVE_TIMEOUT_S or its default).
  /// CommunicationError naming what did not answer.
  static Status connect(const RendezvousInfo &info,
                        std::unique_ptr<TcpRendezvous> &rendezvous,
                        double timeoutSeconds = -1);
  ~TcpRendezvous();

  int rank() const { return rank_; }
  int size() const { return size_; }

  /// Block p of `recv` (`bytes` bytes at recv + p * bytes) = `send` of rank
  /// p. Every rank passes the same `bytes`; `what` names the exchange.
  Status allGather(const void *send, int64_t bytes, void *recv,
                   const std::string &what);

private:
  TcpRendezvous() = default;
  int rank_ = 0;
  int size_ = 1;
  double timeoutSeconds_ = 0;
  std::string where_; ///< "host:port", for messages
  /// Rank 0: the socket of rank p at [p] (-1 for itself). Others: [0] is
  /// the socket to rank 0.
  std::vector<int> sockets_;
};

} // namespace flex

#endif // FLEX_RUNTIME_COMM_TCPRENDEZVOUS_H
