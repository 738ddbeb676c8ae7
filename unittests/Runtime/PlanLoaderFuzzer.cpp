//===- PlanLoaderFuzzer.cpp - libFuzzer target of the plan loader ---------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file is a libFuzzer entry point checking issue 10's property on any
// byte string: the loader rejects it with InvalidPlan, or the plan loads,
// writes and loads again, and, when it is one rank and small, computes the
// layer it declares on the CPU backend within [num-1]'s tolerance
// (PlanFuzzProperty.h). Anything else, a crash or a sanitizer report is a
// finding. Built with clang and -DFLEX_ENABLE_FUZZERS=ON; seeds:
// unittests/Runtime/plans/fuzz (make_fuzz_seeds.py); docs/Runtime.md.
//
//===----------------------------------------------------------------------===//

#include "PlanFuzzProperty.h"

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <string_view>

extern "C" size_t LLVMFuzzerMutate(uint8_t *data, size_t size, size_t maxSize);

// Half the time a structural mutation of the plan (mutatePlan), which
// reaches the verifier's cross-field checks; bytes otherwise, and when the
// input is no JSON plan.
extern "C" size_t LLVMFuzzerCustomMutator(uint8_t *data, size_t size,
                                          size_t maxSize, unsigned int seed) {
  if (seed % 2 == 0) {
    std::string text(reinterpret_cast<const char *>(data), size);
    if (flex::test::mutatePlan(text, seed) && text.size() <= maxSize) {
      std::memcpy(data, text.data(), text.size());
      return text.size();
    }
  }
  return LLVMFuzzerMutate(data, size, maxSize);
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  flex::test::PlanVerdict verdict = flex::test::checkPlanProperty(
      std::string_view(reinterpret_cast<const char *>(data), size));
  if (verdict.kind == flex::test::PlanVerdict::Finding) {
    std::fprintf(stderr, "flex-plan-fuzzer: %s\n", verdict.message.c_str());
    __builtin_trap();
  }
  return 0;
}
