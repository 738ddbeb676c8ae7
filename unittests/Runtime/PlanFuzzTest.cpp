//===- PlanFuzzTest.cpp - The fuzz property on seeded mutations -----------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file runs the plan loader's fuzz property (PlanFuzzProperty.h) in CI
// without libFuzzer: the compiled seeds of plans/fuzz load and compute the
// layer, issue 10's four corrupted plans are rejected naming the field, and
// a few hundred seeded mutations of the seeds (a number nudged, a key
// removed, a step repeated or dropped, two buffers made to share bytes) are
// each rejected with InvalidPlan or compute the layer.
//
//===----------------------------------------------------------------------===//

#include "PlanFuzzProperty.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <random>
#include <sstream>

using namespace flex::test;
using ::testing::HasSubstr;
using Json = nlohmann::ordered_json;

namespace {

std::string readSeed(const std::string &name) {
  std::ifstream in(std::string(FLEX_TEST_PLANS_DIR) + "/fuzz/" + name);
  std::stringstream text;
  text << in.rdbuf();
  EXPECT_FALSE(text.str().empty()) << name;
  return text.str();
}

const char *const kCompiled[] = {"small_ffn.json", "small_swiglu_bf16.json",
                                 "c1_ffn_relu.json"};

/// Every value of `doc` with its JSON pointer.
void collect(const Json &doc, const Json::json_pointer &at,
             std::vector<Json::json_pointer> &out) {
  out.push_back(at);
  if (doc.is_object())
    for (auto it = doc.begin(); it != doc.end(); ++it)
      collect(it.value(), at / it.key(), out);
  else if (doc.is_array())
    for (size_t i = 0; i < doc.size(); ++i)
      collect(doc[i], at / i, out);
}

/// One seeded structural mutation of `doc`.
void mutate(Json &doc, std::mt19937_64 &rng) {
  std::vector<Json::json_pointer> all;
  collect(doc, Json::json_pointer(), all);
  Json::json_pointer at = all[rng() % (all.size() - 1) + 1];
  Json &value = doc[at];
  Json &parent = doc[at.parent_pointer()];
  switch (rng() % 6) {
  case 0: // a number nudged
    if (value.is_number_integer()) {
      const int64_t deltas[] = {1, -1, 2, 8, 16, -16, 1000};
      value = value.get<int64_t>() + deltas[rng() % 7];
      return;
    }
    if (value.is_number_float()) {
      value = value.get<double>() * (rng() % 2 ? 2.0 : 0.5);
      return;
    }
    if (value.is_boolean()) {
      value = !value.get<bool>();
      return;
    }
    [[fallthrough]];
  case 1: // a number set to a boundary
    if (value.is_number()) {
      const int64_t values[] = {0, -1, 1, 3, 1 << 20};
      value = values[rng() % 5];
      return;
    }
    [[fallthrough]];
  case 2: // removed
    if (parent.is_object())
      parent.erase(at.back());
    else
      parent.erase(static_cast<size_t>(std::stoul(at.back())));
    return;
  case 3: // an array element repeated
    if (parent.is_array()) {
      size_t i = std::stoul(at.back());
      parent.insert(parent.begin() + i, parent[i]);
      return;
    }
    [[fallthrough]];
  case 4: { // a string swapped for another of the document
    std::vector<Json::json_pointer> strings;
    for (const Json::json_pointer &p : all)
      if (doc[p].is_string())
        strings.push_back(p);
    if (value.is_string() && !strings.empty()) {
      value = doc[strings[rng() % strings.size()]];
      return;
    }
    [[fallthrough]];
  }
  default: { // a workspace buffer moved onto another's bytes
    Json &buffers = doc["workspace"]["buffers"];
    size_t a = rng() % buffers.size(), b = rng() % buffers.size();
    buffers[a]["offset"] = buffers[b]["offset"];
    return;
  }
  }
}

} // namespace

TEST(PlanFuzz, CompiledSeedsComputeTheLayer) {
  for (const char *name : kCompiled) {
    PlanVerdict verdict = checkPlanProperty(readSeed(name));
    EXPECT_EQ(verdict.kind, PlanVerdict::Computes)
        << name << ": " << verdict.message;
  }
}

// Issue 10's four kinds, each rejected naming the field.
TEST(PlanFuzz, IssueTenMutantsAreRejectedNamingTheField) {
  std::pair<const char *, const char *> mutants[] = {
      {"mut_live_overlap.json", "workspace.buffers"},
      {"mut_gemm_without_attrs.json", "attrs"},
      {"mut_backward_step_repeated.json", "backward["},
      {"mut_capacity_factor_disagrees.json", "capacity_factor"}};
  for (auto [name, field] : mutants) {
    PlanVerdict verdict = checkPlanProperty(readSeed(name));
    EXPECT_EQ(verdict.kind, PlanVerdict::Rejected)
        << name << ": " << verdict.message;
    EXPECT_THAT(verdict.message, HasSubstr(field)) << name;
  }
}

// Seeded, so a failure names a mutant that reproduces.
TEST(PlanFuzz, SeededMutationsAreRejectedOrComputeTheLayer) {
  int counts[4] = {};
  for (int i = 0; i < 600; ++i) {
    std::mt19937_64 rng(i);
    Json doc = Json::parse(readSeed(kCompiled[i % 3]));
    for (int n = 1 + rng() % 2; n > 0; --n)
      mutate(doc, rng);
    std::string text = doc.dump();
    PlanVerdict verdict = checkPlanProperty(text, i);
    ++counts[verdict.kind];
    EXPECT_NE(verdict.kind, PlanVerdict::Finding)
        << "mutant " << i << " of " << kCompiled[i % 3] << ": "
        << verdict.message << "\n"
        << text;
  }
  // Most mutants are rejected; some (a changed seed, a larger workspace)
  // still compute the layer.
  EXPECT_GT(counts[PlanVerdict::Rejected], 200);
  EXPECT_GT(counts[PlanVerdict::Computes], 0);
  std::printf("rejected %d, computes %d, loaded (not run) %d\n",
              counts[PlanVerdict::Rejected], counts[PlanVerdict::Computes],
              counts[PlanVerdict::Loaded]);
}
