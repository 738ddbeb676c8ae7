# The runtime's library layering (docs/Architecture.md, "The runtime's
# libraries"), checked on the #include lines: Core at the bottom includes
# nothing else of the runtime but Status.h, no backend or communicator
# includes another backend's headers (nor a communicator the executor's), the plan model includes no backend, communicator or
# executor, the cost model (CostModel/) includes no backend or executor (its
# calibration alone runs the CPU kernels and communicators, CalibrateCuda.cpp
# the CUDA kernels) and nothing below
# it includes the cost model, and the runtime has no MLIR in it. Run by ctest
# (FlexRuntimeLayering):
#   cmake -DFLEX_SOURCE_DIR=<repo> -P lib/Runtime/CheckLayering.cmake
# With -DFLEX_LAYERING_SELF_TEST=ON it instead checks that each rule catches
# a back edge it is meant to catch (FlexRuntimeLayeringSelfTest).
cmake_minimum_required(VERSION 3.20)

# The part of the runtime a repository path belongs to ("" = not checked).
function(flex_layer path out)
  set(layer "")
  if(path MATCHES "^(include/flex|lib)/Runtime/Core/")
    set(layer "Core")
  elseif(path MATCHES "^(include/flex|lib)/Runtime/Cpu/")
    set(layer "Cpu")
  elseif(path MATCHES "^(include/flex|lib)/Runtime/Cuda/")
    set(layer "Cuda")
  elseif(path MATCHES "^(include/flex|lib)/Runtime/Comm/")
    set(layer "Comm")
  elseif(path MATCHES "^(include/flex|lib)/Runtime/CostModel/")
    set(layer "CostModel")
  elseif(path MATCHES "^lib/Runtime/Plan/" OR path MATCHES
         "^include/flex/Runtime/(Plan|PlanLoader|ExpertSlices|StepSchema|StepFacts)\\.h$"
         OR path MATCHES "^include/flex/Runtime/StepKinds\\.def$")
    set(layer "Plan")
  elseif(path MATCHES "^(include/flex|lib)/Runtime/")
    set(layer "Runtime")
  endif()
  set(${out} "${layer}" PARENT_SCOPE)
endfunction()

# Why `path` may not include "flex/..." or "mlir/..." `target`; "" = it may.
function(flex_layering_violation path target out)
  flex_layer("${path}" layer)
  set(why "")
  if(layer STREQUAL "" OR NOT target MATCHES "^(flex|mlir|llvm)/")
    # Not part of the runtime, or a system header.
  elseif(target MATCHES "^(mlir|llvm)/" OR
         target MATCHES "^flex/(Dialect|Conversion|Compiler|Pipelines|Target)/")
    set(why "the runtime has no MLIR or compiler in it")
  elseif(target STREQUAL "flex/Runtime/LayerConfig.h" OR
         target STREQUAL "flex/Runtime/Cpu/Half.h")
    if(NOT path MATCHES "^include/flex/Runtime/(LayerConfig|Cpu/Half)\\.h$")
      set(why "include the Core header (this one only forwards for code "
              "outside the runtime)")
    endif()
  elseif(layer STREQUAL "Core")
    if(NOT target MATCHES "^flex/Runtime/(Core/|Status\\.h$)")
      set(why "Core is the bottom layer: it includes only Core headers "
              "(and Status.h)")
    endif()
  elseif(layer STREQUAL "Plan")
    if(target MATCHES "^flex/Runtime/(Cpu|Cuda|Comm|CostModel)/" OR target MATCHES
       "^flex/Runtime/(Backend|Executor|StepViews|StepBytes)\\.h$")
      set(why "the plan model sits right above Core: no backend, "
              "communicator or executor")
    endif()
  elseif(layer STREQUAL "Cpu")
    if(target MATCHES "^flex/Runtime/Cuda/")
      set(why "a backend includes no other backend's headers")
    elseif(target MATCHES "^flex/Runtime/CostModel/")
      set(why "the CPU kernels sit below the cost model (its calibration "
              "runs them)")
    endif()
  elseif(layer STREQUAL "Cuda")
    if(target MATCHES "^flex/Runtime/Cpu/")
      set(why "a backend includes no other backend's headers (the kernel "
              "argument types are in Core/KernelArgs.h)")
    endif()
  elseif(layer STREQUAL "Comm")
    if(target MATCHES "^flex/Runtime/(Cpu|Cuda)/" OR target MATCHES
       "^flex/Runtime/(Backend|Executor|StepViews|StepBytes)\\.h$")
      set(why "a communicator includes no backend's or executor's headers")
    elseif(target MATCHES "^flex/Runtime/CostModel/")
      set(why "the communicators sit below the cost model (its calibration "
              "runs them)")
    endif()
  elseif(layer STREQUAL "CostModel")
    if((target MATCHES "^flex/Runtime/Cuda/" AND NOT path MATCHES
        "^lib/Runtime/CostModel/CalibrateCuda[A-Za-z]*\\.(cpp|h)$") OR target MATCHES
       "^flex/Runtime/(Backend|Executor|StepViews|StepBytes)\\.h$")
      set(why "the cost model sits below the backends and the executor "
              "(they may use it, not the reverse)")
    elseif(target MATCHES "^flex/Runtime/(Cpu|Comm)/" AND NOT path MATCHES
           "^lib/Runtime/CostModel/Calibrate[A-Za-z]*\\.(cpp|h)$")
      set(why "only the calibration (lib/Runtime/CostModel/Calibrate*) "
              "runs kernels and collectives; the model reads Core and Plan")
    endif()
  endif()
  # The kernel APIs take Core types only.
  if(why STREQUAL "" AND path MATCHES
     "^include/flex/Runtime/(Cpu/CpuKernels|Cuda/CudaKernels)\\.h$" AND
     target MATCHES "^flex/" AND
     NOT target MATCHES "^flex/Runtime/(Core/|Status\\.h$)")
    set(why "a kernel API includes only Core (and Status.h)")
  endif()
  string(CONCAT why ${why})
  set(${out} "${why}" PARENT_SCOPE)
