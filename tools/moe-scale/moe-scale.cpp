//===- moe-scale.cpp - Predict a layer's variants over many GPUs ----------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// moe-scale: the predicted time of every variant of a layer for each world
// size it is given a plan for, on a stated node shape (docs/CostModel.md,
// "Past the machines"). Bad usage and inputs that do not fit together are
// a message naming the cause and exit status 2.
//
//===----------------------------------------------------------------------===//

#include "MoeScale.h"

#include <cmath>
#include <cstdlib>
#include <iostream>
#include <sstream>

using namespace flex;
using namespace flex::moescale;

namespace {

Status bad(const std::string &message) {
  return Status(StatusCode::InvalidArgument, message);
}

/// A finite number >= 0 (> 0 when `positive`), the whole text.
bool parseNumber(const std::string &text, bool positive, double &value) {
  if (text.empty())
    return false;
  char *end = nullptr;
  value = std::strtod(text.c_str(), &end);
  return end == text.c_str() + text.size() && std::isfinite(value) &&
         value >= 0 && (!positive || value > 0);
}

/// "ALPHA,PER_PEER,BETA" (seconds, seconds, bytes/s).
Status parseLink(const std::string &flag, const std::string &text,
                 LinkFigures &link) {
  std::vector<std::string> parts;
  std::stringstream in(text);
  for (std::string part; std::getline(in, part, ',');)
    parts.push_back(part);
  if (parts.size() != 3 || !parseNumber(parts[0], false, link.alphaSeconds) ||
      !parseNumber(parts[1], false, link.perPeerSeconds) ||
      !parseNumber(parts[2], true, link.betaBytesPerSecond))
    return bad(flag +
               " needs ALPHA_S,PER_PEER_S,BETA_BYTES_PER_S (numbers >= 0, "
               "beta > 0), got '" +
               text + "'");
  return Status::ok();
}

} // namespace

const char *flex::moescale::usage() {
  return R"(usage: moe-scale [options] PLAN...

Predicts every variant of one layer for each world size W it has a plan for
(plans compiled by moe-opt --moe-multiversion for each W; a plan compiled
with --moe-a2a-2dh adds its 2DH variants), on a stated node shape, with the
runtime's cost model (docs/CostModel.md, "Past the machines").

  --profile FILE        a cuda device profile (default: the built-in one)
  --node-shape FILE     the node shape: {"gpus_per_node": P, "intra": LINK,
                        "inter": LINK, "source": "..."}, LINK = {"alpha_s",
                        "per_peer_s", "beta_bytes_per_s"} (default: the
                        profile's topology)
  --gpus-per-node P     GPUs per node (over the file's)
  --intra A,L,B         NVLink: alpha s, s per peer, bytes/s per GPU
  --inter A,L,B         network per GPU: alpha s, s per peer, bytes/s
  --train               forward + backward (training plans)
  --serial              every step on one stream (no overlap)
  --grouped-gemm IMPL   the CUDA grouped GEMMs' path: auto (default), device
                        or cublas (runs measured before the device-sized
                        kernel existed ran cublas)
  --capacity C          count capacity C (default: the plans' static bound)
  --memory GIB          GPU memory (default 80): a variant whose workspace
                        and arguments need more does not fit (marked !)
                        and wins only when no variant of its W fits
  --2dh-copies MODE     a 2DH exchange's block reorders: blocks (one copy
                        per block, the CUDA backend's; default), fused (one
                        kernel per phase), or both
  --summary             only the winners per W
  --json                JSON on stdout
  -h, --help            this text
)";
}

Status flex::moescale::parseOptions(int argc, char **argv, Options &options,
                                    bool &help) {
  help = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&](std::string &out) {
      if (i + 1 >= argc)
        return bad(arg + " needs a value");
      out = argv[++i];
      return Status::ok();
    };
    std::string text;
    if (arg == "-h" || arg == "--help") {
      help = true;
    } else if (arg == "--train") {
      options.train = true;
    } else if (arg == "--serial") {
      options.serial = true;
    } else if (arg == "--json") {
      options.json = true;
    } else if (arg == "--summary") {
      options.summaryOnly = true;
    } else if (arg == "--profile" || arg == "--node-shape") {
      if (Status s = value(arg == "--profile" ? options.profilePath
                                              : options.nodeShapePath);
          !s)
        return s;
    } else if (arg == "--gpus-per-node" || arg == "--capacity") {
      if (Status s = value(text); !s)
        return s;
      char *end = nullptr;
      long long n = std::strtoll(text.c_str(), &end, 10);
      const long long min = arg == "--capacity" ? 0 : 1;
      if (text.empty() || *end != '\0' || n < min)
        return bad(arg + " needs an integer >= " + std::to_string(min) +
                   ", got '" + text + "'");
      (arg == "--capacity" ? options.capacity : options.gpusPerNode.emplace()) =
          n;
    } else if (arg == "--memory") {
      if (Status s = value(text); !s)
        return s;
      if (!parseNumber(text, true, options.memoryGiB))
        return bad("--memory needs a number of GiB > 0, got '" + text + "'");
    } else if (arg == "--intra" || arg == "--inter") {
      if (Status s = value(text); !s)
        return s;
      LinkFigures link;
      if (Status s = parseLink(arg, text, link); !s)
        return s;
      (arg == "--intra" ? options.intra : options.inter) = link;
    } else if (arg == "--grouped-gemm") {
      if (Status s = value(text); !s)
        return s;
      RuntimeOptions runtime;
      if (Status s = runtime.set("grouped_gemm", text); !s)
        return bad("--grouped-gemm needs auto, device or cublas, got '" +
                   text + "'");
      options.groupedGemm = runtime.groupedGemm;
    } else if (arg == "--2dh-copies") {
      if (Status s = value(text); !s)
        return s;
      if (text == "blocks")
        options.copies = Copies::PerBlock;
      else if (text == "fused")
        options.copies = Copies::Fused;
      else if (text == "both")
        options.copies = Copies::Both;
      else
        return bad("--2dh-copies needs blocks, fused or both, got '" + text +
                   "'");
    } else if (arg.size() > 1 && arg[0] == '-') {
      return bad("unknown option '" + arg + "' (moe-scale --help)");
    } else {
      options.plans.push_back(arg);
    }
  }
  return Status::ok();
}

int main(int argc, char **argv) {
  Options options;
  bool help = false;
  if (Status s = parseOptions(argc, argv, options, help); !s) {
    std::cerr << "moe-scale: " << s.message() << "\n";
    return 2;
  }
  if (help) {
    std::cout << usage();
    return 0;
  }
  Result result;
  if (Status s = runScale(options, result); !s) {
    std::cerr << "moe-scale: " << s.message() << "\n";
    return 2;
  }
  std::cout << (options.json ? formatJson(result) : formatText(result));
  return 0;
}
