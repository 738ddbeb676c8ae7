//===- PlanLoaderTest.cpp - Tests of the plan loader and writer -----------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file tests that the loader accepts the hand-written plans of
// unittests/Runtime/plans, that writing and reading a plan gives it back, and
// that each class of bad document is rejected with a message naming the field
// and the value, never a crash; the same for the glu-fused step
// (grouped_gemm_glu) made from the checked-in plans.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/PlanLoader.h"

#include "MultiRankTestSupport.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <random>

using namespace flex;
using flex::test::readTestPlan;
using Json = nlohmann::ordered_json;
using ::testing::HasSubstr;

namespace {

Json readJson(const std::string &name) {
  return Json::parse(readTestPlan(name));
}

/// Parses `doc` and expects rejection with a message containing each of
/// `parts`.
void expectRejected(const Json &doc, std::initializer_list<const char *> parts,
                    const PlanCheckOptions &options = {}) {
  Plan plan;
  Status status = parsePlan(doc.dump(), plan, options);
  ASSERT_FALSE(status.isOk()) << "accepted: " << doc.dump().substr(0, 200);
  EXPECT_EQ(status.code(), StatusCode::InvalidPlan);
  for (const char *part : parts)
    EXPECT_THAT(status.message(), HasSubstr(part));
}

const char *const kPlans[] = {
    "ffn_fixed_train.json", "ffn_dropless_ragged_train.json",
    "gated_bounded_infer.json", "ffn_dropless_ragged_train_bf16.json",
    "gated_fixed_train.json"};

Json &findWorkspaceBuffer(Json &doc, const std::string &name) {
  for (Json &buffer : doc["workspace"]["buffers"])
    if (buffer["name"] == name)
      return buffer;
  throw std::runtime_error("no buffer " + name);
}

} // namespace

TEST(PlanLoader, AcceptsHandWrittenPlans) {
  for (const char *name : kPlans) {
    Plan plan;
    Status status = parsePlan(readTestPlan(name), plan);
    ASSERT_TRUE(status.isOk()) << name << ": " << status.message();
    EXPECT_FALSE(plan.variants.empty());
  }
  Plan plan;
  ASSERT_TRUE(parsePlan(readTestPlan("ffn_fixed_train.json"), plan).isOk());
  EXPECT_EQ(plan.layer.tokens, 8);
  EXPECT_EQ(plan.layer.topK, 2);
  EXPECT_TRUE(plan.training);
  EXPECT_EQ(plan.variants.size(), 2u);
  EXPECT_EQ(plan.variants[1].name, "ragged");
  EXPECT_EQ(plan.variants[0].forward[1].op, StepOp::Gate);
  EXPECT_EQ(plan.variants[1].forward[1].attrs.layout, DispatchLayout::Ragged);
  EXPECT_NE(plan.variants[0].parallelJson.find("\"r\""), std::string::npos);
  EXPECT_FALSE(plan.variants[0].predictedUs.has_value());
  const Step &router = plan.variants[0].forward[0];
  EXPECT_EQ(router.in(OperandRole::X).kind, BufferRef::Kind::Argument);
  EXPECT_EQ(plan.getBuffer(router.out(OperandRole::Logits)).name, "logits");
}

// bad_aligned_i32_rows.json: a one-expert top-1 layer of T = 2^31 - 1
// tokens compiled by moe-opt (E * C = 2^31 - 1 fits i32), then the gate's
// capacity_alignment set to 2, so the aligned C = 2^31 does not: the gate's
// expert offsets would overflow.
TEST(PlanLoader, RejectsAnAlignedCapacityBeyondI32) {
  Plan plan;
  Status status = parsePlan(readTestPlan("bad_aligned_i32_rows.json"), plan);
  EXPECT_EQ(status.code(), StatusCode::InvalidPlan);
  EXPECT_THAT(status.message(),
              ::testing::HasSubstr("capacity bound 2147483648 aligned to 2"));
  EXPECT_THAT(status.message(), ::testing::HasSubstr("i32 range"));
}

// The aligned layout's buffers hold every expert's rows rounded up to 128:
// a ragged plan's T * k rows are too few once its gate says aligned (16
// tokens, top-2, 4 experts: 4 blocks of 128 rows).
TEST(PlanLoader, RejectsAnAlignedGateOverRaggedRows) {
  Json doc = readJson("ffn_dropless_ragged_train_bf16.json");
  Json &gate = doc["variants"][0]["forward"][1];
  ASSERT_EQ(gate["op"], "gate");
  gate["attrs"]["layout"] = "aligned";
  expectRejected(doc, {"'variants[0].forward[2].out.dispatched'",
                       "buffer 'disp' has 32 rows", "at least 512"});
}

TEST(PlanLoader, LoadsFromFileAndReportsMissingFile) {
  Plan plan;
  EXPECT_TRUE(loadPlanFile(std::string(FLEX_TEST_PLANS_DIR) +
                               "/gated_bounded_infer.json",
                           plan)
                  .isOk());
  Status status = loadPlanFile("/nonexistent/plan.json", plan);
  EXPECT_EQ(status.code(), StatusCode::IOError);
  EXPECT_THAT(status.message(), HasSubstr("/nonexistent/plan.json"));
}

TEST(PlanLoader, WriteThenReadGivesThePlanBack) {
  for (const char *name : kPlans) {
    Plan plan;
    ASSERT_TRUE(parsePlan(readTestPlan(name), plan).isOk()) << name;
    plan.variants[0].measuredUs = 12.5;
    std::string written = writePlan(plan);
    Plan again;
    Status status = parsePlan(written, again);
    ASSERT_TRUE(status.isOk()) << name << ": " << status.message();
    EXPECT_EQ(writePlan(again), written) << name;
    EXPECT_EQ(again.variants[0].measuredUs, 12.5);
    EXPECT_EQ(again.arguments.size(), plan.arguments.size());
    EXPECT_EQ(again.workspace.bytes, plan.workspace.bytes);
    // One-line form reads the same.
    Plan compact;
    ASSERT_TRUE(parsePlan(writePlan(plan, -1), compact).isOk());
    EXPECT_EQ(writePlan(compact), written);
  }
}

