// The CPU kernels' instruction set, chosen at run time and shared by the CPU ops.
#pragma once

#include <cstdlib>
#include <string>

namespace smart_kernels {

// AVX2 + FMA kernels when the CPU has them, unless SMART_KERNELS_CPU_ISA=base (read once; lets
// the tests cover the baseline kernels on an AVX2 machine).
inline bool cpu_use_avx2() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool use = [] {
    const char* isa = std::getenv("SMART_KERNELS_CPU_ISA");
    if (isa != nullptr && std::string(isa) == "base") return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return use;
#else
  return false;
#endif
}

}  // namespace smart_kernels
