// csrc/cpu/select_kernel.cpp compiled for the portable vector code (ATen's fallback); setup.py adds the
// matching -m flags. FASTSEL_ISA_NS names its namespace (fastsel/isa_namespace.h),
// CPU_CAPABILITY that of ATen's vectors, so no symbol is shared with the other ISAs.
#define FASTSEL_ISA_NS portable
#define CPU_CAPABILITY DEFAULT

#include "../select_kernel.cpp"
