//===- Executor.cpp - Run a plan on caller buffers ------------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the Executor and the default memory and stream hooks
// of Backend.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/Executor.h"
#include "flex/Runtime/PlanLoader.h"

#include <algorithm>
#include <bit>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

namespace flex {

//===----------------------------------------------------------------------===//
// Backend defaults
//===----------------------------------------------------------------------===//

Backend::~Backend() = default;

Status Backend::setStream(void *stream) {
  if (stream)
    return Status(StatusCode::Unavailable,
                  "backend '" + std::string(name()) +
                      "' runs on the calling thread and takes no stream; "
                      "pass a null stream");
  return Status::ok();
}

void *Backend::allocate(int64_t bytes, int64_t alignment) {
  // aligned_alloc needs a size that is a multiple of the alignment.
  size_t align = std::max<size_t>(alignment, 64);
  size_t size = (static_cast<size_t>(bytes) + align - 1) / align * align;
  return std::aligned_alloc(align, std::max(size, align));
}

void Backend::deallocate(void *data) { std::free(data); }

Status Backend::copyToHost(void *hostDst, const void *src, int64_t bytes) {
  std::memcpy(hostDst, src, static_cast<size_t>(bytes));
  return Status::ok();
}

Status Backend::copyFromHost(void *dst, const void *hostSrc, int64_t bytes) {
  std::memcpy(dst, hostSrc, static_cast<size_t>(bytes));
  return Status::ok();
}

Status Backend::recordTimestamp(int32_t) {
  return Status(StatusCode::Unavailable, "backend '" + std::string(name()) +
                                             "' has no device timer");
}

Status Backend::elapsedMicros(int32_t, int32_t, double &micros) {
  micros = 0;
  return recordTimestamp(0);
}

bool Backend::canCapturePass(const Plan &, int64_t, bool) const {
  return false;
}

Status Backend::beginGraphCapture() {
  return Status(StatusCode::Unavailable, "backend '" + std::string(name()) +
                                             "' cannot record graphs");
}

Status Backend::endGraphCapture(const std::string &) {
  return beginGraphCapture();
}

Status Backend::launchGraph(const std::string &, bool &launched) {
  launched = false;
  return Status::ok();
}

Status Backend::setCommunicator(std::shared_ptr<Communicator> communicator) {
  communicator_ = std::move(communicator);
  return Status::ok();
}

void Backend::setGroupCommunicator(int64_t size, int64_t stride,
                                   std::shared_ptr<Communicator> communicator,
                                   Status made) {
  for (GroupCommunicator &group : groupCommunicators_)
    if (group.size == size && group.stride == stride) {
      group.communicator = std::move(communicator);
      group.made = std::move(made);
      return;
    }
  groupCommunicators_.push_back(
      {size, stride, std::move(communicator), std::move(made)});
}

Status Backend::communicatorFor(const Step &step,
                                Communicator *&communicator) const {
  communicator = nullptr;
  const std::string what = "op '" + std::string(toString(step.op)) + "'";
  if (step.attrs.groupSize == 0) {
    communicator = communicator_.get();
    if (!communicator)
      return Status(StatusCode::FailedPrecondition,
                    what + ": no communicator is set for the collective step");
    return Status::ok();
  }
  for (const GroupCommunicator &group : groupCommunicators_)
    if (group.size == step.attrs.groupSize &&
        group.stride == step.attrs.groupStride) {
      if (!group.communicator)
        return Status(group.made ? StatusCode::FailedPrecondition
                                 : group.made.code(),
                      what + " runs among groups of " +
                          std::to_string(group.size) + " ranks " +
                          std::to_string(group.stride) +
                          " apart, but there is no such sub-communicator" +
                          (group.made ? std::string()
                                      : ": " + group.made.message()));
      communicator = group.communicator.get();
      return Status::ok();
    }
  return Status(StatusCode::FailedPrecondition,
                what + " runs among groups of " +
                    std::to_string(step.attrs.groupSize) + " ranks " +
                    std::to_string(step.attrs.groupStride) +
                    " apart; no sub-communicator was made for them (set the "
                    "communicator through the executor)");
}

//===----------------------------------------------------------------------===//
// Helpers
//===----------------------------------------------------------------------===//

namespace {

std::string shapeString(const std::vector<int64_t> &shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i)
    text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

std::string describe(const Argument &arg) {
  return shapeString(arg.shape) + " " + std::string(toString(arg.dtype)) +
         " = " + std::to_string(arg.numBytes()) + " bytes";
}

bool isFloat(DType type) { return type != DType::I32; }

/// Index of the first NaN or Inf element, or -1.
int64_t findNonFinite(const void *data, DType type, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    float value;
    switch (type) {
    case DType::F32:
      value = static_cast<const float *>(data)[i];
      break;
    case DType::BF16:
      value = std::bit_cast<float>(
          static_cast<uint32_t>(static_cast<const uint16_t *>(data)[i]) << 16);
      break;
    case DType::F16:
      // An f16 is non-finite exactly when its exponent bits are all set.
      if ((static_cast<const uint16_t *>(data)[i] & 0x7c00u) == 0x7c00u)
        return i;
      continue;
    case DType::I32:
      return -1;
    }
    if (!std::isfinite(value))
      return i;
  }
  return -1;
}

std::string elementPosition(const Argument &arg, int64_t index) {
  std::string text = "element " + std::to_string(index) + " (index [";
  std::vector<int64_t> coords(arg.shape.size());
  int64_t rest = index;
  for (size_t i = arg.shape.size(); i-- > 0;) {
    coords[i] = arg.shape[i] ? rest % arg.shape[i] : 0;
    rest = arg.shape[i] ? rest / arg.shape[i] : 0;
  }
  for (size_t i = 0; i < coords.size(); ++i)
    text += (i ? ", " : "") + std::to_string(coords[i]);
  return text + "])";
}

} // namespace

