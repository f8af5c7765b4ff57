// The perturbation ops' CPU group kernels compiled for AVX2 + FMA (8-wide float), chosen at run
// time when the CPU has them. On other architectures this is a second copy of the baseline.
#if defined(__x86_64__) || defined(_M_X64)
#define SK_CPU_ISA_AVX2
#endif
#define SK_CPU_ISA avx2
#include "perturb_groups_impl.h"
