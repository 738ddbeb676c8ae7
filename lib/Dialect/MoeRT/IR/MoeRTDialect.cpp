//===- MoeRTDialect.cpp - The moert dialect -------------------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file registers the `moert` dialect, its enums and attributes, and
// verifies the `#moert.layer` attribute.
//
//===----------------------------------------------------------------------===//

#include "flex/Dialect/MoeRT/IR/MoeRTOps.h"

#include "mlir/IR/Builders.h"
#include "mlir/IR/DialectImplementation.h"
#include "llvm/ADT/TypeSwitch.h"

#include <cmath>
#include <limits>

using namespace mlir;
using namespace flex::moert;

#include "flex/Dialect/MoeRT/IR/MoeRTDialect.cpp.inc"
#include "flex/Dialect/MoeRT/IR/MoeRTEnums.cpp.inc"

#define GET_ATTRDEF_CLASSES
#include "flex/Dialect/MoeRT/IR/MoeRTAttrs.cpp.inc"

void MoeRTDialect::initialize() {
  addOperations<
#define GET_OP_LIST
#include "flex/Dialect/MoeRT/IR/MoeRTOps.cpp.inc"
      >();
  addAttributes<
#define GET_ATTRDEF_LIST
#include "flex/Dialect/MoeRT/IR/MoeRTAttrs.cpp.inc"
      >();
}

//===----------------------------------------------------------------------===//
// Attribute parameters
//===----------------------------------------------------------------------===//

FailureOr<bool> flex::moert::detail::parseBoolParameter(AsmParser &parser) {
  if (succeeded(parser.parseOptionalKeyword("true")))
    return true;
  if (succeeded(parser.parseOptionalKeyword("false")))
    return false;
  return parser.emitError(parser.getCurrentLocation(),
                          "expected 'true' or 'false'");
}

FailureOr<APFloat> flex::moert::detail::parseF64Parameter(AsmParser &parser) {
  double value = 0.0;
  if (parser.parseFloat(value))
    return failure();
  return APFloat(value);
}

//===----------------------------------------------------------------------===//
// LayerAttr
//===----------------------------------------------------------------------===//

// The rules of flex::verifyLayerConfig (lib/Runtime/Cpu/LayerConfig.cpp),
// checked when the plan is built instead of when the runtime loads it.
LogicalResult LayerAttr::verify(function_ref<InFlightDiagnostic()> emitError,
                                int64_t tokens, int64_t modelDim,
                                int64_t hiddenDim, int64_t experts,
                                int64_t topK, moe::CapacityAttr capacity,
                                moe::ExpertKind expert, moe::Activation,
                                Type dtype, bool bias, bool, bool, bool,
                                APFloat gateNoiseValue, int64_t) {
  double gateNoise = gateNoiseValue.convertToDouble();
  for (auto [field, value] : {std::pair{"tokens", tokens},
                              {"model_dim", modelDim},
                              {"hidden_dim", hiddenDim},
                              {"experts", experts}})
    if (value <= 0)
      return emitError() << "[layer] " << field << " must be > 0, got "
                         << value;
  if (topK < 1 || topK > experts)
    return emitError() << "[gate-2] top_k must be in 1..experts (" << experts
                       << "), got " << topK;
  if (!capacity)
    return emitError() << "[cap-1] the layer needs a capacity";
  if (expert == moe::ExpertKind::Gated && bias)
    return emitError() << "[expert-1] a gated (SwiGLU) expert has no bias; "
                          "set bias = false";
  if (!dtype || !(dtype.isF32() || dtype.isBF16() || dtype.isF16()))
    return emitError() << "[layer] dtype must be f32, bf16 or f16, got "
                       << dtype;
  if (!std::isfinite(gateNoise) || gateNoise < 0.0)
    return emitError() << "[gate-1] gate_noise must be finite and >= 0, got "
                       << gateNoise;

  // The runtime's bound of C before routing: Fixed C, min(C, T) when
  // Bounded, T when Dropless (no expert gets more than T slots).
  int64_t bound = tokens;
  if (capacity.getMode() != moe::CapacityMode::Dropless) {
    std::optional<int64_t> fixed =
        capacity.getCapacityBound(tokens, experts, topK);
    if (!fixed)
      return emitError() << "[cap-1] capacity factor "
                         << capacity.getFactorValue()
                         << " gives a capacity that overflows int64";
    if (*fixed == 0)
      return emitError() << "[cap-1] capacity factor "
                         << capacity.getFactorValue()
                         << " gives capacity 0 (k * int(f * ceil(T/E)) with "
                            "T = "
                         << tokens << ", E = " << experts << ", k = " << topK
                         << "): every token would be dropped; raise the factor";
    bound = capacity.getMode() == moe::CapacityMode::Fixed
                ? *fixed
                : std::min(*fixed, tokens);
  }
  // Routing buffers are i32: E * C padded slots and T * k ragged rows.
  constexpr int64_t kI32Max = std::numeric_limits<int32_t>::max();
  if (bound > kI32Max / experts)
    return emitError() << "[cap-1] the capacity bound " << bound
                       << " times experts " << experts
                       << " exceeds the i32 range of the routing buffers; "
                          "lower the capacity factor or tokens";
  if (tokens > kI32Max / topK)
    return emitError() << "[cap-1] tokens * top_k = " << tokens << " * " << topK
                       << " exceeds the i32 range of the routing "
                       << "buffers";
  return success();
}
