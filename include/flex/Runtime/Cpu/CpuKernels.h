//===- CpuKernels.h - CPU kernels of the plan step ops ----------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares the CPU backend's compute kernels: one function per step
// op of the plan format (docs/PlanFormat.md), forward and backward. They take
// plain pointers and sizes in the backend-neutral argument types of
// Core/KernelArgs.h (host pointers here); the executor binds plan buffers to
// them.
//
// Common conventions:
//  - Typed buffers (tokens, weights, activations, their gradients) are f32,
//    bf16 or f16 in storage; the math is fp32 and every elementwise result is
//    rounded once, round-to-nearest-even, into the output buffer's type.
//  - Routing buffers are f32 (scores, gates) and i32 (indices, locations,
//    capacity, expert offsets and rows), laid out as in PlanFormat.md.
//  - Steps after the gate touch only the valid rows of each expert
//    (`expertOffsets[e] .. expertOffsets[e] + expertRows[e]`); other rows of
//    a dispatch-shaped buffer are neither read nor written, except that
//    `dispatch` and `combineBackward` write zeros into the padding rows of
//    [0, expertOffsets[E]) (the padded layout's zero-fill rule).
//  - Element offsets are computed in int64 arithmetic.
//  - Kernels run on OpenMP threads and OpenBLAS; their results do not depend
//    on the number of threads (each output element is reduced in a fixed
//    order), except for the order of fp32 sums inside BLAS.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_CPU_CPUKERNELS_H
#define FLEX_RUNTIME_CPU_CPUKERNELS_H

#include "flex/Runtime/Core/KernelArgs.h"

#include <cstdint>