int64_t resolveVariant(const Plan &plan, std::string_view text) {
  int64_t byName = plan.findVariant(text);
  if (byName >= 0)
    return byName;
  int64_t index = -1;
  auto [end, error] = std::from_chars(text.data(), text.data() + text.size(),
                                      index);
  if (error != std::errc() || end != text.data() + text.size() || index < 0 ||
      index >= static_cast<int64_t>(plan.variants.size()))
    return -1;
  return index;
}

//===----------------------------------------------------------------------===//
// Executor
//===----------------------------------------------------------------------===//

Executor::Executor(std::shared_ptr<const Plan> plan,
                   std::unique_ptr<Backend> backend,
                   const RuntimeOptions &options)
    : plan_(std::move(plan)), backend_(std::move(backend)), options_(options) {
  argumentData_.assign(plan_->arguments.size(), nullptr);
  measurements_.assign(plan_->variants.size(), {});
  buckets_.assign(plan_->variants.size(), {});
  explorations_.assign(plan_->variants.size(), {});
  selected_ = plan_->defaultVariant;
  // One rank needs no setup; more ranks need the caller's communicator.
  if (plan_->worldSize == 1) {
    communicator_ = createSelfCommunicator();
    (void)backend_->setCommunicator(communicator_);
    (void)makeGroupCommunicators();
  }
}

Status Executor::makeGroupCommunicators() {
  // Every rank holds the same plan, so every rank splits the same groups in
  // the same order (split is a collective).
  std::vector<RankGroups> made;
  for (const Variant &variant : plan_->variants)
    for (const std::vector<Step> *steps : {&variant.forward, &variant.backward})
      for (const Step &step : *steps) {
        if (step.attrs.groupSize == 0 || !isCollective(step.op))
          continue;
        RankGroups groups{step.attrs.groupSize, step.attrs.groupStride};
        bool seen = false;
        for (const RankGroups &other : made)
          seen |= other.size == groups.size && other.stride == groups.stride;
        if (seen)
          continue;
        made.push_back(groups);
        std::shared_ptr<Communicator> group;
        Status status = splitIntoGroups(*communicator_, groups, group);
        // A communicator that cannot split (Unavailable) fails the grouped
        // steps when they run, naming them; the other variants still run.
        if (!status && status.code() != StatusCode::Unavailable)
          return status;
        backend_->setGroupCommunicator(groups.size, groups.stride,
                                       std::move(group), status);
      }
  return Status::ok();
}

