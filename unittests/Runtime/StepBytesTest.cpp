//===- StepBytesTest.cpp - Ordering steps after pending exchanges ---------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// The rule a device backend uses to order a compute step after the
// exchanges still running on their own stream (StepBytes.h): it must follow
// every exchange whose bytes it touches, and need not follow the others,
// which is what lets a pipelined variant overlap.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/StepBytes.h"
#include "flex/Runtime/Comm/AllToAllLayout.h"

#include <gtest/gtest.h>

#include <vector>

using namespace flex;

namespace {

BufferDesc rowsDesc(int64_t rows, int64_t cols, DType dtype = DType::BF16) {
  BufferDesc desc;
  desc.name = "rows";
  desc.dtype = dtype;
  desc.shape = {rows, cols};
  return desc;
}

/// An exchange of layout `layout` from `input` into `output` (rows of
/// `rowBytes`), as the CUDA backend records it.
StepBytes exchangeBytes(const AllToAllLayout &layout, AllToAllDirection dir,
                        const void *input, const void *output,
                        int64_t rowBytes) {
  std::vector<Communicator::Block> send, recv;
  layout.blocks(dir, rowBytes, send, recv);
  return {byteRangesOf(input, send), byteRangesOf(output, recv)};
}

// A pipelined variant: W = 2 ranks, L = 2 local experts, C = 4, D = 2. The
// dispatch exchange of chunk q writes chunk q's rows of the received buffer;
// the first GEMM of chunk q' (a = received rows of chunk q', b = weights,
// c = its own output rows) must follow it exactly when q' == q.
TEST(StepBytes, AChunksGemmFollowsOnlyItsOwnChunksExchange) {
  const int64_t W = 2, L = 2, C = 4, D = 2, cols = 8;
  const int64_t rows = W * L * C, n = W * (C / D);
  BufferDesc rowsOfD = rowsDesc(rows, cols), weights = rowsDesc(L * cols, cols);
  std::vector<char> dispatched(rows * cols * 2), received(rows * cols * 2),
      hidden(rows * cols * 2), w1(L * cols * cols * 2);
  const int64_t rowBytes = cols * 2;
  for (int64_t q = 0; q < D; ++q) {
    AllToAllLayout layout{W, L, C, D, q};
    StepBytes exchange =
        exchangeBytes(layout, AllToAllDirection::Dispatch, dispatched.data(),
                      received.data(), rowBytes);
    for (int64_t other = 0; other < D; ++other) {
      StepOperands gemm;
      gemm.inputs[static_cast<int>(OperandRole::A)] = {received.data(),
                                                       &rowsOfD};
      gemm.inputs[static_cast<int>(OperandRole::B)] = {w1.data(), &weights};
      gemm.outputs[static_cast<int>(OperandRole::C)] = {hidden.data(),
                                                        &rowsOfD};
      StepBytes chunkGemm = stepBytes(gemm, {other, L * n});
      EXPECT_EQ(exchange.mustPrecede(chunkGemm), other == q)
          << "exchange of chunk " << q << ", GEMM of chunk " << other;
      // Without the chunk known on the host, the GEMM reads the whole
      // received buffer: it follows every exchange into it.
      EXPECT_TRUE(exchange.mustPrecede(stepBytes(gemm)));
    }
  }
}

// The received rows of chunk q, computed independently of the layout: the
// dispatch exchange of chunk q writes exactly [q * L * n, (q + 1) * L * n).
TEST(StepBytes, ADispatchExchangeWritesExactlyItsChunksReceivedRows) {
  const int64_t W = 3, L = 2, C = 6, D = 3, rowBytes = 4;
  const int64_t n = W * (C / D);
  std::vector<char> input(W * L * C * rowBytes), output(W * L * C * rowBytes);
  for (int64_t q = 0; q < D; ++q) {
    StepBytes exchange = exchangeBytes(AllToAllLayout{W, L, C, D, q},
                                       AllToAllDirection::Dispatch,
                                       input.data(), output.data(), rowBytes);
    std::vector<bool> written(W * L * C, false);
    for (const ByteRange &r : exchange.writes)
      for (const char *at = r.begin; at < r.end; at += rowBytes)
        written[(at - output.data()) / rowBytes] = true;
    for (int64_t row = 0; row < W * L * C; ++row)
      EXPECT_EQ(written[row], row / (L * n) == q)
          << "chunk " << q << ", received row " << row;
  }
}

TEST(StepBytes, WritingWhatAnExchangeReadsWaitsButReadingItDoesNot) {
  std::vector<char> a(64), b(64);
  BufferDesc desc = rowsDesc(8, 4);
  StepBytes exchange{{{a.data(), a.data() + 64}}, {{b.data(), b.data() + 64}}};
  StepOperands reader, writer, unrelated;
  reader.inputs[static_cast<int>(OperandRole::X)] = {a.data(), &desc};
  writer.outputs[static_cast<int>(OperandRole::Out)] = {a.data(), &desc};
  std::vector<char> other(64);
  unrelated.inputs[static_cast<int>(OperandRole::X)] = {other.data(), &desc};
  unrelated.outputs[static_cast<int>(OperandRole::Out)] = {other.data(), &desc};
  EXPECT_FALSE(exchange.mustPrecede(stepBytes(reader))) << "read after read";
  EXPECT_TRUE(exchange.mustPrecede(stepBytes(writer))) << "write after read";
  EXPECT_FALSE(exchange.mustPrecede(stepBytes(unrelated)));
  StepOperands readsOutput;
  readsOutput.inputs[static_cast<int>(OperandRole::X)] = {b.data() + 32, &desc};
  EXPECT_TRUE(exchange.mustPrecede(stepBytes(readsOutput)))
      << "read after write, overlapping in part";
}

// Adjacent ranges do not overlap: a buffer placed right after an exchange's
// bytes by the memory plan does not order a step after it.
TEST(StepBytes, AdjacentBytesDoNotOverlap) {
  std::vector<char> block(128);
  ByteRange low{block.data(), block.data() + 64};
  ByteRange high{block.data() + 64, block.data() + 128};
  EXPECT_FALSE(low.overlaps(high));
  EXPECT_FALSE(high.overlaps(low));
  EXPECT_TRUE(low.overlaps({block.data() + 63, block.data() + 65}));
}

TEST(StepBytes, TheNewestConflictingExchangeIsTheOneToWaitFor) {
  std::vector<char> a(16), b(16), c(16);
  auto writes = [](std::vector<char> &v) {
    return StepBytes{{}, {{v.data(), v.data() + 16}}};
  };
  std::vector<StepBytes> pending = {writes(a), writes(b), writes(a), writes(c)};
  StepBytes readsA{{{a.data(), a.data() + 16}}, {}};
  StepBytes readsB{{{b.data(), b.data() + 16}}, {}};
  StepBytes readsNothing;
  EXPECT_EQ(newestToFollow(pending, readsA), 2);
  EXPECT_EQ(newestToFollow(pending, readsB), 1);
  EXPECT_EQ(newestToFollow(pending, readsNothing), -1);
  EXPECT_EQ(newestToFollow({}, readsA), -1);
}

} // namespace
