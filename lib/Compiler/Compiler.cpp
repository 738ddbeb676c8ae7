//===- Compiler.cpp - Compile a moe layer to a plan in-process ------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the in-process compiler: parse, verify, run the
// lower-to-plan pipeline and write the plan, collecting every diagnostic as
// text for the caller.
//
//===----------------------------------------------------------------------===//

#include "flex/Compiler/Compiler.h"

#include "flex/Dialect/Moe/IR/MoeOps.h"

#include "flex/Dialect/Moe/Transforms/Passes.h"
#include "flex/InitAll.h"
#include "flex/Pipelines/Pipelines.h"
#include "flex/Target/Plan/PlanEmitter.h"

#include "mlir/IR/BuiltinOps.h"
#include "mlir/IR/Diagnostics.h"
#include "mlir/IR/MLIRContext.h"
#include "mlir/Parser/Parser.h"
#include "mlir/Pass/PassManager.h"
#include "llvm/Support/SourceMgr.h"
#include "llvm/Support/raw_ostream.h"

#include <sstream>

using namespace mlir;

bool flex::compileLayerToPlan(std::string_view mlirText,
                              const CompileOptions &options,
                              std::string &planJson, std::string &error) {
  DialectRegistry registry;
  registerAllDialects(registry);
  MLIRContext context(registry, MLIRContext::Threading::DISABLED);

  llvm::SourceMgr sourceMgr;
  sourceMgr.AddNewSourceBuffer(
      llvm::MemoryBuffer::getMemBufferCopy(
          llvm::StringRef(mlirText.data(), mlirText.size()),
          options.sourceName),
      llvm::SMLoc());
  llvm::raw_string_ostream errorStream(error);
  SourceMgrDiagnosticHandler diagnostics(sourceMgr, &context, errorStream);

  OwningOpRef<ModuleOp> module = parseSourceFile<ModuleOp>(sourceMgr, &context);
  if (!module)
    return false;

  PassManager pm(&context);
  // Default variants: the full exchange (r = 1, or r = s for experts
  // sharded over s = W / E ranks) and data parallel.
  std::vector<std::string> variants = options.variants;
  if (variants.empty() && options.ranks > 1) {
    int64_t exchange = 1;
    module->walk([&](moe::LayerOp layer) {
      int64_t experts = layer.getNumExperts();
      if (experts > 0 && experts < options.ranks &&
          options.ranks % experts == 0)
        exchange = options.ranks / experts;
    });
    variants = {"r" + std::to_string(exchange) + "d1", "r0d1"};
  }
  if (!variants.empty()) {
    moe::MoeMultiversionPassOptions multiversion;
    multiversion.ranks = options.ranks;
    multiversion.variants.assign(variants.begin(), variants.end());
    pm.addPass(moe::createMoeMultiversionPass(multiversion));
  }
  if (options.ranksPerNode > 0) {
    moe::MoeA2A2DHPassOptions twoLevel;
    twoLevel.ranksPerNode = options.ranksPerNode;
    pm.addNestedPass<func::FuncOp>(moe::createMoeA2A2DHPass(twoLevel));
  }
  LowerToPlanOptions pipeline;
  pipeline.training = options.training;
  pipeline.layout = options.layout;
  pipeline.layouts = llvm::ArrayRef<std::string>(options.layouts);
  if (options.fuseDispatch)
    pipeline.fuseDispatch = *options.fuseDispatch;
  if (options.fuseGlu)
    pipeline.fuseGlu = *options.fuseGlu;
  if (options.fuseCombine)
    pipeline.fuseCombine = *options.fuseCombine;
  if (options.fuseActivationBackward)
    pipeline.fuseActivationBackward = *options.fuseActivationBackward;
  buildLowerToPlanPipeline(pm, pipeline);
  if (failed(pm.run(*module)))
    return false;

  llvm::raw_string_ostream planStream(planJson);
  return succeeded(emitPlanFile(*module, planStream));
}

std::string flex::layerConfigToMlir(const LayerConfig &c) {
  auto element = [](DType type) {
    switch (type) {
    case DType::BF16:
      return "bf16";
    case DType::F16:
      return "f16";
    default:
      return "f32";
    }
  };
  std::string x = element(c.dtype);
  std::string router = c.routerFp32 ? "f32" : x;
  auto tensor = [&](std::initializer_list<int64_t> shape,
                    const std::string &type) {
    std::ostringstream os;
    os << "tensor<";
    for (int64_t dim : shape)
      os << dim << 'x';
    os << type << '>';
    return os.str();
  };
  bool gated = c.expertKind == ExpertKind::Gated;
  bool bias = !gated && c.bias;
  std::vector<std::pair<std::string, std::string>> args = {
      {"x", tensor({c.tokens, c.modelDim}, x)},
      {"wg", tensor({c.modelDim, c.experts}, router)},
      {"w1", tensor({c.experts, c.modelDim, c.hiddenDim}, x)},
      {"w2", tensor({c.experts, c.hiddenDim, c.modelDim}, x)}};
  if (gated)
    args.push_back({"w3", tensor({c.experts, c.modelDim, c.hiddenDim}, x)});
  if (bias) {
    args.push_back({"b1", tensor({c.experts, c.hiddenDim}, x)});
    args.push_back({"b2", tensor({c.experts, c.modelDim}, x)});
  }
  std::ostringstream os;
  os.precision(17);
  std::string out = tensor({c.tokens, c.modelDim}, x);
  os << "func.func @layer(";
  for (size_t i = 0; i < args.size(); ++i)
    os << (i ? ", " : "") << '%' << args[i].first << ": " << args[i].second;
  os << ") -> (" << out << ", tensor<f32>) {\n  %out, %aux = moe.layer ";
  if (gated)
    os << "gated";
  else
    os << "ffn<" << toString(c.activation) << '>';
  os << " %x, %wg, %w1, %w2";
  if (gated)
    os << " up(%w3)";
  if (bias)
    os << " bias(%b1, %b2)";
  os << " {top_k = " << c.topK << ", capacity = #moe.capacity<"
     << toString(c.capacityMode);
  if (c.capacityMode != CapacityMode::Dropless) {
    std::ostringstream factor;
    factor.precision(17);
    factor << std::scientific << c.capacityFactor;
    os << ' ' << factor.str();
  }
  os << '>';
  if (c.normalizeGate)
    os << ", normalize";
  if (c.batchPrioritized)
    os << ", batch_prioritized";
  if (c.gateNoise != 0.0) {
    std::ostringstream noise;
    noise.precision(17);
    noise << std::scientific << c.gateNoise;
    os << ", gate_noise = " << noise.str() << " : f64";
  }
  if (c.seed != 0)
    os << ", seed = " << static_cast<int64_t>(c.seed) << " : i64";
  os << "} : (";
  for (size_t i = 0; i < args.size(); ++i)
    os << (i ? ", " : "") << args[i].second;
  os << ") -> (" << out << ", tensor<f32>)\n  return %out, %aux : " << out
     << ", tensor<f32>\n}\n";
  return os.str();
}