Executor::~Executor() {
  if (ownedWorkspace_)
    backend_->deallocate(ownedWorkspace_);
  for (void *retired : retiredWorkspaces_)
    backend_->deallocate(retired);
}

Status Executor::create(std::shared_ptr<const Plan> plan,
                        std::unique_ptr<Backend> backend,
                        std::unique_ptr<Executor> &executor) {
  executor.reset();
  RuntimeOptions options;
  if (Status status = RuntimeOptions::fromEnvironment({}, options); !status)
    return status;
  return create(std::move(plan), std::move(backend), options, executor);
}

Status Executor::create(std::shared_ptr<const Plan> plan,
                        std::unique_ptr<Backend> backend,
                        const RuntimeOptions &options,
                        std::unique_ptr<Executor> &executor) {
  executor.reset();
  if (!plan)
    return Status(StatusCode::InvalidArgument, "no plan given");
  if (!backend)
    return Status(StatusCode::InvalidArgument, "no backend given");
  if (Status status = verifyPlan(*plan); !status)
    return status;
  // Refused here, before anything runs, rather than halfway through a pass.
  if (Status status = backend->checkRuns(*plan); !status)
    return status;
  std::unique_ptr<Executor> result(
      new Executor(std::move(plan), std::move(backend), options));
  // Several variants and none named: the cost model chooses (CostModel.md).
  if (options.variant == "auto" ||
      (options.variant.empty() && result->plan().variants.size() > 1)) {
    result->automatic_ = true;
    if (Status status =
            result->chooseVariant(false, result->availableWorkspaceBytes());
        !status)
      return status;
  } else if (!options.variant.empty()) {
    int64_t index = resolveVariant(result->plan(), options.variant);
    if (index < 0) {
      std::string names;
      for (const Variant &variant : result->plan().variants)
        names += (names.empty() ? "" : ", ") + variant.name;
      const std::vector<std::string> &fromEnv = options.environmentOverrides;
      bool env = std::find(fromEnv.begin(), fromEnv.end(), "FLEX_VARIANT") !=
                 fromEnv.end();
      return Status(
          StatusCode::InvalidArgument,
          (env ? "FLEX_VARIANT='" : "option variant='") + options.variant +
              "' names no variant of the plan; allowed: " + names +
              " or an index below " +
              std::to_string(result->plan().variants.size()) + ", or auto");
    }
    result->selected_ = index;
  }
  executor = std::move(result);
  return Status::ok();
}

Status Executor::selectVariant(int64_t index) {
  int64_t count = static_cast<int64_t>(plan_->variants.size());
  if (index < 0 || index >= count)
    return Status(StatusCode::OutOfRange,
                  "variant index " + std::to_string(index) +
                      " is out of range; the plan has " +
                      std::to_string(count) + " variants (0 to " +
                      std::to_string(count - 1) + ")");
  selected_ = index;
  automatic_ = false;
  return Status::ok();
}

Status Executor::selectVariant(std::string_view name) {
  if (name == "auto") {
    automatic_ = true;
    return chooseVariant(false, availableWorkspaceBytes());
  }
  int64_t index = plan_->findVariant(name);
  if (index < 0) {
    std::string names;
    for (const Variant &variant : plan_->variants)
      names += (names.empty() ? "" : ", ") + variant.name;
    return Status(StatusCode::NotFound,
                  "no variant named '" + std::string(name) +
                      "'; the plan has: " + names + " (or auto)");
  }
  selected_ = index;
  automatic_ = false;
  return Status::ok();
}

