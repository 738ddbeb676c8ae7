//===- RoleShapes.h - The fixed shape of each operand role ------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// The shape and element type of each operand role whose shape does not
// depend on the step kind (StepKinds.def, FLEX_OPERAND_ROLE), as a constexpr
// table. Both verifiers read it: the loader's (StepShapeRules.cpp, with the
// layer's sizes) and the moert dialect's (symbolic). Header-only and free of
// the runtime's types, so the dialect needs no runtime library.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_ROLESHAPES_H
#define FLEX_RUNTIME_ROLESHAPES_H

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace flex {

/// The element types a role accepts.
enum class RoleDType : uint8_t {
  Any,    ///< checked per op (or not at all)
  F32,    ///< f32
  I32,    ///< i32
  Token,  ///< the layer's dtype: all token operands of a step agree
  Router, ///< f32 with router_fp32, else the layer's dtype
  Float,  ///< f32, bf16 or f16
};

/// The most dims a fixed role has.
inline constexpr size_t kMaxRoleRank = 2;

/// The declared shape of a role: its dims as symbols of the layer ("T",
/// "d", "E", "k", or a literal "1"), or no dims when the shape depends on the
/// step kind (checked per op).
struct RoleShape {
  std::string_view name;
  std::string_view dims[kMaxRoleRank] = {};
  size_t rank = 0;
  RoleDType dtype = RoleDType::Any;

  /// Whether the dims are declared (else they are checked per op).
  constexpr bool hasFixedDims() const { return rank != 0; }
};

namespace detail {
/// "T,k" -> {"T", "k"}; "" -> no dims.
constexpr RoleShape makeRoleShape(std::string_view name, std::string_view dims,
                                  RoleDType dtype) {
  RoleShape shape{name, {}, 0, dtype};
  while (!dims.empty()) {
    size_t comma = dims.find(',');
    shape.dims[shape.rank++] = dims.substr(0, comma);
    dims = comma == std::string_view::npos ? std::string_view()
                                           : dims.substr(comma + 1);
  }
  return shape;
}
} // namespace detail

/// Indexed by OperandRole (Plan.h), in StepKinds.def's order.
inline constexpr RoleShape kRoleShapes[] = {
#define FLEX_OPERAND_ROLE(Name, spelling, dims, dtype)                         \
  detail::makeRoleShape(spelling, dims, RoleDType::dtype),
#include "flex/Runtime/StepKinds.def"
};

/// The role spelled `name`, or null.
constexpr const RoleShape *findRoleShape(std::string_view name) {
  for (const RoleShape &shape : kRoleShapes)
    if (shape.name == name)
      return &shape;
  return nullptr;
}

static_assert(findRoleShape("indices")->rank == 2 &&
                  findRoleShape("indices")->dims[1] == "k" &&
                  !findRoleShape("expert_offsets")->hasFixedDims(),
              "StepKinds.def: role dims parse");

} // namespace flex

#endif // FLEX_RUNTIME_ROLESHAPES_H
