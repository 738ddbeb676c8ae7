# Runs moe-run twice on the same plan: first with --seed, saving the inputs
# and the outputs; then reading those inputs back from .npy. Both runs must
# write identical outputs (the .npy round trip and determinism of a run).
# Usage: cmake -DMOE_RUN=... -DPLAN=... -DDIR=... [-DCHECK=--check]
#        -P MoeRunRoundTrip.cmake
file(REMOVE_RECURSE ${DIR})
execute_process(
  COMMAND ${MOE_RUN} ${PLAN} --train --seed 5 --save-inputs ${DIR}/inputs
          --outputs ${DIR}/first
  RESULT_VARIABLE status)
if(NOT status EQUAL 0)
  message(FATAL_ERROR "moe-run with --seed failed: ${status}")
endif()
execute_process(
  COMMAND ${MOE_RUN} ${PLAN} --train --inputs ${DIR}/inputs
          --outputs ${DIR}/second ${CHECK}
  RESULT_VARIABLE status)
if(NOT status EQUAL 0)
  message(FATAL_ERROR "moe-run with --inputs failed: ${status}")
endif()
file(GLOB outputs RELATIVE ${DIR}/first ${DIR}/first/*.npy)
list(LENGTH outputs count)
if(count LESS 4)
  message(FATAL_ERROR "expected out, l_aux and gradients; got ${outputs}")
endif()
foreach(name ${outputs})
  execute_process(COMMAND ${CMAKE_COMMAND} -E compare_files
                  ${DIR}/first/${name} ${DIR}/second/${name}
                  RESULT_VARIABLE differ)
  if(differ)
    message(FATAL_ERROR "${name} differs between the two runs")
  endif()
endforeach()
message(STATUS "moe-run round trip: ${count} identical outputs")
