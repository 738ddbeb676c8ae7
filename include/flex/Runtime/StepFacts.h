//===- StepFacts.h - The compiled facts of each step -----------*- C++ -*-===//
//-*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// The compiled facts of a step: which step produced the routing it reads,
// the capacity that sizes its rows when it is known on the host, the chunk
// of a received buffer a segment op works on, and how it is ordered after
// exchanges. One analysis (computeStepFacts) derives them from the data flow
// of each variant, in step order, forward then backward; backends read
// `step.facts` instead of searching the plan or tracking what ran last.
// docs/PlanFormat.md ("Compiled facts") describes the JSON form.
//
// Why the data flow and not a plan-wide search: in one variant several steps
// may write the same buffer (the chunks of a pipelined variant share one
// offsets buffer), and variants share buffer names with different layouts.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_STEPFACTS_H
#define FLEX_RUNTIME_STEPFACTS_H

#include "flex/Runtime/Status.h"

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>

namespace flex {

struct Plan;

/// A step of the same variant: forward[index] or backward[index]; index -1
/// for none. Backward steps refer to forward steps for what forward wrote.
struct StepRef {
  bool backward = false;
  int32_t index = -1;

  bool isValid() const { return index >= 0; }
  friend bool operator==(const StepRef &, const StepRef &) = default;
};

/// "forward[3]", "backward[0]"; "none" for an invalid reference.
std::string toString(StepRef ref);
/// The inverse of toString for valid references; nullopt otherwise.
std::optional<StepRef> parseStepRef(std::string_view text);

/// How a step is ordered after the all_to_alls pending on the exchange
/// stream (docs/Runtime.md): not at all (an exchange itself), after all of
/// them (the other collectives, and a 2DH exchange whose staging kernels run
/// on the compute stream), or after those whose bytes it touches (compute;
/// which those are depends on the bound addresses and, for a capacity known
/// only on the device, on C, so the backend decides that at run time).
enum class ExchangeWait : uint8_t { None, All, Overlapping };
std::string_view toString(ExchangeWait wait);
std::optional<ExchangeWait> parseExchangeWait(std::string_view text);

/// A per-expert op over a received buffer: the uniform_segments step that
/// wrote the offsets it reads, that step's G, W, D and q, and, when C is
/// known on the host, the static rows per group n = W * C / D and the first
/// row q * G * n of its chunk.
struct SegmentFacts {
  StepRef step; ///< the uniform_segments; invalid when not a segment op
  int64_t groups = 0;
  int64_t ranks = 0;
  int64_t chunks = 1;
  int64_t chunk = 0;
  int64_t rows = -1;   ///< n; -1 when C is known only on the device
  int64_t baseRow = 0; ///< q * G * n; 0 when n is unknown

  bool isValid() const { return step.isValid(); }
  /// n for a capacity C read back at run time.
  int64_t rowsFor(int64_t capacity) const {
    return chunks > 0 ? ranks * (capacity / chunks) : -1;
  }
  friend bool operator==(const SegmentFacts &, const SegmentFacts &) = default;
};

/// What the lowering knows about one step and a backend needs.
struct StepFacts {
  /// The gate or shard_routing whose routing (expert_offsets) the step
  /// reads; sync_capacity, which rewrites a gate's routing in place, is seen
  /// through. None for steps without routing and for segment ops.
  StepRef routing;
  /// The gate whose capacity C sizes the step's rows (through
  /// shard_routing, sync_capacity and uniform_segments); for a gate, itself.
  StepRef capacityFrom;
  /// C on the host: that gate's capacity when it is fixed and its layout
  /// padded; -1 when C is known only on the device (dropless, bounded,
  /// ragged).
  int64_t staticCapacity = -1;
  /// The routing lays rows out padded (a padded gate, or shard_routing,
  /// whose virtual experts keep the gate's C padded).
  bool padded = false;
  /// The routing's gate lays rows out aligned: every expert's first row a
  /// multiple of kAlignedLayoutRows (KernelArgs.h).
  bool aligned = false;
  /// Set for the per-expert ops over a received buffer.
  SegmentFacts segments;
  /// all_to_all: runs on the exchange stream (false: 2DH, on the compute
  /// stream after every pending exchange).
  bool exchangeStream = false;
  ExchangeWait wait = ExchangeWait::None;

  friend bool operator==(const StepFacts &, const StepFacts &) = default;
};

/// The one analysis: fills `facts` of every step of every variant from the
/// data flow of that variant (forward then backward, in step order). The
/// compiler's plan emission calls it; so must anyone building a Plan in
/// memory.
void computeStepFacts(Plan &plan);

/// The error readStepFacts and checkStepFacts throw; what() is
/// "plan field '<path>': <message>", as the plan loader reports.
struct StepFactsError : std::runtime_error {
  StepFactsError(const std::string &path, const std::string &message)
      : std::runtime_error("plan field '" + path + "': " + message),
        path(path) {}
  std::string path;
};

/// The "facts" object of a step. Fields at their defaults are left out.
nlohmann::ordered_json writeStepFacts(const StepFacts &facts);
/// Reads a "facts" object; `path` names it ("variants[0].forward[3].facts").
/// Throws StepFactsError naming the field on a mistyped or unknown field.
StepFacts readStepFacts(const nlohmann::ordered_json &json,
                        const std::string &path);

/// Recomputes the facts of `plan` and throws StepFactsError, naming the step
/// and the field ("variants[0].forward[3].facts.static_capacity"), when a
/// recorded one differs.
void checkStepFacts(const Plan &plan);
/// checkStepFacts as a Status (InvalidPlan with the same message).
Status verifyStepFacts(const Plan &plan);

} // namespace flex

#endif // FLEX_RUNTIME_STEPFACTS_H
