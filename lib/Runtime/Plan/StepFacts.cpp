//===- StepFacts.cpp - The compiled facts of each step --------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the analysis that derives each step's facts from the
// data flow of its variant, the JSON form of the facts and the check that a
// plan's recorded facts are the ones its data flow gives.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/StepFacts.h"
#include "flex/Runtime/Core/Capacity.h"
#include "flex/Runtime/Plan.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <charconv>
#include <vector>

namespace flex {
namespace {

using Json = nlohmann::ordered_json;
using R = OperandRole;

/// The analysis of one variant: the step that produced the value each
/// buffer holds, updated step by step.
class VariantFlow {
public:
  VariantFlow(const Plan &plan, const Variant &variant)
      : plan_(plan), variant_(variant), argumentOrigin_(plan.arguments.size()),
        workspaceOrigin_(plan.workspace.buffers.size()) {}

  /// The facts of every step of forward (backward = false) or backward, in
  /// order; forward must run first (backward reads what forward wrote).
  std::vector<StepFacts> run(bool backward) {
    const std::vector<Step> &steps =
        backward ? variant_.backward : variant_.forward;
    std::vector<StepFacts> result;
    result.reserve(steps.size());
    for (size_t i = 0; i < steps.size(); ++i) {
      StepRef self{backward, static_cast<int32_t>(i)};
      result.push_back(factsOf(steps[i], self));
      noteWrites(steps[i], self);
    }
    return result;
  }

private:
  const Step &stepAt(StepRef ref) const {
    return (ref.backward ? variant_.backward : variant_.forward)[ref.index];
  }
  StepRef *origin(const BufferRef &ref) {
    if (ref.kind == BufferRef::Kind::Argument &&
        static_cast<size_t>(ref.index) < argumentOrigin_.size())
      return &argumentOrigin_[ref.index];
    if (ref.kind == BufferRef::Kind::Workspace &&
        static_cast<size_t>(ref.index) < workspaceOrigin_.size())
      return &workspaceOrigin_[ref.index];
    return nullptr;
  }
  /// The step whose value `ref` holds now; invalid when none.
  StepRef producer(const BufferRef &ref) {
    StepRef *o = origin(ref);
    return o ? *o : StepRef{};
  }
  /// The gate whose capacity the buffer `capacity` holds now.
  StepRef capacityGate(const BufferRef &capacity) {
    StepRef ref = producer(capacity);
    return ref.isValid() && stepAt(ref).op == StepOp::Gate ? ref : StepRef{};
  }
  /// C when the gate lays rows out padded with a fixed capacity (known on
  /// the host before gating); -1 when the rows are only known on the device.
  int64_t staticCapacity(StepRef gateRef) const {
    if (!gateRef.isValid())
      return -1;
    const StepAttrs &a = stepAt(gateRef).attrs;
    if (a.layout != DispatchLayout::Padded ||
        a.capacityMode != CapacityMode::Fixed)
      return -1;
    const LayerConfig &layer = plan_.layer;
    return computeCapacity(
        CapacityMode::Fixed, a.capacityFactor, layer.tokens, layer.experts,
        std::clamp<int64_t>(a.topK, 1, layer.experts), 0, a.capacityAlignment);
  }

