//===- PlanLoaderFuzzer.cpp - libFuzzer target of the plan loader ---------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file is a libFuzzer entry point: any byte string given to parsePlan
// must give a Status (with the overlap check on, the most work), never a
// crash, a sanitizer report or an escaped exception. Built with clang and
// -DFLEX_ENABLE_FUZZERS=ON; seed it with unittests/Runtime/plans.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/PlanLoader.h"

#include <cstddef>
#include <cstdint>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  flex::Plan plan;
  flex::PlanCheckOptions options;
  flex::Status status = flex::parsePlan(
      std::string_view(reinterpret_cast<const char *>(data), size), plan,
      options);
  // A plan that loads must write and load again.
  if (status.isOk()) {
    flex::Plan again;
    if (!flex::parsePlan(flex::writePlan(plan), again, options).isOk())
      __builtin_trap();
  }
  return 0;
}