// A variant's workspace_bytes must hold every buffer its steps use and lie
// within the plan's workspace; the field is optional (the whole workspace)
// and survives a write and read.
TEST(PlanLoader, ChecksEachVariantsWorkspace) {
  Json doc = readJson("ffn_dropless_layouts_train.json");
  Plan plan;
  ASSERT_TRUE(parsePlan(doc.dump(), plan).isOk());
  ASSERT_TRUE(plan.variants[0].workspaceBytes.has_value());
  Plan again;
  ASSERT_TRUE(parsePlan(writePlan(plan), again).isOk());
  for (size_t v = 0; v < plan.variants.size(); ++v)
    EXPECT_EQ(again.variantWorkspaceBytes(v), plan.variantWorkspaceBytes(v));
  Json absent = doc;
  absent["variants"][0].erase("workspace_bytes");
  ASSERT_TRUE(parsePlan(absent.dump(), again).isOk());
  EXPECT_EQ(again.variantWorkspaceBytes(0), plan.workspace.bytes);

  const int64_t ragged = doc["variants"][0]["workspace_bytes"];
  Json wrong = doc;
  wrong["variants"][0]["workspace_bytes"] = ragged - 256;
  const std::string beyond = "beyond its " + std::to_string(ragged - 256);
  expectRejected(wrong, {"'variants[0].workspace_bytes'", "variant 'ragged'",
                         beyond.c_str()});
  wrong["variants"][0]["workspace_bytes"] = plan.workspace.bytes + 256;
  expectRejected(
      wrong, {"'variants[0].workspace_bytes'", "outside [0, workspace.bytes"});
  wrong["variants"][0]["workspace_bytes"] = -1;
  expectRejected(wrong, {"'variants[0].workspace_bytes'", "outside"});
  wrong["variants"][0]["workspace_bytes"] = "big";
  expectRejected(wrong,
                 {"'variants[0].workspace_bytes'", "expected an integer"});
}

TEST(PlanLoader, VerifiesPlansBuiltInMemory) {
  Plan plan;
  ASSERT_TRUE(parsePlan(readTestPlan("gated_bounded_infer.json"), plan).isOk());
  EXPECT_TRUE(verifyPlan(plan).isOk());
  plan.arguments[0].shape = {3, 3};
  Status status = verifyPlan(plan);
  EXPECT_EQ(status.code(), StatusCode::InvalidPlan);
  EXPECT_THAT(status.message(), HasSubstr("arguments[0].shape"));
}

TEST(PlanLoader, RejectsTextThatIsNotJson) {
  Plan plan;
  for (std::string text : {"", "hello", "{\"format\": ", "[1, 2"}) {
    Status status = parsePlan(text, plan);
    EXPECT_EQ(status.code(), StatusCode::InvalidPlan) << text;
    EXPECT_THAT(status.message(), HasSubstr("not valid JSON")) << text;
  }
}

TEST(PlanLoader, RejectsTruncatedDocument) {
  std::string text = readTestPlan("ffn_fixed_train.json");
  Plan plan;
  Status status = parsePlan(text.substr(0, text.size() / 2), plan);
  EXPECT_EQ(status.code(), StatusCode::InvalidPlan);
  EXPECT_THAT(status.message(), HasSubstr("not valid JSON"));
}

TEST(PlanLoader, RejectsWrongFormatAndVersion) {
  Json doc = readJson("gated_bounded_infer.json");
  expectRejected(Json::array(), {"expected an object"});
  Json wrong = doc;
  wrong["format"] = "onnx";
  expectRejected(wrong, {"'format'", "'onnx' is not a Flex plan"});
  wrong = doc;
  wrong["version"] = 3;
  expectRejected(
      wrong, {"'version'", "version 3 is not supported", "reads version 2"});
  // A plan of the previous format is refused by name, with the way out.
  wrong["version"] = 1;
  expectRejected(wrong, {"'version'", "version 1 is not supported",
                         "reads version 2", "compile the layer again"});
  wrong = doc;
  wrong["version"] = "2";
  expectRejected(wrong, {"'version'", "expected an integer, got string"});
}

TEST(PlanLoader, RejectsMissingAndMistypedFields) {
  Json doc = readJson("ffn_fixed_train.json");
  for (const char *key : {"format", "version", "layer", "training", "arguments",
                          "workspace", "variants"}) {
    Json wrong = doc;
    wrong.erase(key);
    expectRejected(
        wrong, {(std::string("'") + key + "'").c_str(), "missing (required)"});
  }
  Json wrong = doc;
  wrong["layer"].erase("model_dim");
  expectRejected(wrong, {"'layer.model_dim'", "missing"});
  wrong = doc;
  wrong["layer"]["tokens"] = "8";
  expectRejected(wrong, {"'layer.tokens'", "expected an integer, got string"});
  wrong = doc;
  wrong["layer"]["tokens"] = 8.5;
  expectRejected(wrong, {"'layer.tokens'", "expected an integer, got number"});
  wrong = doc;
  wrong["layer"]["capacity_mode"] = "elastic";
  expectRejected(wrong, {"'layer.capacity_mode'", "'elastic'",
                         "allowed: fixed, dropless, bounded"});
  wrong = doc;
  wrong["layer"]["dtype"] = "f64";
  expectRejected(wrong, {"'layer.dtype'", "'f64'", "f32, bf16, f16, i32"});
  wrong = doc;
  wrong["training"] = 1;
  expectRejected(wrong, {"'training'", "expected true or false"});
  wrong = doc;
  wrong["arguments"][2]["shape"] = "[4, 4, 6]";
  expectRejected(wrong, {"'arguments[2].shape'", "expected an array"});
  wrong = doc;
  wrong["workspace"]["buffers"][0].erase("offset");
  expectRejected(wrong, {"'workspace.buffers[0].offset'", "missing"});
  wrong = doc;
  wrong["variants"][0]["forward"][2]["in"]["x"] = 3;
  expectRejected(wrong, {"'variants[0].forward[2].in.x'", "expected a string"});
  wrong = doc;
  wrong["variants"][0]["forward"][1]["attrs"]["layout"] = "sparse";
  expectRejected(wrong, {"'variants[0].forward[1].attrs.layout'",
                         "allowed: padded, ragged"});
  wrong = doc;
  wrong["variants"][0]["forward"][1]["attrs"].erase("layout");
  expectRejected(wrong, {"attrs.layout'", "required by op 'gate'"});
}

