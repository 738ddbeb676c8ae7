//===- RuntimeOptions.cpp - The behaviour knobs of the runtime ------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements RuntimeOptions: the text form of each option, shared
// by set(), the environment and the C API, and fromEnvironment, the one place
// the FLEX_* behaviour variables are read.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/Core/RuntimeOptions.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <sstream>

namespace flex {

namespace {

Status badValue(const std::string &label, std::string_view value,
                const std::string &allowed) {
  return Status(StatusCode::InvalidArgument,
                label + "='" + std::string(value) + "': expected " + allowed);
}

constexpr const char *kBoolValues = "1 or 0 (also true/false, on/off, yes/no)";

bool parseBool(std::string_view text, bool &value) {
  for (std::string_view on : {"1", "true", "on", "yes"})
    if (text == on)
      return value = true, true;
  for (std::string_view off : {"0", "false", "off", "no"})
    if (text == off)
      return value = false, true;
  return false;
}

Status unknownOption(std::string_view name) {
  std::string names;
  for (const RuntimeOptions::Entry &entry : RuntimeOptions::entries())
    names += (names.empty() ? "" : ", ") + std::string(entry.name);
  return Status(StatusCode::NotFound, "unknown runtime option '" +
                                          std::string(name) +
                                          "'; the options are: " + names);
}

/// Sets option `name` from `value`; `label` names the source in messages
/// (the option, or its environment variable).
Status setOption(RuntimeOptions &options, std::string_view name,
                 std::string_view value, const std::string &label) {
  if (name == "variant") {
    options.variant = std::string(value);
    return Status::ok();
  }
  if (name == "profile") {
    options.profile = std::string(value);
    return Status::ok();
  }
  if (name == "check_nonfinite" || name == "cuda_graph" ||
      name == "cuda_overlap" || name == "refine_variant" ||
      name == "relu_in_gemm" || name == "wgmma") {
    bool flag = false;
    if (!parseBool(value, flag))
      return badValue(label, value, kBoolValues);
    (name == "check_nonfinite" ? options.checkNonFinite
     : name == "cuda_graph"    ? options.cudaGraph
     : name == "cuda_overlap"  ? options.cudaOverlap
     : name == "relu_in_gemm"  ? options.reluInGemm
     : name == "wgmma"         ? options.wgmma
                               : options.refineVariant) = flag;
    return Status::ok();
  }
  if (name == "a2a_staging") {
    if (value == "auto")
      options.a2aStaging = ExchangeStaging::Auto;
    else if (value == "always" || value == "1")
      options.a2aStaging = ExchangeStaging::Always;
    else if (value == "never" || value == "0")
      options.a2aStaging = ExchangeStaging::Never;
    else
      return badValue(label, value,
                      "auto, always (or 1) or never (or 0): whether "
                      "all_to_all packs its rows per peer first");
    return Status::ok();
  }
  if (name == "grouped_gemm") {
    if (value == "auto")
      options.groupedGemm = GroupedGemmImpl::Auto;
    else if (value == "device")
      options.groupedGemm = GroupedGemmImpl::Device;
    else if (value == "cublas")
      options.groupedGemm = GroupedGemmImpl::Cublas;
    else
      return badValue(label, value,
                      "auto, device (the device-sized kernel: no host read "
                      "of the counts, graph-recordable) or cublas (the "
                      "counts read to the host, then cuBLAS)");
    return Status::ok();
  }
  if (name == "wgmma_tile") {
    if (value == "auto")
      options.wgmmaTile = WgmmaTile::Auto;
    else if (value == "wide")
      options.wgmmaTile = WgmmaTile::Wide;
    else if (value == "pair")
      options.wgmmaTile = WgmmaTile::Pair;
    else if (value == "cooperative")
      options.wgmmaTile = WgmmaTile::Cooperative;
    else if (value == "ping-pong")
      options.wgmmaTile = WgmmaTile::PingPong;
    else
      return badValue(label, value,
                      "auto, wide (128 x 256), pair (128 x 256 in clusters "
                      "of 2), cooperative or ping-pong (128 x 128)");
    return Status::ok();
  }
  if (name == "a2a_transport") {
    if (value == "nccl")
      options.a2aTransport = AllToAllTransport::Nccl;
    else if (value == "ce")
      options.a2aTransport = AllToAllTransport::CopyEngine;
    else
      return badValue(label, value,
                      "'nccl' (NCCL's kernels) or 'ce' (the copy engines, "
                      "ranks on one host)");
    return Status::ok();
  }
  if (name == "gemm_streams") {
    const std::string text(value);
    char *end = nullptr;
    const long streams = std::strtol(text.c_str(), &end, 10);
    if (text.empty() || *end || streams < 1 || streams > kMaxGemmStreams)
      return badValue(label, value,
                      "a whole number from 1 to " +
                          std::to_string(kMaxGemmStreams) +
                          " (the streams a dynamic routing's per-expert "
                          "GEMMs spread over; 1: one after another)");
    options.gemmStreams = static_cast<int>(streams);
    return Status::ok();
  }
  if (name == "max_workspace_mib") {
    const std::string text(value);
    char *end = nullptr;
    errno = 0;
    const long long mib = std::strtoll(text.c_str(), &end, 10);
    // Up to 2^40 MiB, so the bytes fit in int64_t.
    if (text.empty() || *end || errno || mib < 0 || mib > (1LL << 40))
      return badValue(label, value,
                      "a whole number of MiB from 0 (no bound) to 2^40: "
                      "the most the executor's own workspace grows to");
    options.maxWorkspaceMib = mib;
    return Status::ok();
  }
  if (name == "collective_timeout_s") {
    std::string text(value);
    char *end = nullptr;
    double seconds = std::strtod(text.c_str(), &end);
    if (text.empty() || *end || !std::isfinite(seconds) || seconds <= 0)
      return badValue(
          label, value,
          "a number of seconds > 0 (the bounded wait of every collective; "
          "default " +
              std::to_string(
                  static_cast<int>(kDefaultCollectiveTimeoutSeconds)) +
              ")");
    options.collectiveTimeoutSeconds = seconds;
    return Status::ok();
  }
  return unknownOption(name);
}

} // namespace

const std::vector<RuntimeOptions::Entry> &RuntimeOptions::entries() {
  static const std::vector<Entry> table = {
      {"variant", "FLEX_VARIANT"},
      {"check_nonfinite", "FLEX_CHECK_NAN"},
      {"cuda_graph", "FLEX_CUDA_GRAPH"},
      {"cuda_overlap", "FLEX_CUDA_OVERLAP"},
      {"a2a_staging", "FLEX_A2A_STAGING"},
      {"a2a_transport", "FLEX_A2A_TRANSPORT"},
      {"collective_timeout_s", "FLEX_COLLECTIVE_TIMEOUT_S"},
      {"profile", "FLEX_PROFILE"},
      {"refine_variant", "FLEX_REFINE_VARIANT"},
      {"grouped_gemm", "FLEX_GROUPED_GEMM"},
      {"relu_in_gemm", "FLEX_RELU_IN_GEMM"},
      {"wgmma", "FLEX_WGMMA"},
      {"wgmma_tile", "FLEX_WGMMA_TILE"},
      {"gemm_streams", "FLEX_GEMM_STREAMS"},
      {"max_workspace_mib", "FLEX_MAX_WORKSPACE_MIB"},
  };
  return table;
}

Status RuntimeOptions::set(std::string_view name, std::string_view value) {
  return setOption(*this, name, value, "option " + std::string(name));
}

Status RuntimeOptions::get(std::string_view name, std::string &value) const {
  auto flag = [](bool on) { return std::string(on ? "1" : "0"); };
  if (name == "variant")
    value = variant;
  else if (name == "profile")
    value = profile;
  else if (name == "check_nonfinite")
    value = flag(checkNonFinite);
  else if (name == "cuda_graph")
    value = flag(cudaGraph);
  else if (name == "cuda_overlap")
    value = flag(cudaOverlap);
  else if (name == "refine_variant")
    value = flag(refineVariant);
  else if (name == "relu_in_gemm")
    value = flag(reluInGemm);
  else if (name == "wgmma")
    value = flag(wgmma);
  else if (name == "a2a_staging")
    value = a2aStaging == ExchangeStaging::Auto     ? "auto"
            : a2aStaging == ExchangeStaging::Always ? "always"
                                                    : "never";
  else if (name == "grouped_gemm")
    value = groupedGemm == GroupedGemmImpl::Auto     ? "auto"
            : groupedGemm == GroupedGemmImpl::Device ? "device"
                                                     : "cublas";
  else if (name == "wgmma_tile")
    value = wgmmaTile == WgmmaTile::Auto          ? "auto"
            : wgmmaTile == WgmmaTile::Wide        ? "wide"
            : wgmmaTile == WgmmaTile::Pair        ? "pair"
            : wgmmaTile == WgmmaTile::Cooperative ? "cooperative"
                                                  : "ping-pong";
  else if (name == "gemm_streams")
    value = std::to_string(gemmStreams);
  else if (name == "max_workspace_mib")
    value = std::to_string(maxWorkspaceMib);
  else if (name == "a2a_transport")
    value = a2aTransport == AllToAllTransport::Nccl ? "nccl" : "ce";
  else if (name == "collective_timeout_s") {
    std::ostringstream text;
    text << collectiveTimeoutSeconds;
    value = text.str();
  } else {
    return unknownOption(name);
  }
  return Status::ok();
}

Status RuntimeOptions::fromEnvironment(const RuntimeOptions &base,
                                       RuntimeOptions &result) {
  RuntimeOptions options = base;
  for (const Entry &entry : entries()) {
    // An empty variable is unset, as a shell's `FLEX_X= cmd` means.
    const char *value = std::getenv(entry.environment);
    if (!value || !*value)
      continue;
    if (Status status =
            setOption(options, entry.name, value, entry.environment);
        !status) {
      result = base;
      return status;
    }
    options.environmentOverrides.push_back(entry.environment);
  }
  result = std::move(options);
  return Status::ok();
}

} // namespace flex
