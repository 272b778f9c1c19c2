// The CUDA paths' environment knobs are read per call (tests and the tuning scripts
// switch them between calls); this is the one parser they share.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>

namespace se_fused {
namespace cuda {

// The integer in the environment variable `name`, or `unset` when it is unset or empty;
// anything that is not an integer in [lo, hi] is refused with "`name` must be `requirement`".
inline int64_t integer_from_env(const char* name, int64_t unset, int64_t lo, int64_t hi, const char* requirement) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return unset;
  char* end = nullptr;
  const long long value = std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(*end == '\0' && value >= lo && value <= hi, "se_fused: ", name, " must be ", requirement,
                    "; got '", env, "'");
  return value;
}

}  // namespace cuda
}  // namespace se_fused