TEST(PlanLoader, RejectsInvalidLayer) {
  Json doc = readJson("ffn_fixed_train.json");
  doc["layer"]["top_k"] = 0;
  expectRejected(doc, {"'layer'", "top_k"});
}

TEST(PlanLoader, RejectsUnknownOpRoleAndBuffer) {
  Json doc = readJson("ffn_fixed_train.json");
  Json wrong = doc;
  wrong["variants"][0]["forward"][0]["op"] = "conv2d";
  expectRejected(wrong,
                 {"'variants[0].forward[0].op'", "'conv2d'", "router, gate"});
  wrong = doc;
  wrong["variants"][0]["forward"][0]["in"]["x"] = "tokens";
  expectRejected(wrong, {"'variants[0].forward[0].in.x'", "'tokens'",
                         "defined by no argument and no workspace buffer"});
  wrong = doc;
  wrong["variants"][0]["forward"][0]["in"]["bias"] = "b1";
  expectRejected(wrong,
                 {"'variants[0].forward[0].in.bias'",
                  "op 'router' has no input role 'bias'", "allowed: x, wg"});
  wrong = doc;
  wrong["variants"][0]["forward"][0]["in"].erase("wg");
  expectRejected(wrong,
                 {"'variants[0].forward[0].in.wg'", "required by op 'router'"});
}

TEST(PlanLoader, RejectsArgumentsThatDisagreeWithTheLayer) {
  Json doc = readJson("ffn_fixed_train.json");
  Json wrong = doc;
  wrong["arguments"][0]["shape"] = {8, 5};
  expectRejected(wrong, {"'arguments[0].shape'", "[8, 5]",
                         "disagrees with the layer", "[8, 4]"});
  wrong = doc;
  wrong["arguments"][0]["dtype"] = "bf16";
  expectRejected(wrong, {"'arguments[0].dtype'", "bf16", "needs f32"});
  wrong = doc;
  wrong["arguments"][0]["role"] = "output";
  expectRejected(wrong, {"'arguments[0].role'", "expected 'input'"});
  wrong = doc;
  wrong["arguments"][0]["role"] = "scratch";
  expectRejected(wrong, {"'arguments[0].role'", "'scratch'",
                         "input, output, grad_input, grad_output"});
  wrong = doc;
  wrong["arguments"][0]["name"] = "tokens";
  expectRejected(wrong, {"'arguments[0].name'",
                         "'tokens' is not an argument of this layer"});
  wrong = doc;
  wrong["arguments"].erase(2); // w1
  expectRejected(wrong, {"argument 'w1'", "is missing"});
  wrong = doc;
  wrong["arguments"].push_back(wrong["arguments"][0]);
  expectRejected(wrong, {"'x' is defined twice"});
}

TEST(PlanLoader, RejectsStepShapesThatDisagreeWithTheLayer) {
  Json doc = readJson("ffn_fixed_train.json");
  Json wrong = doc;
  findWorkspaceBuffer(wrong, "logits")["shape"] = {8, 3};
  expectRejected(wrong,
                 {"'variants[0].forward[0].out.logits'",
                  "buffer 'logits' has shape [8, 3]", "expected [8, 4]"});
  wrong = doc;
  findWorkspaceBuffer(wrong, "indices")["dtype"] = "f32";
  expectRejected(wrong, {"buffer 'indices' has dtype f32", "needs i32"});
  wrong = doc;
  findWorkspaceBuffer(wrong, "disp")["shape"] = {12, 4};
  expectRejected(wrong, {"'variants[0].forward[2].out.dispatched'",
                         "has 12 rows", "at least 16"});
  wrong = doc;
  findWorkspaceBuffer(wrong, "hid")["shape"] = {16, 5};
  expectRejected(wrong, {"'hid'", "[16, 5]"});
}

TEST(PlanLoader, RejectsWorkspaceOutOfRange) {
  Json doc = readJson("ffn_fixed_train.json");
  Json wrong = doc;
  findWorkspaceBuffer(wrong, "grad_logits")["offset"] =
      doc["workspace"]["bytes"];
  expectRejected(wrong, {"buffer 'grad_logits'", "lies outside the workspace"});
  wrong = doc;
  findWorkspaceBuffer(wrong, "logits")["offset"] = 4;
  expectRejected(wrong, {"'workspace.buffers[0].offset'",
                         "offset 4 of buffer 'logits'", "alignment 64"});
  wrong = doc;
  findWorkspaceBuffer(wrong, "logits")["bytes"] = 16;
  expectRejected(wrong, {"reserves 16 bytes", "needs 128"});
  wrong = doc;
  wrong["workspace"]["alignment"] = 48;
  expectRejected(wrong, {"'workspace.alignment'", "48 is not a power of two"});
  wrong = doc;
  wrong["workspace"]["bytes"] = -1;
  expectRejected(wrong, {"'workspace.bytes'", "negative"});
}

