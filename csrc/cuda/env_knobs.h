// The CUDA paths' environment knobs are read per call (tests and the tuning scripts
// switch them between calls); this is the one parser they share.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>

namespace se_fused {
namespace cuda {

// The integer in the environment variable `name`, or `unset` when it is unset or empty;
// anything that is not an integer in [lo, hi] and a multiple of `multiple_of` is refused with
// "`name` must be `requirement`".
inline int64_t integer_from_env(const char* name, int64_t unset, int64_t lo, int64_t hi, const char* requirement,
                                int64_t multiple_of = 1) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return unset;
  char* end = nullptr;
  const long long value = std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(*end == '\0' && value >= lo && value <= hi && value % multiple_of == 0, "se_fused: ", name,
                    " must be ", requirement, "; got '", env, "'");
  return value;
}

// The position in `choices` of the environment variable `name`'s value, or `unset` when it is
// unset or empty; any other value is refused with "`name` must be a, b or c".
inline int choice_from_env(const char* name, std::initializer_list<const char*> choices, int unset) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return unset;
  std::string listed;
  int index = 0;
  for (const char* choice : choices) {
    if (std::strcmp(env, choice) == 0) return index;
    listed += std::string(index == 0 ? "" : index + 1 == static_cast<int>(choices.size()) ? " or " : ", ") + choice;
    ++index;
  }
  TORCH_CHECK_VALUE(false, "se_fused: ", name, " must be ", listed, "; got '", env, "'");
  return unset;
}

}  // namespace cuda
}  // namespace se_fused
