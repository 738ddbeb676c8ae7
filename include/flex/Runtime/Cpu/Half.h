//===- Half.h - Forwards to Core/Half.h -------------------------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// The bf16/f16 conversions moved to the backend-neutral core
// (flex/Runtime/Core/Half.h, namespace flex). This header forwards there and
// keeps the old cpu:: spellings for code outside the runtime; include the
// Core header and write flex::floatToBf16 etc. in new code.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_CPU_HALF_H
#define FLEX_RUNTIME_CPU_HALF_H

#include "flex/Runtime/Core/Half.h"

namespace flex::cpu {
using flex::bf16ToFloat;
using flex::f16ToFloat;
using flex::floatToBf16;
using flex::floatToF16;
} // namespace flex::cpu

#endif // FLEX_RUNTIME_CPU_HALF_H
