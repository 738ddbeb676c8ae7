//===- Half.h - bf16 and f16 conversions ------------------------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file defines bit-exact conversions between fp32 and the 16-bit storage
// types bf16 and f16, rounding to nearest even. They are software-only so the
// runtime needs no F16C/AVX512-BF16 and gives the same bits on every host.
// Backend-neutral (Core): the CPU kernels, the communicators' reductions and
// the tools share them.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_CORE_HALF_H
#define FLEX_RUNTIME_CORE_HALF_H

#include <bit>
#include <cstdint>

namespace flex {

inline float bf16ToFloat(uint16_t bits) {
  return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16);
}

/// Round to nearest even; NaN stays a (quiet) NaN with its sign, infinities
/// stay infinities, values past bf16's range round to infinity.
inline uint16_t floatToBf16(float value) {
  uint32_t bits = std::bit_cast<uint32_t>(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u)
    return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  uint32_t roundingBias = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + roundingBias) >> 16);
}

inline float f16ToFloat(uint16_t bits) {
  uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  uint32_t exponent = (bits >> 10) & 0x1fu;
  uint32_t mantissa = bits & 0x3ffu;
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24 is exact in fp32.
    float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    return std::bit_cast<float>(sign | std::bit_cast<uint32_t>(magnitude));
  }
  if (exponent == 31)
    return std::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));
  return std::bit_cast<float>(sign | ((exponent + 112u) << 23) |
                              (mantissa << 13));
}

/// Round to nearest even (F. Giesen's float_to_half_fast3_rtne); NaN becomes
/// the quiet NaN 0x7e00 with its sign, values from 65520 up round to infinity.
inline uint16_t floatToF16(float value) {
  uint32_t bits = std::bit_cast<uint32_t>(value);
  uint32_t sign = bits & 0x80000000u;
  bits ^= sign;
  uint32_t result;
  if (bits >= (127u + 16u) << 23) {
    result = bits > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (bits < 113u << 23) {
    // Subnormal or zero: adding 0.5 aligns the half ulp (2^-24) with fp32's
    // last mantissa bit, so the fp32 adder does the rounding.
    constexpr uint32_t denormMagic = 126u << 23;
    float shifted =
        std::bit_cast<float>(bits) + std::bit_cast<float>(denormMagic);
    result = std::bit_cast<uint32_t>(shifted) - denormMagic;
  } else {
    uint32_t mantissaOdd = (bits >> 13) & 1u;
    bits += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + mantissaOdd;
    result = bits >> 13;
  }
  return static_cast<uint16_t>(result | (sign >> 16));
}

} // namespace flex

#endif // FLEX_RUNTIME_CORE_HALF_H
