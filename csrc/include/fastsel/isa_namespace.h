// The namespace of the code compiled for one vector ISA.
//
// The CPU kernels are compiled three times into one extension (csrc/cpu/isa/: AVX-512,
// AVX2, portable) and the running CPU picks one (csrc/cpu/dispatch.cpp). Every inline
// function and class of a header those kernels include would otherwise exist three
// times under one mangled name, compiled for three ISAs, and the linker would keep any
// one of them (an AVX-512 copy called on an AVX2 CPU dies with an illegal instruction).
// So each such header puts its contents in FASTSEL_ISA_BEGIN ... FASTSEL_ISA_END: an
// inline namespace named after the ISA of the translation unit (FASTSEL_ISA_NS, set by
// the wrapper files of csrc/cpu/isa/), nothing elsewhere (the CUDA kernels, ops.cpp).
#pragma once

#if defined(FASTSEL_ISA_NS)
#define FASTSEL_ISA_BEGIN inline namespace FASTSEL_ISA_NS {
#define FASTSEL_ISA_END }
#else
#define FASTSEL_ISA_BEGIN
#define FASTSEL_ISA_END
#endif
