//===- PlanEmitter.cpp - Serialize a moert plan for the runtime -----------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file translates a `moert.plan` into the runtime's flex::Plan, then
// writes it with the runtime's own writer, so that the format has one
// writer and one reader, both in the runtime.
//
//===----------------------------------------------------------------------===//

#include "flex/Target/Plan/PlanEmitter.h"

#include "flex/Runtime/CostModel/CostModel.h"
#include "flex/Runtime/PlanLoader.h"
#include "flex/Runtime/StepFacts.h"

#include "mlir/Dialect/Func/IR/FuncOps.h"
#include "mlir/IR/BuiltinAttributes.h"
#include "mlir/Tools/mlir-translate/Translation.h"
#include "llvm/ADT/DenseMap.h"
#include "llvm/Support/CommandLine.h"

using namespace mlir;
using namespace flex;

namespace {
std::optional<DType> toDType(Type type) {
  if (type.isF32())
    return DType::F32;
  if (type.isBF16())
    return DType::BF16;
  if (type.isF16())
    return DType::F16;
  if (type.isInteger(32))
    return DType::I32;
  return std::nullopt;
}

static_assert(static_cast<int>(moe::ExpertKind::Gated) ==
                      static_cast<int>(ExpertKind::Gated) &&
                  static_cast<int>(moe::Activation::Silu) ==
                      static_cast<int>(Activation::Silu),
              "the dialect's expert kinds and activations are the runtime's");

/// The LayerConfig of a plan's `#moert.layer`: its verifier has checked every
/// field, so the conversion cannot fail.
LayerConfig readLayer(moert::PlanOp plan) {
  moert::LayerAttr attr = plan.getLayer();
  moe::CapacityAttr capacity = attr.getCapacity();
  bool dropless = capacity.getMode() == moe::CapacityMode::Dropless;
  LayerConfig layer;
  layer.tokens = attr.getTokens();
  layer.modelDim = attr.getModelDim();
  layer.hiddenDim = attr.getHiddenDim();
  layer.experts = attr.getExperts();
  layer.topK = attr.getTopK();
  layer.capacityMode = static_cast<CapacityMode>(capacity.getMode());
  layer.capacityFactor = dropless ? 1.0 : capacity.getFactorValue();
  layer.expertKind = static_cast<ExpertKind>(attr.getExpert());
  layer.activation = static_cast<Activation>(attr.getActivation());
  layer.bias = attr.getBias();
  layer.dtype = *toDType(attr.getDtype());
  layer.routerFp32 = attr.getRouterFp32();
  layer.batchPrioritized = attr.getBatchPrioritized();
  layer.normalizeGate = attr.getNormalizeGate();
  layer.gateNoise = attr.getGateNoiseValue();
  layer.seed = static_cast<uint64_t>(attr.getSeed());
  return layer;
}

/// Fills the attributes of a step from the op's attributes.
/// grouped_gemm's (and grouped_gemm_combine's) epilogue and bias scale.
template <typename GemmOp>
void readGemmEpilogue(GemmOp gemm, StepAttrs &attrs) {
  attrs.epilogue = Epilogue::None;
  if (auto epilogue = gemm.getEpilogueAttr())
    attrs.epilogue =
        static_cast<Epilogue>(static_cast<int>(epilogue.getValue()) + 1);
  if (auto scale = gemm.getBiasScaleAttr())
    attrs.biasScale = scale.getValueAsDouble();
}

void readStepAttrs(Operation *op, StepAttrs &attrs) {
  if (auto gate = dyn_cast<moert::GateOp>(op)) {
    moe::CapacityAttr capacity = gate.getCapacity();
    attrs.topK = gate.getTopK();
    attrs.capacityMode = static_cast<CapacityMode>(capacity.getMode());
    attrs.capacityFactor = capacity.getMode() == moe::CapacityMode::Dropless
                               ? 1.0
                               : capacity.getFactorValue();
    attrs.capacityAlignment = capacity.getAlignment();
    attrs.normalize = gate.getNormalize();
    attrs.batchPrioritized = gate.getBatchPrioritized();
    attrs.noise = gate.getNoise().convertToDouble();
    attrs.seed = static_cast<uint64_t>(gate.getSeed());
    switch (gate.getLayout()) {
    case moert::Layout::Padded:
      attrs.layout = DispatchLayout::Padded;
      break;
    case moert::Layout::Ragged:
      attrs.layout = DispatchLayout::Ragged;
      break;
    case moert::Layout::Aligned:
      attrs.layout = DispatchLayout::Aligned;
      break;
    }
  } else if (auto gemm = dyn_cast<moert::GroupedGemmOp>(op)) {
    attrs.transB = gemm.getTransB();
    attrs.accumulate = gemm.getAccumulate();
    readGemmEpilogue(gemm, attrs);
  } else if (auto combined = dyn_cast<moert::GroupedGemmCombineOp>(op)) {
    attrs.transB = combined.getTransB();
    readGemmEpilogue(combined, attrs);
  } else if (auto shard = dyn_cast<moert::ShardRoutingOp>(op)) {
    attrs.shards = shard.getShards();
  } else if (auto shardBackward = dyn_cast<moert::ShardRoutingBackwardOp>(op)) {
    attrs.shards = shardBackward.getShards();
  } else if (auto wgrad = dyn_cast<moert::GroupedGemmWgradOp>(op)) {
    attrs.accumulate = wgrad.getAccumulate();
  } else if (auto exchange = dyn_cast<moert::AllToAllOp>(op)) {
    attrs.direction = exchange.getDirection() == moert::Direction::Dispatch
                          ? AllToAllDirection::Dispatch
                          : AllToAllDirection::Combine;
    attrs.chunks = exchange.getChunks();
    attrs.chunk = exchange.getChunk();
    attrs.ranksPerNode = exchange.getRanksPerNode();
    attrs.groupSize = exchange.getGroupSize();
    attrs.groupStride = exchange.getGroupStride();
  } else if (auto gather = dyn_cast<moert::AllGatherOp>(op)) {
    attrs.groupSize = gather.getGroupSize();
    attrs.groupStride = gather.getGroupStride();
  } else if (auto scatter = dyn_cast<moert::ReduceScatterOp>(op)) {
    attrs.groupSize = scatter.getGroupSize();
    attrs.groupStride = scatter.getGroupStride();
  } else if (auto segments = dyn_cast<moert::UniformSegmentsOp>(op)) {
    attrs.groups = segments.getGroups();
    attrs.ranks = segments.getRanks();
    attrs.chunks = segments.getChunks();
    attrs.chunk = segments.getChunk();
  } else if (auto backward = dyn_cast<moert::ActivationBackwardOp>(op)) {
    attrs.activation = static_cast<Activation>(backward.getActivation());
  } else if (auto glu = dyn_cast<moert::GroupedGemmGluBackwardOp>(op)) {
    attrs.transB = glu.getTransB();
  } else if (auto fused =
                 dyn_cast<moert::GroupedGemmActivationBackwardOp>(op)) {
    attrs.transB = fused.getTransB();
    attrs.activation = static_cast<Activation>(fused.getActivation());
  } else if (auto gateBackward = dyn_cast<moert::GateBackwardOp>(op)) {
    attrs.topK = gateBackward.getTopK();
    attrs.normalize = gateBackward.getNormalize();
  }
}

static_assert(static_cast<int>(moe::Activation::Relu) + 1 ==
                      static_cast<int>(Epilogue::Relu) &&
                  static_cast<int>(moe::Activation::Gelu) + 1 ==
                      static_cast<int>(Epilogue::Gelu) &&
                  static_cast<int>(moe::Activation::Silu) + 1 ==
                      static_cast<int>(Epilogue::Silu),
              "epilogues are the activations shifted by one");
static_assert(static_cast<int>(moe::CapacityMode::Bounded) ==
                  static_cast<int>(CapacityMode::Bounded),
              "the dialect's capacity modes are the runtime's");
} // namespace

