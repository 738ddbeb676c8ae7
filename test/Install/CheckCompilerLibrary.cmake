# ctest install.compiler-deps: libflex_compiler.so must travel to a machine
# without MLIR (docs/Embedding.md): it needs only the C and C++ runtime
# libraries, has no RUNPATH, and exports only the C functions of
# flex-c/FlexCompiler.h.
#
#   cmake -DLIBRARY=libflex_compiler.so -DREADELF=readelf -P CheckCompilerLibrary.cmake
cmake_minimum_required(VERSION 3.20)
execute_process(COMMAND ${READELF} -d --wide ${LIBRARY}
  RESULT_VARIABLE result OUTPUT_VARIABLE dynamic)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "readelf -d ${LIBRARY} failed")
endif()
set(allowed libc.so.6 libm.so.6 libstdc++.so.6 libgcc_s.so.1
  ld-linux-x86-64.so.2 ld-linux-aarch64.so.1 libdl.so.2 libpthread.so.0)
string(REPLACE "\n" ";" lines "${dynamic}")
set(bad)
foreach(line IN LISTS lines)
  if(line MATCHES "\\(NEEDED\\).*\\[(.+)\\]")
    message("NEEDED ${CMAKE_MATCH_1}")
    if(NOT CMAKE_MATCH_1 IN_LIST allowed)
      list(APPEND bad ${CMAKE_MATCH_1})
    endif()
  endif()
endforeach()
if(bad)
  message(FATAL_ERROR "libflex_compiler.so needs ${bad}: it must need only "
    "libc, libm, libstdc++ and libgcc_s")
endif()
if(dynamic MATCHES "(RUNPATH|RPATH)")
  message(FATAL_ERROR "libflex_compiler.so has an RPATH/RUNPATH")
endif()

execute_process(COMMAND ${READELF} --dyn-syms --wide ${LIBRARY}
  OUTPUT_VARIABLE symbols)
string(REPLACE ";" "," symbols "${symbols}")
string(REPLACE "\n" ";" lines "${symbols}")
set(exported)
foreach(line IN LISTS lines)
  # Defined (not UND) global or weak symbols are exported.
  if(line MATCHES " (GLOBAL|WEAK) +DEFAULT +[0-9]+ +([^ @]+)")
    list(APPEND exported ${CMAKE_MATCH_2})
  endif()
endforeach()
list(SORT exported)
message("exported: ${exported}")
if(NOT exported STREQUAL
   "flexCompilerGetHooks;flexCompilerGetVersion;flexCompilerRegister")
  message(FATAL_ERROR "libflex_compiler.so must export exactly the "
    "functions of flex-c/FlexCompiler.h")
endif()