namespace flex::cpu {

//===----------------------------------------------------------------------===//
// Gate noise
//===----------------------------------------------------------------------===//

/// [gate-1] The training noise of token t, expert e: a standard normal sample
/// that is a pure function of (seed, t, e), so neither threads nor call order
/// change it. Computed as Box-Muller over two uniforms in (0, 1) drawn from
/// splitmix64 of a hash of (seed, t, e):
///   h  = splitmix64(seed ^ splitmix64(t * 0x9E3779B97F4A7C15 + e))
///   u1 = ((splitmix64(h) >> 11) + 0.5) * 2^-53
///   u2 = ((splitmix64(h + 1) >> 11) + 0.5) * 2^-53
///   sample = sqrt(-2 ln u1) * cos(2 pi u2)
/// The gate adds `noise * sample / E` to logits[t, e] (Tutel's scaling of
/// `gate_noise`), in fp64, and rounds the sum to fp32.
double gateNoiseSample(uint64_t seed, int64_t token, int64_t expert);

//===----------------------------------------------------------------------===//
// Forward step ops
//===----------------------------------------------------------------------===//

/// `router` ([gate-1]): logits[T, E] = x[T, d] @ wg[d, E], fp32 accumulate.
void router(ReadBuffer x, ReadBuffer wg, float *logits, int64_t tokens,
            int64_t modelDim, int64_t experts);

/// `gate`: [gate-1..3], [loc-1], [cap-1], [loss-1] on fp32 logits[T, E].
///  - scores = softmax(logits + noise) over E, in fp32 (max-subtracted).
///  - top-k by score, ties to the lower expert index; the k experts of a token
///    are distinct. Ranking uses the noisy logits (softmax is monotonic), so
///    fp32 scores that underflow to 0 for far-behind experts do not tie.
///  - gates = the chosen scores, normalized over all k choices (dropped or
///    not) when `normalize` and k > 1, by max(sum, kGateNormalizeEps).
///  - locations per [loc-1]; with batchPrioritized tokens are visited by
///    descending max score, ties by token order (a stable sort).
///  - capacity per flex::computeCapacity (Core/Capacity.h);
///    expertRows[e] = min(count_e, C); expertOffsets per `layout`,
///    expertOffsets[E] = rows used.
///  - lAux = E * sum_e mean_t(scores[t, e]) * frac_e, frac_e = share of tokens
///    whose first choice is e (dropped or not), accumulated in fp64.
/// NaN: a NaN (or +-inf, making exp() NaN) in a token's logits makes its
/// scores NaN. Selection ranks a NaN logit below every number, so indices
/// stay in [0, E) (an all-NaN row picks experts 0..k-1) and locations stay
/// exact; the token's gates, its output and lAux are NaN (propagated, never
/// hidden); other tokens' outputs stay finite. batchPrioritized orders a NaN
/// max score last.
void gate(const float *logits, int64_t tokens, int64_t experts,
          const GateAttrs &attrs, const GateOutputs &out);

/// `dispatch` ([dispatch-1]): dispatched[row(t, j)] = x[t] for every kept
/// slot, and zeros in every other row of [0, expertOffsets[E]) (the padding
/// of the padded layout; the ragged layout has none), so GEMMs over whole
/// capacity blocks read finite zeros. Rows past expertOffsets[E] are not
/// written.
/// dispatched has x's type.
void dispatch(ReadBuffer x, int64_t modelDim, const Routing &routing,
              WriteBuffer dispatched);

/// `dispatch_rows`: rowTokens[row of (t, j)] = t for every kept slot, the
/// rows dispatch would copy token t to; -1 for the other rows of [0, rows)
/// (a padded layout's padding, which a gathered GEMM reads as zeros).
void dispatchRows(const Routing &routing, int64_t rows, int32_t *rowTokens);

/// `grouped_gemm` ([expert-1]): for each expert e and its valid rows,
/// `c = epi(a @ b[e] + bias[e])`. a [R, K], b [E, K, N] (or [E, N, K] with
/// transB), bias [E, N] (bias.data may be null), c [R, N]. When `pre.data` is
/// not null it also receives `a @ b[e] + bias[e]` before the epilogue (what
/// activation_backward needs in training), so one GEMM serves both.
/// GELU is the exact erf form: x * Phi(x).
///
/// With `gather.rowTokens` (a gather-fused variant), a is the layer's x
/// [T, K] and row r of the product reads a[rowTokens[r]] (zeros for a token
/// outside [0, T)).
void groupedGemm(ReadBuffer a, ReadBuffer b, ReadBuffer bias, WriteBuffer c,
                 int64_t k, int64_t n, const ExpertSegments &segments,
                 const GroupedGemmOptions &options, WriteBuffer pre = {},
                 const RowGather &gather = {});

/// Elementwise `out = act(pre)` over the valid rows of [R, N] buffers (the
/// forward of activation_backward when the GEMM did not apply it).
void activation(ReadBuffer pre, WriteBuffer out, int64_t n,
                const ExpertSegments &segments, Activation act);

/// `glu` ([expert-1], gated): c = silu(gateIn) * upIn over valid rows.
void glu(ReadBuffer gateIn, ReadBuffer upIn, WriteBuffer c, int64_t n,
         const ExpertSegments &segments);

/// `grouped_gemm_glu` ([expert-1], gated, one step): for each expert e and
/// its valid rows, gate = a @ b[e] and up = a @ bUp[e] (b and bUp
/// [E, K, N], never transposed), each rounded to c's dtype, and
/// c = silu(gate) * up computed from those rounded values: bit for bit
/// `groupedGemm(a, b)`, `groupedGemm(a, bUp)` and `glu`. When `gateIn.data`
/// (`upIn.data`) is not null it receives gate (up), [R, N] of c's dtype;
/// otherwise they live in scratch. `gather` as in groupedGemm.
void groupedGemmGlu(ReadBuffer a, ReadBuffer b, ReadBuffer bUp, WriteBuffer c,
                    int64_t k, int64_t n, const ExpertSegments &segments,
                    WriteBuffer gateIn = {}, WriteBuffer upIn = {},
                    const RowGather &gather = {});

/// `combine` ([combine-1]): out[t] = sum over kept j of
/// gates[t, j] * expertOut[row(t, j)], summed in choice order in fp32.
/// Writes every row of out; a token whose slots are all dropped gets zeros.
void combine(ReadBuffer expertOut, int64_t modelDim, const Routing &routing,
             WriteBuffer out);

//===----------------------------------------------------------------------===//
// Backward step ops
//===----------------------------------------------------------------------===//

/// `combine_backward`: for each kept slot, gradExpertOut[row(t, j)] =
/// gates[t, j] * gradOut[t] and gradGates[t, j] = <gradOut[t],
/// expertOut[row(t, j)]>; gradGates of a dropped slot is 0. Every valid row
/// of gradExpertOut is written (each is the row of exactly one kept slot),
/// and the padding rows of [0, expertOffsets[E]) get zeros, as in
/// `dispatch`.
void combineBackward(ReadBuffer gradOut, ReadBuffer expertOut, int64_t modelDim,
                     const Routing &routing, WriteBuffer gradExpertOut,
                     float *gradGates);

/// `grouped_gemm_wgrad`: gradB[e] = a_e^T @ gradC_e ([K, N]) and, when
/// gradBias.data is not null, gradBias[e] = column sums of gradC_e. Writes
/// all of gradB and gradBias: an expert with no rows gets zeros (with
/// `accumulate`, keeps its value).
void groupedGemmWgrad(ReadBuffer a, ReadBuffer gradC, int64_t k, int64_t n,
                      const ExpertSegments &segments, WriteBuffer gradB,
                      WriteBuffer gradBias,
                      const GroupedGemmWgradOptions &options = {},
                      const RowGather &gather = {});

/// `activation_backward`: gradPre = grad * act'(pre) over valid rows. relu'
/// is 1 for pre > 0 and 0 otherwise.
void activationBackward(ReadBuffer pre, ReadBuffer grad, WriteBuffer gradPre,
                        int64_t n, const ExpertSegments &segments,
                        Activation act);

/// `grouped_gemm_activation_backward`: for each expert e and its valid rows,
/// c = round(a @ b[e]) * act'(pre) (b[e]^T with transB), the product rounded
/// to c's dtype first: bit for bit `groupedGemm(a, b) -> c` followed by
/// `activationBackward(pre, c) -> c`. c must not be a, b or pre.
void groupedGemmActivationBackward(ReadBuffer a, ReadBuffer b, ReadBuffer pre,
                                   WriteBuffer c, int64_t k, int64_t n,
                                   const ExpertSegments &segments, bool transB,
                                   Activation act);

/// `grouped_gemm_glu_backward`: for each expert e and its valid rows, with
/// d = round(a @ b[e]) (b[e]^T with transB), gradGateIn = d * upIn *
/// silu'(gateIn) and gradUpIn = d * silu(gateIn): bit for bit
/// `groupedGemm(a, b) -> d` followed by `gluBackward`. The outputs must be
/// none of the inputs and not one another.
void groupedGemmGluBackward(ReadBuffer a, ReadBuffer b, ReadBuffer gateIn,
                            ReadBuffer upIn, WriteBuffer gradGateIn,
                            WriteBuffer gradUpIn, int64_t k, int64_t n,
                            const ExpertSegments &segments, bool transB);

/// `glu_backward`: with c = silu(g) * u, gradGateIn = grad * u * silu'(g)
/// and gradUpIn = grad * silu(g), over valid rows.
void gluBackward(ReadBuffer gateIn, ReadBuffer upIn, ReadBuffer grad,
                 WriteBuffer gradGateIn, WriteBuffer gradUpIn, int64_t n,
                 const ExpertSegments &segments);

/// `shard_routing` (experts sharded over `shards` = s ranks, padded layout):
/// the gate's top-k routing over E experts -> top-(k * s) over E * s virtual
/// experts. Choice i * s + q of token t is virtual expert indices[t, i] * s +
/// q with the location and gate of choice i; virtual expert v has the rows
/// of expert v / s and the padded offset v * C. Outputs: indices, locations,
/// gates [T, k * s], expertOffsets [E * s + 1], expertRows [E * s].
void shardRouting(const Routing &routing, int64_t shards, int32_t *indices,
                  int32_t *locations, float *gates, int32_t *expertOffsets,
                  int32_t *expertRows);

/// `shard_routing_backward`: gradGates[t, i] = sum over q of
/// shardGradGates[t, i * s + q] (q in order, fp32), for [T, k] out of
/// [T, k * s].
void shardRoutingBackward(const float *shardGradGates, int64_t tokens,
                          int64_t topK, int64_t shards, float *gradGates);

/// `dispatch_backward`: gradX[t] = sum over kept j of
/// gradDispatched[row(t, j)] (choice order, fp32), zeros when none is kept.
/// Overwrites every row of gradX.
void dispatchBackward(ReadBuffer gradDispatched, int64_t modelDim,
                      const Routing &routing, WriteBuffer gradX);

/// `gate_backward`: grad_logits[T, E] (f32) through [gate-3], the softmax
/// and [loss-1]. gradGates [T, k] is d loss / d gates (all k choices, 0 for
/// dropped ones as combine_backward writes); gradLAux [1] is the weight of
/// l_aux in the loss (null = 0). frac_e of [loss-1] is piecewise constant
/// (argmax), so l_aux reaches the logits through its mean scores only. The
/// noise is additive, so the gradient of the noisy logits is the gradient of
/// the logits. Reads routing.indices (and nothing else of routing but the
/// sizes).
void gateBackward(const float *gradGates, const float *gradLAux,
                  const float *scores, const Routing &routing,
                  const GateBackwardAttrs &attrs, float *gradLogits);

/// `router_backward`: gradX += gradLogits @ wg^T (gradX.data may be null to
/// skip) and gradWg = x^T @ gradLogits (overwritten).
void routerBackward(ReadBuffer x, ReadBuffer wg, const float *gradLogits,
                    int64_t tokens, int64_t modelDim, int64_t experts,
                    WriteBuffer gradX, WriteBuffer gradWg);

} // namespace flex::cpu

#endif // FLEX_RUNTIME_CPU_CPUKERNELS_H