TEST(PlanLoader, RejectsSizesThatOverflow64Bits) {
  Json doc = readJson("ffn_fixed_train.json");
  Json wrong = doc;
  // 2^40 * 2^40 elements do not fit in int64.
  findWorkspaceBuffer(wrong, "logits")["shape"] = {1LL << 40, 1LL << 40};
  expectRejected(wrong, {"buffer 'logits'", "more elements than fit in int64"});
  wrong = doc;
  // 2^62 elements fit; 2^62 * 4 bytes do not.
  findWorkspaceBuffer(wrong, "logits")["shape"] = {1LL << 31, 1LL << 31};
  expectRejected(wrong, {"buffer 'logits'", "byte size that overflows int64"});
  wrong = doc;
  findWorkspaceBuffer(wrong, "logits")["offset"] = 1LL << 62;
  findWorkspaceBuffer(wrong, "logits")["bytes"] = (1LL << 62) + (1LL << 61);
  expectRejected(wrong, {"lies outside the workspace"});
  wrong = doc;
  wrong["workspace"]["bytes"] = 18446744073709551615ULL;
  expectRejected(wrong, {"'workspace.bytes'", "does not fit in int64"});
  // Byte sizes past 32 bits are computed in int64: x is 2^20 x 2^12 f32 =
  // 2^34 bytes here.
  wrong = doc;
  wrong["layer"]["tokens"] = 1LL << 20;
  wrong["layer"]["model_dim"] = 1LL << 12;
  wrong["arguments"][0]["shape"] = {1LL << 20, 1LL << 11};
  expectRejected(wrong, {"'arguments[0].shape'", "[1048576, 2048]",
                         "expected [1048576, 4096]"});
}

TEST(PlanLoader, RejectsBrokenDataFlow) {
  Json doc = readJson("ffn_fixed_train.json");
  Json wrong = doc;
  wrong["variants"][0]["forward"].erase(0); // no router: logits unwritten
  expectRejected(wrong, {"'variants[0].forward[0].in.logits'",
                         "'logits' is read before any step writes it"});
  wrong = doc;
  wrong["variants"][0]["forward"][0]["out"]["logits"] = "x";
  expectRejected(wrong, {"'variants[0].forward[0].out.logits'",
                         "writes argument 'x' of role 'input'"});
  wrong = doc;
  // A step that writes an input argument.
  wrong["variants"][0]["backward"][8]["out"]["grad_wg"] = "wg";
  expectRejected(wrong, {"'variants[0].backward[8].out.grad_wg'",
                         "writes argument 'wg' of role 'input'"});
  wrong = doc;
  // router_backward adds into grad_x: dispatch_backward must write it first.
  std::swap(wrong["variants"][0]["backward"][6],
            wrong["variants"][0]["backward"][8]);
  expectRejected(wrong, {"'variants[0].backward[6].out.grad_x'",
                         "op 'router_backward' adds into 'grad_x', which no "
                         "earlier step writes"});
  wrong = doc;
  wrong["variants"][0]["forward"][3]["attrs"]["accumulate"] = true;
  expectRejected(wrong,
                 {"'variants[0].forward[3].out.c'", "adds into 'hid_pre'"});
  wrong = doc;
  wrong["variants"][0]["forward"].erase(6); // combine: out never written
  expectRejected(wrong, {"argument 'out' (role output) is written by no step"});
  wrong = doc;
  wrong["variants"][0]["backward"] = Json::array();
  expectRejected(wrong, {"'variants[0].backward'", "needs backward steps"});
  wrong = doc;
  wrong["variants"][0]["forward"].push_back(doc["variants"][0]["forward"][1]);
  expectRejected(wrong, {"more than one 'gate' step"});
}

TEST(PlanLoader, RejectsBadVariants) {
  Json doc = readJson("ffn_fixed_train.json");
  Json wrong = doc;
  wrong["default_variant"] = 2;
  expectRejected(
      wrong, {"'default_variant'", "index 2 is out of range", "2 variants"});
  wrong = doc;
  wrong["variants"][1]["name"] = "padded";
  expectRejected(wrong, {"'variants[1].name'", "'padded' is used twice"});
  wrong = doc;
  wrong["variants"] = Json::array();
  expectRejected(wrong, {"at least one variant"});
  wrong = readJson("gated_bounded_infer.json");
  wrong["variants"][0]["backward"] = doc["variants"][0]["backward"];
  expectRejected(wrong, {"'variants[0].backward", "defined by no argument"});
}

// Format 2: a plan that loads computes the layer, so the liveness check
// always runs (it used to be on request only).
TEST(PlanLoader, OverlapCheckAlwaysRuns) {
  Json doc = readJson("ffn_fixed_train.json");
  // scores and indices are both live from gate to gate_backward.
  findWorkspaceBuffer(doc, "indices")["offset"] =
      findWorkspaceBuffer(doc, "scores")["offset"];
  expectRejected(doc, {"buffer 'indices'", "overlaps buffer 'scores'",
                       "while both are live"});
}

// The corrupted plans a fuzzer once found loading and running with wrong
// outputs (issue 10): each is now rejected, naming the field.
TEST(PlanLoader, RejectsAGemmStepWithoutItsAttributes) {
  Json doc = readJson("ffn_fixed_train.json");
  for (Json &step : doc["variants"][0]["forward"])
    if (step["op"] == "grouped_gemm") {
      step.erase("attrs"); // the epilogue used to become 'none' silently
      break;
    }
  expectRejected(doc, {".attrs.trans_b'", "missing (required by op "
                                          "'grouped_gemm')"});
  doc = readJson("ffn_fixed_train.json");
  for (Json &step : doc["variants"][0]["forward"])
    if (step["op"] == "grouped_gemm") {
      step["attrs"].erase("epilogue");
      break;
    }
  expectRejected(doc, {".attrs.epilogue'", "missing"});
  // An attribute the kind does not take is not ignored either.
  doc = readJson("ffn_fixed_train.json");
  doc["variants"][0]["forward"][0]["attrs"]["epilogue"] = "relu";
  expectRejected(doc, {"'variants[0].forward[0].attrs.epilogue'",
                       "op 'router' takes no epilogue attribute"});
}

