// How the CPU kernel was compiled (reported by se_fused._C.build_info()).
#pragma once

namespace se_fused {

// ATen's at::parallel_for is a header template: in a translation unit compiled
// without OpenMP (while torch's ATen uses it) it runs inline on one thread, so
// the build must match torch's.
struct CpuKernelBuild {
  bool parallel;           // at::parallel_for spreads work over torch's threads
  const char* vector_isa;  // what at::vec::Vectorized compiles to: "AVX2" or "DEFAULT"
};
CpuKernelBuild cpu_kernel_build();

}  // namespace se_fused
