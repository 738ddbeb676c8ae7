//===- CAPISupport.h - What the C API's source files share ------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file declares what lib/CAPI's files share (internal, not installed):
// the handle structs behind include/flex-c/Flex.h's opaque types, the registry
// of live handles, and the helpers that set the last error and check handles
// and out-pointers. Flex.cpp has contexts, executables and compiling;
// Options.cpp the runtime options; Communicators.cpp the communicators.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_LIB_CAPI_CAPISUPPORT_H
#define FLEX_LIB_CAPI_CAPISUPPORT_H

#include "flex-c/Flex.h"

#include "flex/Runtime/Core/RuntimeOptions.h"
#include "flex/Runtime/Executor.h"

#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_set>
#include <vector>

struct FlexContextImpl {
  std::string backend;
  /// As the caller set them; the environment is applied per executable.
  flex::RuntimeOptions options;
};

struct FlexOptionsImpl {
  flex::RuntimeOptions options;
  std::string text; // what flexOptionsGet returned last
};

struct FlexCommunicatorImpl {
  std::shared_ptr<flex::Communicator> communicator;
};

struct FlexExecutableImpl {
  std::shared_ptr<const flex::Plan> plan;
  std::unique_ptr<flex::Executor> executor;
  std::string lastError;
  std::vector<flex::Binding> bindings; // scratch, reused per call
};

namespace flex::capi {

/// The live handles: a destroyed or foreign pointer is rejected, not used.
struct HandleRegistry {
  std::mutex mutex;
  std::unordered_set<const void *> live;

  void add(const void *handle) {
    std::lock_guard<std::mutex> lock(mutex);
    live.insert(handle);
  }
  bool remove(const void *handle) {
    std::lock_guard<std::mutex> lock(mutex);
    return live.erase(handle) == 1;
  }
  bool contains(const void *handle) {
    std::lock_guard<std::mutex> lock(mutex);
    return live.count(handle) == 1;
  }
};

HandleRegistry &registry();

/// Sets the thread's last error (and `exe`'s) to `message`; returns `status`.
FlexStatus fail(FlexStatus status, std::string message,
                FlexExecutable exe = nullptr);
/// FLEX_STATUS_OK for an ok `status`, else fail() with its code and message.
FlexStatus report(const Status &status, FlexExecutable exe = nullptr);
/// INVALID_ARGUMENT naming `function` unless `handle` (a `what`) is live.
FlexStatus checkHandle(const void *handle, const char *function,
                       const char *what);
/// INVALID_ARGUMENT naming `function` when the out-pointer `what` is null.
FlexStatus checkOut(const void *pointer, const char *function,
                    const char *what);

/// Checks a handle, forgets it and deletes it.
template <typename Handle>
FlexStatus destroyHandle(Handle handle, const char *function,
                         const char *what) {
  if (FlexStatus status = checkHandle(handle, function, what);
      status != FLEX_STATUS_OK)
    return status;
  if (!registry().remove(handle)) // destroyed by another thread meanwhile
    return checkHandle(handle, function, what);
  delete handle;
  return FLEX_STATUS_OK;
}

/// Runs `body` with the handle checked and exceptions caught.
template <typename Body>
FlexStatus withExecutable(FlexExecutable exe, const char *function,
                          Body &&body) {
  if (FlexStatus status = checkHandle(exe, function, "executable");
      status != FLEX_STATUS_OK)
    return status;
  try {
    return body();
  } catch (const std::exception &error) {
    return fail(FLEX_STATUS_INTERNAL,
                std::string(function) + ": internal error: " + error.what(),
                exe);
  } catch (...) {
    return fail(FLEX_STATUS_INTERNAL,
                std::string(function) + ": unknown internal error", exe);
  }
}

} // namespace flex::capi

#endif // FLEX_LIB_CAPI_CAPISUPPORT_H