Status Executor::setCommunicator(std::shared_ptr<Communicator> communicator) {
  const int64_t world = plan_->worldSize;
  if (!communicator && world == 1)
    communicator = createSelfCommunicator();
  if (communicator) {
    if (communicator->size() != world)
      return Status(StatusCode::InvalidArgument,
                    "the plan runs on " + std::to_string(world) +
                        " rank(s) (world.size), but communicator '" +
                        std::string(communicator->name()) + "' has " +
                        std::to_string(communicator->size()) +
                        "; run it with " + std::to_string(world) +
                        " ranks (e.g. mpirun -np " + std::to_string(world) +
                        ")");
    bool deviceComm = communicator->memory() == CommMemory::Device;
    if (world > 1 && deviceComm == backend_->isHostMemory())
      return Status(StatusCode::InvalidArgument,
                    "communicator '" + std::string(communicator->name()) +
                        "' works on " + (deviceComm ? "device" : "host") +
                        " memory, but backend '" +
                        std::string(backend_->name()) + "' keeps buffers in " +
                        (deviceComm ? "host" : "device") +
                        " memory; use a communicator of the backend's "
                        "memory space");
  }
  if (Status status = backend_->setCommunicator(communicator); !status)
    return status;
  communicator_ = std::move(communicator);
  if (communicator_)
    return makeGroupCommunicators();
  return Status::ok();
}

Status Executor::bind(bool backward, const Binding *bindings, size_t count) {
  const Plan &plan = *plan_;
  std::fill(argumentData_.begin(), argumentData_.end(), nullptr);
  if (count && !bindings)
    return Status(StatusCode::InvalidArgument,
                  "bindings is null but count is " + std::to_string(count));
  for (size_t i = 0; i < count; ++i) {
    const Binding &binding = bindings[i];
    int64_t index = plan.findArgument(binding.name);
    if (index < 0) {
      std::string names;
      for (const Argument &arg : plan.arguments)
        names += (names.empty() ? "" : ", ") + arg.name;
      return Status(StatusCode::NotFound,
                    "binding " + std::to_string(i) + ": '" +
                        std::string(binding.name) +
                        "' is not an argument of the plan; its arguments are " +
                        names);
    }
    const Argument &arg = plan.arguments[index];
    if (argumentData_[index])
      return Status(StatusCode::InvalidArgument,
                    "binding " + std::to_string(i) + ": argument '" +
                        arg.name + "' is bound twice");
    if (!binding.data)
      return Status(StatusCode::InvalidArgument,
                    "binding " + std::to_string(i) + ": argument '" +
                        arg.name + "' has a null pointer");
    if (binding.bytes != arg.numBytes())
      return Status(StatusCode::InvalidArgument,
                    "binding " + std::to_string(i) + ": argument '" +
                        arg.name + "' is " + describe(arg) + "; got " +
                        std::to_string(binding.bytes) + " bytes");
    argumentData_[index] = binding.data;
  }
  // What this pass reads and writes must be bound.
  for (size_t i = 0; i < plan.arguments.size(); ++i) {
    const Argument &arg = plan.arguments[i];
    bool needed = arg.role == ArgumentRole::Input ||
                  (backward ? arg.role == ArgumentRole::GradInput ||
                                  arg.role == ArgumentRole::GradOutput
                            : arg.role == ArgumentRole::Output);
    if (needed && !argumentData_[i])
      return Status(StatusCode::InvalidArgument,
                    "argument '" + arg.name + "' (role " +
                        std::string(toString(arg.role)) + ", " +
                        describe(arg) + ") is not bound; " +
                        (backward ? "backward" : "forward") +
                        " needs every input" +
                        (backward ? ", grad_input and grad_output"
                                  : " and output") +
                        " argument");
  }
  // A written argument must not share bytes with any other bound one:
  // inputs are never written, and outputs do not clobber each other.
  ArgumentRole written =
      backward ? ArgumentRole::GradOutput : ArgumentRole::Output;
  for (size_t i = 0; i < plan.arguments.size(); ++i) {
    if (!argumentData_[i] || plan.arguments[i].role != written)
      continue;
    auto begin = reinterpret_cast<uintptr_t>(argumentData_[i]);
    auto end = begin + plan.arguments[i].numBytes();
    for (size_t j = 0; j < plan.arguments.size(); ++j) {
      if (j == i || !argumentData_[j])
        continue;
      auto otherBegin = reinterpret_cast<uintptr_t>(argumentData_[j]);
      auto otherEnd = otherBegin + plan.arguments[j].numBytes();
      if (begin < otherEnd && otherBegin < end)
        return Status(StatusCode::InvalidArgument,
                      "argument '" + plan.arguments[i].name +
                          "' (written) overlaps the memory of argument '" +
                          plan.arguments[j].name + "'");
    }
  }
  return Status::ok();
}

