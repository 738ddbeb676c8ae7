//===- Workspaces.cpp - The executor's workspaces and pending forwards ----===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements the executor's workspaces: its own (the caller's from
// setWorkspace, or one it allocates), a call's own (RunOptions::workspace),
// and the records of the forwards whose backward has not run yet
// (docs/Runtime.md, "Per-call workspaces").
//
// A forward's device-side state (routing, capacity, activations) is in its
// workspace already; what the executor keeps on the host between a forward
// and its backward (the variant, the seed, the capacity bucket of its time)
// is a small record in a map keyed by the workspace's address. It is not in a
// header of the workspace: on a device backend the host would need a copy
// (a synchronization) to read it, and the workspace would no longer be the
// plan's `workspace.bytes`. The map is bounded (kMaxPendingForwards, the
// oldest dropped): forwards that never get a backward (inference, no_grad)
// would otherwise grow it without end.
//
//===----------------------------------------------------------------------===//

#include "flex/Runtime/Executor.h"

#include <algorithm>
#include <cstdio>

namespace flex {

namespace {

std::string addressString(const void *address) {
  char text[32];
  std::snprintf(text, sizeof(text), "%p", address);
  return text;
}

std::string mib(int64_t bytes) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.1f MiB",
                static_cast<double>(bytes) / (1 << 20));
  return text;
}

} // namespace

int64_t Executor::availableWorkspaceBytes() const {
  return variantBound(
      givenWorkspaceBytes_.value_or(options_.maxWorkspaceBytes()));
}

int64_t Executor::minWorkspaceBytes() const {
  int64_t least = workspaceBytes();
  for (size_t v = 0; v < plan_->variants.size(); ++v)
    least = std::min(least, plan_->variantWorkspaceBytes(v));
  return sizeNarrowsVariants() ? least : workspaceBytes();
}

int64_t Executor::runWorkspaceBytes() const {
  if (!sizeNarrowsVariants())
    return workspaceBytes();
  if (!automatic_)
    return workspaceBytes(selected_);
  int64_t largest = -1;
  for (size_t v = 0; v < plan_->variants.size(); ++v) {
    const int64_t bytes = plan_->variantWorkspaceBytes(v);
    if (bytes <= options_.maxWorkspaceBytes())
      largest = std::max(largest, bytes);
  }
  return largest >= 0 ? largest : minWorkspaceBytes();
}

Status Executor::checkWorkspace(const void *data, int64_t bytes) const {
  const int64_t alignment = std::max<int64_t>(workspaceAlignment(), 1);
  const std::string needs =
      "the plan needs " + std::to_string(workspaceBytes()) +
      " bytes for every variant" +
      (minWorkspaceBytes() < workspaceBytes()
           ? ", at least " + std::to_string(minWorkspaceBytes()) +
                 " for its smallest"
           : std::string()) +
      ", aligned to " + std::to_string(alignment) +
      " (flexExecutableGetWorkspaceSize, "
      "flexExecutableGetVariantWorkspaceSize)";
  if (bytes < minWorkspaceBytes())
    return Status(StatusCode::InvalidArgument,
                  "workspace of " + std::to_string(bytes) +
                      " bytes is too small; " + needs);
  if (reinterpret_cast<uintptr_t>(data) % static_cast<uintptr_t>(alignment))
    return Status(StatusCode::InvalidArgument,
                  "workspace address " + addressString(data) +
                      " is not aligned to " + std::to_string(alignment) +
                      " bytes; " + needs);
  return Status::ok();
}

Status Executor::checkVariantFits(int64_t variant, int64_t available,
                                  bool own) const {
  const int64_t bytes = workspaceBytes(variant);
  if (bytes <= available)
    return Status::ok();
  return Status(
      StatusCode::InvalidArgument,
      "variant '" + plan_->variants[variant].name + "' needs " +
          std::to_string(bytes) + " workspace bytes (" + mib(bytes) +
          "), more than " +
          (own ? "max_workspace_mib allows the executor's own workspace ("
               : "the workspace given has (") +
          std::to_string(available) +
          " bytes); give a larger workspace or run a variant that fits "
          "(flexExecutableGetVariantWorkspaceSize, variant=auto picks among "
          "them)");
}

