//===- StepShapeRules.cpp - The operand rules of each step kind
//-------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file checks a step's operands (dtype and shape) against the layer and
// the plan's world, and its attributes' cross-field rules.
//
//===----------------------------------------------------------------------===//

#include "PlanDetail.h"

#include "flex/Runtime/StepSchema.h"

#include <algorithm>
#include <limits>
#include <string>

namespace flex {
using namespace plan_detail;
namespace {

struct OperandChecker {
  const Plan &plan;
  const Step &step;
  std::string path;

  const BufferDesc *get(OperandRole role, bool isInput) const {
    const BufferRef &ref = isInput ? step.in(role) : step.out(role);
    return ref.isValid() ? &plan.getBuffer(ref) : nullptr;
  }
  std::string where(OperandRole role, bool isInput) const {
    return path + (isInput ? ".in." : ".out.") + std::string(toString(role));
  }

  /// Checks the dtype: any of `dtypes`.
  const BufferDesc *expectDType(OperandRole role, bool isInput,
                                const std::vector<DType> &dtypes) const {
    const BufferDesc *desc = get(role, isInput);
    if (!desc)
      return nullptr;
    if (std::find(dtypes.begin(), dtypes.end(), desc->dtype) == dtypes.end()) {
      std::vector<std::string_view> allowed;
      for (DType type : dtypes)
        allowed.push_back(toString(type));
      fail(where(role, isInput), "buffer '" + desc->name + "' has dtype " +
                                     std::string(toString(desc->dtype)) +
                                     "; op '" + std::string(toString(step.op)) +
                                     "' needs " + joinNames(allowed));
    }
    return desc;
  }

  /// Checks dtype (any of `dtypes`) and shape; -1 in `shape` matches any dim.
  const BufferDesc *expect(OperandRole role, bool isInput,
                           const std::vector<DType> &dtypes,
                           std::vector<int64_t> shape,
                           const std::string &meaning) const {
    const BufferDesc *desc = expectDType(role, isInput, dtypes);
    if (!desc)
      return nullptr;
    bool match = desc->shape.size() == shape.size();
    for (size_t i = 0; match && i < shape.size(); ++i)
      match = shape[i] < 0 || shape[i] == desc->shape[i];
    if (!match) {
      std::string expected = "[";
      for (size_t i = 0; i < shape.size(); ++i)
        expected += (i ? ", " : "") + (shape[i] < 0 ? std::string("?")
                                                    : std::to_string(shape[i]));
      expected += "]";
      fail(where(role, isInput),
           "buffer '" + desc->name + "' has shape " + shapeString(desc->shape) +
               ", which disagrees with the layer: " + "expected " + expected +
               " (" + meaning + ")");
    }
    return desc;
  }

  /// A [R, cols] buffer: rows at least `minRows` (the dispatch row bound).
  const BufferDesc *expectRows(OperandRole role, bool isInput, int64_t cols,
                               int64_t minRows,
                               const std::string &meaning) const {
    return expectMinRows(expect(role, isInput,
                                {DType::F32, DType::BF16, DType::F16},
                                {-1, cols}, meaning),
                         role, isInput, minRows, meaning);
  }

  /// The row map of a gathered GEMM or dispatch_rows: [R] i32, R at least
  /// `minRows`.
  const BufferDesc *expectRowMap(OperandRole role, bool isInput,
                                 int64_t minRows) const {
    const std::string meaning = "row_tokens [R] i32";
    return expectMinRows(expect(role, isInput, {DType::I32}, {-1}, meaning),
                         role, isInput, minRows, meaning);
  }

  /// `desc` (if any) with at least `minRows` rows.
  const BufferDesc *expectMinRows(const BufferDesc *desc, OperandRole role,
                                  bool isInput, int64_t minRows,
                                  const std::string &meaning) const {
    if (desc && !desc->shape.empty() && desc->shape[0] < minRows)
      fail(where(role, isInput),
           "buffer '" + desc->name + "' has " + std::to_string(desc->shape[0]) +
               " rows; the dispatch layout needs at least " +
               std::to_string(minRows) + " (" + meaning + ")");
    return desc;
  }