Status Executor::forward(const Binding *bindings, size_t count,
                         const RunOptions &options) {
  return run(/*backward=*/false, bindings, count, options);
}

Status Executor::backward(const Binding *bindings, size_t count,
                          const RunOptions &options) {
  return run(/*backward=*/true, bindings, count, options);
}

/// One forward or backward pass, from its start to its measurements: what
/// runs, how it is timed and whether it goes through a graph.
struct Executor::Pass {
  bool backward = false;
  int64_t variantIndex = 0;
  const Variant *variant = nullptr;
  const std::vector<Step> *steps = nullptr;
  /// The call's workspace, and the seed its gates use instead of the plan's
  /// (empty: the plan's).
  void *workspace = nullptr;
  std::optional<uint64_t> seed;
  /// The capacity bucket of the forward (a backward's: its forward's).
  int64_t bucket = -1;
  bool timeSteps = true;
  /// Device timers: marker 0 before the first step, marker s + 1 after step
  /// s (or 1 after a replayed graph); read after one synchronize at the end.
  bool deviceTimer = false;
  /// Graphs: the key is the pass and every pointer its steps were bound to.
  bool useGraph = false;
  std::string graphKey;
  /// The key ran once eagerly, so this call records it.
  bool warm = false;
  bool capturing = false;
  /// The pass ran as a replayed graph.
  bool launched = false;
  RunStats stats;

  /// `status` with the variant, the direction and `where` in front.
  Status fail(const Status &status, const std::string &where) const {
    return Status(status.code(), "variant '" + variant->name + "' " +
                                     (backward ? "backward" : "forward") +
                                     where + ": " + status.message());
  }
};

Status Executor::checkRunnable(bool backward, const void *workspace,
                               ForwardRecord &record) const {
  const Plan &plan = *plan_;
  if (backward && !plan.training)
    return Status(StatusCode::FailedPrecondition,
                  "the plan was compiled for inference (training false); it "
                  "has no backward");
  if (backward)
    if (Status status = findForwardRecord(workspace, record); !status)
      return status;
  if (!communicator_)
    return Status(StatusCode::FailedPrecondition,
                  "the plan runs on " + std::to_string(plan.worldSize) +
                      " ranks (world.size) and no communicator is set "
                      "(Executor::setCommunicator, "
                      "flexExecutableSetCommunicator; moe-run under mpirun)");
  return Status::ok();
}

Status Executor::checkNonFiniteArguments(bool backward, bool outputs) {
  const Plan &plan = *plan_;
  for (size_t i = 0; i < plan.arguments.size(); ++i) {
    const Argument &arg = plan.arguments[i];
    bool selected = outputs
                        ? arg.role == (backward ? ArgumentRole::GradOutput
                                                : ArgumentRole::Output)
                        : (arg.role == ArgumentRole::Input ||
                           (backward && arg.role == ArgumentRole::GradInput));
    if (!selected || !isFloat(arg.dtype))
      continue;
    const void *data = argumentData_[i];
    std::vector<uint8_t> hostCopy;
    if (!backend_->isHostMemory()) {
      // Device memory: the host reads a copy, once the device is done.
      if (Status status = backend_->synchronize(); !status)
        return status;
      hostCopy.resize(static_cast<size_t>(arg.numBytes()));
      if (Status status =
              backend_->copyToHost(hostCopy.data(), data, arg.numBytes());
          !status)
        return status;
      data = hostCopy.data();
    }
    int64_t at = findNonFinite(data, arg.dtype, arg.numElements());
    if (at >= 0)
      return Status(
          StatusCode::NumericError,
          std::string(outputs ? "output" : "input") + " argument '" + arg.name +
              "' has NaN or Inf at " + elementPosition(arg, at) +
              (outputs ? " (inputs were finite)" : "; nothing was run"));
  }
  return Status::ok();
}

