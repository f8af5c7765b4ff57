// The sym_kl CPU row kernels for the baseline instruction set (SSE2 on x86-64, NEON on arm64).
#define SK_CPU_ISA base
#include "sym_kl_rows.h"