endfunction()

if(FLEX_LAYERING_SELF_TEST)
  set(failures 0)
  # path | include | expected to be refused
  foreach(c
      "lib/Runtime/Cuda/Gate.cu|flex/Runtime/Cpu/CpuKernels.h|1"
      "include/flex/Runtime/Cuda/CudaKernels.h|flex/Runtime/Cpu/CpuKernels.h|1"
      "lib/Runtime/Comm/Communicator.cpp|flex/Runtime/Cpu/Half.h|1"
      "lib/Runtime/Comm/NcclCommunicator.cpp|flex/Runtime/Cuda/CudaKernels.h|1"
      "lib/Runtime/Cpu/Gate.cpp|flex/Runtime/Cuda/CudaKernels.h|1"
      "include/flex/Runtime/Core/KernelArgs.h|flex/Runtime/Plan.h|1"
      "include/flex/Runtime/Plan.h|flex/Runtime/Backend.h|1"
      "lib/Runtime/Plan/PlanReader.cpp|flex/Runtime/Comm/Communicator.h|1"
      "lib/Runtime/Executor/Executor.cpp|mlir/IR/Value.h|1"
      "lib/Runtime/Executor/Executor.cpp|flex/Runtime/LayerConfig.h|1"
      "include/flex/Runtime/Cpu/CpuKernels.h|flex/Runtime/Plan.h|1"
      "include/flex/Runtime/Comm/Communicator.h|flex/Runtime/Executor.h|1"
      "include/flex/Runtime/Core/RuntimeOptions.h|flex/Runtime/Backend.h|1"
      "lib/Runtime/Cuda/CudaBackend.cpp|flex/Runtime/Comm/Communicator.h|0"
      "lib/Runtime/Cpu/Gate.cpp|flex/Runtime/Core/Half.h|0"
      "include/flex/Runtime/Plan.h|flex/Runtime/Core/KernelArgs.h|0"
      "include/flex/Runtime/Cpu/Half.h|flex/Runtime/Core/Half.h|0"
      "tools/moe-run/Npy.cpp|flex/Runtime/Cpu/Half.h|0"
      "include/flex/Runtime/Core/LayerConfig.h|string|0"
      "include/flex/Runtime/Core/RuntimeOptions.h|flex/Runtime/Status.h|0"
      "include/flex/Runtime/Comm/Communicator.h|flex/Runtime/Core/RuntimeOptions.h|0"
      "lib/Runtime/CostModel/CostModel.cpp|flex/Runtime/StepBytes.h|1"
      "include/flex/Runtime/CostModel/CostModel.h|flex/Runtime/Executor.h|1"
      "lib/Runtime/CostModel/CostModel.cpp|flex/Runtime/Cpu/CpuKernels.h|1"
      "include/flex/Runtime/CostModel/Calibrate.h|flex/Runtime/Comm/Communicator.h|1"
      "lib/Runtime/CostModel/CalibrateCpu.cpp|flex/Runtime/Cuda/CudaKernels.h|1"
      "lib/Runtime/CostModel/CalibrateCuda.cpp|flex/Runtime/Cuda/CudaKernels.h|0"
      "lib/Runtime/CostModel/CalibrateCuda.cpp|flex/Runtime/Executor.h|1"
      "lib/Runtime/CostModel/CalibrateCudaSupport.h|flex/Runtime/Cuda/CudaKernels.h|0"
      "lib/Runtime/CostModel/CostModel.cpp|flex/Runtime/Cuda/CudaKernels.h|1"
      "lib/Runtime/Plan/StepSchema.cpp|flex/Runtime/CostModel/CostModel.h|1"
      "lib/Runtime/Comm/Communicator.cpp|flex/Runtime/CostModel/DeviceProfile.h|1"
      "lib/Runtime/Cpu/Gate.cpp|flex/Runtime/CostModel/CostModel.h|1"
      "lib/Runtime/CostModel/CalibrateCpu.cpp|flex/Runtime/Cpu/CpuKernels.h|0"
      "lib/Runtime/CostModel/CalibrateCpu.cpp|flex/Runtime/Comm/Communicator.h|0"
      "lib/Runtime/CostModel/CostModel.cpp|flex/Runtime/StepSchema.h|0"
      "lib/Runtime/Executor/Executor.cpp|flex/Runtime/CostModel/CostModel.h|0"
      "lib/Runtime/Cuda/CudaBackend.cpp|flex/Runtime/CostModel/CostModel.h|0")
    string(REPLACE "|" ";" parts "${c}")
    list(GET parts 0 path)
    list(GET parts 1 target)
    list(GET parts 2 refused)
    flex_layering_violation("${path}" "${target}" why)
    if((refused AND why STREQUAL "") OR (NOT refused AND NOT why STREQUAL ""))
      message(SEND_ERROR "self test: ${path} -> ${target}: expected "
                         "refused=${refused}, got '${why}'")
      math(EXPR failures "${failures} + 1")
    endif()
  endforeach()
  if(failures)
    message(FATAL_ERROR "${failures} layering rule(s) misjudged")
  endif()
  message(STATUS "layering rules: self test passed")
  return()