Executor::Pass Executor::startPass(bool backward, const RunOptions &options,
                                   void *workspace,
                                   const ForwardRecord &record) const {
  Pass pass;
  pass.backward = backward;
  pass.variantIndex = backward ? record.variant : selected_;
  pass.variant = &plan_->variants[pass.variantIndex];
  pass.steps = backward ? &pass.variant->backward : &pass.variant->forward;
  pass.workspace = workspace;
  pass.seed = backward ? record.seed : options.seed;
  pass.bucket = backward ? record.bucket : -1;
  pass.timeSteps = options.timeSteps;
  pass.deviceTimer = options.timeSteps && backend_->hasDeviceTimer();
  pass.useGraph = (options.useGraph || options_.cudaGraph) &&
                  backend_->canCapturePass(*plan_, pass.variantIndex, backward);
  // A graph keeps the seed it was recorded with: a per-call seed that
  // changes the noise runs step by step instead.
  if (pass.seed)
    for (const Step &step : *pass.steps)
      if (step.op == StepOp::Gate && step.attrs.noise != 0.0)
        pass.useGraph = false;
  if (pass.useGraph) {
    // The workspace is part of the key: a graph recorded on one workspace
    // never replays on another.
    pass.graphKey = std::to_string(pass.variantIndex) + (backward ? "b" : "f") +
                    ":" +
                    std::to_string(reinterpret_cast<uintptr_t>(workspace));
    for (void *data : argumentData_)
      pass.graphKey += "," + std::to_string(reinterpret_cast<uintptr_t>(data));
    pass.warm = std::find(warmGraphKeys_.begin(), warmGraphKeys_.end(),
                          pass.graphKey) != warmGraphKeys_.end();
  }
  pass.stats.variant = pass.variantIndex;
  pass.stats.backward = backward;
  return pass;
}

Status Executor::mark(const Pass &pass, int32_t marker) {
  return pass.deviceTimer ? backend_->recordTimestamp(marker) : Status::ok();
}

TensorView Executor::resolve(const BufferRef &ref) const {
  if (ref.kind == BufferRef::Kind::Argument)
    return {argumentData_[ref.index], &plan_->arguments[ref.index]};
  if (ref.kind == BufferRef::Kind::Workspace) {
    const WorkspaceBuffer &buffer = plan_->workspace.buffers[ref.index];
    return {static_cast<char *>(runWorkspace_) + buffer.offset, &buffer};
  }
  return {};
}

