//===- LayerConfig.h - Forwards to Core/LayerConfig.h -----------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// The layer configuration moved to the backend-neutral core
// (flex/Runtime/Core/LayerConfig.h). This header forwards there so that code
// outside the runtime keeps building; include the Core header in new code.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_LAYERCONFIG_H
#define FLEX_RUNTIME_LAYERCONFIG_H

#include "flex/Runtime/Core/LayerConfig.h"

#endif // FLEX_RUNTIME_LAYERCONFIG_H
