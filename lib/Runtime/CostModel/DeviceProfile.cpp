//===- DeviceProfile.cpp - The device profile and its JSON form -----------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the profile's lookups (the GEMM table's
// interpolation, the collectives' nearest point), its JSON reader and
// writer, the staleness check and the built-in fallback profiles.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/CostModel/DeviceProfile.h"
#include "flex/Runtime/Plan.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <limits>
#include <sstream>
#include <stdexcept>

namespace flex {

namespace {

using Json = nlohmann::ordered_json;

constexpr std::string_view kCollectiveNames[] = {
    "all_to_all", "all_gather", "reduce_scatter", "all_reduce"};

/// A malformed field; what() names it ("profile field 'PATH': ...";
/// parseTopology says "node shape field" instead).
struct ProfileError : std::runtime_error {
  ProfileError(const std::string &path, const std::string &message)
      : std::runtime_error("profile field '" + path + "': " + message) {}
};

const Json &field(const Json &json, const std::string &path, const char *key) {
  auto it = json.find(key);
  if (it == json.end())
    throw ProfileError(path.empty() ? key : path + "." + key, "missing");
  return *it;
}

std::string join(const std::string &path, const char *key) {
  return path.empty() ? std::string(key) : path + "." + key;
}

void expectObject(const Json &json, const std::string &path) {
  if (!json.is_object())
    throw ProfileError(path.empty() ? "(document)" : path, "not an object");
}

std::string asString(const Json &json, const std::string &path) {
  if (!json.is_string())
    throw ProfileError(path, "not a string");
  return json.get<std::string>();
}

int64_t asInt(const Json &json, const std::string &path, int64_t min) {
  if (!json.is_number_integer())
    throw ProfileError(path, "not an integer");
  int64_t value = json.get<int64_t>();
  if (value < min)
    throw ProfileError(path, "must be >= " + std::to_string(min) + ", got " +
                                 std::to_string(value));
  return value;
}

/// A finite number; `positive`: > 0, else >= 0.
double asNumber(const Json &json, const std::string &path, bool positive) {
  if (!json.is_number())
    throw ProfileError(path, "not a number");
  double value = json.get<double>();
  if (!std::isfinite(value) || value < 0 || (positive && value == 0))
    throw ProfileError(path, positive ? "must be a finite number > 0"
                                      : "must be a finite number >= 0");
  return value;
}

bool asBool(const Json &json, const std::string &path) {
  if (!json.is_boolean())
    throw ProfileError(path, "not a boolean");
  return json.get<bool>();
}

std::string optionalString(const Json &json, const std::string &path,
                           const char *key) {
  auto it = json.find(key);
  return it == json.end() ? std::string() : asString(*it, join(path, key));
}

GemmPoint readGemm(const Json &json, const std::string &path) {
  expectObject(json, path);
  GemmPoint point;
  point.m = asInt(field(json, path, "m"), path + ".m", 1);
  point.n = asInt(field(json, path, "n"), path + ".n", 1);
  point.k = asInt(field(json, path, "k"), path + ".k", 1);
  std::string dtype = asString(field(json, path, "dtype"), path + ".dtype");
  std::optional<DType> parsed = parseDType(dtype);
  if (!parsed || *parsed == DType::I32)
    throw ProfileError(path + ".dtype",
                       "expected f32, bf16 or f16, got '" + dtype + "'");
  point.dtype = *parsed;
  point.ragged = asBool(field(json, path, "ragged"), path + ".ragged");
  point.flopsPerSecond =
      asNumber(field(json, path, "flops_per_s"), path + ".flops_per_s", true);
  if (auto it = json.find("groups"); it != json.end())
    point.groups = asInt(*it, path + ".groups", 1);
  return point;
}

StepCostPoint readStep(const Json &json, const std::string &path) {
  expectObject(json, path);
  StepCostPoint point;
  point.op = asString(field(json, path, "op"), path + ".op");
  if (!parseStepOp(point.op))
    throw ProfileError(path + ".op", "unknown step op '" + point.op + "'");
  point.alphaSeconds =
      asNumber(field(json, path, "alpha_s"), path + ".alpha_s", false);
  point.bytesPerSecond =
      asNumber(field(json, path, "bytes_per_s"), path + ".bytes_per_s", false);
  if (auto it = json.find("gemm_scale"); it != json.end())
    point.gemmScale = asNumber(*it, path + ".gemm_scale", true);
  if (auto it = json.find("samples"); it != json.end())
    point.samples = asInt(*it, path + ".samples", 0);
  return point;
}

CollectivePoint readCollective(const Json &json, const std::string &path) {
  expectObject(json, path);
  CollectivePoint point;
  std::string kind = asString(field(json, path, "kind"), path + ".kind");
  std::optional<CollectiveKind> parsed = parseCollectiveKind(kind);
  if (!parsed)
    throw ProfileError(path + ".kind", "expected all_to_all, all_gather, "
                                       "reduce_scatter or all_reduce, got '" +
                                           kind + "'");
  point.kind = *parsed;
  point.worldSize =
      asInt(field(json, path, "world_size"), path + ".world_size", 1);
  point.groupSize =
      asInt(field(json, path, "group_size"), path + ".group_size", 1);
  point.transport =
      asString(field(json, path, "transport"), path + ".transport");
  point.alphaSeconds =
      asNumber(field(json, path, "alpha_s"), path + ".alpha_s", false);
  point.betaBytesPerSecond = asNumber(field(json, path, "beta_bytes_per_s"),
                                      path + ".beta_bytes_per_s", true);
  return point;
}

/// Only `allowed` keys: a misspelt key in a hand-written node shape would
/// otherwise be a silent default.
void expectKeys(const Json &json, const std::string &path,
                std::initializer_list<const char *> allowed) {
  for (auto it = json.begin(); it != json.end(); ++it)
    if (std::none_of(allowed.begin(), allowed.end(),
                     [&](const char *key) { return it.key() == key; }))
      throw ProfileError(join(path, it.key().c_str()), "unknown field");
}

LinkFigures readLink(const Json &json, const std::string &path) {
  expectObject(json, path);
  expectKeys(json, path, {"alpha_s", "per_peer_s", "beta_bytes_per_s"});
  LinkFigures link;
  link.alphaSeconds =
      asNumber(field(json, path, "alpha_s"), join(path, "alpha_s"), false);
  link.perPeerSeconds = asNumber(field(json, path, "per_peer_s"),
                                 join(path, "per_peer_s"), false);
  link.betaBytesPerSecond = asNumber(field(json, path, "beta_bytes_per_s"),
                                     join(path, "beta_bytes_per_s"), true);
  return link;
}

/// A node shape at `path` ("topology" in a profile, "" alone).
Topology readTopology(const Json &json, const std::string &path) {
  expectObject(json, path);
  expectKeys(json, path, {"gpus_per_node", "intra", "inter", "source"});
  Topology topology;
  topology.gpusPerNode =
      asInt(field(json, path, "gpus_per_node"), join(path, "gpus_per_node"), 1);
  topology.intra = readLink(field(json, path, "intra"), join(path, "intra"));
  topology.inter = readLink(field(json, path, "inter"), join(path, "inter"));
  topology.source = optionalString(json, path, "source");
  return topology;
}

Json topologyJson(const Topology &topology) {
  auto link = [](const LinkFigures &l) {
    return Json{{"alpha_s", l.alphaSeconds},
                {"per_peer_s", l.perPeerSeconds},
                {"beta_bytes_per_s", l.betaBytesPerSecond}};
  };
  Json json = {{"gpus_per_node", topology.gpusPerNode},
               {"intra", link(topology.intra)},
               {"inter", link(topology.inter)}};
  if (!topology.source.empty())
    json["source"] = topology.source;
  return json;
}

/// The device-sized grouped GEMM's figures: every key optional (a missing
/// one keeps its default), unknown keys refused.
DeviceGemmFigures readDeviceGemm(const Json &json, const std::string &path) {
  expectObject(json, path);
  expectKeys(json, path,
             {"available", "small_flops_per_s", "large_flops_per_s",
              "wgmma_flops_per_s", "weight_read_efficiency", "launch_s",
              "wgrad_tile_s", "store_combine_slowdown", "source"});
  DeviceGemmFigures figures;
  auto number = [&](const char *key, double &value, bool positive) {
    if (auto it = json.find(key); it != json.end())
      value = asNumber(*it, join(path, key), positive);
  };
  if (auto it = json.find("available"); it != json.end())
    figures.available = asBool(*it, join(path, "available"));
  number("small_flops_per_s", figures.smallFlopsPerSecond, true);
  number("large_flops_per_s", figures.largeFlopsPerSecond, true);
  number("wgmma_flops_per_s", figures.wgmmaFlopsPerSecond, true);
  number("weight_read_efficiency", figures.weightReadEfficiency, true);
  number("launch_s", figures.launchSeconds, false);
  number("wgrad_tile_s", figures.wgradTileSeconds, false);
  number("store_combine_slowdown", figures.storeCombineSlowdown, true);
  figures.source = optionalString(json, path, "source");
  return figures;
}

Json deviceGemmJson(const DeviceGemmFigures &figures) {
  Json json = {{"available", figures.available},
               {"small_flops_per_s", figures.smallFlopsPerSecond},
               {"large_flops_per_s", figures.largeFlopsPerSecond},
               {"wgmma_flops_per_s", figures.wgmmaFlopsPerSecond},
               {"weight_read_efficiency", figures.weightReadEfficiency},
               {"launch_s", figures.launchSeconds},
               {"wgrad_tile_s", figures.wgradTileSeconds},
               {"store_combine_slowdown", figures.storeCombineSlowdown}};
  if (!figures.source.empty())
    json["source"] = figures.source;
  return json;
}

void readDocument(const Json &json, DeviceProfile &profile) {
  expectObject(json, "");
  if (asString(field(json, "", "format"), "format") != kProfileFormatName)
    throw ProfileError("format",
                       "expected '" + std::string(kProfileFormatName) + "'");
  int64_t version = asInt(field(json, "", "version"), "version", 0);
  // Version 1 had no groups per GEMM point (one group of m rows) and no
  // per-step figures; both read as such.
  if (version < 1 || version > kProfileFormatVersion)
    throw ProfileError("version", "this runtime reads versions 1 to " +
                                      std::to_string(kProfileFormatVersion) +
                                      ", got " + std::to_string(version));
  std::string source = asString(field(json, "", "source"), "source");
  if (source != "calibrated" && source != "builtin")
    throw ProfileError("source",
                       "expected calibrated or builtin, got '" + source + "'");
  profile.builtin = source == "builtin";
  profile.created = optionalString(json, "", "created");
  profile.notes = optionalString(json, "", "notes");

  const Json &device = field(json, "", "device");
  expectObject(device, "device");
  profile.deviceName = asString(field(device, "device", "name"), "device.name");
  profile.backend =
      asString(field(device, "device", "backend"), "device.backend");
  if (profile.backend != "cpu" && profile.backend != "cuda")
    throw ProfileError("device.backend",
                       "expected cpu or cuda, got '" + profile.backend + "'");
  profile.driverVersion = optionalString(device, "device", "driver");
  profile.cudaVersion = optionalString(device, "device", "cuda");
  profile.ncclVersion = optionalString(device, "device", "nccl");

  const Json &world = field(json, "", "world");
  expectObject(world, "world");
  profile.worldSize = asInt(field(world, "world", "size"), "world.size", 1);
  profile.ranksPerNode =
      asInt(field(world, "world", "ranks_per_node"), "world.ranks_per_node", 1);

  const Json &gemm = field(json, "", "gemm");
  if (!gemm.is_array() || gemm.empty())
    throw ProfileError("gemm", "expected a non-empty array");
  profile.gemm.clear();
  for (size_t i = 0; i < gemm.size(); ++i)
    profile.gemm.push_back(
        readGemm(gemm[i], "gemm[" + std::to_string(i) + "]"));

  profile.steps.clear();
  if (auto it = json.find("steps"); it != json.end()) {
    if (!it->is_array())
      throw ProfileError("steps", "not an array");
    for (size_t i = 0; i < it->size(); ++i)
      profile.steps.push_back(
          readStep((*it)[i], "steps[" + std::to_string(i) + "]"));
  }

  const Json &memory = field(json, "", "memory");
  expectObject(memory, "memory");
  profile.memoryBandwidth =
      asNumber(field(memory, "memory", "bandwidth_bytes_per_s"),
               "memory.bandwidth_bytes_per_s", true);
  profile.launchSeconds =
      asNumber(field(memory, "memory", "launch_s"), "memory.launch_s", false);

  const Json &collectives = field(json, "", "collectives");
  if (!collectives.is_array())
    throw ProfileError("collectives", "not an array");
  profile.collectives.clear();
  for (size_t i = 0; i < collectives.size(); ++i)
    profile.collectives.push_back(readCollective(
        collectives[i], "collectives[" + std::to_string(i) + "]"));

  const Json &overlap = field(json, "", "overlap");
  expectObject(overlap, "overlap");
  profile.overlapSlowdown =
      asNumber(field(overlap, "overlap", "compute_slowdown"),
               "overlap.compute_slowdown", true);
  if (profile.overlapSlowdown < 1)
    throw ProfileError("overlap.compute_slowdown", "must be >= 1");
  profile.exchangeSlowdown = 1.0;
  if (auto it = overlap.find("exchange_slowdown"); it != overlap.end()) {
    profile.exchangeSlowdown = asNumber(*it, "overlap.exchange_slowdown", true);
    if (profile.exchangeSlowdown < 1)
      throw ProfileError("overlap.exchange_slowdown", "must be >= 1");
  }

  // Optional in version 2 (older files have none).
  profile.topology.reset();
  if (auto it = json.find("topology"); it != json.end())
    profile.topology = readTopology(*it, "topology");
  // Optional too: older files price the device kernel from the defaults.
  profile.deviceGemm.reset();
  if (auto it = json.find("device_gemm"); it != json.end())
    profile.deviceGemm = readDeviceGemm(*it, "device_gemm");
}

} // namespace

std::string_view toString(CollectiveKind kind) {
  return kCollectiveNames[static_cast<int>(kind)];
}

std::optional<CollectiveKind> parseCollectiveKind(std::string_view text) {
  for (size_t i = 0; i < std::size(kCollectiveNames); ++i)
    if (kCollectiveNames[i] == text)
      return static_cast<CollectiveKind>(i);
  return std::nullopt;
}

namespace {

/// The closest class of GEMM points to (dtype, ragged): same dtype and
/// layout, else same dtype (f16 and bf16 run the same tensor cores), else
/// all.
std::vector<const GemmPoint *> gemmClass(const std::vector<GemmPoint> &gemm,
                                         DType dtype, bool ragged) {
  auto sameDtype = [&](DType other) {
    auto half = [](DType d) { return d == DType::BF16 || d == DType::F16; };
    return other == dtype || (half(other) && half(dtype));
  };
  std::vector<const GemmPoint *> points;
  for (int pass = 0; pass < 4 && points.empty(); ++pass)
    for (const GemmPoint &point : gemm)
      if ((pass >= 3 ||
           (pass == 2 ? sameDtype(point.dtype) : point.dtype == dtype)) &&
          (pass >= 1 || point.ragged == ragged))
        points.push_back(&point);
  return points;
}

} // namespace

int64_t DeviceProfile::gemmMinRows(DType dtype, bool ragged) const {
  int64_t least = 0;
  for (const GemmPoint *point : gemmClass(gemm, dtype, ragged))
    least = least == 0 ? point->m : std::min(least, point->m);
  return least;
}

double DeviceProfile::gemmFlopsPerSecond(int64_t groups, int64_t m, int64_t n,
                                         int64_t k, DType dtype,
                                         bool ragged) const {
  const std::vector<const GemmPoint *> points = gemmClass(gemm, dtype, ragged);
  if (points.empty())
    return 0;
  auto lg = [](int64_t v) {
    return std::log2(double(std::max<int64_t>(1, v)));
  };
  const double q[4] = {lg(m), lg(n), lg(k), lg(groups)};
  // Inverse squared distance over the four nearest points, in log space:
  // throughput changes with each dimension's order of magnitude.
  std::vector<std::pair<double, const GemmPoint *>> near;
  for (const GemmPoint *point : points) {
    const double p[4] = {lg(point->m), lg(point->n), lg(point->k),
                         lg(point->groups)};
    double d2 = 0;
    for (int i = 0; i < 4; ++i)
      d2 += (p[i] - q[i]) * (p[i] - q[i]);
    if (d2 < 1e-12)
      return point->flopsPerSecond;
    near.emplace_back(d2, point);
  }
  const size_t count = std::min<size_t>(4, near.size());
  std::partial_sort(
      near.begin(), near.begin() + count, near.end(),
      [](const auto &a, const auto &b) { return a.first < b.first; });
  double weights = 0, sum = 0;
  for (size_t i = 0; i < count; ++i) {
    const double w = 1.0 / near[i].first;
    weights += w;
    sum += w * std::log(near[i].second->flopsPerSecond);
  }
  return std::exp(sum / weights);
}

const StepCostPoint *DeviceProfile::findStep(std::string_view op) const {
  for (const StepCostPoint &point : steps)
    if (point.op == op)
      return &point;
  return nullptr;
}

const CollectivePoint *
DeviceProfile::findCollective(CollectiveKind kind, int64_t world, int64_t group,
                              std::string_view transport) const {
  // Lexicographic distance: transport mismatch, group-size gap, world gap.
  const CollectivePoint *best = nullptr;
  double bestScore = std::numeric_limits<double>::infinity();
  for (const CollectivePoint &point : collectives) {
    if (point.kind != kind)
      continue;
    double score =
        (transport.empty() || point.transport == transport ? 0.0 : 1e12) +
        std::abs(std::log2(double(std::max<int64_t>(1, point.groupSize))) -
                 std::log2(double(std::max<int64_t>(1, group)))) *
            1e6 +
        std::abs(std::log2(double(std::max<int64_t>(1, point.worldSize))) -
                 std::log2(double(std::max<int64_t>(1, world))));
    if (score < bestScore) {
      bestScore = score;
      best = &point;
    }
  }
  return best;
}

std::string writeProfile(const DeviceProfile &profile) {
  Json json;
  json["format"] = kProfileFormatName;
  json["version"] = kProfileFormatVersion;
  json["source"] = profile.builtin ? "builtin" : "calibrated";
  json["created"] = profile.created;
  if (!profile.notes.empty())
    json["notes"] = profile.notes;
  json["device"] = {{"name", profile.deviceName},
                    {"backend", profile.backend},
                    {"driver", profile.driverVersion},
                    {"cuda", profile.cudaVersion},
                    {"nccl", profile.ncclVersion}};
  json["world"] = {{"size", profile.worldSize},
                   {"ranks_per_node", profile.ranksPerNode}};
  Json gemm = Json::array();
  for (const GemmPoint &point : profile.gemm)
    gemm.push_back({{"groups", point.groups},
                    {"m", point.m},
                    {"n", point.n},
                    {"k", point.k},
                    {"dtype", toString(point.dtype)},
                    {"ragged", point.ragged},
                    {"flops_per_s", point.flopsPerSecond}});
  json["gemm"] = std::move(gemm);
  Json steps = Json::array();
  for (const StepCostPoint &point : profile.steps)
    steps.push_back({{"op", point.op},
                     {"alpha_s", point.alphaSeconds},
                     {"bytes_per_s", point.bytesPerSecond},
                     {"gemm_scale", point.gemmScale},
                     {"samples", point.samples}});
  json["steps"] = std::move(steps);
  json["memory"] = {{"bandwidth_bytes_per_s", profile.memoryBandwidth},
                    {"launch_s", profile.launchSeconds}};
  Json collectives = Json::array();
  for (const CollectivePoint &point : profile.collectives)
    collectives.push_back({{"kind", toString(point.kind)},
                           {"world_size", point.worldSize},
                           {"group_size", point.groupSize},
                           {"transport", point.transport},
                           {"alpha_s", point.alphaSeconds},
                           {"beta_bytes_per_s", point.betaBytesPerSecond}});
  json["collectives"] = std::move(collectives);
  json["overlap"] = {{"compute_slowdown", profile.overlapSlowdown},
                     {"exchange_slowdown", profile.exchangeSlowdown}};
  if (profile.topology)
    json["topology"] = topologyJson(*profile.topology);
  if (profile.deviceGemm)
    json["device_gemm"] = deviceGemmJson(*profile.deviceGemm);
  return json.dump(2) + "\n";
}

Status parseTopology(std::string_view text, Topology &topology) {
  try {
    Json json = Json::parse(text.begin(), text.end());
    topology = readTopology(json, "");
    return Status::ok();
  } catch (const ProfileError &error) {
    // The same message with the noun of a file read alone.
    std::string message = error.what();
    return Status(StatusCode::InvalidArgument,
                  "node shape" + message.substr(std::strlen("profile")));
  } catch (const std::exception &error) {
    return Status(StatusCode::InvalidArgument,
                  std::string("node shape is not valid JSON: ") + error.what());
  }
}

std::string writeTopology(const Topology &topology) {
  return topologyJson(topology).dump(2) + "\n";
}

Status parseProfile(std::string_view text, DeviceProfile &profile) {
  try {
    Json json = Json::parse(text.begin(), text.end());
    DeviceProfile parsed;
    readDocument(json, parsed);
    profile = std::move(parsed);
    return Status::ok();
  } catch (const ProfileError &error) {
    return Status(StatusCode::InvalidArgument, error.what());
  } catch (const std::exception &error) {
    return Status(StatusCode::InvalidArgument,
                  std::string("profile is not valid JSON: ") + error.what());
  }
}

Status readProfileFile(const std::string &path, DeviceProfile &profile) {
  std::ifstream in(path, std::ios::binary);
  if (!in)
    return Status(StatusCode::IOError,
                  "cannot read device profile '" + path + "'");
  std::stringstream text;
  text << in.rdbuf();
  if (Status s = parseProfile(text.str(), profile); !s)
    return Status(s.code(), "device profile '" + path + "': " + s.message());
  return Status::ok();
}

Status writeProfileFile(const std::string &path, const DeviceProfile &profile) {
  std::ofstream out(path, std::ios::binary);
  out << writeProfile(profile);
  out.close();
  if (!out)
    return Status(StatusCode::IOError,
                  "cannot write device profile '" + path + "'");
  return Status::ok();
}

Status checkProfile(const DeviceProfile &profile,
                    const ProfileExpectation &expected) {
  auto stale = [&](const std::string &what) {
    return Status(StatusCode::FailedPrecondition,
                  "device profile is stale: measured " + what +
                      " (calibrate again: moe-run --calibrate)");
  };
  if (!expected.backend.empty() && profile.backend != expected.backend)
    return stale("on backend '" + profile.backend + "', this run uses '" +
                 expected.backend + "'");
  if (!expected.deviceName.empty() && profile.deviceName != expected.deviceName)
    return stale("on device '" + profile.deviceName + "', this run uses '" +
                 expected.deviceName + "'");
  if (expected.worldSize > 0 && profile.worldSize != expected.worldSize)
    return stale("with " + std::to_string(profile.worldSize) +
                 " rank(s), this run has " +
                 std::to_string(expected.worldSize));
  return Status::ok();
}

DeviceProfile defaultProfile(std::string_view backend, int64_t worldSize) {
  DeviceProfile profile;
  profile.builtin = true;
  profile.backend = backend == "cuda" ? "cuda" : "cpu";
  profile.deviceName = "builtin-" + profile.backend;
  profile.worldSize = std::max<int64_t>(1, worldSize);
  profile.ranksPerNode = profile.worldSize;
  const bool cuda = profile.backend == "cuda";
  // Conservative figures (docs/CostModel.md, "The fallback"): a fraction of
  // what a current part reaches, so no variant looks better than it is.
  const double f32 = cuda ? 20e12 : 5e9, half = cuda ? 200e12 : 2e9;
  for (bool ragged : {false, true})
    for (DType dtype : {DType::F32, DType::BF16, DType::F16}) {
      const double peak =
          (dtype == DType::F32 ? f32 : half) * (ragged ? 0.8 : 1.0);
      // A small shape reaches a tenth of the large one's rate.
      profile.gemm.push_back({64, 64, 64, dtype, ragged, peak / 10, 1});
      profile.gemm.push_back({4096, 4096, 4096, dtype, ragged, peak, 1});
    }
  profile.memoryBandwidth = cuda ? 1e12 : 5e9;
  profile.launchSeconds = cuda ? 5e-6 : 1e-6;
  const double alpha = cuda ? 30e-6 : 50e-6, beta = cuda ? 50e9 : 1e9;
  for (CollectiveKind kind :
       {CollectiveKind::AllToAll, CollectiveKind::AllGather,
        CollectiveKind::ReduceScatter, CollectiveKind::AllReduce})
    profile.collectives.push_back(
        {kind, profile.worldSize, profile.worldSize, "", alpha, beta});
  profile.overlapSlowdown = cuda ? 1.25 : 1.0;
  // Flex's exchange (NCCL's kernels) beside cuBLAS GEMMs on H200s over
  // NVLink: 2.5-3.5 fitted to the overlapped Runs 6-11 with Flex's own
  // exchange rates (bench/replay_multi.py, bench/RESULTS.md Run 19b),
  // whatever layer it was fitted on.
  profile.exchangeSlowdown = cuda ? 3.0 : 1.0;
  if (cuda) {
    // The device-sized grouped GEMM at the same fraction of the H100
    // figures as the GEMM table's rates (200 of about 660 TFLOP/s); its
    // weight reads against the built-in bandwidth.
    DeviceGemmFigures figures;
    figures.smallFlopsPerSecond = 30e12;
    figures.largeFlopsPerSecond = 66e12;
    figures.wgmmaFlopsPerSecond = 156e12;
    figures.source = "builtin: 0.3x bench/RESULTS.md Run 20 (H100), wgmma "
                     "0.3x the 2026-12-06 probe";
    profile.deviceGemm = figures;
  }
  return profile;
}

DeviceProfile loadProfileOrDefault(const std::string &path,
                                   const ProfileExpectation &expected,
                                   Status &why) {
  DeviceProfile profile;
  why = path.empty() ? Status(StatusCode::NotFound, "no device profile given")
                     : readProfileFile(path, profile);
  if (why)
    why = checkProfile(profile, expected);
  if (why)
    return profile;
  const std::string backend =
      expected.backend.empty() ? "cpu" : expected.backend;
  why = Status(why.code(), why.message() + "; using the built-in " + backend +
                               " profile (docs/CostModel.md)");
  return defaultProfile(backend, expected.worldSize);
}

std::string utcTimestamp() {
  std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char text[32];
  std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return text;
}

} // namespace flex
