// csrc/cpu/select_kernel.cpp compiled for AVX2 + FMA (256-bit vectors); setup.py adds the
// matching -m flags. FASTSEL_ISA_NS names its namespace (fastsel/isa_namespace.h),
// CPU_CAPABILITY that of ATen's vectors, so no symbol is shared with the other ISAs.
#define FASTSEL_ISA_NS avx2
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "../select_kernel.cpp"
