//===- Element.h - One element of a typed buffer, as a double ---*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file defines the element access every host-side user of typed
// buffers shares (moe-run's inputs, the reference check, the tests): element
// i of a buffer of a plan dtype read as a double, or a double stored once
// rounded to the dtype.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_CORE_ELEMENT_H
#define FLEX_RUNTIME_CORE_ELEMENT_H

#include "flex/Runtime/Core/Half.h"
#include "flex/Runtime/Core/LayerConfig.h"

#include <cstdint>
#include <cstring>

namespace flex {

/// Element `i` of `data`, a buffer of `type`, widened to double.
inline double loadElement(const void *data, DType type, int64_t i) {
  const char *bytes = static_cast<const char *>(data);
  switch (type) {
  case DType::F32: {
    float v;
    std::memcpy(&v, bytes + 4 * i, 4);
    return v;
  }
  case DType::BF16:
  case DType::F16: {
    uint16_t v;
    std::memcpy(&v, bytes + 2 * i, 2);
    return type == DType::BF16 ? bf16ToFloat(v) : f16ToFloat(v);
  }
  case DType::I32: {
    int32_t v;
    std::memcpy(&v, bytes + 4 * i, 4);
    return v;
  }
  }
  return 0.0;
}

/// Stores `value` as element `i` of `data`, rounded to `type` once (through
/// float for the half types, as the kernels round).
inline void storeElement(void *data, DType type, int64_t i, double value) {
  char *bytes = static_cast<char *>(data);
  switch (type) {
  case DType::F32: {
    float v = static_cast<float>(value);
    std::memcpy(bytes + 4 * i, &v, 4);
    return;
  }
  case DType::BF16:
  case DType::F16: {
    float f = static_cast<float>(value);
    uint16_t v = type == DType::BF16 ? floatToBf16(f) : floatToF16(f);
    std::memcpy(bytes + 2 * i, &v, 2);
    return;
  }
  case DType::I32: {
    int32_t v = static_cast<int32_t>(value);
    std::memcpy(bytes + 4 * i, &v, 4);
    return;
  }
  }
}

} // namespace flex

#endif // FLEX_RUNTIME_CORE_ELEMENT_H
