//===- TcpRendezvous.cpp - A small TCP meeting point for W ranks ----------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements TcpRendezvous: blocking-free POSIX sockets driven by
// poll() against one deadline per call. Wire format (little-endian, as every
// machine Flex runs on): a hello of four u32 (magic, version, rank, size)
// from each rank to rank 0, then per allGather one u64 length and the bytes
// each way.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/Comm/TcpRendezvous.h"
#include "flex/Runtime/Comm/Communicator.h"

#include <arpa/inet.h>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <thread>
#include <unistd.h>

namespace flex {
namespace {

using Clock = std::chrono::steady_clock;

constexpr uint32_t kMagic = 0x52584c46; // "FLXR"
constexpr uint32_t kVersion = 1;

std::string errnoText(int error) { return std::strerror(error); }

/// Milliseconds left until `deadline` (0 when past), for poll().
int millisLeft(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                  deadline - Clock::now())
                  .count();
  return left <= 0 ? 0 : static_cast<int>(std::min<int64_t>(left, 1 << 30));
}

/// Waits until `fd` is ready for `events`; false on timeout (errno 0) or
/// error (errno set).
bool waitFor(int fd, short events, Clock::time_point deadline) {
  for (;;) {
    pollfd p{fd, events, 0};
    int ready = ::poll(&p, 1, millisLeft(deadline));
    if (ready > 0)
      return true;
    if (ready == 0) {
      errno = 0;
      return false;
    }
    if (errno != EINTR)
      return false;
  }
}

bool sendAll(int fd, const void *data, size_t bytes,
             Clock::time_point deadline) {
  const char *p = static_cast<const char *>(data);
  while (bytes > 0) {
    ssize_t sent = ::send(fd, p, bytes, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (sent > 0) {
      p += sent;
      bytes -= static_cast<size_t>(sent);
      continue;
    }
    if (sent < 0 && errno == EINTR)
      continue;
    if (sent < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (!waitFor(fd, POLLOUT, deadline))
        return false;
      continue;
    }
    return false;
  }
  return true;
}

/// Reads exactly `bytes`; false on timeout, error or a closed peer (errno
/// ECONNRESET then).
bool recvAll(int fd, void *data, size_t bytes, Clock::time_point deadline) {
  char *p = static_cast<char *>(data);
  while (bytes > 0) {
    if (!waitFor(fd, POLLIN, deadline))
      return false;
    ssize_t got = ::recv(fd, p, bytes, MSG_DONTWAIT);
    if (got > 0) {
      p += got;
      bytes -= static_cast<size_t>(got);
      continue;
    }
    if (got == 0) {
      errno = ECONNRESET;
      return false;
    }
    if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)
      continue;
    return false;
  }
  return true;
}

void closeSocket(int &fd) {
  if (fd >= 0)
    ::close(fd);
  fd = -1;
}

Status commError(std::string message) {
  return Status(StatusCode::CommunicationError, std::move(message));
}

/// "timed out after 30 s" or the errno text of the last call.
std::string failure(double timeoutSeconds) {
  if (errno == 0)
    return "timed out after " + std::to_string(timeoutSeconds) +
           " s (FLEX_COLLECTIVE_TIMEOUT_S)";
  if (errno == ECONNRESET)
    return "the connection was closed (did that rank exit or fail?)";
  return errnoText(errno);
}

bool parseInt(const char *text, int &value) {
  if (!text || !*text)
    return false;
  char *end = nullptr;
  long v = std::strtol(text, &end, 10);
  if (*end || v < 0 || v > (1 << 30))
    return false;
  value = static_cast<int>(v);
  return true;
}

} // namespace

bool isLaunchedByEnvironment() {
  int rank = 0, size = 0;
  return parseInt(std::getenv("RANK"), rank) &&
         parseInt(std::getenv("WORLD_SIZE"), size) && size > 1;
}

int localRankFromEnvironment() {
  for (const char *name : {"LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK",
                           "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK",
                           "SLURM_LOCALID"}) {
    int value = 0;
    if (parseInt(std::getenv(name), value))
      return value;
  }
  return -1;
}