  StepFacts factsOf(const Step &step, StepRef self) {
    StepFacts facts;
    // Where the routing (or the segments) this step reads came from.
    if (StepRef writer = producer(step.in(R::ExpertOffsets));
        writer.isValid()) {
      const Step &w = stepAt(writer);
      if (w.op == StepOp::Gate) {
        facts.routing = facts.capacityFrom = writer;
        facts.padded = w.attrs.layout == DispatchLayout::Padded;
        facts.aligned = w.attrs.layout == DispatchLayout::Aligned;
      } else if (w.op == StepOp::ShardRouting) {
        // Every virtual expert keeps the gate's C, padded whatever the
        // gate's own layout.
        facts.routing = writer;
        facts.capacityFrom = capacityGate(w.in(R::Capacity));
        facts.padded = true;
      } else if (w.op == StepOp::UniformSegments) {
        SegmentFacts &seg = facts.segments;
        seg.step = writer;
        seg.groups = w.attrs.groups;
        seg.ranks = w.attrs.ranks;
        seg.chunks = w.attrs.chunks;
        seg.chunk = w.attrs.chunk;
        facts.capacityFrom = capacityGate(w.in(R::Capacity));
      }
    } else if (step.op == StepOp::Gate) {
      facts.capacityFrom = self;
    } else if (!step.in(R::ExpertOffsets).isValid() &&
               step.in(R::Capacity).isValid()) {
      facts.capacityFrom = capacityGate(step.in(R::Capacity));
    }
    facts.staticCapacity = staticCapacity(facts.capacityFrom);
    // A received buffer of a fixed capacity is static too: chunk q's groups
    // are G blocks of n = W * C / D rows from row q * G * n.
    SegmentFacts &seg = facts.segments;
    if (seg.isValid() && facts.staticCapacity >= 0 && seg.chunks > 0) {
      seg.rows = seg.rowsFor(facts.staticCapacity);
      seg.baseRow = seg.chunk * seg.groups * seg.rows;
    }
    if (step.op == StepOp::AllToAll) {
      // 2DH (ranks_per_node N with 1 < N < W) stages its blocks with
      // kernels on the compute stream; N == 1 or N == W is the flat
      // exchange.
      const int64_t n = step.attrs.ranksPerNode;
      const bool twoPhase = n > 1 && n < step.attrs.groupRanks(plan_.worldSize);
      facts.exchangeStream = !twoPhase;
      facts.wait = twoPhase ? ExchangeWait::All : ExchangeWait::None;
    } else {
      facts.wait =
          isCollective(step.op) ? ExchangeWait::All : ExchangeWait::Overlapping;
    }
    return facts;
  }

  void noteWrites(const Step &step, StepRef self) {
    for (const BufferRef &ref : step.outputs) {
      StepRef *o = origin(ref);
      if (!o)
        continue;
      // sync_capacity rewrites the gate's capacity and offsets in place:
      // the routing is still the gate's.
      if (step.op == StepOp::SyncCapacity && o->isValid())
        continue;
      *o = self;
    }
  }