Status Executor::runSteps(Pass &pass) {
  using Clock = std::chrono::steady_clock;
  const std::vector<Step> &steps = *pass.steps;
  const bool timed = pass.timeSteps && !pass.capturing;
  for (size_t s = 0; s < steps.size(); ++s) {
    const Step &step = steps[s];
    StepOperands operands;
    for (int r = 0; r < kNumOperandRoles; ++r) {
      operands.inputs[r] = resolve(step.inputs[r]);
      operands.outputs[r] = resolve(step.outputs[r]);
    }
    // The per-call seed reaches the gate through a copy of its step.
    Step seeded;
    const Step *run = &step;
    if (pass.seed && step.op == StepOp::Gate) {
      seeded = step;
      seeded.attrs.seed = *pass.seed;
      run = &seeded;
    }
    auto stepStart = Clock::now();
    Status status = backend_->runStep(*plan_, *run, operands);
    if (status && timed)
      status = pass.deviceTimer ? mark(pass, static_cast<int32_t>(s) + 1)
                                : backend_->synchronize();
    if (!status) {
      if (pass.capturing)
        (void)backend_->endGraphCapture(std::string());
      Status failed =
          pass.fail(status, " step " + std::to_string(s) + " (" +
                                std::string(toString(step.op)) + ")");
      // A failed collective may leave peers waiting in it: the
      // communicator ends the job (MPI) or stays broken.
      if (status.code() == StatusCode::CommunicationError)
        communicator_->abort(failed);
      return failed;
    }
    if (timed)
      pass.stats.steps.push_back(
          {static_cast<int32_t>(s), step.op,
           std::chrono::duration<double, std::micro>(Clock::now() - stepStart)
               .count()});
  }
  Status status = backend_->endPass();
  // The last step's time includes the join.
  if (status && timed && !steps.empty())
    status = mark(pass, static_cast<int32_t>(steps.size()));
  if (!status) {
    if (pass.capturing)
      (void)backend_->endGraphCapture(std::string());
    return pass.fail(status, " end of pass");
  }
  return Status::ok();
}

Status Executor::executePass(Pass &pass) {
  if (pass.useGraph)
    if (Status status = backend_->launchGraph(pass.graphKey, pass.launched);
        !status)
      return pass.fail(status, " graph replay");
  pass.capturing = pass.useGraph && !pass.launched && pass.warm;
  if (pass.capturing)
    if (Status status = backend_->beginGraphCapture(); !status)
      return pass.fail(status, " graph capture");
  if (!pass.launched)
    if (Status status = runSteps(pass); !status)
      return status;
  if (pass.capturing) {
    if (Status status = backend_->endGraphCapture(pass.graphKey); !status)
      return pass.fail(status, " graph capture");
    if (Status status = backend_->launchGraph(pass.graphKey, pass.launched);
        !status)
      return pass.fail(status, " graph replay");
    if (!pass.launched)
      return Status(StatusCode::Internal, "the graph just recorded for key " +
                                              pass.graphKey + " was not found");
  }
  if (pass.useGraph && !pass.warm && !pass.launched) {
    // Bounded: a caller whose pointers change every call never replays.
    if (warmGraphKeys_.size() >= kMaxWarmGraphKeys)
      warmGraphKeys_.erase(warmGraphKeys_.begin());
    warmGraphKeys_.push_back(pass.graphKey);
  }
  pass.stats.replayedGraph = pass.launched;
  return Status::ok();
}

Status Executor::finishPass(Pass &pass,
                            std::chrono::steady_clock::time_point start) {
  RunStats &stats = pass.stats;
  int32_t lastMarker =
      pass.launched ? 1 : static_cast<int32_t>(pass.steps->size());
  if (pass.launched)
    if (Status status = mark(pass, 1); !status)
      return pass.fail(status, "");
  if (pass.launched)
    stats.steps.clear();
  // A device backend returns without waiting unless the times are wanted.
  if (pass.timeSteps || backend_->isHostMemory())
    if (Status status = backend_->synchronize(); !status)
      return pass.fail(status, "");
  stats.totalMicros = std::chrono::duration<double, std::micro>(
                          std::chrono::steady_clock::now() - start)
                          .count();
  if (!pass.deviceTimer)
    return Status::ok();
  for (StepTiming &timing : stats.steps)
    if (Status status = backend_->elapsedMicros(timing.index, timing.index + 1,
                                                timing.micros);
        !status)
      return pass.fail(status, " timing");
  if (Status status = backend_->elapsedMicros(0, lastMarker, stats.totalMicros);
      !status)
    return pass.fail(status, " timing");
  return Status::ok();
}