Status Executor::setWorkspace(void *data, int64_t bytes) {
  if (data)
    if (Status status = checkWorkspace(data, bytes); !status)
      return status;
  // The forwards pending on the old and on the new workspace are gone: a
  // caller replacing the workspace may reuse or free either memory.
  forwardRecords_.erase(workspace_);
  workspace_ = data ? data : ownedWorkspace_;
  givenWorkspaceBytes_ = data ? std::optional<int64_t>(bytes) : std::nullopt;
  forwardRecords_.erase(workspace_);
  return Status::ok();
}

Status Executor::ensureWorkspace(int64_t bytes) {
  if (givenWorkspaceBytes_ || bytes == 0)
    return Status::ok();
  if (!ownedWorkspace_ || bytes > ownedWorkspaceBytes_) {
    // A forward replaces its workspace's state, so nothing pending is lost
    // when the block moves; a capture cannot allocate.
    if (backend_->isRecording())
      return Status(StatusCode::FailedPrecondition,
                    "the executor's own workspace must grow to " +
                        std::to_string(bytes) + " bytes (" + mib(bytes) +
                        ") for this variant, which cannot happen while a "
                        "graph is being recorded; run the variant once "
                        "before recording, or give a workspace "
                        "(flexExecutableSetWorkspace)");
    void *grown = backend_->allocate(bytes, workspaceAlignment());
    if (!grown)
      return Status(StatusCode::Internal, "cannot allocate a workspace of " +
                                              std::to_string(bytes) +
                                              " bytes (" + mib(bytes) + ")");
    if (ownedWorkspace_) {
      forwardRecords_.erase(ownedWorkspace_);
      // A caller's graph recorded on the old block would replay into freed
      // memory: such blocks live as long as the executor.
      if (ownedWorkspaceRecorded_)
        retiredWorkspaces_.push_back(ownedWorkspace_);
      else
        backend_->deallocate(ownedWorkspace_);
    }
    // A record left at the new address (a freed caller workspace there) is
    // not this workspace's.
    forwardRecords_.erase(grown);
    ownedWorkspace_ = grown;
    ownedWorkspaceBytes_ = bytes;
  }
  workspace_ = ownedWorkspace_;
  return Status::ok();
}

Status Executor::callWorkspace(const RunOptions &options, void *&workspace,
                               int64_t &available) const {
  workspace = workspace_;
  available = availableWorkspaceBytes();
  if (!options.workspace)
    return Status::ok();
  if (Status status = checkWorkspace(options.workspace, options.workspaceBytes);
      !status)
    return status;
  workspace = options.workspace;
  available = variantBound(options.workspaceBytes);
  return Status::ok();
}

Status Executor::findForwardRecord(const void *workspace,
                                   ForwardRecord &record) const {
  auto found = forwardRecords_.find(workspace);
  if (found == forwardRecords_.end())
    return Status(
        StatusCode::FailedPrecondition,
        "backward needs a forward first on the same workspace, and none is "
        "pending on " +
            std::string(workspace == workspace_ ? "the default workspace "
                                                  "(setWorkspace)"
                                                : "the call's workspace") +
            (workspace ? " at " + addressString(workspace) : "") +
            ": backward reads the routing and "
            "activations that forward leaves in the workspace (one backward "
            "per forward; a failed forward leaves none; at most " +
            std::to_string(kMaxPendingForwards) +
            " forwards wait for their backward, the oldest is dropped)");
  record = found->second;
  return Status::ok();
}

void Executor::keepForwardRecord(const void *workspace, ForwardRecord record) {
  record.order = ++forwardOrder_;
  forwardRecords_[workspace] = record;
  if (forwardRecords_.size() <= kMaxPendingForwards)
    return;
  // Only when full: one scan per forward past the bound.
  auto oldest = std::min_element(forwardRecords_.begin(), forwardRecords_.end(),
                                 [](const auto &a, const auto &b) {
                                   return a.second.order < b.second.order;
                                 });
  forwardRecords_.erase(oldest);
}

} // namespace flex