TEST(PlanLoader, RejectsARepeatedStep) {
  Json doc = readJson("ffn_fixed_train.json");
  Json &backward = doc["variants"][0]["backward"];
  // router_backward adds into grad_x: twice is twice the gradient.
  int last = static_cast<int>(backward.size()) - 1;
  ASSERT_EQ(backward[last]["op"], "router_backward");
  backward.push_back(backward[last]);
  const std::string repeated =
      "'variants[0].backward[" + std::to_string(last + 1) + "]'";
  const std::string original =
      "repeats variants[0].backward[" + std::to_string(last) + "]";
  expectRejected(doc, {repeated.c_str(), original.c_str()});
  // Any step, anywhere in the pass, with nothing written in between.
  doc = readJson("ffn_fixed_train.json");
  Json &forward = doc["variants"][0]["forward"];
  forward.insert(forward.begin() + 3, forward[2]);
  expectRejected(doc, {"'variants[0].forward[3]'", "repeats"});
}

TEST(PlanLoader, RejectsAGateThatDisagreesWithTheLayer) {
  Json doc = readJson("ffn_fixed_train.json");
  doc["layer"]["capacity_factor"] = 2.0;
  expectRejected(doc, {"'variants[0].forward[1].attrs.capacity_factor'",
                       "disagrees with the layer's capacity_factor"});
  doc = readJson("ffn_fixed_train.json");
  doc["variants"][0]["forward"][1]["attrs"]["normalize"] =
      !doc["layer"]["normalize_gate"].get<bool>();
  expectRejected(doc, {".attrs.normalize'", "disagrees with the layer's"});
}

// What the fuzz property found loading and computing another layer once the
// four kinds above were closed (docs/Runtime.md, "Fuzzing the loader").
TEST(PlanLoader, RejectsStepsThatReadTheWrongValue) {
  auto edit = [](auto change) {
    Json doc = readJson("ffn_fixed_train.json");
    change(doc["variants"][0]);
    return doc;
  };
  // A bias no step reads: the layer adds it.
  expectRejected(
      edit([](Json &v) { v["forward"][5]["in"].erase("bias"); }),
      {"'variants[0].forward'", "argument 'b2'", "is read by no step"});
  // Locations read as indices would index experts out of range.
  expectRejected(
      edit([](Json &v) { v["forward"][6]["in"]["indices"] = "locations"; }),
      {"'variants[0].forward[6].in.indices'", "'locations' is read as indices",
       "written as locations"});
  // The router's backward multiplies by x, not by the output's gradient.
  expectRejected(
      edit([](Json &v) { v["backward"][8]["in"]["x"] = "grad_out"; }),
      {"'variants[0].backward[8].in.x'", "the layer's argument 'x'"});
  // A GEMM's b is an expert weight, never a computed value.
  expectRejected(
      edit([](Json &v) { v["backward"][2]["in"]["b"] = "grad_w2"; }),
      {"'variants[0].backward[2].in.b'", "'grad_w2' is not an expert weight"});
  expectRejected(
      edit([](Json &v) { v["forward"][5]["attrs"]["bias_scale"] = 0.5; }),
      {"'variants[0].forward[5].attrs.bias_scale'", "not sharded"});
  expectRejected(
      edit([](Json &v) { v["forward"][1]["attrs"]["noise"] = 0.5; }),
      {"'variants[0].forward[1].attrs.noise'", "disagree with the layer's"});
}

// Square experts (d == h, a compiled SwiGLU layer): every shape agrees
// whichever weight or transpose a GEMM takes, so only the rules tell.
TEST(PlanLoader, RejectsGemmsTheWrongWayRoundOnSquareExperts) {
  const Json seed = readJson("fuzz/small_swiglu_bf16.json");
  ASSERT_EQ(seed["layer"]["model_dim"], seed["layer"]["hidden_dim"]);
  // The forward multiplies by the weights, the backward by their transposes.
  Json doc = seed;
  doc["variants"][0]["forward"][6]["attrs"]["trans_b"] = true;
  expectRejected(doc, {"'variants[0].forward[6].attrs.trans_b'",
                       "trans_b true in a forward"});
  doc = seed;
  doc["variants"][0]["backward"][2]["attrs"]["trans_b"] = false;
  expectRejected(doc, {"'variants[0].backward[2].attrs.trans_b'",
                       "trans_b false in a backward"});
  // The gradients go back through every weight: a backward GEMM through
  // w3 in place of w1 leaves w1 unread.
  doc = seed;
  ASSERT_EQ(doc["variants"][0]["backward"][6]["in"]["b"], "w1");
  doc["variants"][0]["backward"][6]["in"]["b"] = "w3";
  expectRejected(doc, {"'variants[0].backward'", "argument 'w1'",
                       "read by no backward step"});
  // Reading a weight only through a buffer gathered from it counts: the
  // data-parallel variants of the multi-rank plans load (MultiRankTest).
}

//===----------------------------------------------------------------------===//
// grouped_gemm_glu
//===----------------------------------------------------------------------===//

namespace {

/// The checked-in CUDA test plan `name` (unittests/Cuda/plans).
Json readCudaJson(const std::string &name) {
  std::ifstream file(std::string(FLEX_TEST_CUDA_PLANS_DIR) + "/" + name);
  return Json::parse(file);
}

/// `doc` with its glu steps fused (test::fuseGluSteps), expecting `count`.
Json fused(Json doc, bool keepProducts, int count = 1) {
  EXPECT_EQ(test::fuseGluSteps(doc, keepProducts), count);
  return doc;
}

} // namespace

