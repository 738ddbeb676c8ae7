# flex_static_link_closure(<out-var> <target>...): the link line that links
# <target>s' dependencies statically, MLIR and LLVM included, for a shared
# library that must not need libLLVM.so / libMLIR.so (libflex_compiler.so,
# docs/Embedding.md).
#
# Debian's MLIR archives name the LLVM dylib (`LLVM`) in their link
# interface, and every target of this build links it through them. Instead of
# rewriting the imported targets (which would move moe-opt and every test to
# static LLVM too), this walks the link interface of <target>s and returns
# the archives themselves: each Flex static library's file, each imported
# MLIR archive's location, `LLVM` replaced by the static LLVM component
# archives of FLEX_STATIC_LLVM_COMPONENTS. Object libraries contribute their
# dependencies only (their objects are in the archive that lists them).
# Shared libraries the runtime's archives name (OpenMP, OpenBLAS, MPI, CUDA)
# are left out: the compiler uses only the runtime's plan model and writer,
# and the caller links with --no-undefined, which says if that changes.
#
# The result goes between -Wl,--start-group and -Wl,--end-group: archives
# reference each other in cycles (MLIRIR <-> MLIRSupport, ...).

# The LLVM components MLIR's IR, parser, pass and transform libraries use;
# -Wl,--no-undefined on the shared library says when one is missing.
set(FLEX_STATIC_LLVM_COMPONENTS support demangle remarks bitstreamreader
  targetparser CACHE STRING "LLVM components linked into the compiler library")

# Adds a file or library name to the link line, unless it is a shared one.
function(_flex_static_link_add item)
  if(NOT item MATCHES "\\.so(\\.[0-9.]+)?$")
    set_property(GLOBAL APPEND PROPERTY _flex_static_items "${item}")
  endif()
endfunction()

function(_flex_static_link_visit item)
  # $<LINK_ONLY:x> (a static library's private dependency) is still linked.
  if(item MATCHES "^\\$<(LINK_ONLY|BUILD_INTERFACE):(.+)>$")
    set(item "${CMAKE_MATCH_2}")
  elseif(item MATCHES "^\\$<INSTALL_INTERFACE:")
    return()
  endif()
  if(item MATCHES "^\\$<")
    message(FATAL_ERROR "flex_static_link_closure: cannot resolve '${item}'")
  endif()
  get_property(seen GLOBAL PROPERTY _flex_static_seen)
  if("${item}" IN_LIST seen)
    return()
  endif()
  set_property(GLOBAL APPEND PROPERTY _flex_static_seen "${item}")

  if(item STREQUAL "LLVM" OR item STREQUAL "MLIR")
    if(item STREQUAL "MLIR")
      message(FATAL_ERROR "flex_static_link_closure: MLIR is linked as the "
        "libMLIR.so dylib; the static archives are needed")
    endif()
    llvm_map_components_to_libnames(llvm_libs ${FLEX_STATIC_LLVM_COMPONENTS})
    foreach(lib IN LISTS llvm_libs)
      get_target_property(location ${lib} LOCATION)
      set_property(GLOBAL APPEND PROPERTY _flex_static_items "${location}")
    endforeach()
    return()
  endif()

  if(NOT TARGET "${item}" AND item MATCHES "::")
    # An imported target of another directory's scope (OpenMP, MPI, NCCL of
    # the runtime's kernels and communicators): the compiler does not use
    # them, and --no-undefined would say if it did.
    return()
  endif()
  if(NOT TARGET "${item}")
    # A plain library (-lpthread, m, a path).
    _flex_static_link_add("${item}")
    return()
  endif()

  get_target_property(type ${item} TYPE)
  get_target_property(imported ${item} IMPORTED)
  if(imported)
    if(type STREQUAL "STATIC_LIBRARY" OR type STREQUAL "SHARED_LIBRARY" OR
       type STREQUAL "UNKNOWN_LIBRARY")
      get_target_property(location ${item} LOCATION)
      _flex_static_link_add("${location}")
    endif()
    get_target_property(deps ${item} INTERFACE_LINK_LIBRARIES)
  else()
    if(type STREQUAL "STATIC_LIBRARY")
      set_property(GLOBAL APPEND PROPERTY _flex_static_items
        "$<TARGET_FILE:${item}>")
      set_property(GLOBAL APPEND PROPERTY _flex_static_targets "${item}")
    elseif(NOT type STREQUAL "OBJECT_LIBRARY" AND
           NOT type STREQUAL "INTERFACE_LIBRARY")
      message(FATAL_ERROR "flex_static_link_closure: ${item} is a ${type}")
    endif()
    if(type STREQUAL "INTERFACE_LIBRARY")
      get_target_property(deps ${item} INTERFACE_LINK_LIBRARIES)
    else()
      get_target_property(deps ${item} LINK_LIBRARIES)
    endif()
  endif()
  if(deps)
    foreach(dep IN LISTS deps)
      _flex_static_link_visit("${dep}")
    endforeach()
  endif()
endfunction()

# Sets <out-var> to the link items and <out-var>_TARGETS to this build's
# archives among them (the shared library depends on them).
function(flex_static_link_closure out)
  set_property(GLOBAL PROPERTY _flex_static_seen "")
  set_property(GLOBAL PROPERTY _flex_static_items "")
  set_property(GLOBAL PROPERTY _flex_static_targets "")
  foreach(target IN LISTS ARGN)
    _flex_static_link_visit("${target}")
  endforeach()
  get_property(items GLOBAL PROPERTY _flex_static_items)
  get_property(targets GLOBAL PROPERTY _flex_static_targets)
  set(${out} "${items}" PARENT_SCOPE)
  set(${out}_TARGETS "${targets}" PARENT_SCOPE)
endfunction()
