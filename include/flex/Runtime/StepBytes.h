//===- StepBytes.h - The bytes a step reads and writes ----------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// A device backend that runs exchanges on a stream of their own must order a
// compute step after each pending exchange whose bytes it touches, and only
// those: that is what lets chunk q + 1 move while chunk q's experts run. The
// rule lives here, on the host and apart from CUDA, so it is tested in CI:
// a step follows an exchange when it reads or writes bytes the exchange
// writes, or writes bytes the exchange reads. Ordering by bytes rather than
// by buffer names also covers buffers the memory plan placed on the same
// bytes.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_STEPBYTES_H
#define FLEX_RUNTIME_STEPBYTES_H

#include "flex/Runtime/Backend.h"
#include "flex/Runtime/ByteOverlap.h"
#include "flex/Runtime/Comm/Communicator.h"

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <vector>

namespace flex {

/// Device addresses (ByteOverlap.h has the rule).
using ByteRange = BasicByteRange<const char *>;
using StepBytes = BasicStepBytes<const char *>;

/// The rows of one chunk: a per-expert op of a pipelined variant touches
/// rows [chunk * rows, (chunk + 1) * rows) of its dispatch-shaped operands.
/// rows < 0: unknown on the host (whole buffers).
struct ChunkRows {
  int64_t chunk = 0;
  int64_t rows = -1;
};

/// The bytes of a step's operands; with `chunk.rows >= 0`, its
/// dispatch-shaped operands only the chunk's rows.
inline StepBytes stepBytes(const StepOperands &ops, ChunkRows chunk = {}) {
  auto range = [&](OperandRole role, const TensorView &view) {
    auto *data = static_cast<const char *>(view.data);
    ByteRange r{data, data + view.desc->numBytes()};
    if (chunk.rows >= 0 && isDispatchShapedRole(role) &&
        !view.desc->shape.empty()) {
      const int64_t rowBytes =
          view.desc->shape.back() *
          static_cast<int64_t>(dtypeSize(view.desc->dtype));
      r.begin = std::min(r.end, data + chunk.chunk * chunk.rows * rowBytes);
      r.end = std::min(r.end, r.begin + chunk.rows * rowBytes);
    }
    return r;
  };
  StepBytes bytes;
  for (int i = 0; i < kNumOperandRoles; ++i) {
    auto role = static_cast<OperandRole>(i);
    if (ops.inputs[i].isPresent())
      bytes.reads.push_back(range(role, ops.inputs[i]));
    if (ops.outputs[i].isPresent())
      bytes.writes.push_back(range(role, ops.outputs[i]));
  }
  return bytes;
}

/// The bytes of the runs `blocks` at `base`.
inline std::vector<ByteRange>
byteRangesOf(const void *base, const std::vector<Communicator::Block> &blocks) {
  std::vector<ByteRange> result;
  for (const Communicator::Block &block : blocks) {
    const char *begin = static_cast<const char *>(base) + block.offset;
    result.push_back({begin, begin + block.bytes});
  }
  return result;
}

/// Of the exchanges `pending` (oldest first, one stream, so waiting for one
/// waits for every older one), the newest one `step` must follow; -1 when
/// none.
inline int64_t newestToFollow(const std::vector<StepBytes> &pending,
                              const StepBytes &step) {
  for (size_t i = pending.size(); i-- > 0;)
    if (pending[i].mustPrecede(step))
      return static_cast<int64_t>(i);
  return -1;
}

} // namespace flex

#endif // FLEX_RUNTIME_STEPBYTES_H
