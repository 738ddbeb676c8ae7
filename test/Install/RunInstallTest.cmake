# The install test (ctest install.package): cmake --install the build into a
# fresh prefix, build the outside project consumer/ against it with
# find_package(Flex), and run its programs on a plan file.
#
#   cmake -DFLEX_BINARY_DIR=... -DWORK_DIR=... -DCONSUMER_DIR=... -DPLAN=...
#         -DGENERATOR=... -DC_COMPILER=... -DCXX_COMPILER=...
#         -P RunInstallTest.cmake
cmake_minimum_required(VERSION 3.20)
foreach(var FLEX_BINARY_DIR WORK_DIR CONSUMER_DIR PLAN GENERATOR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "RunInstallTest.cmake: ${var} is not set")
  endif()
endforeach()

function(run what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE result
    OUTPUT_VARIABLE output ERROR_VARIABLE output)
  message("${output}")
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "${what} failed (${result})")
  endif()
endfunction()

set(prefix ${WORK_DIR}/prefix)
set(build ${WORK_DIR}/consumer-build)
file(REMOVE_RECURSE ${prefix} ${build})

run("cmake --install" ${CMAKE_COMMAND} --install ${FLEX_BINARY_DIR}
  --prefix ${prefix})
foreach(file include/flex-c/Flex.h include/flex/Runtime/Executor.h
             lib/cmake/Flex/FlexConfig.cmake
             lib/cmake/Flex/FlexConfigVersion.cmake bin/moe-run)
  if(NOT EXISTS ${prefix}/${file})
    message(FATAL_ERROR "not installed: ${file}")
  endif()
endforeach()

# Only the installed tree: CMAKE_PREFIX_PATH, and no package registry.
run("configuring the consumer" ${CMAKE_COMMAND} -S ${CONSUMER_DIR}
  -B ${build} -G ${GENERATOR} -DCMAKE_BUILD_TYPE=Release
  -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF
  -DCMAKE_C_COMPILER=${C_COMPILER} -DCMAKE_CXX_COMPILER=${CXX_COMPILER})
run("building the consumer" ${CMAKE_COMMAND} --build ${build})

run("flex-consumer" ${build}/flex-consumer ${PLAN})
if(NOT EXISTS ${build}/flex-consumer-static)
  message(FATAL_ERROR "flex-consumer-static was not built: FlexConfig.cmake "
    "did not find Flex::RuntimeStatic's dependencies")
endif()
run("flex-consumer-static" ${build}/flex-consumer-static ${PLAN})
