// CUDA implementations of the fastsel operators. The ops are defined once, in
// csrc/ops.cpp (TORCH_LIBRARY(fastsel, m), schemas from fastsel/contract.py); this file
// only adds the CUDA dispatch key,
// so torch.ops.fastsel.score_forward / score_backward route CUDA tensors to
// csrc/cuda/score_kernel.cu and the selection ops (select_topk, sample_without_replacement,
// sample_with_replacement, percentile) to csrc/cuda/select_kernel.cu. Fake implementations
// are registered from Python (fastsel/registration/), the autograd in
// csrc/score_autograd.cpp; both serve every device.
//
// Host-only code. It is a .cu file because it belongs to the CUDA part of the build (it
// must be compiled only when the CUDA kernels are), and the __CUDA_ARCH__ guard keeps
// nvcc's device passes from parsing the torch headers for nothing.
#if !defined(__CUDA_ARCH__)

#include <torch/library.h>

#include "kernels.h"

TORCH_LIBRARY_IMPL(fastsel, CUDA, m) {
  m.impl("score_forward", &fastsel::cuda::score_forward);
  m.impl("score_backward", &fastsel::cuda::score_backward);
  m.impl("select_topk", &fastsel::cuda::select_topk);
  m.impl("sample_without_replacement", &fastsel::cuda::sample_without_replacement);
  m.impl("sample_with_replacement", &fastsel::cuda::sample_with_replacement);
  m.impl("percentile", &fastsel::cuda::percentile);
}

#endif  // !defined(__CUDA_ARCH__)