  void expectSameShape(OperandRole role, bool isInput,
                       const BufferDesc *reference,
                       const std::string &referenceName) const {
    const BufferDesc *desc = get(role, isInput);
    if (!desc || !reference)
      return;
    if (desc->shape != reference->shape)
      fail(where(role, isInput),
           "buffer '" + desc->name + "' has shape " + shapeString(desc->shape) +
               "; expected the shape of " + referenceName + " " +
               shapeString(reference->shape));
  }
};

const std::vector<DType> kFloatTypes = {DType::F32, DType::BF16, DType::F16};

/// The sizes of one side of a step that StepKinds.def's role dims name.
struct RoleSizes {
  int64_t T, d, E, k;
  /// The routing over the shards of each expert: k and E stand for k * s
  /// and E * s.
  bool sharded;
};

/// Checks every operand on one side of the step whose role has a declared
/// dtype or shape (StepKinds.def, FLEX_OPERAND_ROLE); the meaning in the
/// message is written from the declaration ("indices [T, k] i32").
void checkDeclaredRoles(const OperandChecker &c, bool isInput,
                        const RoleSizes &sizes, DType tokenType,
                        DType routerType) {
  for (int r = 0; r < kNumOperandRoles; ++r) {
    const OperandRole role = static_cast<OperandRole>(r);
    const RoleShape &declared = getRoleShape(role);
    std::vector<DType> dtypes;
    std::string dtypeName;
    switch (declared.dtype) {
    case RoleDType::Any:
      continue;
    case RoleDType::F32:
      dtypes = {DType::F32};
      dtypeName = " f32";
      break;
    case RoleDType::I32:
      dtypes = {DType::I32};
      dtypeName = " i32";
      break;
    case RoleDType::Token:
      dtypes = {tokenType};
      break;
    case RoleDType::Router:
      dtypes = {routerType};
      break;
    case RoleDType::Float:
      dtypes = kFloatTypes;
      break;
    }
    if (!declared.hasFixedDims()) {
      c.expectDType(role, isInput, dtypes);
      continue;
    }
    std::vector<int64_t> shape;
    std::string meaning = std::string(declared.name) + " [";
    bool usesK = false;
    for (size_t i = 0; i < declared.rank; ++i) {
      std::string_view dim = declared.dims[i];
      std::string name(dim);
      int64_t size;
      if (dim == "T") {
        size = sizes.T;
      } else if (dim == "d") {
        size = sizes.d;
      } else if (dim == "E") {
        size = sizes.E;
        name = sizes.sharded ? "E * s" : "E";
      } else if (dim == "k") {
        size = sizes.k;
        name = sizes.sharded ? "k * s" : "k";
        usesK = true;
      } else {
        size = std::stoll(name); // a literal size ("1")
      }
      shape.push_back(size);
      meaning += (i ? ", " : "") + name;
    }
    meaning += "]" + dtypeName;
    if (usesK && sizes.sharded)
      meaning += " (k * s = " + std::to_string(sizes.k) +
                 ": the routing over the shards of each expert)";
    c.expect(role, isInput, dtypes, shape, meaning);
  }
}

/// The chunks D and chunk q of all_to_all and uniform_segments.
void checkChunks(const Step &step, const std::string &path) {
  const StepAttrs &a = step.attrs;
  if (a.chunks < 1 || a.chunks > (1 << 20))
    fail(path + ".attrs.chunks", "chunks " + std::to_string(a.chunks) +
                                     " is out of range; allowed: 1 to 2^20");
  if (a.chunk < 0 || a.chunk >= a.chunks)
    fail(path + ".attrs.chunk", "chunk " + std::to_string(a.chunk) +
                                    " is out of range; allowed: 0 "
                                    "to chunks - 1 = " +
                                    std::to_string(a.chunks - 1));
}

/// ranks_per_node of all_to_all: 0 (flat) or N dividing W (W / N nodes).
void checkRanksPerNode(const Step &step, const std::string &path, int64_t W) {
  const int64_t N = step.attrs.ranksPerNode;
  if (N == 0 || (N > 0 && N <= W && W % N == 0))
    return;
  std::string divisors;
  for (int64_t n = 1; n <= W; ++n)
    if (W % n == 0)
      divisors += ", " + std::to_string(n);
  fail(path + ".attrs.ranks_per_node",
       "ranks_per_node " + std::to_string(N) +
           " does not divide the plan's world size " + std::to_string(W) +
           "; allowed: 0 (flat)" + divisors);
}

/// group_size / group_stride of a collective: 0 (all W ranks), or groups of
/// n ranks S apart with n * S dividing W; not with ranks_per_node. A
/// grouped all_to_all is a token class (n * S == W, experts sharded), a
/// grouped gather or scatter a shard group (S == 1).
void checkGroups(const Step &step, const std::string &path, int64_t W,
                 int64_t s) {
  const int64_t n = step.attrs.groupSize, S = step.attrs.groupStride;
  const bool grouped = n != 0 || S != 1;
  if (!grouped)
    return;
  if (step.op != StepOp::AllToAll && step.op != StepOp::AllGather &&
      step.op != StepOp::ReduceScatter)
    fail(path + ".attrs.group_size",
         "op '" + std::string(toString(step.op)) +
             "' takes no group; group_size and group_stride are attributes "
             "of all_to_all, all_gather and reduce_scatter");
  if (n < 1 || S < 1 || n > W || S > W || W % (n * S) != 0)
    fail(path + ".attrs.group_size",
         "groups of group_size " + std::to_string(n) + " ranks group_stride " +
             std::to_string(S) +
             " apart do not partition the plan's world size " +
             std::to_string(W) +
             "; need group_size >= 1, group_stride >= 1 and group_size * "
             "group_stride dividing W");
  if (step.attrs.ranksPerNode != 0)
    fail(path + ".attrs.ranks_per_node",
         "ranks_per_node (2DH) runs over all W ranks; a grouped all_to_all "
         "(group_size " +
             std::to_string(n) + ") is flat");
  // The groups the layout needs (PlanFormat.md, "Groups of ranks"): a
  // shard group gathers g consecutive ranks' shards, and a token class of
  // W / g ranks g apart exchanges them. Other groups partition the ranks too
  // but hold other experts than the segment ops run: a wrong answer.
  if (n == W)
    return; // all W ranks: no group
  if (step.op == StepOp::AllToAll) {
    if (s == 1)
      fail(path + ".attrs.group_size",
           "a grouped all_to_all (group_size " + std::to_string(n) +
               ") needs experts sharded over ranks (E < W, W % E == 0): "
               "with whole experts the segment ops run L = E / W experts "
               "per rank");
    if (n * S != W)
      fail(path + ".attrs.group_stride",
           "a grouped all_to_all runs among a token class: group_size " +
               std::to_string(n) + " ranks group_stride = W / group_size = " +
               std::to_string(W / n) + " apart, got group_stride " +
               std::to_string(S));
  } else if (S != 1) {
    fail(path + ".attrs.group_stride",
         "a grouped " + std::string(toString(step.op)) +
             " runs among consecutive ranks (a shard group): group_stride "
             "must be 1, got " +
             std::to_string(S));
  }
}

/// The rules of one step's operands and attributes. The constructor derives
/// what they read (the layer's sizes, the variant's gate, the world, the
/// step's row groups); each check below is one family of step kinds.
class StepShapes {
public:
  StepShapes(const Plan &plan, const Step &step, const std::string &path,
             const StepAttrs &gateAttrs, bool backward);
  void check();

private:
  void checkRoutingSides();
  void checkGate();
  void checkRowOps();
  int64_t gemmRows(const BufferDesc *a);
  void checkGemm();
  void checkGemmGlu();
  void
  expectOneDType(const BufferDesc *a,
                 std::initializer_list<std::pair<OperandRole, bool>> roles);
  void expectWrittenApart(std::initializer_list<OperandRole> outputs,
                          std::initializer_list<OperandRole> inputs);
  void checkWgrad();
  void checkShardRouting();
  void checkAllToAll();
  void checkUniformSegments();
  void checkGatherOrScatter();
  void checkElementwise();