Status readRendezvousEnvironment(RendezvousInfo &info) {
  auto need = [](const char *name, int &value, int min) -> Status {
    const char *text = std::getenv(name);
    if (!text || !*text)
      return Status(StatusCode::InvalidArgument,
                    std::string(name) +
                        " is not set; a launch without MPI needs RANK, "
                        "WORLD_SIZE, MASTER_ADDR and MASTER_PORT (as torchrun "
                        "sets them)");
    if (!parseInt(text, value) || value < min)
      return Status(StatusCode::InvalidArgument,
                    std::string(name) + "='" + text +
                        "' is not an integer >= " + std::to_string(min));
    return Status::ok();
  };
  if (Status s = need("RANK", info.rank, 0); !s)
    return s;
  if (Status s = need("WORLD_SIZE", info.size, 1); !s)
    return s;
  if (info.rank >= info.size)
    return Status(StatusCode::InvalidArgument,
                  "RANK " + std::to_string(info.rank) +
                      " is not below WORLD_SIZE " + std::to_string(info.size));
  const char *address = std::getenv("MASTER_ADDR");
  info.address = address && *address ? address : "";
  if (info.address.empty())
    return Status(StatusCode::InvalidArgument,
                  "MASTER_ADDR is not set; it names the host of rank 0");
  const char *flexPort = std::getenv("FLEX_RENDEZVOUS_PORT");
  if (flexPort && *flexPort) {
    if (Status s = need("FLEX_RENDEZVOUS_PORT", info.port, 1); !s)
      return s;
  } else {
    if (Status s = need("MASTER_PORT", info.port, 1); !s)
      return s;
    // torchrun's agent serves its own store on MASTER_PORT.
    const char *elastic = std::getenv("TORCHELASTIC_RUN_ID");
    if (elastic && *elastic)
      info.port += 1;
  }
  if (info.port > 65535)
    return Status(StatusCode::InvalidArgument,
                  "the rendezvous port " + std::to_string(info.port) +
                      " is above 65535");
  info.localRank = localRankFromEnvironment();
  return Status::ok();
}

TcpRendezvous::~TcpRendezvous() {
  for (int &fd : sockets_)
    closeSocket(fd);
}

