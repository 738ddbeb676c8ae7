//===- TcpRendezvousTest.cpp - The torchrun-style rendezvous --------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file tests TcpRendezvous on localhost with ranks as threads: the
// meeting, allGather of blocks, the environment it reads, and the bounded
// waits (a rank 0 that never comes, a rank that never joins).
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/Comm/NcclCommunicator.h"
#include "flex/Runtime/Comm/TcpRendezvous.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <cstdlib>
#include <netinet/in.h>
#include <sys/socket.h>
#include <thread>
#include <unistd.h>

using namespace flex;
using ::testing::HasSubstr;

namespace {

/// A port nobody listens on right now (bind to 0, read it, close).
int freePort() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  EXPECT_EQ(::bind(fd, reinterpret_cast<sockaddr *>(&address), sizeof address),
            0);
  socklen_t length = sizeof address;
  ::getsockname(fd, reinterpret_cast<sockaddr *>(&address), &length);
  ::close(fd);
  return ntohs(address.sin_port);
}

TEST(TcpRendezvous, ThreeRanksGatherTheirBlocks) {
  const int size = 3, port = freePort();
  std::vector<Status> results(size);
  std::vector<std::vector<int64_t>> gathered(size);
  std::vector<std::thread> threads;
  for (int r = 0; r < size; ++r)
    threads.emplace_back([&, r] {
      RendezvousInfo info{"127.0.0.1", port, r, size};
      std::unique_ptr<TcpRendezvous> rendezvous;
      Status s = TcpRendezvous::connect(info, rendezvous, 20);
      // Two exchanges in a row, of different sizes.
      for (int round = 0; s && round < 2; ++round) {
        std::vector<int64_t> mine(round + 2, 100 * r + round);
        gathered[r].assign(mine.size() * size, -1);
        s = rendezvous->allGather(
            mine.data(), static_cast<int64_t>(mine.size() * sizeof(int64_t)),
            gathered[r].data(), "round " + std::to_string(round));
      }
      results[r] = s;
    });
  for (std::thread &t : threads)
    t.join();
  for (int r = 0; r < size; ++r) {
    ASSERT_TRUE(results[r].isOk()) << "rank " << r << ": "
                                   << results[r].message();
    for (int p = 0; p < size; ++p)
      for (int i = 0; i < 3; ++i)
        EXPECT_EQ(gathered[r][p * 3 + i], 100 * p + 1);
  }
}

TEST(TcpRendezvous, ARankWithoutRankZeroTimesOutWithTheAddress) {
  const int port = freePort();
  RendezvousInfo info{"127.0.0.1", port, 1, 2};
  std::unique_ptr<TcpRendezvous> rendezvous;
  Status status = TcpRendezvous::connect(info, rendezvous, 0.5);
  EXPECT_EQ(status.code(), StatusCode::CommunicationError);
  EXPECT_THAT(status.message(),
              HasSubstr("127.0.0.1:" + std::to_string(port)));
  EXPECT_THAT(status.message(), HasSubstr("is rank 0 running"));
}

TEST(TcpRendezvous, RankZeroNamesTheRanksThatNeverCame) {
  RendezvousInfo info{"127.0.0.1", freePort(), 0, 3};
  std::unique_ptr<TcpRendezvous> rendezvous;
  Status status = TcpRendezvous::connect(info, rendezvous, 0.5);
  EXPECT_EQ(status.code(), StatusCode::CommunicationError);
  EXPECT_THAT(status.message(), HasSubstr("waiting for rank(s) 1, 2"));
}

TEST(TcpRendezvous, ReadsTheTorchrunEnvironment) {
  ::setenv("RANK", "1", 1);
  ::setenv("WORLD_SIZE", "2", 1);
  ::setenv("MASTER_ADDR", "localhost", 1);
  ::setenv("MASTER_PORT", "29500", 1);
  ::setenv("LOCAL_RANK", "1", 1);
  ::unsetenv("FLEX_RENDEZVOUS_PORT");
  ::unsetenv("TORCHELASTIC_RUN_ID");
  RendezvousInfo info;
  ASSERT_TRUE(readRendezvousEnvironment(info).isOk());
  EXPECT_EQ(info.rank, 1);
  EXPECT_EQ(info.size, 2);
  EXPECT_EQ(info.address, "localhost");
  EXPECT_EQ(info.port, 29500);
  EXPECT_EQ(info.localRank, 1);
  EXPECT_TRUE(isLaunchedByEnvironment());
  // Under torchrun its own store holds MASTER_PORT.
  ::setenv("TORCHELASTIC_RUN_ID", "job", 1);
  ASSERT_TRUE(readRendezvousEnvironment(info).isOk());
  EXPECT_EQ(info.port, 29501);
  ::setenv("FLEX_RENDEZVOUS_PORT", "31000", 1);
  ASSERT_TRUE(readRendezvousEnvironment(info).isOk());
  EXPECT_EQ(info.port, 31000);
  ::setenv("RANK", "2", 1);
  Status bad = readRendezvousEnvironment(info);
  EXPECT_EQ(bad.code(), StatusCode::InvalidArgument);
  EXPECT_THAT(bad.message(), HasSubstr("not below WORLD_SIZE"));
  ::unsetenv("MASTER_ADDR");
  ::setenv("RANK", "0", 1);
  bad = readRendezvousEnvironment(info);
  EXPECT_THAT(bad.message(), HasSubstr("MASTER_ADDR is not set"));
  for (const char *name : {"RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK",
                           "FLEX_RENDEZVOUS_PORT", "TORCHELASTIC_RUN_ID"})
    ::unsetenv(name);
  EXPECT_FALSE(isLaunchedByEnvironment());
}

// Without NCCL (or without a GPU) the entry points say what is missing.
TEST(NcclCommunicator, SaysWhenItIsNotBuilt) {
  if (isNcclAvailable())
    GTEST_SKIP() << "this build has the NCCL communicator "
                    "(unittests/Cuda/NcclCommunicatorTest.cpp tests it)";
  std::shared_ptr<Communicator> comm;
  Status status = createNcclCommunicatorFromMpi(comm, nullptr);
  EXPECT_EQ(status.code(), StatusCode::Unavailable);
  EXPECT_THAT(status.message(), HasSubstr("no NCCL communicator"));
  EXPECT_FALSE(comm);
}

} // namespace
