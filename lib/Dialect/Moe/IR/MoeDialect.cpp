//===- MoeDialect.cpp - The moe dialect, its types and attributes ---------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file registers the `moe` dialect and implements the custom syntax and
// verifiers of its routing type and capacity attribute.
//
//===----------------------------------------------------------------------===//

#include "flex/Dialect/Moe/IR/MoeOps.h"

#include "mlir/IR/Builders.h"
#include "mlir/IR/DialectImplementation.h"
#include "llvm/ADT/SmallString.h"
#include "llvm/ADT/TypeSwitch.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <string_view>

using namespace mlir;
using namespace flex::moe;

#include "flex/Dialect/Moe/IR/MoeDialect.cpp.inc"
#include "flex/Dialect/Moe/IR/MoeEnums.cpp.inc"

#define GET_ATTRDEF_CLASSES
#include "flex/Dialect/Moe/IR/MoeAttrs.cpp.inc"

#define GET_TYPEDEF_CLASSES
#include "flex/Dialect/Moe/IR/MoeTypes.cpp.inc"

void MoeDialect::initialize() {
  addOperations<
#define GET_OP_LIST
#include "flex/Dialect/Moe/IR/MoeOps.cpp.inc"
      >();
  addTypes<
#define GET_TYPEDEF_LIST
#include "flex/Dialect/Moe/IR/MoeTypes.cpp.inc"
      >();
  addAttributes<
#define GET_ATTRDEF_LIST
#include "flex/Dialect/Moe/IR/MoeAttrs.cpp.inc"
      >();
}

//===----------------------------------------------------------------------===//
// CapacityAttr
//===----------------------------------------------------------------------===//

// #moe.capacity<fixed 1.0>, #moe.capacity<dropless, align = 4>, ...
Attribute CapacityAttr::parse(AsmParser &parser, Type) {
  SMLoc loc = parser.getCurrentLocation();
  StringRef keyword;
  if (parser.parseLess() || parser.parseKeyword(&keyword))
    return {};
  std::optional<CapacityMode> mode = symbolizeCapacityMode(keyword);
  if (!mode) {
    parser.emitError(loc, "[cap-1] unknown capacity mode '")
        << keyword << "'; expected fixed, dropless or bounded";
    return {};
  }
  double factor = 0.0;
  if (*mode != CapacityMode::Dropless) {
    if (parser.parseFloat(factor))
      return {};
  }
  int64_t alignment = 1;
  if (succeeded(parser.parseOptionalComma())) {
    if (parser.parseKeyword("align") || parser.parseEqual() ||
        parser.parseInteger(alignment))
      return {};
  }
  if (parser.parseGreater())
    return {};
  return getChecked([&] { return parser.emitError(loc); }, parser.getContext(),
                    *mode, APFloat(factor), alignment);
}

void CapacityAttr::print(AsmPrinter &printer) const {
  printer << '<' << stringifyCapacityMode(getMode());
  if (getMode() != CapacityMode::Dropless) {
    // The shortest text that reads back to the same double (`1.25`), with a
    // dot, since the parser takes no integer literal for a float (`1.0`).
    char text[32];
    auto [end, error] =
        std::to_chars(text, text + sizeof(text), getFactorValue());
    std::string_view printed(text, end - text);
    size_t exponent = std::min(printed.find('e'), printed.size());
    std::string_view mantissa = printed.substr(0, exponent);
    printer << ' ' << mantissa;
    if (mantissa.find('.') == std::string_view::npos)
      printer << ".0";
    printer << printed.substr(exponent);
  }
  if (getAlignment() != 1)
    printer << ", align = " << getAlignment();
  printer << '>';
}