FailureOr<Plan> flex::translateToRuntimePlan(moert::PlanOp planOp) {
  if (!planOp.getWorkspaceBytes())
    return planOp.emitOpError("[plan-3] place the workspace first "
                              "(--moert-plan-memory)");
  Plan plan;
  plan.producer = "flex moe-opt 0.1";
  plan.layer = readLayer(planOp);
  plan.training = planOp.getTraining();
  plan.worldSize = planOp.getWorldSize();
  plan.workspace.bytes = *planOp.getWorkspaceBytes();
  plan.workspace.alignment = planOp.getWorkspaceAlignment();

  llvm::DenseMap<Value, BufferRef> buffers;
  auto describe = [&](BufferDesc &desc, StringRef name,
                      Value value) -> LogicalResult {
    auto type = cast<MemRefType>(value.getType());
    std::optional<DType> dtype = toDType(type.getElementType());
    if (!dtype)
      return value.getDefiningOp()->emitOpError("[plan-2] element type ")
             << type.getElementType() << " has no plan dtype";
    desc.name = name.str();
    desc.dtype = *dtype;
    desc.shape.assign(type.getShape().begin(), type.getShape().end());
    return success();
  };

  for (Operation &op : planOp.getBody().front()) {
    if (auto argument = dyn_cast<moert::ArgumentOp>(op)) {
      Argument desc;
      if (failed(describe(desc, argument.getName(), argument.getBuffer())))
        return failure();
      desc.role = static_cast<ArgumentRole>(argument.getRole());
      buffers[argument.getBuffer()] = {BufferRef::Kind::Argument,
                                       int32_t(plan.arguments.size())};
      plan.arguments.push_back(std::move(desc));
    } else if (auto alloc = dyn_cast<moert::AllocOp>(op)) {
      WorkspaceBuffer desc;
      if (failed(describe(desc, alloc.getName(), alloc.getBuffer())))
        return failure();
      if (!alloc.getOffset())
        return alloc.emitOpError("[plan-3] has no offset: run "
                                 "--moert-plan-memory");
      desc.offset = *alloc.getOffset();
      desc.bytes = desc.numBytes();
      buffers[alloc.getBuffer()] = {BufferRef::Kind::Workspace,
                                    int32_t(plan.workspace.buffers.size())};
      plan.workspace.buffers.push_back(std::move(desc));
    }
  }

  for (auto variantOp : planOp.getBody().getOps<moert::VariantOp>()) {
    Variant variant;
    variant.name = variantOp.getName().str();
    variant.workspaceBytes = variantOp.getWorkspaceBytes();
    for (auto [region, steps] :
         {std::pair{&variantOp.getForward(), &variant.forward},
          std::pair{&variantOp.getBackward(), &variant.backward}}) {
      for (Operation &op : region->front()) {
        auto stepOp = dyn_cast<moert::StepOpInterface>(op);
        if (!stepOp)
          return op.emitOpError("[plan-3] is not a plan step");
        std::optional<StepOp> kind = parseStepOp(stepOp.getStepName().str());
        if (!kind)
          return op.emitOpError("[plan-3] the runtime has no step '")
                 << stepOp.getStepName() << "'";
        Step step;
        step.op = *kind;
        for (const moert::StepOperand &operand : stepOp.getStepOperands()) {
          std::optional<OperandRole> role =
              parseOperandRole(operand.role.str());
          auto it = buffers.find(operand.value);
          if (!role || it == buffers.end())
            return op.emitOpError("[plan-3] operand '")
                   << operand.role << "' is not a plan buffer";
          auto &slots = operand.isOutput ? step.outputs : step.inputs;
          slots[static_cast<int>(*role)] = it->second;
        }
        readStepAttrs(&op, step.attrs);
        steps->push_back(std::move(step));
      }
    }
    plan.variants.push_back(std::move(variant));
  }

  // What backends are told instead of searching the plan (StepFacts.h).
  computeStepFacts(plan);
  if (Status status = verifyPlan(plan);
      !status)
    return planOp.emitOpError("[plan-3] the runtime rejects the plan: ")
           << status.message();
  return plan;
}