// The fused step loads wherever the triple it replaces did: padded and
// ragged, a received buffer's chunks (uniform_segments) on two ranks,
// gathered through row_tokens; training keeps the products for
// glu_backward.
TEST(PlanLoader, AcceptsGluFusedSteps) {
  struct Case {
    Json doc;
    bool keep;
    int steps;
  };
  LayerConfig layer;
  layer.tokens = 40;
  layer.modelDim = 16;
  layer.hiddenDim = 24;
  layer.experts = 4;
  layer.topK = 2;
  layer.capacityMode = CapacityMode::Dropless;
  layer.expertKind = ExpertKind::Gated;
  layer.dtype = DType::BF16;
  const Case cases[] = {
      {readJson("gated_fixed_train.json"), true, 1},
      {readJson("gated_bounded_infer.json"), false, 1},
      {readJson("gated_bounded_infer.json"), true, 1},
      {readJson("mr_gated_bounded_w2_train_bf16.json"), true, 5},
      {readCudaJson("small_swiglu_bf16_gather_train.json"), true, 2},
      {Json::parse(test::swigluInferencePlan(layer, DispatchLayout::Ragged,
                                             /*gathered=*/true)),
       false, 1},
      {Json::parse(test::swigluInferencePlan(layer, DispatchLayout::Padded,
                                             /*gathered=*/false)),
       false, 1}};
  for (const Case &c : cases) {
    Plan plan;
    Status status = parsePlan(fused(c.doc, c.keep, c.steps).dump(), plan);
    ASSERT_TRUE(status.isOk()) << c.doc["layer"] << ": " << status.message();
    int steps = 0;
    for (const Variant &variant : plan.variants)
      for (const Step &step : variant.forward)
        if (step.op == StepOp::GroupedGemmGlu) {
          ++steps;
          EXPECT_EQ(step.out(OperandRole::GateIn).isValid(), c.keep);
          EXPECT_EQ(step.out(OperandRole::UpIn).isValid(), c.keep);
          EXPECT_TRUE(step.facts.routing.isValid() ||
                      step.facts.segments.isValid());
        }
    EXPECT_EQ(steps, c.steps);
  }
  // Training without the products: glu_backward reads what no step wrote.
  expectRejected(fused(readJson("gated_fixed_train.json"), false), {"'g_in'"});
}

// Each operand rule of grouped_gemm_glu, named by its field.
TEST(PlanLoader, RejectsGluFusedStepsThatBreakTheirRules) {
  // gated_fixed_train: d 6, h 8; the fused step is forward[3].
  const Json doc = fused(readJson("gated_fixed_train.json"), true);
  ASSERT_EQ(doc["variants"][0]["forward"][3]["op"], "grouped_gemm_glu");
  auto edit = [&](auto change) {
    Json wrong = doc;
    change(wrong["variants"][0]["forward"][3]);
    return wrong;
  };
  expectRejected(edit([](Json &s) { s["in"]["b"] = "w2"; }),
                 {"'variants[0].forward[3].in.b'", "buffer 'w2'",
                  "has K = 8 but a 'disp' has K = 6"});
  expectRejected(edit([](Json &s) { s["in"]["b_up"] = "w2"; }),
                 {"'variants[0].forward[3].in.b_up'",
                  "buffer 'w2' has shape [4, 8, 6]",
                  "expected the shape of b 'w1' [4, 6, 8]"});
  expectRejected(
      edit([](Json &s) { s["out"]["c"] = "y"; }),
      {"'variants[0].forward[3].out.c'", "buffer 'y'", "c [R, N], R of a"});
  expectRejected(
      edit([](Json &s) { s["out"]["up_in"] = "y"; }),
      {"'variants[0].forward[3].out.up_in'", "buffer 'y'", "up_in [R, N]"});
  expectRejected(edit([](Json &s) { s["out"].erase("up_in"); }),
                 {"'variants[0].forward[3].out.up_in'",
                  "writes gate_in and up_in together or neither",
                  "gate_in 'g_in' but no up_in"});
  expectRejected(
      edit([](Json &s) { s["out"].erase("gate_in"); }),
      {"'variants[0].forward[3].out.gate_in'", "up_in 'u_in' but no gate_in"});
  expectRejected(edit([](Json &s) { s["in"].erase("b_up"); }),
                 {"'variants[0].forward[3]", "b_up"});
  expectRejected(edit([](Json &s) { s["in"]["a"] = "hid"; }),
                 {"'variants[0].forward[3].in.b'", "has K = 6 but a 'hid'"});
  // The dispatch layout's rows: a [R, K] with R at least E * C.
  Json shortRows = doc;
  findWorkspaceBuffer(shortRows, "g_in")["shape"] = {12, 8};
  expectRejected(shortRows, {"'variants[0].forward[3].out.gate_in'",
                             "buffer 'g_in' has shape [12, 8]"});
  // One dtype: the products are rounded to c's and read back in it.
  Json mixed = doc;
  Json &gate = findWorkspaceBuffer(mixed, "g_in");
  gate["dtype"] = "bf16";
  gate["bytes"] = gate["bytes"].get<int64_t>() / 2;
  expectRejected(mixed, {"'variants[0].forward[3].out.gate_in'",
                         "buffer 'g_in' has dtype bf16",
                         "computes in one dtype, a's ('disp', f32)"});
}

