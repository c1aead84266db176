// csrc/cpu/select_kernel.cpp compiled for AVX-512 F, BW, VL, DQ (512-bit vectors); setup.py adds the
// matching -m flags. FASTSEL_ISA_NS names its namespace (fastsel/isa_namespace.h),
// CPU_CAPABILITY that of ATen's vectors, so no symbol is shared with the other ISAs.
#define FASTSEL_ISA_NS avx512
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "../select_kernel.cpp"