LogicalResult CapacityAttr::verify(function_ref<InFlightDiagnostic()> emitError,
                                   CapacityMode mode, APFloat factorValue,
                                   int64_t alignment) {
  double factor = factorValue.convertToDouble();
  if (mode == CapacityMode::Dropless) {
    if (factor != 0.0)
      return emitError() << "[cap-1] dropless capacity takes no factor, got "
                         << factor;
  } else if (!std::isfinite(factor) || factor <= 0.0) {
    return emitError() << "[cap-1] capacity factor of the "
                       << stringifyCapacityMode(mode)
                       << " mode must be finite and > 0, got " << factor;
  }
  if (alignment < 1)
    return emitError() << "[cap-1] capacity alignment must be >= 1, got "
                       << alignment;
  return success();
}

std::optional<int64_t> CapacityAttr::getCapacityBound(int64_t tokens,
                                                      int64_t experts,
                                                      int64_t topK) const {
  if (getMode() == CapacityMode::Dropless || experts < 1)
    return std::nullopt;
  int64_t tokensPerExpert = (tokens + experts - 1) / experts;
  double perChoice = std::floor(getFactorValue() * double(tokensPerExpert));
  // Doubles above 2^62 cannot be converted to int64 safely.
  if (!(perChoice < 0x1p62))
    return std::nullopt;
  int64_t bound;
  if (llvm::MulOverflow(int64_t(perChoice), topK, bound))
    return std::nullopt;
  return bound;
}

std::optional<int64_t> CapacityAttr::getStaticCapacity(int64_t tokens,
                                                       int64_t experts,
                                                       int64_t topK) const {
  if (getMode() != CapacityMode::Fixed)
    return std::nullopt;
  std::optional<int64_t> bound = getCapacityBound(tokens, experts, topK);
  if (!bound)
    return std::nullopt;
  int64_t align = getAlignment();
  int64_t rounded;
  if (llvm::AddOverflow(*bound, align - 1, rounded))
    return std::nullopt;
  return rounded / align * align;
}

//===----------------------------------------------------------------------===//
// RoutingType
//===----------------------------------------------------------------------===//

// !moe.routing<tokens = T, experts = E, top_k = k, capacity = C | ?>
Type RoutingType::parse(AsmParser &parser) {
  SMLoc loc = parser.getCurrentLocation();
  int64_t tokens, experts, topK, capacity = ShapedType::kDynamic;
  if (parser.parseLess() || parser.parseKeyword("tokens") ||
      parser.parseEqual() || parser.parseInteger(tokens) ||
      parser.parseComma() || parser.parseKeyword("experts") ||
      parser.parseEqual() || parser.parseInteger(experts) ||
      parser.parseComma() || parser.parseKeyword("top_k") ||
      parser.parseEqual() || parser.parseInteger(topK) || parser.parseComma() ||
      parser.parseKeyword("capacity") || parser.parseEqual())
    return {};
  if (failed(parser.parseOptionalQuestion())) {
    if (parser.parseInteger(capacity))
      return {};
  }
  if (parser.parseGreater())
    return {};
  return getChecked([&] { return parser.emitError(loc); }, parser.getContext(),
                    tokens, experts, topK, capacity);
}

void RoutingType::print(AsmPrinter &printer) const {
  printer << "<tokens = " << getTokens() << ", experts = " << getExperts()
          << ", top_k = " << getTopK() << ", capacity = ";
  if (hasStaticCapacity())
    printer << getCapacity();
  else
    printer << '?';
  printer << '>';
}

LogicalResult RoutingType::verify(function_ref<InFlightDiagnostic()> emitError,
                                  int64_t tokens, int64_t experts, int64_t topK,
                                  int64_t capacity) {
  if (tokens < 1)
    return emitError() << "[shape-1] routing needs at least one token, got "
                       << tokens;
  if (experts < 1)
    return emitError() << "[shape-1] routing needs at least one expert, got "
                       << experts;
  if (topK < 1 || topK > experts)
    return emitError() << "[gate-2] top_k must be in [1, experts = " << experts
                       << "], got " << topK;
  if (!ShapedType::isDynamic(capacity) && capacity < 0)
    return emitError() << "[cap-1] capacity must be >= 0 or '?', got "
                       << capacity;
  return success();
}
