# Default CUDA architectures by toolkit version: the one rule, kept apart from
# CMakeLists.txt so that tests/test_portability.py can check it with `cmake -P`
# without a CUDA compiler.
#
#   CUDA >= 13.0         75;80;86;87;89;90           (13.0 removed sm_50..sm_72)
#   CUDA 11.8 .. 12.x    60;61;70;75;80;86;87;89;90  (Pascal, e.g. Tesla P100 = sm_60)
#   CUDA <  11.8         no default: 11.8 is the first toolkit with sm_89/sm_90,
#                        pass -DCMAKE_CUDA_ARCHITECTURES=... for an older one
#
# 87 is Jetson Orin (JetPack 6 ships CUDA 12.6).  A bare number gets SASS and
# PTX (CMake's default), so a GPU newer than the list runs the last entry's
# PTX through the driver's JIT; an older one has no kernels.

# fer_edge_default_cuda_archs(<version> <out_var>): <out_var> = the list, or ""
# when the version has no default.
function(fer_edge_default_cuda_archs version out_var)
  if(NOT version MATCHES "^[0-9]+\\.[0-9]+")
    message(FATAL_ERROR "fer_edge_default_cuda_archs: '${version}' is not a CUDA version (like 12.4)")
  endif()
  if(version VERSION_GREATER_EQUAL 13.0)
    set(archs "75;80;86;87;89;90")
  elseif(version VERSION_GREATER_EQUAL 11.8)
    set(archs "60;61;70;75;80;86;87;89;90")
  else()
    set(archs "")
  endif()
  set(${out_var} "${archs}" PARENT_SCOPE)
endfunction()

# fer_edge_nvcc_version(<text> <out_var>): the "X.Y" of nvcc's `--version`
# output ("Cuda compilation tools, release 12.4, V12.4.131"), or "" when the
# text has none (e.g. clang as the CUDA compiler).
function(fer_edge_nvcc_version text out_var)
  if(text MATCHES "release ([0-9]+\\.[0-9]+)")
    set(${out_var} "${CMAKE_MATCH_1}" PARENT_SCOPE)
  else()
    set(${out_var} "" PARENT_SCOPE)
  endif()
endfunction()

# fer_edge_cutlass_archs(<archs> <out_var>): the architectures to build the
# CUTLASS path (SM80 mma.sync kernels) for, from the extension's list.  Its
# sm_80 code runs on every 8.x GPU (86, 87 Jetson Orin, 89), so those share
# one 80-real build; 9.0 and newer get their own.  The highest also gets PTX
# (a bare number), as the extension's own list does, so a GPU newer than the
# list JIT-compiles it.  Older entries get none (the path needs 8.0).  A
# symbolic list (native, all, all-major) is kept as is: the host code checks
# the compute capability before any launch.
function(fer_edge_cutlass_archs archs out_var)
  set(result "")
  foreach(arch IN LISTS archs)
    if(NOT arch MATCHES "^([0-9]+)")
      set(${out_var} "${archs}" PARENT_SCOPE)
      return()
    endif()
    set(num "${CMAKE_MATCH_1}")
    if(num GREATER_EQUAL 90)
      list(APPEND result "${num}-real")
    elseif(num GREATER_EQUAL 80)
      list(APPEND result "80-real")
    endif()
  endforeach()
  list(REMOVE_DUPLICATES result)
  list(LENGTH result count)
  if(count GREATER 0)
    math(EXPR last "${count} - 1")
    list(GET result ${last} highest)
    string(REPLACE "-real" "" highest_ptx "${highest}")
    list(REMOVE_AT result ${last})
    list(APPEND result "${highest_ptx}")
  endif()
  set(${out_var} "${result}" PARENT_SCOPE)
endfunction()

# fer_edge_cutlass_sm90_archs(<archs> <out_var>): "90a-real" when the list
# builds for compute capability 9.0 (H100, H200), else "": the Hopper path
# uses wgmma and the TMA, which only sm_90a code has (and which no other GPU
# runs).  A symbolic list (native, all) gets none: name the architecture.
function(fer_edge_cutlass_sm90_archs archs out_var)
  set(result "")
  foreach(arch IN LISTS archs)
    if(arch MATCHES "^90(a)?(-real|-virtual)?$")
      set(result "90a-real")
    endif()
  endforeach()
  set(${out_var} "${result}" PARENT_SCOPE)
endfunction()
