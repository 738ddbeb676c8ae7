//===- Dispatch.cpp - dispatch, combine and their backward ----------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the sparse data movement of [dispatch-1] and
// [combine-1]. Work is split by token: a token's k rows are distinct, so no
// two threads write the same row and the result does not depend on threads.
//
//===----------------------------------------------------------------------===//

#include "KernelSupport.h"

#include <vector>

namespace flex::cpu {

using detail::loadRow;
using detail::storeRow;

namespace {

/// The dispatch row of slot (t, j), or -1 when the slot is dropped.
int64_t keptRow(const Routing &routing, int64_t t, int64_t j) {
  int64_t slot = t * routing.topK + j;
  int64_t location = routing.locations[slot];
  if (location < 0 || location >= *routing.capacity)
    return -1;
  return int64_t{routing.expertOffsets[routing.indices[slot]]} + location;
}

/// Threads only pay off past a few thousand elements.
bool worthThreads(const Routing &routing, int64_t width) {
  return routing.tokens * routing.topK * width > 16384;
}

/// Zeros every row of [0, expertOffsets[E]) that no kept slot maps to: the
/// padding of the padded layout (the ragged layout has none). GEMMs over
/// whole capacity blocks, here or on the rank the block is sent to, then
/// read finite zeros that add nothing (PlanFormat.md, "Many ranks").
void zeroUnkeptRows(const Routing &routing, int64_t width, WriteBuffer buffer) {
  int64_t used = routing.expertOffsets[routing.experts];
  if (used <= 0)
    return;
  std::vector<uint8_t> kept(static_cast<size_t>(used), 0);
  for (int64_t t = 0; t < routing.tokens; ++t)
    for (int64_t j = 0; j < routing.topK; ++j) {
      int64_t row = keptRow(routing, t, j);
      if (row >= 0 && row < used)
        kept[row] = 1;
    }
  // Padding rows come in runs (the tail of each expert's block).
  for (int64_t row = 0; row < used;) {
    if (kept[row]) {
      ++row;
      continue;
    }
    int64_t end = row;
    while (end < used && !kept[end])
      ++end;
    detail::storeZeros(buffer, row * width, (end - row) * width);
    row = end;
  }
}

} // namespace

void dispatch(ReadBuffer x, int64_t modelDim, const Routing &routing,
              WriteBuffer dispatched) {
  zeroUnkeptRows(routing, modelDim, dispatched);
  bool sameType = x.type == dispatched.type;
  int64_t elementBytes = static_cast<int64_t>(dtypeSize(x.type));
#pragma omp parallel if (worthThreads(routing, modelDim))
  {
    std::vector<float> row(sameType ? 0 : static_cast<size_t>(modelDim));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < routing.tokens; ++t) {
      for (int64_t j = 0; j < routing.topK; ++j) {
        int64_t target = keptRow(routing, t, j);
        if (target < 0)
          continue;
        if (sameType) {
          std::memcpy(static_cast<char *>(dispatched.data) +
                          target * modelDim * elementBytes,
                      static_cast<const char *>(x.data) +
                          t * modelDim * elementBytes,
                      static_cast<size_t>(modelDim * elementBytes));
        } else {
          loadRow(x, t * modelDim, modelDim, row.data());
          storeRow(dispatched, target * modelDim, modelDim, row.data());
        }
      }
    }
  }
}

void dispatchRows(const Routing &routing, int64_t rows, int32_t *rowTokens) {
  std::fill(rowTokens, rowTokens + rows, -1);
  for (int64_t t = 0; t < routing.tokens; ++t)
    for (int64_t j = 0; j < routing.topK; ++j) {
      int64_t target = keptRow(routing, t, j);
      if (target >= 0 && target < rows)
        rowTokens[target] = static_cast<int32_t>(t);
    }
}

void dispatchBackward(ReadBuffer gradDispatched, int64_t modelDim,
                      const Routing &routing, WriteBuffer gradX) {
#pragma omp parallel if (worthThreads(routing, modelDim))
  {
    std::vector<float> sum(static_cast<size_t>(modelDim));
    std::vector<float> row(static_cast<size_t>(modelDim));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < routing.tokens; ++t) {
      std::fill(sum.begin(), sum.end(), 0.0f);
      for (int64_t j = 0; j < routing.topK; ++j) {
        int64_t source = keptRow(routing, t, j);
        if (source < 0)
          continue;
        loadRow(gradDispatched, source * modelDim, modelDim, row.data());
        for (int64_t i = 0; i < modelDim; ++i)
          sum[i] += row[i];
      }
      storeRow(gradX, t * modelDim, modelDim, sum.data());
    }
  }
}

void combine(ReadBuffer expertOut, int64_t modelDim, const Routing &routing,
             WriteBuffer out) {
#pragma omp parallel if (worthThreads(routing, modelDim))
  {
    std::vector<float> sum(static_cast<size_t>(modelDim));
    std::vector<float> row(static_cast<size_t>(modelDim));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < routing.tokens; ++t) {
      std::fill(sum.begin(), sum.end(), 0.0f);
      for (int64_t j = 0; j < routing.topK; ++j) {
        int64_t source = keptRow(routing, t, j);
        if (source < 0)
          continue;
        float gate = routing.gates[t * routing.topK + j];
        loadRow(expertOut, source * modelDim, modelDim, row.data());
        for (int64_t i = 0; i < modelDim; ++i)
          sum[i] += gate * row[i];
      }
      storeRow(out, t * modelDim, modelDim, sum.data());
    }
  }
}

void combineBackward(ReadBuffer gradOut, ReadBuffer expertOut, int64_t modelDim,
                     const Routing &routing, WriteBuffer gradExpertOut,
                     float *gradGates) {
  zeroUnkeptRows(routing, modelDim, gradExpertOut);
#pragma omp parallel if (worthThreads(routing, modelDim))
  {
    std::vector<float> grad(static_cast<size_t>(modelDim));
    std::vector<float> row(static_cast<size_t>(modelDim));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < routing.tokens; ++t) {
      loadRow(gradOut, t * modelDim, modelDim, grad.data());
      for (int64_t j = 0; j < routing.topK; ++j) {
        int64_t slot = t * routing.topK + j;
        int64_t target = keptRow(routing, t, j);
        if (target < 0) {
          gradGates[slot] = 0.0f;
          continue;
        }
        loadRow(expertOut, target * modelDim, modelDim, row.data());
        // The dot product in fp64: it is one number per slot, and its
        // cancellation would otherwise dominate the gate gradient's error.
        double dot = 0.0;
        for (int64_t i = 0; i < modelDim; ++i)
          dot += static_cast<double>(grad[i]) * row[i];
        gradGates[slot] = static_cast<float>(dot);
        float gate = routing.gates[slot];
        for (int64_t i = 0; i < modelDim; ++i)
          row[i] = gate * grad[i];
        storeRow(gradExpertOut, target * modelDim, modelDim, row.data());
      }
    }
  }
}

} // namespace flex::cpu