endif()

if(NOT FLEX_SOURCE_DIR)
  message(FATAL_ERROR "pass -DFLEX_SOURCE_DIR=<repository root>")
endif()
file(GLOB_RECURSE files RELATIVE "${FLEX_SOURCE_DIR}"
     "${FLEX_SOURCE_DIR}/include/flex/Runtime/*"
     "${FLEX_SOURCE_DIR}/lib/Runtime/*")
set(violations 0)
set(checked 0)
foreach(path ${files})
  if(NOT path MATCHES "\\.(h|def|cpp|cu|cuh)$")
    continue()
  endif()
  math(EXPR checked "${checked} + 1")
  file(STRINGS "${FLEX_SOURCE_DIR}/${path}" lines
       REGEX "^[ \t]*#[ \t]*include[ \t]*[\"<]")
  foreach(line ${lines})
    if(NOT line MATCHES "#[ \t]*include[ \t]*[\"<]([^\">]+)[\">]")
      continue()
    endif()
    set(target "${CMAKE_MATCH_1}")
    flex_layering_violation("${path}" "${target}" why)
    if(NOT why STREQUAL "")
      message(SEND_ERROR "${path}: #include \"${target}\": ${why}")
      math(EXPR violations "${violations} + 1")
    endif()
  endforeach()
endforeach()
if(violations)
  message(FATAL_ERROR "${violations} include(s) break the runtime's layering "
                      "(docs/Architecture.md, \"The runtime's libraries\")")
endif()
message(STATUS "runtime layering: ${checked} files, no back edge")
