//===- consumer_static.cpp - The installed C++ runtime (RuntimeStatic) ----===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// Built by the install test against Flex::RuntimeStatic and Flex::Reference
// (the static C++ runtime and its dependencies, found by FlexConfig.cmake):
// loads a plan with the C++ loader and checks a CPU run of it against the
// fp64 reference.
//
// usage: flex-consumer-static PLAN.json   (exit status 0 when it passed)
//
//===----------------------------------------------------------------------===//

#include "flex/Reference/PlanCheck.h"
#include "flex/Runtime/PlanLoader.h"

#include <cstdio>

int main(int argc, char **argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: flex-consumer-static PLAN.json\n");
    return 2;
  }
  flex::Plan plan;
  if (flex::Status status = flex::loadPlanFile(argv[1], plan); !status) {
    std::fprintf(stderr, "%s\n", status.message().c_str());
    return 1;
  }
  flex::reference::PlanRunCheck check =
      flex::reference::runPlanOnCpu(plan, /*variant=*/0, /*seed=*/11);
  std::printf("C++ runtime vs fp64 reference: %s\n", check.describe().c_str());
  return check.pass() ? 0 : 1;
}