// The weights are w1 (b) and w3 (b_up): on square experts every weight has
// their shape. A gathered step reads x through a row map dispatch_rows
// wrote.
TEST(PlanLoader, RejectsGluFusedStepsOnTheWrongValues) {
  const Json square = fused(readJson("fuzz/small_swiglu_bf16.json"), true);
  ASSERT_EQ(square["variants"][0]["forward"][3]["op"], "grouped_gemm_glu");
  Json wrong = square;
  wrong["variants"][0]["forward"][3]["in"]["b_up"] = "w2";
  expectRejected(wrong, {"'variants[0].forward[3].in.b_up'",
                         "buffer 'w2' is not the up projection's expert "
                         "weight (w3, or what an all_gather gathered from "
                         "it)"});
  wrong = square;
  wrong["variants"][0]["forward"][3]["in"]["b"] = "w3";
  wrong["variants"][0]["forward"][3]["in"]["b_up"] = "w1";
  expectRejected(wrong, {"'variants[0].forward[3].in.b'",
                         "buffer 'w3' is not the gate's expert weight (w1"});

  Json gathered =
      fused(readCudaJson("small_swiglu_bf16_gather_train.json"), true, 2);
  const Json &step = gathered["variants"][1]["forward"][3];
  ASSERT_EQ(step["op"], "grouped_gemm_glu");
  ASSERT_TRUE(step["in"].contains("row_tokens"));
  auto edit = [&](auto change) {
    Json doc = gathered;
    change(doc["variants"][1]["forward"][3]);
    return doc;
  };
  expectRejected(edit([](Json &s) { s["in"]["a"] = "dispatched"; }),
                 {"'variants[1].forward[3].in.a'", "buffer 'dispatched'",
                  "with row_tokens, a is the layer's tokens [T, K], T = "
                  "1000"});
  expectRejected(
      edit([](Json &s) { s["in"]["a"] = "grad_out"; }),
      {"'variants[1].forward[3].in.a'", "is not the layer's input x"});
  expectRejected(
      edit(
          [](Json &s) { s["in"]["row_tokens"] = "single+gather.expert_rows"; }),
      {"'variants[1].forward[3].in.row_tokens'", "row_tokens [R] i32"});
  expectRejected(
      edit([](Json &s) { s["out"]["c"] = "single+gather.expert_out"; }),
      {"'variants[1].forward[3].out.c'", "R of row_tokens"});
}

//===----------------------------------------------------------------------===//
// grouped_gemm_activation_backward
//===----------------------------------------------------------------------===//

// The fused step loads wherever the pair it replaces did: ragged and padded,
// each chunk of a pipelined backward on two ranks.
TEST(PlanLoader, AcceptsActivationBackwardFusedSteps) {
  // Every variant's pairs: padded and ragged; one rank's, and on two ranks
  // ep1, ep2 (two chunks), dp, ex2 (two chunks).
  const std::pair<const char *, int> cases[] = {
      {"ffn_dropless_ragged_train.json", 1},
      {"ffn_fixed_train.json", 2},
      {"mr_ffn_fixed_w2_train.json", 6}};
  for (auto [name, count] : cases) {
    Json doc = readJson(name);
    ASSERT_EQ(test::fuseActivationBackwardSteps(doc), count) << name;
    Plan plan;
    Status status = parsePlan(doc.dump(), plan);
    ASSERT_TRUE(status.isOk()) << name << ": " << status.message();
    int steps = 0;
    for (const Variant &variant : plan.variants)
      for (const Step &step : variant.backward) {
        EXPECT_NE(step.op, StepOp::ActivationBackward) << name;
        if (step.op == StepOp::GroupedGemmActivationBackward) {
          ++steps;
          EXPECT_TRUE(step.attrs.transB);
          EXPECT_TRUE(step.facts.routing.isValid() ||
                      step.facts.segments.isValid());
        }
      }
    EXPECT_EQ(steps, count) << name;
  }
}

// Each rule of grouped_gemm_activation_backward, named by its field.
TEST(PlanLoader, RejectsActivationBackwardFusedStepsThatBreakTheirRules) {
  // ffn_dropless_ragged_train: d 8, h 12, f32; the fused step is
  // backward[2].
  Json doc = readJson("ffn_dropless_ragged_train.json");
  ASSERT_EQ(test::fuseActivationBackwardSteps(doc), 1);
  ASSERT_EQ(doc["variants"][0]["backward"][2]["op"],
            "grouped_gemm_activation_backward");
  auto edit = [&](auto change) {
    Json wrong = doc;
    change(wrong["variants"][0]["backward"][2]);
    return wrong;
  };
  expectRejected(edit([](Json &s) { s["in"]["pre"] = "grad_y"; }),
                 {"'variants[0].backward[2].in.pre'", "buffer 'grad_y'",
                  "pre [R, N], R of a"});
  expectRejected(edit([](Json &s) { s["in"].erase("pre"); }),
                 {"'variants[0].backward[2].in.pre': missing"});
  expectRejected(edit([](Json &s) { s["out"]["c"] = "hid_pre"; }),
                 {"'variants[0].backward[2].out.c'",
                  "buffer 'hid_pre' is also the step's pre",
                  "writes its outputs apart from what it reads"});
  expectRejected(edit([](Json &s) { s["in"]["b"] = "w1"; }),
                 {"'variants[0].backward[2].in.b'", "buffer 'w1'",
                  "has K = 12 but a 'grad_y' has "
                  "K = 8"});
  expectRejected(edit([](Json &s) { s["attrs"]["trans_b"] = false; }),
                 {"'variants[0].backward[2].in.b'"});
  expectRejected(edit([](Json &s) { s["attrs"].erase("activation"); }),
                 {"activation"});
  // b is an expert weight, never a value steps computed (grad_w2 has
  // w2's shape).
  expectRejected(edit([](Json &s) { s["in"]["b"] = "grad_w2"; }),
                 {"'variants[0].backward[2].in.b'",
                  "buffer 'grad_w2' is not an expert weight"});
  // One dtype: the product is rounded to c's and scaled in it.
  Json mixed = doc;
  Json &pre = findWorkspaceBuffer(mixed, "hid_pre");
  pre["dtype"] = "bf16";
  pre["bytes"] = pre["bytes"].get<int64_t>() / 2;
  expectRejected(mixed, {"'variants[0].backward[2].in.pre'",
                         "buffer 'hid_pre' has dtype bf16",
                         "computes in one dtype, a's ('grad_y', f32)"});
}

