//===- StepViews.h - Kernel buffer views of step operands -------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file defines the small conversions every backend makes from a step's
// operand views (TensorView) to the buffer views its kernels take, so the
// CPU and CUDA backends share them.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_STEPVIEWS_H
#define FLEX_RUNTIME_STEPVIEWS_H

#include "flex/Runtime/Backend.h"
#include "flex/Runtime/Cpu/CpuKernels.h"

namespace flex::step_views {

/// A typed read view of an operand; empty for an absent optional operand.
inline cpu::ReadBuffer read(const TensorView &view) {
  if (!view.isPresent())
    return {};
  return {view.data, view.desc->dtype};
}

/// A typed write view of an operand; empty for an absent optional operand.
inline cpu::WriteBuffer write(const TensorView &view) {
  if (!view.isPresent())
    return {};
  return {view.data, view.desc->dtype};
}

/// The operand as an array of `T` (routing buffers have fixed types).
template <typename T> const T *readAs(const TensorView &view) {
  return static_cast<const T *>(view.data);
}
template <typename T> T *writeAs(const TensorView &view) {
  return static_cast<T *>(view.data);
}

/// The plan's epilogue as the kernels spell it.
inline cpu::Epilogue toKernelEpilogue(Epilogue epilogue) {
  switch (epilogue) {
  case Epilogue::None:
    return cpu::Epilogue::None;
  case Epilogue::Relu:
    return cpu::Epilogue::Relu;
  case Epilogue::Gelu:
    return cpu::Epilogue::Gelu;
  case Epilogue::Silu:
    return cpu::Epilogue::Silu;
  }
  return cpu::Epilogue::None;
}

} // namespace flex::step_views

#endif // FLEX_RUNTIME_STEPVIEWS_H
