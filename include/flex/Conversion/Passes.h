//===- Passes.h - Conversion passes of Flex ---------------------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares the conversion passes of Flex and their registration.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_CONVERSION_PASSES_H
#define FLEX_CONVERSION_PASSES_H

#include "flex/Conversion/MoeToMoeRT/MoeToMoeRT.h"

namespace flex {

#define GEN_PASS_REGISTRATION
#include "flex/Conversion/Passes.h.inc"

} // namespace flex

#endif // FLEX_CONVERSION_PASSES_H