// grouped_gemm_combine loads as the compiler writes it (a decode plan's
// combine-fused variants, with and without row_tokens), and each of its
// rules is named by its field.
TEST(PlanLoader, CombineFusedStepsLoadAndKeepTheirRules) {
  std::ifstream file(std::string(FLEX_TEST_CUDA_PLANS_DIR) +
                     "/decode_ffn_bias_bf16_combine.json");
  const Json doc = Json::parse(file);
  {
    Plan plan;
    Status status = parsePlan(doc.dump(), plan);
    ASSERT_TRUE(status.isOk()) << status.message();
    ASSERT_EQ(plan.variants.size(), 4u);
    for (size_t v = 0; v < 4; ++v) {
      int fused = 0;
      for (const Step &step : plan.variants[v].forward) {
        EXPECT_NE(step.op,
                  v >= 2 ? StepOp::Combine : StepOp::GroupedGemmCombine);
        if (step.op != StepOp::GroupedGemmCombine)
          continue;
        ++fused;
        EXPECT_EQ(step.in(OperandRole::RowTokens).isValid(), v == 3);
        EXPECT_FALSE(step.gathersA());
        EXPECT_TRUE(step.facts.routing.isValid());
      }
      EXPECT_EQ(fused, v >= 2 ? 1 : 0);
    }
  }
  // single+gather+combine: forward[4] is the fused step.
  ASSERT_EQ(doc["variants"][3]["forward"][4]["op"], "grouped_gemm_combine");
  auto edit = [&](auto change) {
    Json wrong = doc;
    change(wrong["variants"][3]["forward"][4]);
    return wrong;
  };
  const std::string v = "single+gather+combine.";
  // c holds the rows the combine sums: [R, d].
  expectRejected(edit([&](Json &s) { s["out"]["c"] = v + "hidden"; }),
                 {"'variants[3].forward[4].out.c'",
                  "expected [256, 256] (c [R, N], R of a)"});
  expectRejected(edit([&](Json &s) { s["in"]["b"] = "w1"; }),
                 {"'variants[3].forward[4].in.b'", "buffer 'w1'"});
  expectRejected(edit([](Json &s) { s["attrs"]["trans_b"] = true; }),
                 {"'variants[3].forward[4].in.b'"});
  expectRejected(edit([](Json &s) { s["in"]["bias"] = "b1"; }),
                 {"'variants[3].forward[4].in.bias'", "buffer 'b1'"});
  expectRejected(edit([&](Json &s) { s["in"]["row_tokens"] = v + "indices"; }),
                 {"'variants[3].forward[4].in.row_tokens'"});
  expectRejected(edit([](Json &s) { s["in"].erase("gates"); }),
                 {"'variants[3].forward[4].in.gates': missing"});
  expectRejected(edit([](Json &s) { s["attrs"].erase("bias_scale"); }),
                 {"bias_scale"});
}

// The GLU's fused backward loads wherever its pair did (every variant of
// one rank's and two ranks' gated plans), and each of its rules is named.
TEST(PlanLoader, GluBackwardFusedStepsLoadAndKeepTheirRules) {
  for (auto [name, count] :
       {std::pair{"gated_fixed_train.json", 1},
        std::pair{"mr_gated_bounded_w2_train_bf16.json", 5}}) {
    Json doc = readJson(name);
    ASSERT_EQ(test::fuseActivationBackwardSteps(doc), count) << name;
    Plan plan;
    Status status = parsePlan(doc.dump(), plan);
    ASSERT_TRUE(status.isOk()) << name << ": " << status.message();
    int steps = 0;
    for (const Variant &variant : plan.variants)
      for (const Step &step : variant.backward) {
        EXPECT_NE(step.op, StepOp::GluBackward) << name;
        steps += step.op == StepOp::GroupedGemmGluBackward;
      }
    EXPECT_EQ(steps, count) << name;
  }
  // gated_fixed_train: d 6, h 8, f32; the fused step is backward[2].
  Json doc = readJson("gated_fixed_train.json");
  ASSERT_EQ(test::fuseActivationBackwardSteps(doc), 1);
  ASSERT_EQ(doc["variants"][0]["backward"][2]["op"],
            "grouped_gemm_glu_backward");
  auto edit = [&](auto change) {
    Json wrong = doc;
    change(wrong["variants"][0]["backward"][2]);
    return wrong;
  };
  expectRejected(edit([](Json &s) { s["in"]["up_in"] = "grad_y"; }),
                 {"'variants[0].backward[2].in.up_in'", "buffer 'grad_y'",
                  "up_in [R, N], R of a"});
  expectRejected(edit([](Json &s) { s["out"]["grad_up_in"] = "u_in"; }),
                 {"'variants[0].backward[2].out.grad_up_in'",
                  "buffer 'u_in' is also the step's up_in",
                  "writes its outputs apart from what it reads"});
  expectRejected(edit([](Json &s) { s["out"]["grad_up_in"] = "grad_g_in"; }),
                 {"'variants[0].backward[2].out.grad_up_in'",
                  "is also the step's grad_gate_in"});
  expectRejected(edit([](Json &s) { s["in"].erase("gate_in"); }),
                 {"'variants[0].backward[2].in.gate_in': missing"});
  Json mixed = doc;
  Json &gate = findWorkspaceBuffer(mixed, "g_in");
  gate["dtype"] = "bf16";
  gate["bytes"] = gate["bytes"].get<int64_t>() / 2;
  expectRejected(mixed, {"'variants[0].backward[2].in.gate_in'",
                         "buffer 'g_in' has dtype bf16",
                         "computes in one dtype, a's ('grad_y', f32)"});
}

// Damaged documents (cut anywhere, bytes flipped) give a Status, never a
// crash or an exception.
TEST(PlanLoader, SurvivesDamagedDocuments) {
  std::string text = readTestPlan("ffn_dropless_ragged_train.json");
  Plan plan;
  for (size_t cut = 0; cut < text.size(); cut += 37)
    EXPECT_FALSE(parsePlan(text.substr(0, cut), plan).isOk());
  std::mt19937 random(1234);
  int accepted = 0;
  for (int trial = 0; trial < 300; ++trial) {
    std::string damaged = text;
    for (int flips = 0; flips < 3; ++flips)
      damaged[random() % damaged.size()] = static_cast<char>(random() % 128);
    Status status = parsePlan(damaged, plan);
    if (status.isOk())
      ++accepted;
    else
      EXPECT_EQ(status.code(), StatusCode::InvalidPlan);
  }
  EXPECT_LT(accepted, 300);
}