  const Plan &plan_;
  const Variant &variant_;
  std::vector<StepRef> argumentOrigin_, workspaceOrigin_;
};

/// The facts of every step of `variant`: forward, then backward.
std::pair<std::vector<StepFacts>, std::vector<StepFacts>>
analyse(const Plan &plan, const Variant &variant) {
  VariantFlow flow(plan, variant);
  std::vector<StepFacts> forward = flow.run(/*backward=*/false);
  return {std::move(forward), flow.run(/*backward=*/true)};
}

//===----------------------------------------------------------------------===//
// JSON
//===----------------------------------------------------------------------===//

[[noreturn]] void fail(const std::string &path, const std::string &what) {
  throw StepFactsError(path, what);
}

std::string brief(const Json &value) {
  std::string text = value.dump();
  return text.size() > 40 ? text.substr(0, 37) + "..." : text;
}

int64_t readInt(const Json &value, const std::string &path) {
  if (value.is_number_integer() &&
      !(value.is_number_unsigned() &&
        value.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)))
    return value.get<int64_t>();
  fail(path, "expected an integer, got " + brief(value));
}

bool readBool(const Json &value, const std::string &path) {
  if (!value.is_boolean())
    fail(path, "expected true or false, got " + brief(value));
  return value.get<bool>();
}

StepRef readRef(const Json &value, const std::string &path) {
  std::optional<StepRef> ref;
  if (value.is_string())
    ref = parseStepRef(value.get<std::string>());
  if (!ref)
    fail(path, "expected a step as \"forward[i]\" or \"backward[i]\", got " +
                   brief(value));
  return *ref;
}

SegmentFacts readSegments(const Json &json, const std::string &path) {
  if (!json.is_object())
    fail(path, "expected an object, got " + brief(json));
  SegmentFacts seg;
  for (const char *key :
       {"step", "groups", "ranks", "chunks", "chunk", "rows", "base_row"})
    if (!json.contains(key))
      fail(path + "." + key, "missing (required)");
  for (auto it = json.begin(); it != json.end(); ++it) {
    const std::string at = path + "." + it.key();
    const std::string &key = it.key();
    if (key == "step")
      seg.step = readRef(*it, at);
    else if (key == "groups")
      seg.groups = readInt(*it, at);
    else if (key == "ranks")
      seg.ranks = readInt(*it, at);
    else if (key == "chunks")
      seg.chunks = readInt(*it, at);
    else if (key == "chunk")
      seg.chunk = readInt(*it, at);
    else if (key == "rows")
      seg.rows = readInt(*it, at);
    else if (key == "base_row")
      seg.baseRow = readInt(*it, at);
    else
      fail(at, "unknown field; allowed: step, groups, ranks, chunks, chunk, "
               "rows, base_row");
  }
  return seg;
}

/// The first field where `recorded` and `computed` differ (its JSON key and
/// both values as text); nullopt when they agree.
struct Difference {
  std::string field, recorded, computed;
};
std::optional<Difference> firstDifference(const StepFacts &recorded,
                                          const StepFacts &computed) {
  auto num = [](int64_t v) { return std::to_string(v); };
  auto flag = [](bool v) { return std::string(v ? "true" : "false"); };
  auto ref = [](StepRef r) { return toString(r); };
  if (recorded.routing != computed.routing)
    return Difference{"routing", ref(recorded.routing), ref(computed.routing)};
  if (recorded.capacityFrom != computed.capacityFrom)
    return Difference{"capacity_from", ref(recorded.capacityFrom),
                      ref(computed.capacityFrom)};
  if (recorded.staticCapacity != computed.staticCapacity)
    return Difference{"static_capacity", num(recorded.staticCapacity),
                      num(computed.staticCapacity)};
  if (recorded.padded != computed.padded)
    return Difference{"padded", flag(recorded.padded), flag(computed.padded)};
  if (recorded.aligned != computed.aligned)
    return Difference{"aligned", flag(recorded.aligned),
                      flag(computed.aligned)};
  if (recorded.segments != computed.segments)
    return Difference{
        "segments", writeStepFacts(recorded).value("segments", Json()).dump(),
        writeStepFacts(computed).value("segments", Json()).dump()};
  if (recorded.exchangeStream != computed.exchangeStream)
    return Difference{"exchange_stream", flag(recorded.exchangeStream),
                      flag(computed.exchangeStream)};
  if (recorded.wait != computed.wait)
    return Difference{"wait", std::string(toString(recorded.wait)),
                      std::string(toString(computed.wait))};
  return std::nullopt;
}

} // namespace

std::string toString(StepRef ref) {
  if (!ref.isValid())
    return "none";
  return (ref.backward ? "backward[" : "forward[") + std::to_string(ref.index) +
         "]";
}

std::optional<StepRef> parseStepRef(std::string_view text) {
  StepRef ref;
  for (auto [prefix, backward] :
       {std::pair<std::string_view, bool>{"forward[", false},
        {"backward[", true}}) {
    if (text.substr(0, prefix.size()) != prefix)
      continue;
    std::string_view digits = text.substr(prefix.size());
    if (digits.size() < 2 || digits.back() != ']')
      return std::nullopt;
    digits.remove_suffix(1);
    int32_t index = -1;
    auto [end, error] =
        std::from_chars(digits.data(), digits.data() + digits.size(), index);
    if (error != std::errc() || end != digits.data() + digits.size() ||
        index < 0)
      return std::nullopt;
    ref.backward = backward;
    ref.index = index;
    return ref;
  }
  return std::nullopt;
}

std::string_view toString(ExchangeWait wait) {
  switch (wait) {
  case ExchangeWait::None:
    return "none";
  case ExchangeWait::All:
    return "all";
  case ExchangeWait::Overlapping:
    return "overlapping";
  }
  return "none";
}

std::optional<ExchangeWait> parseExchangeWait(std::string_view text) {
  for (ExchangeWait wait :
       {ExchangeWait::None, ExchangeWait::All, ExchangeWait::Overlapping})
    if (toString(wait) == text)
      return wait;
  return std::nullopt;
}

