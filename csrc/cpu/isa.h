// Run-time ISA choice (x86-64 with GCC): the .so is compiled for baseline x86-64, and kernels
// that pay for it are compiled a second and third time under `#pragma GCC target("avx2...")` /
// `("avx512...")`, each copy in its own namespace (avx2_isa, avx512_isa); the caller picks one
// per call from kvslimmer::cpu_isa() (what the CPU reports, or KVSLIMMER_CPU_ISA). Other
// compilers and architectures get the portable loops only.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define KVS_X86_DISPATCH 1
#else
#define KVS_X86_DISPATCH 0
#endif

// KVS_BEGIN_AVX2 / KVS_BEGIN_AVX512 ... KVS_END_TARGET enclose a copy's namespace.
#define KVS_BEGIN_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define KVS_BEGIN_AVX512         \
  _Pragma("GCC push_options")    \
  _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c\")")
#define KVS_END_TARGET _Pragma("GCC pop_options")
