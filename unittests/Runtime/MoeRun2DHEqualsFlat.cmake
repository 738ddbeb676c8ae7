# Runs a plan whose all_to_all steps have "ranks_per_node" (the hierarchical
# 2DH exchange) and the same plan with it 0 (flat) under mpirun on the same
# inputs; every rank's outputs must be identical, byte for byte.
# Usage: cmake -DMPIRUN="mpirun|flags" -DNP=... -DMOE_RUN=... -DPLAN=...
#        -DVARIANT=... -DDIR=... -P MoeRun2DHEqualsFlat.cmake
# (MPIRUN's words are separated by '|', as ';' would split the -D argument.)
string(REPLACE "|" ";" mpirun "${MPIRUN}")
file(REMOVE_RECURSE ${DIR})
file(MAKE_DIRECTORY ${DIR})
file(READ ${PLAN} text)
string(REGEX REPLACE "\"ranks_per_node\": *[1-9][0-9]*" "\"ranks_per_node\": 0"
       flat "${text}")
if(flat STREQUAL text)
  message(FATAL_ERROR "${PLAN} has no \"ranks_per_node\" to take out")
endif()
file(WRITE ${DIR}/flat.json "${flat}")
foreach(kind 2dh flat)
  if(kind STREQUAL "2dh")
    set(plan ${PLAN})
  else()
    set(plan ${DIR}/flat.json)
  endif()
  execute_process(
    COMMAND ${mpirun} -np ${NP} ${MOE_RUN} ${plan} --train --seed 3
            --variant ${VARIANT} --outputs ${DIR}/${kind}
    RESULT_VARIABLE status)
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "moe-run on the ${kind} plan failed: ${status}")
  endif()
endforeach()
file(GLOB_RECURSE outputs RELATIVE ${DIR}/2dh ${DIR}/2dh/*.npy)
list(LENGTH outputs count)
if(count LESS NP)
  message(FATAL_ERROR "expected the outputs of ${NP} ranks; got ${outputs}")
endif()
foreach(name ${outputs})
  execute_process(COMMAND ${CMAKE_COMMAND} -E compare_files
                  ${DIR}/2dh/${name} ${DIR}/flat/${name}
                  RESULT_VARIABLE differ)
  if(differ)
    message(FATAL_ERROR "${name} differs between the 2DH and the flat plan")
  endif()
endforeach()
message(STATUS "2DH == flat: ${count} identical outputs on ${NP} ranks")
