# Decides FLEX_HAVE_NCCL: the NCCL communicator (lib/Runtime/Comm/
# NcclCommunicator.cpp) is built when the CUDA backend is (FLEX_HAVE_CUDA)
# and NCCL's header and library are found: in the CUDA toolkit, the system
# paths, or NCCL_ROOT / NCCL_HOME / the nvidia-nccl Python wheel. It defines
# the imported target Flex::NCCL. -DFLEX_ENABLE_NCCL=OFF switches it off.
option(FLEX_ENABLE_NCCL "Build the NCCL communicator when NCCL is found" ON)
set(FLEX_HAVE_NCCL OFF)
if(FLEX_HAVE_CUDA AND FLEX_ENABLE_NCCL)
  set(_flex_nccl_hints $ENV{NCCL_ROOT} $ENV{NCCL_HOME} ${NCCL_ROOT}
    ${CUDAToolkit_LIBRARY_ROOT} ${CUDAToolkit_TARGET_DIR})
  find_path(FLEX_NCCL_INCLUDE_DIR nccl.h
    HINTS ${_flex_nccl_hints} ${CUDAToolkit_INCLUDE_DIRS}
    PATH_SUFFIXES include)
  find_library(FLEX_NCCL_LIBRARY NAMES nccl libnccl.so.2
    HINTS ${_flex_nccl_hints} ${CUDAToolkit_LIBRARY_DIR}
    PATH_SUFFIXES lib lib64 lib/x86_64-linux-gnu)
  if(FLEX_NCCL_INCLUDE_DIR AND FLEX_NCCL_LIBRARY)
    file(STRINGS ${FLEX_NCCL_INCLUDE_DIR}/nccl.h _flex_nccl_version
      REGEX "^#define NCCL_(MAJOR|MINOR) ")
    string(REGEX REPLACE ".*NCCL_MAJOR ([0-9]+).*NCCL_MINOR ([0-9]+).*"
      "\\1.\\2" FLEX_NCCL_VERSION "${_flex_nccl_version}")
    # bf16 reductions (ncclBfloat16) and ncclCommGetAsyncError polling of
    # non-blocking communicators need NCCL 2.14 or newer.
    if(FLEX_NCCL_VERSION VERSION_LESS 2.14)
      message(STATUS "Flex: NCCL ${FLEX_NCCL_VERSION} at "
        "${FLEX_NCCL_INCLUDE_DIR} is older than 2.14; no NCCL communicator")
    else()
      set(FLEX_HAVE_NCCL ON)
      if(NOT TARGET Flex::NCCL)
        add_library(Flex::NCCL UNKNOWN IMPORTED)
        set_target_properties(Flex::NCCL PROPERTIES
          IMPORTED_LOCATION ${FLEX_NCCL_LIBRARY}
          INTERFACE_INCLUDE_DIRECTORIES ${FLEX_NCCL_INCLUDE_DIR})
      endif()
    endif()
  endif()
endif()
set(FLEX_HAVE_NCCL ${FLEX_HAVE_NCCL} CACHE INTERNAL
  "The NCCL communicator is built")
if(FLEX_HAVE_NCCL)
  message(STATUS "Flex: NCCL communicator with NCCL ${FLEX_NCCL_VERSION} "
    "(${FLEX_NCCL_LIBRARY})")
else()
  message(STATUS "Flex: no NCCL communicator (needs the CUDA backend and "
    "NCCL >= 2.14)")
endif()
