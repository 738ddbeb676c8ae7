//===- ByteOverlap.h - When one step must follow an exchange -----*- C++
//-*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// The ordering rule of an exchange that runs on a stream of its own: a step
// follows a pending exchange when it reads or writes bytes the exchange
// writes, or writes bytes the exchange reads. The CUDA backend applies it to
// device addresses (StepBytes.h), the cost model to the memory plan's
// offsets (CostModel.cpp); both take it from here, over any address type.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_BYTEOVERLAP_H
#define FLEX_RUNTIME_BYTEOVERLAP_H

#include "flex/Runtime/Plan.h"

#include <algorithm>
#include <iterator>
#include <vector>

namespace flex {

/// The bytes [begin, end), as pointers or as offsets.
template <typename Address> struct BasicByteRange {
  Address begin{}, end{};

  bool overlaps(const BasicByteRange &other) const {
    return begin < other.end && other.begin < end;
  }
};

/// What one step (or exchange) reads and writes.
template <typename Address> struct BasicStepBytes {
  std::vector<BasicByteRange<Address>> reads, writes;

  /// Whether a step touching `step` must run after this exchange.
  bool mustPrecede(const BasicStepBytes &step) const {
    auto any = [](const std::vector<BasicByteRange<Address>> &a,
                  const std::vector<BasicByteRange<Address>> &b) {
      for (const auto &x : a)
        for (const auto &y : b)
          if (x.overlaps(y))
            return true;
      return false;
    };
    return any(writes, step.reads) || any(writes, step.writes) ||
           any(reads, step.writes);
  }
};

/// The operand roles whose buffers are dispatch-shaped (rows of experts),
/// the ones a pipelined chunk restricts to its own rows.
inline bool isDispatchShapedRole(OperandRole role) {
  static constexpr OperandRole kRoles[] = {
      OperandRole::A,       OperandRole::C,       OperandRole::Pre,
      OperandRole::GateIn,  OperandRole::UpIn,    OperandRole::GradC,
      OperandRole::Grad,    OperandRole::GradPre, OperandRole::GradGateIn,
      OperandRole::GradUpIn};
  return std::find(std::begin(kRoles), std::end(kRoles), role) !=
         std::end(kRoles);
}

} // namespace flex

#endif // FLEX_RUNTIME_BYTEOVERLAP_H
