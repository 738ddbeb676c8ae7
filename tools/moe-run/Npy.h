//===- Npy.h - A small reader and writer of NumPy .npy files ----*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares a self-contained .npy reader and writer (format 1.0 to
// 3.0, little-endian, C order) and the conversions between .npy element types
// and the runtime's argument dtypes that moe-run uses:
//
//   argument dtype | written as           | read from
//   ---------------+----------------------+-------------------------------
//   f32            | '<f4'                | '<f4', '<f8' (rounded)
//   f16            | '<f2'                | '<f2', '<f4', '<f8' (rounded)
//   bf16           | '<f4' (exact widening;| '<u2' (raw bf16 bits), '<f4',
//                  |  NumPy has no bf16)   | '<f8' (rounded to nearest even)
//   i32            | '<i4'                | '<i4'
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_TOOLS_MOE_RUN_NPY_H
#define FLEX_TOOLS_MOE_RUN_NPY_H

#include "flex/Runtime/Core/LayerConfig.h"
#include "flex/Runtime/Status.h"

#include <cstdint>
#include <string>
#include <vector>

namespace flex::npy {

/// The contents of one .npy file.
struct Array {
  std::string descr; ///< NumPy type string, e.g. "<f4"
  std::vector<int64_t> shape;
  std::vector<uint8_t> data; ///< C order, little-endian
};

/// Reads `path`. Rejects (with the path and the reason) files that are not
/// .npy, are truncated, are Fortran-ordered or big-endian.
Status readArray(const std::string &path, Array &array);

/// Writes a version 1.0 file (2.0 when the header needs it).
Status writeArray(const std::string &path, const Array &array);

/// Reads `path` into `out` as `dtype` of shape `shape`, converting per the
/// table above; a shape () file is accepted for a shape [1] argument.
Status readAs(const std::string &path, DType dtype,
              const std::vector<int64_t> &shape, std::vector<uint8_t> &out);

/// Writes `data` (of `dtype`, `shape`) per the table above.
Status writeFrom(const std::string &path, DType dtype,
                 const std::vector<int64_t> &shape, const void *data);

} // namespace flex::npy

#endif // FLEX_TOOLS_MOE_RUN_NPY_H
