//===- Options.cpp - The runtime options of the C API ---------------------===//
//
// Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
//
//===----------------------------------------------------------------------===//
//
// This file implements FlexOptions (include/flex-c/Flex.h): a
// flex::RuntimeOptions set by name, with the text of the options' environment
// variables (RuntimeOptions::set parses both).
//
//===----------------------------------------------------------------------===//

#include "CAPISupport.h"

#include <new>

using namespace flex;
using namespace flex::capi;

extern "C" {

FlexStatus flexOptionsCreate(FlexOptions *options) {
  if (FlexStatus s = checkOut(options, "flexOptionsCreate", "options"))
    return s;
  auto *impl = new (std::nothrow) FlexOptionsImpl;
  if (!impl)
    return fail(FLEX_STATUS_INTERNAL, "flexOptionsCreate: out of memory");
  registry().add(impl);
  *options = impl;
  return FLEX_STATUS_OK;
}

FlexStatus flexOptionsDestroy(FlexOptions options) {
  return destroyHandle(options, "flexOptionsDestroy", "options");
}

FlexStatus flexOptionsSet(FlexOptions options, const char *name,
                          const char *value) {
  const char *function = "flexOptionsSet";
  if (FlexStatus s = checkHandle(options, function, "options"))
    return s;
  if (FlexStatus s = checkOut(name, function, "name"))
    return s;
  if (FlexStatus s = checkOut(value, function, "value"))
    return s;
  Status status = options->options.set(name, value);
  if (!status)
    return fail(static_cast<FlexStatus>(status.code()),
                std::string(function) + ": " + status.message());
  return FLEX_STATUS_OK;
}

FlexStatus flexOptionsGet(FlexOptions options, const char *name,
                          const char **value) {
  const char *function = "flexOptionsGet";
  if (FlexStatus s = checkHandle(options, function, "options"))
    return s;
  if (FlexStatus s = checkOut(name, function, "name"))
    return s;
  if (FlexStatus s = checkOut(value, function, "value"))
    return s;
  Status status = options->options.get(name, options->text);
  if (!status)
    return fail(static_cast<FlexStatus>(status.code()),
                std::string(function) + ": " + status.message());
  *value = options->text.c_str();
  return FLEX_STATUS_OK;
}

} // extern "C"