void Executor::recordPass(Pass &pass) {
  VariantMeasurements &m = measurements_[pass.variantIndex];
  int64_t &runs = pass.backward ? m.backwardRuns : m.forwardRuns;
  double &mean = pass.backward ? m.backwardMeanMicros : m.forwardMeanMicros;
  int64_t &calls = pass.backward ? m.backwardCalls : m.forwardCalls;
  if (calls++ > 0) {
    ++runs;
    mean += (pass.stats.totalMicros - mean) / static_cast<double>(runs);
  }
  lastStats_ = std::move(pass.stats);
  if (!pass.backward)
    keepForwardRecord(pass.workspace,
                      {pass.variantIndex, pass.bucket, pass.seed, 0});
}

Status Executor::run(bool backward, const Binding *bindings, size_t count,
                     const RunOptions &options) {
  void *workspace = nullptr;
  int64_t available = 0;
  if (Status status = callWorkspace(options, workspace, available); !status)
    return status;
  // A forward replaces what its workspace held, whatever comes of it: only
  // its success leaves a record a backward may use.
  if (!backward)
    forwardRecords_.erase(workspace);
  ForwardRecord record;
  if (Status status = checkRunnable(backward, workspace, record); !status)
    return status;
  if (Status status = bind(backward, bindings, count); !status)
    return status;
  bool checkNonFinite = options.checkNonFinite || options_.checkNonFinite;
  if (checkNonFinite)
    if (Status status = checkNonFiniteArguments(backward, /*outputs=*/false);
        !status)
      return status;

  // Inside a caller's capture the own workspace cannot grow (nor be freed
  // later: the graph keeps its address), so auto keeps to what it holds.
  const bool recording =
      !options.workspace && !givenWorkspaceBytes_ && backend_->isRecording();
  if (recording) {
    ownedWorkspaceRecorded_ = true;
    if (ownedWorkspace_)
      available = std::min(available, variantBound(ownedWorkspaceBytes_));
  }
  // The automatic choice, from quantities every rank agrees on.
  if (!backward && automatic_) {
    if (Status status = agreeOnProfile(); !status)
      return status;
    if (Status status = chooseVariant(options.timeSteps, available); !status)
      return status;
  }
  // The variant runs on the call's workspace only if it fits there. The
  // executor's own holds what the next calls may run (runWorkspaceBytes:
  // under auto every variant within max_workspace_mib, so auto switches
  // without allocating, in a caller's capture too), and grows in a forward
  // when a bigger variant is named (a backward's forward grew it).
  const bool own = !options.workspace && !givenWorkspaceBytes_;
  const int64_t variant = backward ? record.variant : selected_;
  if (Status status = checkVariantFits(variant, available, own); !status)
    return status;
  if (own && backward && workspaceBytes(variant) > ownedWorkspaceBytes_)
    return Status(StatusCode::Internal,
                  "the backward's variant '" + plan_->variants[variant].name +
                      "' needs more than the executor's own workspace holds");
  if (own) {
    const int64_t bytes =
        backward || recording
            ? workspaceBytes(variant)
            : std::max(workspaceBytes(variant), runWorkspaceBytes());
    if (Status status = ensureWorkspace(bytes); !status)
      return status;
    workspace = workspace_;
  }
  Pass pass = startPass(backward, options, workspace, record);
  // A backward consumes its forward's state once it starts (it may
  // overwrite it), even if it fails.
  if (backward)
    forwardRecords_.erase(workspace);
  runWorkspace_ = workspace;
  auto start = std::chrono::steady_clock::now();
  if (Status status = mark(pass, 0); !status)
    return pass.fail(status, "");
  if (Status status = executePass(pass); !status)
    return status;
  if (Status status = finishPass(pass, start); !status)
    return status;
  // A variant's first pass pays one-time costs: not a measurement.
  const VariantMeasurements &seen = measurements_[pass.variantIndex];
  const bool first = (backward ? seen.backwardCalls : seen.forwardCalls) == 0;
  pass.bucket = recordAutomatic(pass.variantIndex, backward, pass.timeSteps,
                                pass.timeSteps && !first,
                                pass.stats.totalMicros, pass.bucket);
  recordPass(pass);

  if (checkNonFinite)
    return checkNonFiniteArguments(backward, /*outputs=*/true);
  return Status::ok();
}

} // namespace flex