void computeStepFacts(Plan &plan) {
  for (Variant &variant : plan.variants) {
    auto [forward, backward] = analyse(plan, variant);
    for (size_t i = 0; i < forward.size(); ++i)
      variant.forward[i].facts = std::move(forward[i]);
    for (size_t i = 0; i < backward.size(); ++i)
      variant.backward[i].facts = std::move(backward[i]);
  }
}

Json writeStepFacts(const StepFacts &facts) {
  Json json = Json::object();
  if (facts.routing.isValid())
    json["routing"] = toString(facts.routing);
  if (facts.capacityFrom.isValid())
    json["capacity_from"] = toString(facts.capacityFrom);
  if (facts.staticCapacity != -1)
    json["static_capacity"] = facts.staticCapacity;
  if (facts.padded)
    json["padded"] = true;
  if (facts.aligned)
    json["aligned"] = true;
  if (const SegmentFacts &seg = facts.segments; seg.isValid())
    json["segments"] =
        Json{{"step", toString(seg.step)}, {"groups", seg.groups},
             {"ranks", seg.ranks},         {"chunks", seg.chunks},
             {"chunk", seg.chunk},         {"rows", seg.rows},
             {"base_row", seg.baseRow}};
  if (facts.exchangeStream)
    json["exchange_stream"] = true;
  if (facts.wait != ExchangeWait::None)
    json["wait"] = std::string(toString(facts.wait));
  return json;
}

StepFacts readStepFacts(const Json &json, const std::string &path) {
  if (!json.is_object())
    fail(path, "expected an object, got " + brief(json));
  StepFacts facts;
  for (auto it = json.begin(); it != json.end(); ++it) {
    const std::string at = path + "." + it.key();
    const std::string &key = it.key();
    if (key == "routing") {
      facts.routing = readRef(*it, at);
    } else if (key == "capacity_from") {
      facts.capacityFrom = readRef(*it, at);
    } else if (key == "static_capacity") {
      facts.staticCapacity = readInt(*it, at);
      if (facts.staticCapacity < -1)
        fail(at, "capacity " + std::to_string(facts.staticCapacity) +
                     " is negative; -1 means known only on the device");
    } else if (key == "padded") {
      facts.padded = readBool(*it, at);
    } else if (key == "aligned") {
      facts.aligned = readBool(*it, at);
    } else if (key == "segments") {
      facts.segments = readSegments(*it, at);
    } else if (key == "exchange_stream") {
      facts.exchangeStream = readBool(*it, at);
    } else if (key == "wait") {
      std::optional<ExchangeWait> wait;
      if (it->is_string())
        wait = parseExchangeWait(it->get<std::string>());
      if (!wait)
        fail(at, "unknown value " + brief(*it) +
                     "; allowed: none, all, overlapping");
      facts.wait = *wait;
    } else {
      fail(at, "unknown field; allowed: routing, capacity_from, "
               "static_capacity, padded, aligned, segments, exchange_stream, "
               "wait");
    }
  }
  return facts;
}

void checkStepFacts(const Plan &plan) {
  for (size_t v = 0; v < plan.variants.size(); ++v) {
    const Variant &variant = plan.variants[v];
    auto [forward, backward] = analyse(plan, variant);
    for (bool isBackward : {false, true}) {
      const std::vector<Step> &steps =
          isBackward ? variant.backward : variant.forward;
      const std::vector<StepFacts> &computed = isBackward ? backward : forward;
      for (size_t i = 0; i < steps.size(); ++i) {
        std::optional<Difference> diff =
            firstDifference(steps[i].facts, computed[i]);
        if (!diff)
          continue;
        fail("variants[" + std::to_string(v) + "]." +
                 toString(StepRef{isBackward, static_cast<int32_t>(i)}) +
                 ".facts." + diff->field,
             "recorded " + diff->recorded +
                 ", but the variant's data flow "
                 "gives " +
                 diff->computed);
      }
    }
  }
}

Status verifyStepFacts(const Plan &plan) {
  try {
    checkStepFacts(plan);
  } catch (const StepFactsError &error) {
    return Status(StatusCode::InvalidPlan, error.what());
  }
  return Status::ok();
}

} // namespace flex
