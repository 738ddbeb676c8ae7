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

} // namespace

Status Executor::checkWorkspace(const void *data, int64_t bytes) const {
  const int64_t alignment = std::max<int64_t>(workspaceAlignment(), 1);
  const std::string needs = "the plan needs " +
                            std::to_string(workspaceBytes()) +
                            " bytes aligned to " + std::to_string(alignment) +
                            " (flexExecutableGetWorkspaceSize)";
  if (bytes < workspaceBytes())
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

Status Executor::setWorkspace(void *data, int64_t bytes) {
  if (data)
    if (Status status = checkWorkspace(data, bytes); !status)
      return status;
  // The forwards pending on the old and on the new workspace are gone: a
  // caller replacing the workspace may reuse or free either memory.
  forwardRecords_.erase(workspace_);
  workspace_ = data ? data : ownedWorkspace_;
  forwardRecords_.erase(workspace_);
  return Status::ok();
}

Status Executor::ensureWorkspace() {
  if (workspace_ || workspaceBytes() == 0)
    return Status::ok();
  if (!ownedWorkspace_) {
    ownedWorkspace_ =
        backend_->allocate(workspaceBytes(), workspaceAlignment());
    if (!ownedWorkspace_)
      return Status(StatusCode::Internal, "cannot allocate a workspace of " +
                                              std::to_string(workspaceBytes()) +
                                              " bytes");
  }
  workspace_ = ownedWorkspace_;
  return Status::ok();
}

Status Executor::callWorkspace(const RunOptions &options,
                               void *&workspace) const {
  workspace = workspace_;
  if (!options.workspace)
    return Status::ok();
  if (Status status = checkWorkspace(options.workspace, options.workspaceBytes);
      !status)
    return status;
  workspace = options.workspace;
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
