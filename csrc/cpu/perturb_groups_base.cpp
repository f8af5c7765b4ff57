// The perturbation ops' CPU group kernels for the baseline instruction set (SSE2 on x86-64,
// NEON on arm64).
#define SK_CPU_ISA base
#include "perturb_groups_impl.h"
