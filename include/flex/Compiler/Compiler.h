//===- Compiler.h - Compile a moe layer to a plan in-process ----*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares the in-process compiler behind the C API's
// flexCompileLayer: moe IR text (or a layer configuration) in, plan JSON out,
// with the diagnostics as the error text.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_COMPILER_COMPILER_H
#define FLEX_COMPILER_COMPILER_H

#include "flex/Runtime/Core/LayerConfig.h"

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace flex {

struct CompileOptions {
  bool training = false;
  /// auto, padded or ragged (see --convert-moe-to-moert).
  std::string layout = "auto";
  /// Several layouts, one variant each (--moe-lower-to-plan="layouts=...");
  /// empty: `layout` alone.
  std::vector<std::string> layouts;
  /// --moe-lower-to-plan="fuse-dispatch=...": add the gather-fused variant
  /// `<variant>+gather` of each qualifying variant (--moert-fuse-dispatch);
  /// unset: the pipeline's default.
  std::optional<bool> fuseDispatch;
  /// --moe-lower-to-plan="fuse-glu=...": add the glu-fused variant
  /// `<variant>+glu` of each qualifying variant (--moert-fuse-glu); unset:
  /// the pipeline's default.
  std::optional<bool> fuseGlu;
  /// --moe-lower-to-plan="fuse-combine=...": add the variant
  /// `<variant>+combine` of each qualifying variant (--moert-fuse-combine);
  /// unset: the pipeline's default.
  std::optional<bool> fuseCombine;
  /// --moe-lower-to-plan="fuse-activation-backward=...": add the variant
  /// `<variant>+act_backward` of each qualifying variant
  /// (--moert-fuse-activation-backward); unset: the pipeline's default.
  std::optional<bool> fuseActivationBackward;
  /// > 0: the hierarchical (2DH) exchange for nodes of this many ranks
  /// (--moe-a2a-2dh); 0: the flat one.
  int64_t ranksPerNode = 0;
  /// W ranks: the plan's variants run on W ranks with one parameter layout
  /// (--moe-multiversion).
  int64_t ranks = 1;
  /// The variants to keep, `r<R>d<D>`; empty: r1d1 (r<s>d1 for experts
  /// sharded over s = W / E ranks) and r0d1 when ranks > 1, the single-rank
  /// plan otherwise.
  std::vector<std::string> variants;
  /// What diagnostics call the text (`file:line:col: error: ...`): the file
  /// it was read from, when there is one.
  std::string sourceName = "<layer>";
};

/// Compiles one layer of `moe` IR (a function holding moe.layer, or its
/// expanded form) to plan JSON. On failure returns false and sets `error` to
/// the diagnostics.
bool compileLayerToPlan(std::string_view mlirText,
                        const CompileOptions &options, std::string &planJson,
                        std::string &error);

/// The `moe.layer` function that `config` describes, as MLIR text.
std::string layerConfigToMlir(const LayerConfig &config);

} // namespace flex

#endif // FLEX_COMPILER_COMPILER_H
