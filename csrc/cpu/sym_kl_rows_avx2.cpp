// The sym_kl CPU row kernels compiled for AVX2 + FMA (8-wide float), chosen at run time when
// the CPU has them. On other architectures this is a second copy of the baseline kernels.
#if defined(__x86_64__) || defined(_M_X64)
#define SK_CPU_ISA_AVX2
#endif
#define SK_CPU_ISA avx2
#include "sym_kl_rows.h"
