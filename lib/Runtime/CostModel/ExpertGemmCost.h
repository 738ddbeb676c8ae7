//===- ExpertGemmCost.h - Which path an expert GEMM takes, and its price --===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// The cost model's expert GEMMs, for CostModel.cpp (ExpertGemmCost.cpp).
//
//===----------------------------------------------------------------------===//

#ifndef LIB_RUNTIME_COSTMODEL_EXPERTGEMMCOST_H
#define LIB_RUNTIME_COSTMODEL_EXPERTGEMMCOST_H

#include "flex/Runtime/CostModel/CostModel.h"

#include <cstdint>

namespace flex::costmodel {

/// Whether grouped_gemm_glu runs fused, on the device-sized kernel: on CUDA
/// wherever its operands fit it and the profile has its figures, for any
/// row space (a static one too) and under grouped_gemm=auto or device
/// whatever they pick for a plain GEMM. That kernel is the only engine that
/// fuses (it computes the gate and up tiles side by side in one CTA, the A
/// tile shared, and applies silu(gate) * up before the store); anywhere
/// else, or under grouped_gemm=cublas, the step runs as the unfused steps
/// would: two GEMMs on grouped_gemm's path and a glu pass.
bool fusedGluOnDevice(const DeviceProfile &profile,
                      const CostModelOptions &options, DType dtype, int64_t k,
                      int64_t n);

/// grouped_gemm_activation_backward and grouped_gemm_glu_backward: fc2's
/// input gradient with the backward of what follows fc1 in the store of the
/// wgmma kernel, the only engine that fuses it.
bool isFusedBackward(StepOp op);

/// Whether a fused backward (isFusedBackward: the activation's or the GLU's)
/// runs fused: on CUDA where the wgmma kernel runs
/// (CostModelOptions::wgmmaGemm, the backend's answer), its operands fit it
/// and the profile has the device kernel's figures, over `rows` declared
/// rows (E * C for a fixed capacity) of `groups` experts, always with
/// grouped_gemm=device and under auto by autoFusesBackwardInStore (the
/// eager rule: the backend records such passes only where its rule already
/// runs the kernels). Elsewhere the step runs as the unfused steps would: a
/// GEMM on grouped_gemm's path and the activation_backward or glu_backward
/// pass.
bool fusedActivationBackwardOnDevice(const DeviceProfile &profile,
                                     const CostModelOptions &options,
                                     DType dtype, int64_t k, int64_t n,
                                     int64_t rows, int64_t groups);

/// The rows a grouped GEMM step's backend row space declares: its A
/// buffer's, from a pipelined chunk's first row on.
int64_t declaredRows(const Step &step, const BufferDesc &a);

/// The rows the fused backwards' rule weighs, as the backend's row space
/// has them (fusedBackwardRows: E x C or a chunk's G x n where known).
int64_t fusedBackwardRowsOf(const Step &step, const BufferDesc &a,
                            int64_t groups);

/// The elementwise pass a fused step runs after its GEMM off its fusing
/// kernel: one launch, `tensors` [rows, n] read or written at the profile's
/// bandwidth (as those steps are priced without fitted figures): 3 for glu
/// and activation_backward (two read, one written), 5 for glu_backward
/// (three read, two written).
double elementwisePassSeconds(const DeviceProfile &profile, double rows,
                              int64_t n, DType dtype, int tensors = 3);

/// The path the backend takes for a grouped GEMM (or its weight gradient)
/// over the rows of `a` into `groups` experts: one batched GEMM where the
/// rows per group are known on the host (a fixed capacity, a pipelined
/// chunk's rows); otherwise, on CUDA, the rule of Core/GroupedGemmRule.h
/// (the device-sized kernel, else a GEMM per group), and on the CPU a GEMM
/// per group (a dropless padded plan ran as slowly as its ragged twin on an
/// H100, Run 17). grouped_gemm_glu takes the device kernel wherever
/// fusedGluOnDevice says, else the path of its two GEMMs;
/// grouped_gemm_activation_backward and grouped_gemm_glu_backward likewise with
/// fusedActivationBackwardOnDevice.
GemmPath expertGemmPath(const DeviceProfile &profile,
                        const CostModelOptions &options, const Step &step,
                        const BufferDesc &a, int64_t k, int64_t n,
                        int64_t groups);

/// The experts that get at least one of `rows` rows routed uniformly at
/// random over `groups` (a dynamic routing's counts are unknown here):
/// E (1 - (1 - 1/E)^rows), at most min(E, rows).
double touchedExperts(double rows, int64_t groups);

/// The device-sized kernel's time for `rows` rows over `groups` experts of
/// [k, n] weights, its launch not counted: the FLOPs of the touched
/// experts' rows padded to whole tiles at the tile's rate, or the bytes it
/// moves (the touched experts' weights, every expert's gradient, the rows'
/// operands) at the weight-read rate, or (the weight gradient) its output
/// tiles at their per-tile cost, whichever is longest. `wgmma`: the wgmma
/// kernel's 128-row tiles at its rate, whatever the rows. `wgmmaTilesOnly`:
/// those tiles for a step only it fuses (at the large tile's rate where the
/// option is off). `storeElementsPerRow`:
/// what a fused store reads and writes per row beyond a and c (the fused
/// backwards' pre; gate, up and the second gradient).
double deviceGemmSeconds(const DeviceProfile &profile, double rows,
                         int64_t groups, int64_t k, int64_t n, DType dtype,
                         int64_t rowBound, bool wgrad, bool wgmma,
                         bool wgmmaTilesOnly = false,
                         double storeElementsPerRow = 0);

/// A grouped GEMM step (or its gradient) of `rows` rows on the device-sized
/// kernel, `a` the buffer whose rows it computes.
double stepOnDeviceKernel(const DeviceProfile &profile,
                          const CostModelOptions &options, const Step &step,
                          const BufferDesc &a, double rows, int64_t groups,
                          int64_t k, int64_t n, bool wgrad);

/// One cuBLAS call per expert with rows, none faster than the table's
/// fewest rows per group measured: below them a call costs its launch and
/// weight read, not its FLOPs (Run 20: 64 calls of 3 to 24 rows took
/// 520-590 us).
double cublasPerExpertSeconds(const DeviceProfile &profile, double rows,
                              int64_t groups, int64_t k, int64_t n,
                              DType dtype);

} // namespace flex::costmodel

#endif // LIB_RUNTIME_COSTMODEL_EXPERTGEMMCOST_H