Status TcpRendezvous::connect(const RendezvousInfo &info,
                              std::unique_ptr<TcpRendezvous> &rendezvous,
                              double timeoutSeconds) {
  rendezvous.reset();
  if (timeoutSeconds < 0)
    if (Status s = getCollectiveTimeout(timeoutSeconds); !s)
      return s;
  if (info.size < 1 || info.rank < 0 || info.rank >= info.size)
    return Status(StatusCode::InvalidArgument,
                  "rendezvous: rank " + std::to_string(info.rank) +
                      " of " + std::to_string(info.size) + " is out of range");
  std::unique_ptr<TcpRendezvous> r(new TcpRendezvous);
  r->rank_ = info.rank;
  r->size_ = info.size;
  r->timeoutSeconds_ = timeoutSeconds;
  r->where_ = info.address + ":" + std::to_string(info.port);
  const std::string at = "rendezvous at " + r->where_ + ": rank " +
                         std::to_string(info.rank) + ": ";
  auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                     std::chrono::duration<double>(
                                         timeoutSeconds));
  if (info.size == 1) {
    rendezvous = std::move(r);
    return Status::ok();
  }

  if (info.rank == 0) {
    int listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (listener < 0)
      return commError(at + "socket: " + errnoText(errno));
    int one = 1;
    ::setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_ANY);
    address.sin_port = htons(static_cast<uint16_t>(info.port));
    if (::bind(listener, reinterpret_cast<sockaddr *>(&address),
               sizeof address) != 0 ||
        ::listen(listener, info.size) != 0) {
      int error = errno;
      closeSocket(listener);
      return commError(at + "cannot listen on port " +
                       std::to_string(info.port) + ": " + errnoText(error) +
                       (error == EADDRINUSE
                            ? " (another job or torchrun's own store holds "
                              "it; set FLEX_RENDEZVOUS_PORT to a free port)"
                            : ""));
    }
    ::fcntl(listener, F_SETFL, ::fcntl(listener, F_GETFL) | O_NONBLOCK);
    r->sockets_.assign(info.size, -1);
    int joined = 1;
    while (joined < info.size) {
      if (!waitFor(listener, POLLIN, deadline)) {
        std::string missing;
        for (int p = 1; p < info.size; ++p)
          if (r->sockets_[p] < 0)
            missing += (missing.empty() ? "" : ", ") + std::to_string(p);
        std::string why = failure(timeoutSeconds);
        closeSocket(listener);
        return commError(at + why + " waiting for rank(s) " + missing +
                         " to connect");
      }
      int fd = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0)
        continue; // the peer went away between poll and accept
      ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      uint32_t hello[4] = {};
      if (!recvAll(fd, hello, sizeof hello, deadline) ||
          hello[0] != kMagic || hello[1] != kVersion) {
        // Not one of ours (a port scanner, a stale job): ignore it.
        ::close(fd);
        continue;
      }
      const int peer = static_cast<int>(hello[2]);
      if (static_cast<int>(hello[3]) != info.size || peer <= 0 ||
          peer >= info.size || r->sockets_[peer] >= 0) {
        ::close(fd);
        closeSocket(listener);
        return commError(
            at + "a rank introduced itself as rank " + std::to_string(peer) +
            " of " + std::to_string(hello[3]) + ", but this job has " +
            std::to_string(info.size) +
            " ranks and each rank joins once (check RANK and WORLD_SIZE)");
      }
      r->sockets_[peer] = fd;
      ++joined;
    }
    closeSocket(listener);
    rendezvous = std::move(r);
    return Status::ok();
  }

  // Other ranks: connect, retrying while rank 0 is not listening yet.
  addrinfo hints{}, *found = nullptr;
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  std::string port = std::to_string(info.port);
  if (int error = ::getaddrinfo(info.address.c_str(), port.c_str(), &hints,
                                &found);
      error != 0)
    return commError(at + "cannot resolve MASTER_ADDR '" + info.address +
                     "': " + gai_strerror(error));
  std::unique_ptr<addrinfo, void (*)(addrinfo *)> owned(found, freeaddrinfo);
  int lastError = 0;
  for (;;) {
    int fd = ::socket(found->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
      return commError(at + "socket: " + errnoText(errno));
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
    int rc = ::connect(fd, found->ai_addr, found->ai_addrlen);
    if (rc != 0 && errno == EINPROGRESS) {
      if (waitFor(fd, POLLOUT, deadline)) {
        int error = 0;
        socklen_t length = sizeof error;
        ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length);
        rc = error == 0 ? 0 : -1;
        errno = error;
      } else {
        rc = -1;
      }
    }
    if (rc == 0) {
      int one = 1;
      ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      uint32_t hello[4] = {kMagic, kVersion, static_cast<uint32_t>(info.rank),
                           static_cast<uint32_t>(info.size)};
      if (!sendAll(fd, hello, sizeof hello, deadline)) {
        std::string why = failure(timeoutSeconds);
        ::close(fd);
        return commError(at + "introducing itself to rank 0: " + why);
      }
      r->sockets_.assign(1, fd);
      rendezvous = std::move(r);
      return Status::ok();
    }
    lastError = errno;
    ::close(fd);
    if (Clock::now() >= deadline)
      return commError(at + "rank 0 did not accept a connection within " +
                       std::to_string(timeoutSeconds) +
                       " s (FLEX_COLLECTIVE_TIMEOUT_S; last error: " +
                       (lastError ? errnoText(lastError) : "timed out") +
                       "); is rank 0 running, and are MASTER_ADDR and the "
                       "port right?");
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

Status TcpRendezvous::allGather(const void *send, int64_t bytes, void *recv,
                                const std::string &what) {
  if (bytes < 0)
    return Status(StatusCode::InvalidArgument,
                  what + ": negative block size");
  auto *out = static_cast<char *>(recv);
  std::memmove(out + static_cast<int64_t>(rank_) * bytes, send,
               static_cast<size_t>(bytes));
  if (size_ == 1)
    return Status::ok();
  auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                     std::chrono::duration<double>(
                                         timeoutSeconds_));
  const std::string at = what + " (rendezvous at " + where_ + ", rank " +
                         std::to_string(rank_) + "): ";
  const uint64_t total = static_cast<uint64_t>(bytes) * size_;
  if (rank_ != 0) {
    uint64_t length = static_cast<uint64_t>(bytes);
    if (!sendAll(sockets_[0], &length, sizeof length, deadline) ||
        !sendAll(sockets_[0], send, static_cast<size_t>(bytes), deadline))
      return commError(at + "sending to rank 0: " + failure(timeoutSeconds_));
    uint64_t answer = 0;
    if (!recvAll(sockets_[0], &answer, sizeof answer, deadline))
      return commError(at + "waiting for rank 0: " + failure(timeoutSeconds_));
    if (answer != total)
      return commError(at + "rank 0 answered " + std::to_string(answer) +
                       " bytes, expected " + std::to_string(total) +
                       "; the ranks are in different exchanges");
    if (!recvAll(sockets_[0], out, static_cast<size_t>(total), deadline))
      return commError(at + "receiving from rank 0: " +
                       failure(timeoutSeconds_));
    return Status::ok();
  }
  for (int p = 1; p < size_; ++p) {
    uint64_t length = 0;
    if (!recvAll(sockets_[p], &length, sizeof length, deadline))
      return commError(at + "waiting for rank " + std::to_string(p) + ": " +
                       failure(timeoutSeconds_));
    if (length != static_cast<uint64_t>(bytes))
      return commError(at + "rank " + std::to_string(p) + " sent " +
                       std::to_string(length) + " bytes, expected " +
                       std::to_string(bytes) +
                       "; the ranks are in different exchanges");
    if (!recvAll(sockets_[p], out + static_cast<int64_t>(p) * bytes,
                 static_cast<size_t>(bytes), deadline))
      return commError(at + "receiving from rank " + std::to_string(p) + ": " +
                       failure(timeoutSeconds_));
  }
  for (int p = 1; p < size_; ++p)
    if (!sendAll(sockets_[p], &total, sizeof total, deadline) ||
        !sendAll(sockets_[p], out, static_cast<size_t>(total), deadline))
      return commError(at + "answering rank " + std::to_string(p) + ": " +
                       failure(timeoutSeconds_));
  return Status::ok();
}

} // namespace flex
