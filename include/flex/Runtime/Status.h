//===- Status.h - Error codes and messages of the runtime -------*- C++ -*-===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file defines the status that every fallible runtime call returns: a
// code the C API maps one to one to FlexStatus, and a message that says what
// was wrong, with the value, and what is allowed. The runtime throws no
// exceptions across its interfaces.
//
//===----------------------------------------------------------------------===//

#ifndef FLEX_RUNTIME_STATUS_H
#define FLEX_RUNTIME_STATUS_H

#include <string>
#include <utility>

namespace flex {

/// Keep the numbering in step with FlexStatus in include/flex-c/Flex.h.
enum class StatusCode : int {
  Ok = 0,
  InvalidArgument = 1,     ///< a caller-provided value is not allowed
  NotFound = 2,            ///< a name (argument, variant) is unknown
  OutOfRange = 3,          ///< an index or size is out of range
  FailedPrecondition = 4,  ///< the call is not allowed in this state
  Unavailable = 5,         ///< the feature is not built or linked in
  NumericError = 6,        ///< NaN or Inf found by a requested check
  IOError = 7,             ///< a file could not be read or written
  InvalidPlan = 8,         ///< the plan document is rejected by the loader
  Internal = 9,            ///< a bug in Flex
  CommunicationError = 10, ///< a collective failed or timed out
};

const char *toString(StatusCode code);

class [[nodiscard]] Status {
public:
  Status() = default;
  Status(StatusCode code, std::string message)
      : code_(code), message_(std::move(message)) {}

  static Status ok() { return Status(); }

  bool isOk() const { return code_ == StatusCode::Ok; }
  explicit operator bool() const { return isOk(); }
  StatusCode code() const { return code_; }
  const std::string &message() const { return message_; }

private:
  StatusCode code_ = StatusCode::Ok;
  std::string message_;
};

} // namespace flex

#endif // FLEX_RUNTIME_STATUS_H
