//===- Elementwise.cpp - Activations, GLU and their backward --------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the elementwise step ops over the valid rows of
// dispatch-shaped buffers: activation, glu, activation_backward and
// glu_backward. Math is fp32; each result is rounded once on store.
//
//===----------------------------------------------------------------------===//

#include "KernelSupport.h"

#include <vector>

namespace flex::cpu {

using detail::loadRow;
using detail::RowRange;
using detail::storeRow;

void activation(ReadBuffer pre, WriteBuffer out, int64_t n,
                const ExpertSegments &segments, Activation act) {
  Epilogue epilogue = toEpilogue(act);
  detail::forEachValidRowRange(segments, n, [&](const RowRange &range) {
    std::vector<float> v(static_cast<size_t>(n));
    for (int64_t row = range.begin; row < range.end; ++row) {
      loadRow(pre, row * n, n, v.data());
      for (float &value : v)
        value = detail::applyEpilogue(epilogue, value);
      storeRow(out, row * n, n, v.data());
    }
  });
}

void glu(ReadBuffer gateIn, ReadBuffer upIn, WriteBuffer c, int64_t n,
         const ExpertSegments &segments) {
  detail::forEachValidRowRange(segments, n, [&](const RowRange &range) {
    std::vector<float> g(static_cast<size_t>(n)), u(static_cast<size_t>(n));
    for (int64_t row = range.begin; row < range.end; ++row) {
      loadRow(gateIn, row * n, n, g.data());
      loadRow(upIn, row * n, n, u.data());
      for (int64_t j = 0; j < n; ++j)
        g[j] = detail::siluForward(g[j]) * u[j];
      storeRow(c, row * n, n, g.data());
    }
  });
}

void activationBackward(ReadBuffer pre, ReadBuffer grad, WriteBuffer gradPre,
                        int64_t n, const ExpertSegments &segments,
                        Activation act) {
  detail::forEachValidRowRange(segments, n, [&](const RowRange &range) {
    std::vector<float> p(static_cast<size_t>(n)), g(static_cast<size_t>(n));
    for (int64_t row = range.begin; row < range.end; ++row) {
      loadRow(pre, row * n, n, p.data());
      loadRow(grad, row * n, n, g.data());
      for (int64_t j = 0; j < n; ++j)
        g[j] *= detail::activationDerivative(act, p[j]);
      storeRow(gradPre, row * n, n, g.data());
    }
  });
}

void gluBackward(ReadBuffer gateIn, ReadBuffer upIn, ReadBuffer grad,
                 WriteBuffer gradGateIn, WriteBuffer gradUpIn, int64_t n,
                 const ExpertSegments &segments) {
  detail::forEachValidRowRange(segments, 2 * n, [&](const RowRange &range) {
    std::vector<float> g(static_cast<size_t>(n)), u(static_cast<size_t>(n)),
        d(static_cast<size_t>(n));
    for (int64_t row = range.begin; row < range.end; ++row) {
      loadRow(gateIn, row * n, n, g.data());
      loadRow(upIn, row * n, n, u.data());
      loadRow(grad, row * n, n, d.data());
      for (int64_t j = 0; j < n; ++j) {
        float gradUp = d[j] * detail::siluForward(g[j]);
        float gradGate = d[j] * u[j] * detail::siluDerivative(g[j]);
        g[j] = gradGate;
        u[j] = gradUp;
      }
      storeRow(gradGateIn, row * n, n, g.data());
      storeRow(gradUpIn, row * n, n, u.data());
    }
  });
}

} // namespace flex::cpu