  using R = OperandRole;
  static constexpr bool in = true, out = false;
  const Plan &plan;
  const Step &step;
  const std::string &path;
  /// The step runs in the backward pass.
  bool backward;
  const LayerConfig &layer;
  OperandChecker c;
  int64_t T, d, E, k;
  /// [cap-1] C rounded up to the variant's alignment.
  int64_t alignment, capacityBound;
  /// Experts sharded over s ranks: after shard_routing the routing is over
  /// E * s virtual experts with k * s choices, and every dispatch-shaped
  /// buffer holds E * s capacity blocks.
  int64_t s, Ev, kv;
  /// The rows of the dispatch buffer: E * C for padded, at most T * k for
  /// ragged (never more than E * C either).
  int64_t paddedRows, minRows;
  DType tokenType, routerType;
  /// W, L, and the ranks a collective runs among: W, or its group's.
  int64_t W, L, groupW;
  /// The ops that run per group of rows take their G groups from
  /// expert_offsets/expert_rows: the gate's E experts, or the L = E / W
  /// local experts of a received buffer (uniform_segments).
  bool segmentOp;
  int64_t G;
  std::string groupsMeaning;
  /// Which routing each side of the step holds: the gate's (k choices over
  /// E experts) or, with sharded experts, shard_routing's (k * s over E * s).
  bool shardedIn = false, shardedOut = false;
};

StepShapes::StepShapes(const Plan &plan, const Step &step,
                       const std::string &path, const StepAttrs &gateAttrs,
                       bool backward)
    : plan(plan), step(step), path(path), backward(backward),
      layer(plan.layer), c{plan, step, path} {
  T = layer.tokens, d = layer.modelDim, E = layer.experts;
  k = std::min(layer.topK, layer.experts);
  alignment = gateAttrs.capacityAlignment;
  capacityBound = alignedCapacityBound(layer, alignment);
  s = plan.shards(), Ev = plan.virtualExperts(), kv = k * s;
  paddedRows = checkedMul(Ev, capacityBound)
                   .value_or(std::numeric_limits<int64_t>::max());
  const int64_t keptRows =
      std::min(checkedMul(T, k).value_or(paddedRows), paddedRows);
  switch (gateAttrs.layout) {
  case DispatchLayout::Padded:
    minRows = paddedRows;
    break;
  case DispatchLayout::Ragged:
    minRows = keptRows;
    break;
  case DispatchLayout::Aligned:
    minRows = alignedLayoutRows(keptRows, Ev, capacityBound,
                                layoutRowAlignment(gateAttrs.layout));
    break;
  }
  tokenType = layer.dtype;
  routerType = layer.routerFp32 ? DType::F32 : layer.dtype;
  W = plan.worldSize, L = plan.localExperts();
  groupW = step.attrs.groupRanks(W);
  segmentOp = getStepKind(step.op).has(kStepSegmentOp);
  G = Ev;
  if (segmentOp) {
    const BufferDesc *rows =
        c.get(R::ExpertRows, step.op != StepOp::UniformSegments);
    if (rows && rows->shape.size() == 1 && rows->shape[0] == L)
      G = L;
    // Sharded experts exchanged among groups of n ranks: E * s / n local
    // (virtual) experts per rank (PlanFormat.md, "Groups of ranks").
    else if (rows && rows->shape.size() == 1 && s > 1 && rows->shape[0] > 0 &&
             Ev % rows->shape[0] == 0 && W % (Ev / rows->shape[0]) == 0)
      G = rows->shape[0];
  }
  groupsMeaning = segmentOp && s > 1
                      ? " (G = E * s = " + std::to_string(Ev) +
                            " virtual experts (shards), or 1 shard per rank)"
                  : segmentOp && L != E
                      ? " (G = E = " + std::to_string(E) +
                            " experts, or L = E / W = " + std::to_string(L) +
                            " local experts)"
                      : "";
  switch (step.op) {
  case StepOp::ShardRouting:
    shardedOut = true;
    break;
  case StepOp::ShardRoutingBackward:
    shardedIn = true;
    break;
  case StepOp::Dispatch:
  case StepOp::Combine:
  case StepOp::CombineBackward:
  case StepOp::DispatchBackward:
    shardedIn = shardedOut = s > 1;
    break;
  default:
    break;
  }
}

void StepShapes::checkRoutingSides() {
  // Roles of one shape wherever they appear (StepKinds.def), then the
  // segments: the routing's E (+ 1) experts, or the segment op's G.
  for (bool isInput : {in, out}) {
    const bool sharded = isInput ? shardedIn : shardedOut;
    const int64_t kk = sharded ? kv : k, EE = sharded ? Ev : E;
    const std::string eName = sharded ? "E * s" : "E";
    checkDeclaredRoles(c, isInput, {T, d, EE, kk, sharded}, tokenType,
                       routerType);
    c.expect(R::ExpertOffsets, isInput, {DType::I32},
             {segmentOp ? G + 1 : EE + 1},
             (segmentOp ? std::string("expert_offsets [G + 1] i32")
                        : "expert_offsets [" + eName + " + 1] i32") +
                 groupsMeaning);
    c.expect(R::ExpertRows, isInput, {DType::I32}, {segmentOp ? G : EE},
             (segmentOp ? std::string("expert_rows [G] i32")
                        : "expert_rows [" + eName + "] i32") +
                 groupsMeaning);
  }
}

void StepShapes::checkGate() {
  if (step.attrs.topK != layer.topK)
    fail(path + ".attrs.top_k", "top_k " + std::to_string(step.attrs.topK) +
                                    " disagrees with the layer's top_k " +
                                    std::to_string(layer.topK));
  if (step.op == StepOp::Gate && step.attrs.capacityMode != layer.capacityMode)
    fail(path + ".attrs.capacity_mode",
         "'" + std::string(toString(step.attrs.capacityMode)) +
             "' disagrees with the layer's capacity_mode '" +
             std::string(toString(layer.capacityMode)) + "'");
  // The gate computes the layer's routing: its attributes are the
  // layer's, or the plan would compute another function than it declares.
  if (step.op == StepOp::Gate && layer.capacityMode != CapacityMode::Dropless &&
      step.attrs.capacityFactor != layer.capacityFactor)
    fail(path + ".attrs.capacity_factor",
         "capacity_factor " + std::to_string(step.attrs.capacityFactor) +
             " disagrees with the layer's capacity_factor " +
             std::to_string(layer.capacityFactor));
  if (step.attrs.normalize != layer.normalizeGate)
    fail(path + ".attrs.normalize",
         std::string("normalize ") + (step.attrs.normalize ? "true" : "false") +
             " disagrees with the layer's normalize_gate " +
             (layer.normalizeGate ? "true" : "false"));
  if (step.op == StepOp::Gate &&
      (step.attrs.noise != layer.gateNoise || step.attrs.seed != layer.seed))
    fail(path + (step.attrs.noise != layer.gateNoise ? ".attrs.noise"
                                                     : ".attrs.seed"),
         "noise " + std::to_string(step.attrs.noise) + " and seed " +
             std::to_string(step.attrs.seed) +
             " disagree with the layer's gate_noise " +
             std::to_string(layer.gateNoise) + " and seed " +
             std::to_string(layer.seed));
  if (step.op == StepOp::Gate &&
      step.attrs.batchPrioritized != layer.batchPrioritized)
    fail(path + ".attrs.batch_prioritized",
         std::string("batch_prioritized ") +
             (step.attrs.batchPrioritized ? "true" : "false") +
             " disagrees with the layer's batch_prioritized " +
             (layer.batchPrioritized ? "true" : "false"));
  // [cap-1] The gate writes expert_offsets[e] = e * C with C rounded up
  // to the alignment: the layer's check of the unaligned bound is not
  // enough.
  if (step.op == StepOp::Gate &&
      checkedMul(layer.experts, capacityBound)
              .value_or(std::numeric_limits<int64_t>::max()) >
          std::numeric_limits<int32_t>::max())
    fail(path + ".attrs.capacity_alignment",
         "[cap-1] the capacity bound " + std::to_string(capacityBound) +
             " aligned to " + std::to_string(alignment) + " times " +
             std::to_string(layer.experts) +
             " experts exceeds the i32 range of the routing buffers");
  // The aligned layout's offsets reach its row bound.
  if (step.op == StepOp::Gate && step.attrs.layout == DispatchLayout::Aligned &&
      minRows > std::numeric_limits<int32_t>::max())
    fail(path + ".attrs.layout",
         "the aligned layout's " + std::to_string(minRows) +
             " rows (each expert's rounded up to " +
             std::to_string(kAlignedLayoutRows) +
             ") exceed the i32 range of the routing buffers");
}

/// dispatch, combine and their backward: rows of d columns, at least the
/// dispatch layout's.
void StepShapes::checkRowOps() {
  switch (step.op) {
  case StepOp::Dispatch:
    c.expectRows(R::Dispatched, out, d, minRows, "dispatched [R, d]");
    return;
  case StepOp::DispatchRows:
    c.expectRowMap(R::RowTokens, out, minRows);
    return;
  case StepOp::DispatchBackward:
    c.expectRows(R::GradDispatched, in, d, minRows, "grad_dispatched [R, d]");
    return;
  case StepOp::Combine:
    c.expectRows(R::ExpertOut, in, d, minRows, "expert_out [R, d]");
    return;
  case StepOp::CombineBackward: {
    const BufferDesc *expertOut =
        c.expectRows(R::ExpertOut, in, d, minRows, "expert_out [R, d]");
    c.expectSameShape(R::GradExpertOut, out, expertOut, "expert_out");
    return;
  }
  default:
    return;
  }
}

/// The row -> token map of a gather-fused GEMM: [R] i32, R >= the dispatch
/// rows; its A operand is then the layer's x, [T, K]. Returns the rows R of
/// the product (a's rows without it), or -1 after a failure.
int64_t StepShapes::gemmRows(const BufferDesc *a) {
  const BufferDesc *rowTokens = c.get(R::RowTokens, in);
  if (!rowTokens)
    return a->shape[0];
  c.expectRowMap(R::RowTokens, in, minRows);
  if (a->shape[0] != T)
    fail(c.where(R::A, in),
         "buffer '" + a->name + "' has " + std::to_string(a->shape[0]) +
             " rows; with row_tokens, a is the layer's tokens [T, K], T = " +
             std::to_string(T));
  return rowTokens->shape.size() == 1 ? rowTokens->shape[0] : -1;
}

void StepShapes::checkGemm() {
  // grouped_gemm_combine's row_tokens maps c's rows for its combine; it
  // gathers nothing.
  const bool combined = step.op == StepOp::GroupedGemmCombine;
  const bool gathered = !combined && c.get(R::RowTokens, in) != nullptr;
  const BufferDesc *a = c.expect(R::A, in, kFloatTypes, {-1, -1},
                                 gathered ? "a [T, K]" : "a [R, K]");
  int64_t K = a->shape[1];
  const int64_t rows = combined ? a->shape[0] : gemmRows(a);
  const BufferDesc *b = c.expect(
      R::B, in, kFloatTypes, {G, -1, -1},
      (step.attrs.transB ? "b [G, N, K]" : "b [G, K, N]") + groupsMeaning);
  int64_t bK = b->shape[step.attrs.transB ? 2 : 1];
  int64_t N = b->shape[step.attrs.transB ? 1 : 2];
  if (bK != K)
    fail(c.where(R::B, in),
         "buffer '" + b->name + "' of shape " + shapeString(b->shape) +
             " has K = " + std::to_string(bK) + " but a '" + a->name +
             "' has K = " + std::to_string(K) +
             (step.attrs.transB ? " (trans_b: b is [E, N, K])"
                                : " (b is [E, K, N])"));
  c.expect(R::Bias, in, kFloatTypes, {G, N}, "bias [G, N]" + groupsMeaning);
  if (!gathered)
    c.expectRows(R::A, in, K, minRows, "a [R, K]");
  const std::string ofRows = gathered ? ", R of row_tokens" : ", R of a";
  c.expect(R::C, out, kFloatTypes, {rows, N}, "c [R, N]" + ofRows);
  c.expect(R::Pre, out, kFloatTypes, {rows, N}, "pre [R, N]" + ofRows);
  // The fused backwards read the forward's values and round the product
  // to their outputs' dtype before using it, as activation_backward and
  // glu_backward do; they store tiles while other tiles still read their
  // inputs.
  if (step.op == StepOp::GroupedGemmActivationBackward) {
    c.expect(R::Pre, in, kFloatTypes, {rows, N}, "pre [R, N]" + ofRows);
    expectOneDType(a, {{R::B, in}, {R::Pre, in}, {R::C, out}});
    expectWrittenApart({R::C}, {R::A, R::B, R::Pre});
  } else if (combined) {
    // c holds the rows the combine sums into out [T, d]: N = d, and rows
    // for every kept slot. The fused store sums a token's rows while other
    // tiles still read a, b and the bias.
    c.expectRows(R::C, out, d, minRows, "c [R, d]" + ofRows);
    if (const BufferDesc *rowTokens = c.expectRowMap(R::RowTokens, in, minRows);
        rowTokens && rows >= 0 && rowTokens->shape[0] != rows)
      fail(c.where(R::RowTokens, in),
           "buffer '" + rowTokens->name + "' has " +
               std::to_string(rowTokens->shape[0]) + " rows; it maps c's " +
               std::to_string(rows) + " rows to their tokens");
    expectOneDType(a, {{R::B, in}, {R::Bias, in}, {R::C, out}, {R::Out, out}});
    expectWrittenApart({R::C, R::Out}, {R::A, R::B, R::Bias});
  } else if (step.op == StepOp::GroupedGemmGluBackward) {
    for (auto [role, isInput] :
         {std::pair{R::GateIn, in}, std::pair{R::UpIn, in},
          std::pair{R::GradGateIn, out}, std::pair{R::GradUpIn, out}})
      c.expect(role, isInput, kFloatTypes, {rows, N},
               std::string(toString(role)) + " [R, N]" + ofRows);
    expectOneDType(a, {{R::B, in},
                       {R::GateIn, in},
                       {R::UpIn, in},
                       {R::GradGateIn, out},
                       {R::GradUpIn, out}});
    expectWrittenApart({R::GradGateIn, R::GradUpIn},
                       {R::A, R::B, R::GateIn, R::UpIn});
    if (step.out(R::GradGateIn) == step.out(R::GradUpIn))
      fail(c.where(R::GradUpIn, out),
           "buffer '" + c.get(R::GradUpIn, out)->name +
               "' is also the step's grad_gate_in; op '" +
               std::string(toString(step.op)) +
               "' writes the two gradients apart");
  }
  // [expert-1] The forward multiplies by the expert weights ([d, h] and
  // [h, d]), the backward's data gradients by their transposes: a GEMM the
  // other way round has shapes that agree whenever d == h, and computes
  // another layer.
  if (step.attrs.transB != backward)
    fail(path + ".attrs.trans_b",
         std::string("trans_b ") + (step.attrs.transB ? "true" : "false") +
             " in a " + (backward ? "backward" : "forward") + " " +
             std::string(toString(step.op)) + "; the " +
             (backward ? "backward multiplies by the transposed weights "
                         "(trans_b true)"
                       : "forward multiplies by the weights (trans_b false)"));
  // Only fc2 of an expert sharded over s ranks scales its bias (by 1 / s,
  // so the s partial outputs add b2 once).
  const double scale = step.attrs.biasScale;
  if (scale != 1.0 && (s == 1 || scale != 1.0 / static_cast<double>(s)))
    fail(path + ".attrs.bias_scale",
         "bias_scale " + std::to_string(scale) +
             (s == 1 ? " on experts that are not sharded; it must be 1"
                     : " must be 1 or 1 / s = 1 / " + std::to_string(s)));
}

/// grouped_gemm_glu: c = silu(a @ b) * (a @ b_up), the products kept in
/// gate_in and up_in when given. It rounds the products to c's dtype and
/// glu reads them back in it, so every operand has one dtype; b and b_up
/// are [G, K, N], never transposed.
void StepShapes::checkGemmGlu() {
  const bool gathered = c.get(R::RowTokens, in) != nullptr;
  const BufferDesc *a = c.expect(R::A, in, kFloatTypes, {-1, -1},
                                 gathered ? "a [T, K]" : "a [R, K]");
  const int64_t K = a->shape[1];
  const int64_t rows = gemmRows(a);
  const BufferDesc *b = c.expect(R::B, in, kFloatTypes, {G, -1, -1},
                                 "b [G, K, N]" + groupsMeaning);
  if (b->shape[1] != K)
    fail(c.where(R::B, in),
         "buffer '" + b->name + "' of shape " + shapeString(b->shape) +
             " has K = " + std::to_string(b->shape[1]) + " but a '" + a->name +
             "' has K = " + std::to_string(K) + " (b is [G, K, N])");
  const int64_t N = b->shape[2];
  c.expectSameShape(R::BUp, in, b, "b '" + b->name + "'");
  if (!gathered)
    c.expectRows(R::A, in, K, minRows, "a [R, K]");
  const std::string ofRows = gathered ? ", R of row_tokens" : ", R of a";
  c.expect(R::C, out, kFloatTypes, {rows, N}, "c [R, N]" + ofRows);
  c.expect(R::GateIn, out, kFloatTypes, {rows, N}, "gate_in [R, N]" + ofRows);
  c.expect(R::UpIn, out, kFloatTypes, {rows, N}, "up_in [R, N]" + ofRows);
  // Both products or neither: the backward's glu_backward reads the two,
  // so keeping one alone serves no plan.
  const bool keepsGate = c.get(R::GateIn, out), keepsUp = c.get(R::UpIn, out);
  if (keepsGate != keepsUp) {
    const OperandRole kept = keepsGate ? R::GateIn : R::UpIn;
    const OperandRole missing = keepsGate ? R::UpIn : R::GateIn;
    fail(c.where(missing, out),
         "op 'grouped_gemm_glu' writes gate_in and up_in together or "
         "neither; it writes " +
             std::string(toString(kept)) + " '" + c.get(kept, out)->name +
             "' but no " + std::string(toString(missing)));
  }
  expectOneDType(a, {{R::B, in},
                     {R::BUp, in},
                     {R::C, out},
                     {R::GateIn, out},
                     {R::UpIn, out}});
}

/// No output of `outputs` is an input of `inputs`: a fused step stores some
/// tiles while others still read its inputs.
void StepShapes::expectWrittenApart(std::initializer_list<OperandRole> outputs,
                                    std::initializer_list<OperandRole> inputs) {
  for (OperandRole output : outputs)
    for (OperandRole input : inputs)
      if (step.out(output).isValid() && step.in(input) == step.out(output))
        fail(c.where(output, out),
             "buffer '" + c.get(output, out)->name + "' is also the step's " +
                 std::string(toString(input)) + "; op '" +
                 std::string(toString(step.op)) +
                 "' writes its outputs apart from what it reads");
}

/// Each of `roles` present has a's dtype: the fused steps compute in one.
void StepShapes::expectOneDType(
    const BufferDesc *a,
    std::initializer_list<std::pair<OperandRole, bool>> roles) {
  for (auto [role, isInput] : roles) {
    const BufferDesc *desc = c.get(role, isInput);
    if (desc && desc->dtype != a->dtype)
      fail(c.where(role, isInput),
           "buffer '" + desc->name + "' has dtype " +
               std::string(toString(desc->dtype)) + "; op '" +
               std::string(toString(step.op)) +
               "' computes in one dtype, a's ('" + a->name + "', " +
               std::string(toString(a->dtype)) + ")");
  }
}

void StepShapes::checkWgrad() {
  const bool gathered = c.get(R::RowTokens, in) != nullptr;
  const BufferDesc *a =
      gathered ? c.expect(R::A, in, kFloatTypes, {-1, -1}, "a [T, K]")
               : c.expectRows(R::A, in, -1, minRows, "a [R, K]");
  const BufferDesc *gradC = c.expect(
      R::GradC, in, kFloatTypes, {gemmRows(a), -1},
      gathered ? "grad_c [R, N], R of row_tokens" : "grad_c [R, N], R of a");
  int64_t K = a->shape[1], N = gradC->shape[1];
  c.expect(R::GradB, out, kFloatTypes, {G, K, N},
           "grad_b [G, K, N]" + groupsMeaning);
  c.expect(R::GradBias, out, kFloatTypes, {G, N},
           "grad_bias [G, N]" + groupsMeaning);
}

void StepShapes::checkShardRouting() {
  // The routing shapes above say the rest.
  if (s == 1)
    fail(path + ".op", "op '" + std::string(toString(step.op)) +
                           "' needs experts sharded over ranks (E < W, "
                           "W % E == 0); this plan has E = " +
                           std::to_string(E) +
                           " experts on W = " + std::to_string(W) + " ranks");
  if (step.attrs.shards != s)
    fail(path + ".attrs.shards",
         "shards " + std::to_string(step.attrs.shards) +
             " disagrees with the plan: s = W / E = " + std::to_string(W) +
             " / " + std::to_string(E) + " = " + std::to_string(s));
  // [cap-1] The routing buffers are i32 and shard_routing writes
  // expert_offsets[v] = v * C up to E * s * C: the layer's check of
  // E * C is not enough.
  if (step.op == StepOp::ShardRouting &&
      paddedRows > std::numeric_limits<int32_t>::max())
    fail(path + ".op",
         "[cap-1] the capacity bound " + std::to_string(capacityBound) +
             " times the E * s = " + std::to_string(Ev) +
             " virtual experts exceeds the i32 range of the routing "
             "buffers (expert_offsets); lower capacity_factor or tokens");
}

void StepShapes::checkAllToAll() {
  checkChunks(step, path);
  checkRanksPerNode(step, path, W);
  // Both sides hold E * C rows: [W, L, C, n] and [D, L, W, C / D, n].
  const BufferDesc *input =
      c.expectRows(R::Input, in, -1, paddedRows, "input [E * C, n]");
  c.expectRows(R::Output, out, input->shape[1], paddedRows,
               "output [E * C, n], n of input");
  c.expect(R::Output, out, {input->dtype}, {-1, input->shape[1]},
           "output has the dtype of input");
}

void StepShapes::checkUniformSegments() {
  checkChunks(step, path);
  // Sharded experts exchanged among groups of n ranks (n dividing W):
  // G = E * s / n local virtual experts.
  if (s > 1 && step.attrs.ranks >= 1 && step.attrs.ranks < W &&
      W % step.attrs.ranks == 0) {
    if (step.attrs.groups * step.attrs.ranks != Ev)
      fail(path + ".attrs.groups",
           "groups " + std::to_string(step.attrs.groups) + " on ranks " +
               std::to_string(step.attrs.ranks) +
               " disagrees with the plan: groups * ranks must be the E * s "
               "= " +
               std::to_string(Ev) + " virtual experts");
    return;
  }
  if (step.attrs.groups != L)
    fail(path + ".attrs.groups",
         "groups " + std::to_string(step.attrs.groups) +
             " disagrees with the local experts of the plan: L = E / W = " +
             std::to_string(E) + " / " + std::to_string(W) + " = " +
             std::to_string(L));
  if (step.attrs.ranks != W)
    fail(path + ".attrs.ranks", "ranks " + std::to_string(step.attrs.ranks) +
                                    " disagrees with the plan's world size " +
                                    std::to_string(W));
}

void StepShapes::checkGatherOrScatter() {
  // The rank's block is 1/W of the full buffer's first dimension.
  bool gather = step.op == StepOp::AllGather;
  const BufferDesc *input = c.get(R::Input, in);
  const BufferDesc *output = c.get(R::Output, out);
  const BufferDesc *block = gather ? input : output;
  const BufferDesc *full = gather ? output : input;
  std::string fullPath = c.where(gather ? R::Output : R::Input, !gather);
  if (!gather && input->dtype == DType::I32)
    fail(c.where(R::Input, in), "buffer '" + input->name +
                                    "' has dtype i32; op 'reduce_scatter' "
                                    "sums f32, bf16 or f16");
  if (input->dtype != output->dtype)
    fail(c.where(R::Output, out),
         "buffer '" + output->name + "' has dtype " +
             std::string(toString(output->dtype)) + "; op '" +
             std::string(toString(step.op)) +
             "' keeps the dtype of its input (" +
             std::string(toString(input->dtype)) + ")");
  std::vector<int64_t> want = block->shape;
  if (!want.empty())
    want[0] = checkedMul(want[0], groupW).value_or(-1);
  if (block->shape.empty() || full->shape != want)
    fail(fullPath,
         "buffer '" + full->name + "' has shape " + shapeString(full->shape) +
             "; op '" + std::string(toString(step.op)) +
             "' needs the rank's block " + shapeString(block->shape) +
             " times " + (step.attrs.groupSize > 0 ? "group_size" : "W") +
             " = " + std::to_string(groupW) + " in the first dimension, " +
             shapeString(want));
}

/// glu, glu_backward and activation_backward: [R, N] operands of one shape.
void StepShapes::checkElementwise() {
  OperandRole first =
      step.op == StepOp::ActivationBackward ? R::Pre : R::GateIn;
  const BufferDesc *reference = c.expectRows(
      first, in, -1, minRows, std::string(toString(first)) + " [R, N]");
  std::string name = "'" + reference->name + "'";
  for (OperandRole role : {R::UpIn, R::Grad})
    c.expectSameShape(role, in, reference, name);
  for (OperandRole role : {R::C, R::GradPre, R::GradGateIn, R::GradUpIn})
    c.expectSameShape(role, out, reference, name);
  for (OperandRole role : {R::UpIn, R::Grad})
    c.expect(role, in, kFloatTypes, reference->shape, "[R, N]");
  for (OperandRole role : {R::C, R::GradPre, R::GradGateIn, R::GradUpIn})
    c.expect(role, out, kFloatTypes, reference->shape, "[R, N]");
}

void StepShapes::check() {
  checkGroups(step, path, W, s);
  checkRoutingSides();
  switch (step.op) {
  case StepOp::Router:
  case StepOp::RouterBackward:
  case StepOp::SyncCapacity:
    return; // their operands are the declared roles of checkRoutingSides
  case StepOp::Gate:
  case StepOp::GateBackward:
    return checkGate();
  case StepOp::Dispatch:
  case StepOp::DispatchRows:
  case StepOp::DispatchBackward:
  case StepOp::Combine:
  case StepOp::CombineBackward:
    return checkRowOps();
  case StepOp::GroupedGemm:
  case StepOp::GroupedGemmCombine:
  case StepOp::GroupedGemmActivationBackward:
  case StepOp::GroupedGemmGluBackward:
    return checkGemm();
  case StepOp::GroupedGemmGlu:
    return checkGemmGlu();
  case StepOp::GroupedGemmWgrad:
    return checkWgrad();
  case StepOp::ShardRouting:
  case StepOp::ShardRoutingBackward:
    return checkShardRouting();
  case StepOp::AllToAll:
    return checkAllToAll();
  case StepOp::UniformSegments:
    return checkUniformSegments();
  case StepOp::AllGather:
  case StepOp::ReduceScatter:
    return checkGatherOrScatter();
  case StepOp::Glu:
  case StepOp::GluBackward:
  case StepOp::ActivationBackward:
    return checkElementwise();
  }
}

} // namespace

void plan_detail::checkStepShapes(const Plan &plan, const Step &step,
                                  const std::string &path,
                                  const StepAttrs &gateAttrs, bool backward) {
  StepShapes(plan, step, path, gateAttrs, backward).check();
}

} // namespace flex
