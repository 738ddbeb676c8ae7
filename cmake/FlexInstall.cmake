# cmake --install: the headers, libflex.so (Flex::Runtime), the compiler
# library libflex_compiler.so (Flex::Compiler), the C++ runtime's archives
# (Flex::RuntimeStatic, Flex::Reference), the tools, and the CMake package an
# outside project finds with find_package(Flex) (docs/Embedding.md).
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(FLEX_INSTALL_CMAKEDIR ${CMAKE_INSTALL_LIBDIR}/cmake/Flex)
set(flex_exported)

install(FILES ${FLEX_SOURCE_DIR}/include/flex-c/Flex.h
  DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/flex-c)

if(FLEX_ENABLE_RUNTIME)
  install(DIRECTORY ${FLEX_SOURCE_DIR}/include/flex/Runtime
    ${FLEX_SOURCE_DIR}/include/flex/Reference
    DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/flex
    FILES_MATCHING PATTERN "*.h" PATTERN "*.def")
  list(APPEND flex_exported FlexCAPIShared FlexRuntime FlexReference)
  install(TARGETS moe-run RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
endif()
if(TARGET FlexCompilerShared)
  install(FILES ${FLEX_SOURCE_DIR}/include/flex-c/FlexCompiler.h
    DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/flex-c)
  list(APPEND flex_exported FlexCompilerShared)
endif()
foreach(tool moe-opt moe-translate)
  if(TARGET ${tool})
    install(TARGETS ${tool} RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
  endif()
endforeach()
# Installed binaries keep the directories of the libraries they link from
# outside (LLVM, CUDA, MPI) in their RUNPATH.
foreach(target moe-run moe-opt moe-translate)
  if(TARGET ${target})
    set_target_properties(${target} PROPERTIES INSTALL_RPATH_USE_LINK_PATH ON)
  endif()
endforeach()

# The package: only a build with the runtime has targets to export.
if(NOT flex_exported)
  return()
endif()
install(TARGETS ${flex_exported} EXPORT FlexTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(EXPORT FlexTargets NAMESPACE Flex::
  DESTINATION ${FLEX_INSTALL_CMAKEDIR})

# What FlexConfig.cmake needs to find the static runtime's dependencies again.
set(FLEX_CONFIG_HAVE_COMPILER OFF)
if(TARGET FlexCompilerShared)
  set(FLEX_CONFIG_HAVE_COMPILER ON)
endif()
get_target_property(flex_runtime_links FlexRuntime INTERFACE_LINK_LIBRARIES)
set(FLEX_CONFIG_HAVE_OPENMP OFF)
if(flex_runtime_links MATCHES "OpenMP::OpenMP_CXX")
  set(FLEX_CONFIG_HAVE_OPENMP ON)
endif()
set(FLEX_CONFIG_HAVE_MPI OFF)
if(flex_runtime_links MATCHES "MPI::MPI_C")
  set(FLEX_CONFIG_HAVE_MPI ON)
endif()
configure_package_config_file(${FLEX_SOURCE_DIR}/cmake/FlexConfig.cmake.in
  ${FLEX_BINARY_DIR}/cmake/FlexConfig.cmake
  INSTALL_DESTINATION ${FLEX_INSTALL_CMAKEDIR})
write_basic_package_version_file(${FLEX_BINARY_DIR}/cmake/FlexConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${FLEX_BINARY_DIR}/cmake/FlexConfig.cmake
  ${FLEX_BINARY_DIR}/cmake/FlexConfigVersion.cmake
  DESTINATION ${FLEX_INSTALL_CMAKEDIR})