namespace {

/// --plan-profile: a device profile (docs/CostModel.md) the emitter
/// predicts each variant's time with, filling its predicted_us.
llvm::cl::opt<std::string>
    planProfile("plan-profile",
                llvm::cl::desc("With --moert-to-plan: fill each variant's "
                               "predicted_us from this device profile"),
                llvm::cl::value_desc("profile.json"), llvm::cl::init(""));

/// Each variant's predicted microseconds (forward, plus backward for a
/// training plan) at the static capacity, or the buffers' bounds when C is
/// known only at run time.
LogicalResult predictVariants(moert::PlanOp op, Plan &plan,
                              const std::string &path) {
  DeviceProfile profile;
  if (Status status = readProfileFile(path, profile); !status)
    return op.emitError("[plan-4] ") << status.message();
  if (Status status = checkProfile(profile, {"", "", plan.worldSize}); !status)
    return op.emitError("[plan-4] ") << status.message();
  const CostModel model(profile);
  for (size_t v = 0; v < plan.variants.size(); ++v) {
    double us = model.predict(plan, v, /*backward=*/false, -1).totalUs;
    if (plan.training)
      us += model.predict(plan, v, /*backward=*/true, -1).totalUs;
    plan.variants[v].predictedUs = us;
  }
  return success();
}

} // namespace

LogicalResult flex::emitPlanFile(ModuleOp module, raw_ostream &os,
                                 const std::string &profilePath) {
  auto plans = module.getOps<moert::PlanOp>();
  if (std::distance(plans.begin(), plans.end()) != 1)
    return module.emitError("[plan-3] a plan file holds one moert.plan; "
                            "the module has ")
           << std::distance(plans.begin(), plans.end());
  FailureOr<Plan> plan = translateToRuntimePlan(*plans.begin());
  if (failed(plan))
    return failure();
  if (!profilePath.empty() &&
      failed(predictVariants(*plans.begin(), *plan, profilePath)))
    return failure();
  os << writePlan(*plan) << '\n';
  return success();
}

void flex::registerPlanTranslation() {
  TranslateFromMLIRRegistration registration(
      "moert-to-plan", "Write the plan file of a moert.plan",
      [](Operation *op, raw_ostream &os) -> LogicalResult {
        auto module = dyn_cast<ModuleOp>(op);
        if (!module)
          return op->emitError("expected a module");
        return emitPlanFile(module, os, planProfile);
      },
      [](DialectRegistry &registry) {
        registry
            .insert<moert::MoeRTDialect, moe::MoeDialect, func::FuncDialect>();
      });
}
