//===- MpiCommunicatorTest.cpp - The MPI communicator under mpirun --------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file tests the MPI communicator on the ranks of an mpirun launch
// (ctest runs it with 2 and 4 processes): every collective against values
// each rank can predict, blocks of uneven and zero size, and the bounded
// wait: a rank that does not come makes the collective fail, naming it,
// instead of hanging. Only rank 0's gtest output is printed.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/Comm/MpiCommunicator.h"
#include "flex/Runtime/Core/Half.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include <cstdint>
#include <vector>

using namespace flex;
using ::testing::HasSubstr;

namespace {

std::shared_ptr<Communicator> makeComm(double timeout = 30,
                                       bool abortOnFailure = true) {
  MpiCommunicatorOptions options;
  options.timeoutSeconds = timeout;
  options.abortOnFailure = abortOnFailure;
  std::shared_ptr<Communicator> comm;
  Status status = createMpiCommunicator(comm, options);
  EXPECT_TRUE(status.isOk()) << status.message();
  return comm;
}

// Rank p sends (p + 1) * (q + 1) bytes to rank q, each byte p * 16 + q; one
// pair sends nothing.
TEST(MpiCommunicator, AllToAllWithUnevenBlocks) {
  auto comm = makeComm();
  const int W = comm->size(), me = comm->rank();
  auto bytesFrom = [&](int p, int q) {
    return p == 0 && q == W - 1 ? 0 : (p + 1) * (q + 1);
  };
  std::vector<int64_t> sendOffsets(W), sendBytes(W), recvOffsets(W),
      recvBytes(W);
  int64_t sendTotal = 0, recvTotal = 0;
  for (int p = 0; p < W; ++p) {
    sendOffsets[p] = sendTotal;
    sendBytes[p] = bytesFrom(me, p);
    sendTotal += sendBytes[p];
    recvOffsets[p] = recvTotal;
    recvBytes[p] = bytesFrom(p, me);
    recvTotal += recvBytes[p];
  }
  std::vector<uint8_t> send(sendTotal), recv(recvTotal, 0xee);
  for (int p = 0; p < W; ++p)
    for (int64_t i = 0; i < sendBytes[p]; ++i)
      send[sendOffsets[p] + i] = static_cast<uint8_t>(me * 16 + p);
  Status status =
      comm->allToAll(send.data(), sendOffsets.data(), sendBytes.data(),
                     recv.data(), recvOffsets.data(), recvBytes.data(), "a2a");
  ASSERT_TRUE(status.isOk()) << status.message();
  for (int p = 0; p < W; ++p)
    for (int64_t i = 0; i < recvBytes[p]; ++i)
      ASSERT_EQ(recv[recvOffsets[p] + i], static_cast<uint8_t>(p * 16 + me))
          << "from rank " << p;
}

TEST(MpiCommunicator, ReductionsAndGather) {
  auto comm = makeComm();
  const int W = comm->size(), me = comm->rank();
  int32_t values[2] = {me, -me};
  ASSERT_TRUE(comm->allReduceMaxInt32(values, 2, "max").isOk());
  EXPECT_EQ(values[0], W - 1);
  EXPECT_EQ(values[1], 0);

  float mine[3] = {float(me), float(2 * me), float(3 * me)};
  std::vector<float> all(3 * W, -1);
  ASSERT_TRUE(comm->allGather(mine, sizeof(mine), all.data(), "gather").isOk());
  for (int p = 0; p < W; ++p)
    EXPECT_EQ(all[3 * p + 2], float(3 * p));

  // send[j, i] = rank + j + i: block j of the sum is W*(j+i) + W(W-1)/2.
  const int64_t count = 5;
  std::vector<float> send(W * count), recv(count);
  std::vector<uint16_t> sendBf16(W * count), recvBf16(count);
  for (int j = 0; j < W; ++j)
    for (int64_t i = 0; i < count; ++i) {
      send[j * count + i] = float(me + j + i);
      sendBf16[j * count + i] = floatToBf16(float(me + j + i));
    }
  ASSERT_TRUE(
      comm->reduceScatterSum(send.data(), recv.data(), count, DType::F32, "rs")
          .isOk());
  ASSERT_TRUE(comm->reduceScatterSum(sendBf16.data(), recvBf16.data(), count,
                                     DType::BF16, "rs bf16")
                  .isOk());
  for (int64_t i = 0; i < count; ++i) {
    float want = float(W * (me + i) + W * (W - 1) / 2);
    EXPECT_EQ(recv[i], want);
    EXPECT_EQ(bf16ToFloat(recvBf16[i]), want);
  }
  ASSERT_TRUE(comm->barrier("barrier").isOk());
  EXPECT_EQ(comm->reduceScatterSum(send.data(), recv.data(), count, DType::I32,
                                   "rs i32")
                .code(),
            StatusCode::InvalidArgument);
}

// Rank 0 waits for a block rank 1 sends late: the wait ends at the timeout
// with the collective and rank 1 named, and the communicator stays broken.
// Rank 1 then sends, so no message is left behind at MPI_Finalize.
TEST(MpiCommunicator, TimeoutNamesTheCollectiveAndTheRank) {
  auto comm = makeComm(/*timeout=*/0.5, /*abortOnFailure=*/false);
  const int W = comm->size(), me = comm->rank();
  if (W < 2)
    GTEST_SKIP() << "needs 2 ranks";
  // Only ranks 0 and 1 exchange one byte each way.
  std::vector<int64_t> offsets(W, 0), bytes(W, 0);
  static uint8_t send = 1, recv = 0;
  if (me <= 1)
    bytes[1 - me] = 1;
  if (me == 0) {
    Status status = comm->allToAll(&send, offsets.data(), bytes.data(), &recv,
                                   offsets.data(), bytes.data(),
                                   "all_to_all dispatch 'disp' -> 'recv'");
    EXPECT_EQ(status.code(), StatusCode::CommunicationError);
    EXPECT_THAT(status.message(),
                HasSubstr("rank 0: all_to_all dispatch 'disp' -> 'recv': "
                          "timed out after 0.5"));
    EXPECT_THAT(status.message(), HasSubstr("waiting for rank(s) 1"));
    Status later = comm->barrier("later");
    EXPECT_EQ(later.code(), StatusCode::CommunicationError);
    EXPECT_THAT(later.message(), HasSubstr("failed earlier"));
  }
  MPI_Barrier(MPI_COMM_WORLD);
  if (me == 1) {
    EXPECT_TRUE(comm->allToAll(&send, offsets.data(), bytes.data(), &recv,
                               offsets.data(), bytes.data(), "late")
                    .isOk());
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

// Groups of 2 consecutive ranks and the ranks of one parity (W even): each
// sub-communicator holds its group in index order; a gather and a sum reach
// exactly the group's ranks.
TEST(MpiCommunicator, SplitIntoGroupsOfRanks) {
  auto comm = makeComm();
  const int W = comm->size(), me = comm->rank();
  if (W % 2 != 0)
    GTEST_SKIP() << "needs an even number of ranks";
  for (RankGroups groups : {RankGroups{2, 1}, RankGroups{W / 2, 2}}) {
    SCOPED_TRACE("size " + std::to_string(groups.size) + " stride " +
                 std::to_string(groups.stride));
    std::shared_ptr<Communicator> group;
    Status status = splitIntoGroups(*comm, groups, group);
    ASSERT_TRUE(status.isOk()) << status.message();
    ASSERT_EQ(group->size(), groups.size);
    EXPECT_EQ(group->rank(), groups.index(me));
    int32_t mine = me;
    std::vector<int32_t> members(groups.size, -1);
    ASSERT_TRUE(
        group->allGather(&mine, sizeof(mine), members.data(), "gather").isOk());
    const int base = me / (groups.size * groups.stride) *
                         (groups.size * groups.stride) +
                     me % groups.stride;
    for (int i = 0; i < groups.size; ++i)
      EXPECT_EQ(members[i], base + i * groups.stride);
    std::vector<float> send(groups.size, float(me + 1)), recv(1, -1);
    ASSERT_TRUE(
        group->reduceScatterSum(send.data(), recv.data(), 1, DType::F32, "rs")
            .isOk());
    float want = 0;
    for (int i = 0; i < groups.size; ++i)
      want += float(base + i * groups.stride + 1);
    EXPECT_EQ(recv[0], want);
  }
  std::shared_ptr<Communicator> none;
  EXPECT_EQ(splitIntoGroups(*comm, RankGroups{W + 1, 1}, none).code(),
            StatusCode::InvalidArgument);
}

} // namespace

int main(int argc, char **argv) {
  if (Status status = initMpi(&argc, &argv); !status) {
    std::fprintf(stderr, "%s\n", status.message().c_str());
    return 1;
  }
  ::testing::InitGoogleTest(&argc, argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  // One report: rank 0's. A failure on another rank still fails the run.
  if (rank != 0)
    delete ::testing::UnitTest::GetInstance()->listeners().Release(
        ::testing::UnitTest::GetInstance()
            ->listeners()
            .default_result_printer());
  int failed = RUN_ALL_TESTS();
  int anyFailed = 0;
  MPI_Allreduce(&failed, &anyFailed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  finalizeMpi();
  return anyFailed;
}
