//===- AutoVariant.cpp - The executor's automatic variant choice ----------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements `variant = auto` (docs/CostModel.md, "The automatic
// choice"): the executor loads a device profile once (or the built-in
// fallback, keeping the reason), the ranks agree on it, and before each
// forward it picks the variant with CostModel::choose for the capacity C of
// the previous call (the static C, or the buffers' bound before the first
// call), re-choosing when C changes. The choice is a pure function of the
// plan, the agreed profile and the synced C, so every rank picks the same
// variant with no collective per call. It also implements explain() and its
// JSON form.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/Executor.h"

#include <nlohmann/json.hpp>

#include <bit>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>

namespace flex {

namespace {

/// The forward step whose capacity output holds the C the later steps use
/// (the last sync_capacity, else the last gate) and the gate that computed
/// it; nulls when there is none.
std::pair<const Step *, const Step *> capacitySource(const Variant &variant) {
  const Step *source = nullptr, *gate = nullptr, *lastGate = nullptr;
  for (const Step &step : variant.forward) {
    if (step.op == StepOp::Gate)
      lastGate = &step;
    if ((step.op == StepOp::Gate || step.op == StepOp::SyncCapacity) &&
        step.out(OperandRole::Capacity).isValid()) {
      source = &step;
      gate = lastGate;
    }
  }
  return {source, gate};
}

/// C rounded up to a power of two; -1 stays -1.
int64_t bucketOf(int64_t capacity) {
  return capacity <= 0 ? capacity
                       : static_cast<int64_t>(
                             std::bit_ceil(static_cast<uint64_t>(capacity)));
}

double nan() { return std::numeric_limits<double>::quiet_NaN(); }

/// Among the measured candidates (meanUs[v] >= 0): the fastest, or
/// `running` while it is within `keepBand` of it (near-equal variants would
/// swap on noise). fastest < 0 when none is measured.
struct MeasuredPick {
  int64_t variant = -1, fastest = -1;
  double fastestUs = 0;
};
MeasuredPick pickMeasured(const std::vector<double> &meanUs, int64_t running,
                          double keepBand) {
  MeasuredPick pick;
  for (int64_t v = 0; v < static_cast<int64_t>(meanUs.size()); ++v)
    if (meanUs[v] >= 0 && (pick.fastest < 0 || meanUs[v] < pick.fastestUs)) {
      pick.fastest = v;
      pick.fastestUs = meanUs[v];
    }
  pick.variant = pick.fastest;
  if (pick.fastest >= 0 && running >= 0 &&
      running < static_cast<int64_t>(meanUs.size()) && meanUs[running] >= 0 &&
      meanUs[running] <= pick.fastestUs * (1 + keepBand))
    pick.variant = running;
  return pick;
}

std::string formatMicros(double us) {
  char text[64];
  std::snprintf(text, sizeof text, "%.4g us", us);
  return text;
}

} // namespace

Status allReduceMaxOnHost(Communicator &communicator, Backend &backend,
                          int32_t *values, int64_t count,
                          std::string_view what) {
  if (communicator.memory() == CommMemory::Host)
    return communicator.allReduceMaxInt32(values, count, what);
  // The reduction goes on the backend's stream, after the copy in and
  // before the wait below (a device communicator keeps the stream of its
  // last collective step otherwise).
  if (void *stream = backend.currentStream())
    if (Status status = communicator.setStream(stream); !status)
      return status;
  const int64_t bytes = count * static_cast<int64_t>(sizeof(int32_t));
  void *device = backend.allocate(bytes, 256);
  if (!device)
    return Status(StatusCode::OutOfRange,
                  "no " + std::to_string(bytes) + " bytes of " +
                      std::string(backend.name()) + " memory for " +
                      std::string(what));
  Status status = backend.copyFromHost(device, values, bytes);
  if (status)
    status = communicator.allReduceMaxInt32(static_cast<int32_t *>(device),
                                            count, what);
  // The reduction is queued on the device: done before the copy back.
  if (status)
    status = backend.synchronize();
  if (status)
    status = backend.copyToHost(values, device, bytes);
  backend.deallocate(device);
  return status;
}

void Executor::ensureCostModel() {
  if (costModel_)
    return;
  ProfileExpectation expected;
  expected.backend = std::string(backend_->name());
  expected.worldSize = plan_->worldSize;
  Status why;
  DeviceProfile profile = loadProfileOrDefault(options_.profile, expected, why);
  profileWhy_ = why ? std::string() : why.message();
  CostModelOptions modelOptions;
  modelOptions.overlap = options_.cudaOverlap;
  // The CUDA grouped GEMMs' path (Core/GroupedGemmRule.h), as the backend
  // takes it from the same options.
  modelOptions.groupedGemm = options_.groupedGemm;
  modelOptions.wgmmaGemm = backend_->groupedGemmRunsWgmma();
  costModel_ = std::make_unique<CostModel>(std::move(profile), modelOptions);
  // A fixed capacity is known before the first call.
  const Variant &first = plan_->variants[plan_->defaultVariant];
  if (const Step *gate = capacitySource(first).second;
      gate && gate->facts.staticCapacity >= 0) {
    capacity_ = gate->facts.staticCapacity;
    capacitySource_ = "static";
  }
}

Status Executor::agreeOnProfile() {
  ensureCostModel();
  if (profileAgreed_)
    return Status::ok();
  // Once per communicator: every rank's profile text hashed; the max of h
  // and of -h (as INT32_MAX - h) differ unless every rank has the same.
  // On a mismatch every rank sees it and takes the built-in profile, so the
  // ranks still agree.
  if (communicator_ && communicator_->size() > 1) {
    // Inside a caller's graph capture a device round trip cannot run: the
    // check waits for an eager call (the choice meanwhile uses this rank's
    // profile, as every rank's first calls do).
    if (communicator_->memory() == CommMemory::Device &&
        backend_->isRecording())
      return Status::ok();
    const uint32_t hash = static_cast<uint32_t>(std::hash<std::string>()(
                              writeProfile(costModel_->profile()))) &
                          0x7fffffffu;
    int32_t values[2] = {static_cast<int32_t>(hash),
                         static_cast<int32_t>(0x7fffffffu - hash)};
    if (Status status = allReduceMaxOnHost(*communicator_, *backend_, values,
                                           2, "profile agreement");
        !status)
      return status;
    if (static_cast<uint32_t>(values[0]) !=
        0x7fffffffu - static_cast<uint32_t>(values[1])) {
      profileWhy_ = "the ranks were given different device profiles; using "
                    "the built-in " +
                    std::string(backend_->name()) +
                    " profile on every rank (docs/CostModel.md)";
      costModel_ = std::make_unique<CostModel>(
          defaultProfile(backend_->name(), plan_->worldSize),
          costModel_->options());
      choiceCapacity_ = -2;
    }
  }
  profileAgreed_ = true;
  return Status::ok();
}

Status Executor::chooseVariant(bool timed, int64_t available) {
  ensureCostModel();
  if (choiceCapacity_ != capacity_ || choice_.variant < 0) {
    choice_ = costModel_->choose(*plan_, plan_->training, capacity_);
    choiceCapacity_ = capacity_;
  }
  if (choice_.variant < 0 ||
      choice_.variant >= static_cast<int64_t>(plan_->variants.size()))
    return Status(StatusCode::Internal,
                  "the cost model chose no variant: " + choice_.reason);
  // refineChoice reads selected_ (the variant running so far) while it
  // decides the next.
  int64_t next = selected_;
  Status status = refineChoice(timed, available, next);
  selected_ = next;
  return status;
}

Status Executor::refineChoice(bool timed, int64_t available, int64_t &variant) {
  refineNote_.clear();
  exploring_ = false;
  variant = choice_.variant;
  const int64_t count = static_cast<int64_t>(plan_->variants.size());
  auto fits = [&](int64_t v) { return workspaceBytes(v) <= available; };
  if (!fits(variant)) {
    // The model's fastest among the variants the workspace holds (one
    // rank: on several, nothing is left out, availableWorkspaceBytes).
    int64_t best = -1;
    for (int64_t v = 0; v < count; ++v)
      if (fits(v) && (best < 0 || choice_.totalUs[v] < choice_.totalUs[best]))
        best = v;
    if (best < 0)
      return Status(StatusCode::InvalidArgument,
                    "no variant fits in the " + std::to_string(available) +
                        " workspace bytes available (the smallest needs " +
                        std::to_string(minWorkspaceBytes()) +
                        "): raise max_workspace_mib or give a larger "
                        "workspace");
    refineNote_ = "; '" + plan_->variants[variant].name + "' needs " +
                  std::to_string(workspaceBytes(variant)) +
                  " workspace bytes, more than the " +
                  std::to_string(available) + " available: '" +
                  plan_->variants[best].name + "' instead";
    variant = best;
  }
  const std::string fitNote = refineNote_;
  if (!options_.refineVariant)
    return Status::ok();
  // Several ranks agree through an all-reduce (agreeOnMeasurements).
  const bool severalRanks = plan_->worldSize > 1;
  if (severalRanks && !(communicator_ && communicator_->size() > 1))
    return Status::ok();
  const int64_t bucket = bucketOf(capacity_);
  auto name = [&](int64_t v) { return "'" + plan_->variants[v].name + "'"; };
  if (severalRanks) {
    auto agreed = agreedChoices_.find(bucket);
    if (agreed != agreedChoices_.end() && fits(agreed->second.variant)) {
      refineNote_ = fitNote +
                    "; measured fastest at this capacity on the slowest "
                    "rank: " +
                    name(agreed->second.variant) + " (" +
                    formatMicros(agreed->second.us) + ")";
      variant = agreed->second.variant;
      return Status::ok();
    }
  }
  const double band = choice_.totalUs[variant] * (1 + kRefineBand);
  std::vector<double> meanUs(count, -1.0); // -1: not a measured candidate
  int64_t explore = -1, measured = 0;
  for (int64_t v = 0; v < count; ++v) {
    if (choice_.totalUs[v] > band || !fits(v))
      continue;
    auto found = buckets_[v].find(bucket);
    const BucketMeasurement m =
        found == buckets_[v].end() ? BucketMeasurement{} : found->second;
    const int64_t runs = plan_->training
                             ? std::min(m.forwardRuns, m.backwardRuns)
                             : m.forwardRuns;
    if (runs < kMinMeasuredRuns) {
      if (explore < 0 && explorations_[v][bucket] < kMaxExplorations)
        explore = v;
      continue;
    }
    ++measured;
    meanUs[v] =
        m.forwardMeanMicros + (plan_->training ? m.backwardMeanMicros : 0.0);
  }
  if (timed && explore >= 0) {
    ++explorations_[explore][bucket];
    refineNote_ =
        fitNote + "; measuring " + name(explore) + " (predicted within " +
        std::to_string(static_cast<int>(kRefineBand * 100)) +
        "% of the pick, " + std::to_string(explorations_[explore][bucket]) +
        " of at most " + std::to_string(kMaxExplorations) + " calls)";
    variant = explore;
    exploring_ = true;
    return Status::ok();
  }
  if (measured < 2)
    return Status::ok();
  if (!severalRanks) {
    // selected_ is the variant of the last call.
    const MeasuredPick pick = pickMeasured(meanUs, selected_, kKeepBand);
    const std::string fastestText =
        name(pick.fastest) + " (" + formatMicros(pick.fastestUs) + ")";
    refineNote_ =
        fitNote + (pick.variant != pick.fastest
                       ? "; keeping " + name(pick.variant) + ", within " +
                             std::to_string(static_cast<int>(kKeepBand * 100)) +
                             "% of the measured fastest " + fastestText
                       : "; measured fastest at this capacity: " + fastestText);
    variant = pick.variant;
    return Status::ok();
  }
  // Several ranks decide once the bucket's exploration is over, every rank
  // at the same call (the same calls and counters on every rank); not
  // inside a caller's graph capture (a device round trip), where the
  // model's pick runs until an eager call agrees.
  if (explore >= 0 || (communicator_->memory() == CommMemory::Device &&
                       backend_->isRecording()))
    return Status::ok();
  if (Status status = agreeOnMeasurements(bucket, meanUs); !status)
    return status;
  variant = agreedChoices_[bucket].variant;
  return Status::ok();
}

Status Executor::agreeOnMeasurements(int64_t bucket,
                                     const std::vector<double> &meanUs) {
  // Tenths of a microsecond as int32 (up to 214 s), -1 where a variant was
  // not measured here (then on no rank: the counters are the same).
  std::vector<int32_t> values(meanUs.size());
  for (size_t v = 0; v < meanUs.size(); ++v)
    values[v] = meanUs[v] < 0 ? -1
                               : static_cast<int32_t>(std::min(
                                     meanUs[v] * 10.0 + 0.5, 2147483646.0));
  if (Status status = allReduceMaxOnHost(
          *communicator_, *backend_, values.data(),
          static_cast<int64_t>(values.size()),
          "agreeing on the measured variants");
      !status)
    return status;
  // The same pick as on one rank, on the agreed (slowest-rank) means.
  std::vector<double> agreedUs(values.size());
  for (size_t v = 0; v < values.size(); ++v)
    agreedUs[v] = values[v] < 0 ? -1.0 : values[v] / 10.0;
  const MeasuredPick pick = pickMeasured(agreedUs, selected_, kKeepBand);
  if (pick.variant < 0)
    return Status(StatusCode::Internal,
                  "the ranks agreed on no measured variant");
  agreedChoices_[bucket] = {pick.variant, agreedUs[pick.variant]};
  refineNote_ = "; measured fastest at this capacity on the slowest rank: '" +
                plan_->variants[pick.variant].name + "' (" +
                formatMicros(agreedUs[pick.variant]) + ")";
  return Status::ok();
}

int64_t Executor::readCapacity(int64_t variantIndex, bool waited) {
  const Variant &variant = plan_->variants[variantIndex];
  auto [source, gate] = capacitySource(variant);
  if (!source || !gate)
    return -1;
  if (gate->facts.staticCapacity >= 0)
    return gate->facts.staticCapacity;
  // A gate's own C differs between ranks until sync_capacity: only the
  // synced one may steer a choice on several ranks.
  if (plan_->worldSize > 1 && source->op != StepOp::SyncCapacity)
    return -1;
  // No new wait on a device: only a pass that already waited (timed) reads.
  if (!backend_->isHostMemory() && !waited)
    return -1;
  TensorView view = resolve(source->out(OperandRole::Capacity));
  int32_t capacity = -1;
  if (!view.data ||
      !backend_->copyToHost(&capacity, view.data, sizeof(capacity)))
    return -1;
  return capacity;
}

int64_t Executor::recordAutomatic(int64_t variant, bool backward, bool timed,
                                  bool measured, double micros,
                                  int64_t bucket) {
  if (!backward) {
    // Kept in either mode: explain() reports the capacity of the last call.
    int64_t capacity = readCapacity(variant, timed);
    if (capacity >= 0 && capacity != capacity_) {
      capacity_ = capacity;
      const Variant &run = plan_->variants[variant];
      const Step *gate = capacitySource(run).second;
      capacitySource_ =
          gate && gate->facts.staticCapacity >= 0 ? "static" : "previous call";
    }
    // A variant that cannot say its C (no synced one on several ranks) is
    // measured at the capacity the choice was made for, where the next
    // choice looks for it.
    bucket = bucketOf(capacity >= 0 ? capacity : capacity_);
  }
  if (!measured)
    return bucket;
  BucketMeasurement &m = buckets_[variant][bucket];
  int64_t &runs = backward ? m.backwardRuns : m.forwardRuns;
  double &mean = backward ? m.backwardMeanMicros : m.forwardMeanMicros;
  ++runs;
  mean += (micros - mean) / static_cast<double>(runs);
  return bucket;
}

Explanation Executor::explain() {
  ensureCostModel();
  Explanation result;
  result.automatic = automatic_;
  result.capacity = capacity_;
  result.capacitySource = capacitySource_;
  Choice choice = choiceCapacity_ == capacity_ && choice_.variant >= 0
                      ? choice_
                      : costModel_->choose(*plan_, plan_->training, capacity_);
  result.chosen =
      automatic_ && refineNote_.empty() ? choice.variant : selected_;
  result.exploring = automatic_ && exploring_;
  result.reason = automatic_ ? choice.reason + refineNote_
                             : "named by the caller (variant option, "
                               "selectVariant); the model would pick '" +
                                   plan_->variants[choice.variant].name + "'";
  const DeviceProfile &profile = costModel_->profile();
  result.profileSource = profile.builtin ? "builtin" : "file";
  result.profilePath = options_.profile;
  result.profileWhy = profileWhy_;
  result.profileDevice = profile.deviceName;
  const int64_t bucket = bucketOf(capacity_);
  for (size_t v = 0; v < plan_->variants.size(); ++v) {
    VariantExplanation out;
    out.name = plan_->variants[v].name;
    out.forwardStageUs = choice.forward[v].stageUs;
    out.predictedForwardUs = choice.forward[v].totalUs;
    if (plan_->training && v < choice.backward.size()) {
      out.backwardStageUs = choice.backward[v].stageUs;
      out.predictedBackwardUs = choice.backward[v].totalUs;
    }
    out.predictedUs = choice.totalUs[v];
    // The choice's bucket when it was timed, else every timed run.
    auto found = buckets_[v].find(bucket);
    BucketMeasurement m;
    if (found != buckets_[v].end())
      m = found->second;
    else
      for (const auto &[key, each] : buckets_[v]) {
        (void)key;
        for (auto [runs, mean, eachRuns, eachMean] :
             {std::tuple{&m.forwardRuns, &m.forwardMeanMicros, each.forwardRuns,
                         each.forwardMeanMicros},
              std::tuple{&m.backwardRuns, &m.backwardMeanMicros,
                         each.backwardRuns, each.backwardMeanMicros}}) {
          if (!eachRuns)
            continue;
          *mean = (*mean * static_cast<double>(*runs) +
                   eachMean * static_cast<double>(eachRuns)) /
                  static_cast<double>(*runs + eachRuns);
          *runs += eachRuns;
        }
      }
    out.forwardCalls = measurements_[v].forwardCalls;
    out.backwardCalls = measurements_[v].backwardCalls;
    out.forwardRuns = m.forwardRuns;
    out.measuredForwardUs = m.forwardMeanMicros;
    out.backwardRuns = m.backwardRuns;
    out.measuredBackwardUs = m.backwardMeanMicros;
    double predicted = 0, measured = 0;
    if (m.forwardRuns) {
      predicted += out.predictedForwardUs;
      measured += m.forwardMeanMicros;
    }
    if (m.backwardRuns) {
      predicted += out.predictedBackwardUs;
      measured += m.backwardMeanMicros;
    }
    out.error = predicted > 0 ? (measured - predicted) / predicted : nan();
    out.workspaceBytes = workspaceBytes(static_cast<int64_t>(v));
    result.variants.push_back(std::move(out));
  }
  return result;
}

std::string toJson(const Explanation &explanation) {
  using Json = nlohmann::ordered_json;
  auto number = [](double value) {
    return std::isfinite(value) ? Json(value) : Json(nullptr);
  };
  auto stages = [&](const std::array<double, kNumCostStages> &us) {
    Json json = Json::object();
    for (int s = 0; s < kNumCostStages; ++s)
      json[std::string(toString(static_cast<CostStage>(s)))] = us[s];
    return json;
  };
  Json json;
  json["format"] = "flex-explain";
  json["automatic"] = explanation.automatic;
  json["chosen"] = explanation.chosen;
  json["chosen_name"] = explanation.variants.empty()
                            ? std::string()
                            : explanation.variants[explanation.chosen].name;
  json["reason"] = explanation.reason;
  json["exploring"] = explanation.exploring;
  json["capacity"] = explanation.capacity;
  json["capacity_source"] = explanation.capacitySource;
  json["profile"] = {{"source", explanation.profileSource},
                     {"path", explanation.profilePath},
                     {"device", explanation.profileDevice},
                     {"why", explanation.profileWhy}};
  Json variants = Json::array();
  for (size_t v = 0; v < explanation.variants.size(); ++v) {
    const VariantExplanation &each = explanation.variants[v];
    Json item;
    item["index"] = v;
    item["name"] = each.name;
    item["chosen"] = static_cast<int64_t>(v) == explanation.chosen;
    item["predicted_us"] = each.predictedUs;
    item["predicted_forward_us"] = each.predictedForwardUs;
    item["forward_stages_us"] = stages(each.forwardStageUs);
    item["predicted_backward_us"] = each.predictedBackwardUs;
    item["backward_stages_us"] = stages(each.backwardStageUs);
    item["forward_calls"] = each.forwardCalls;
    item["backward_calls"] = each.backwardCalls;
    item["forward_runs"] = each.forwardRuns;
    item["measured_forward_us"] =
        each.forwardRuns ? number(each.measuredForwardUs) : Json(nullptr);
    item["backward_runs"] = each.backwardRuns;
    item["measured_backward_us"] =
        each.backwardRuns ? number(each.measuredBackwardUs) : Json(nullptr);
    item["error"] = number(each.error);
    item["workspace_bytes"] = each.workspaceBytes;
    variants.push_back(std::move(item));
  }
  json["variants"] = std::move(variants);
  return json.dump(2);
}

} // namespace flex
