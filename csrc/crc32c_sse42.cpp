// The SSE4.2 crc32 instruction, eight bytes at a time: x86-64 CPUs since 2008.
#include "crc32c_paths.h"

#if DS_FASTCKPT_CRC32C_SSE42

#include <nmmintrin.h>

#include <cstring>

namespace ds_fastckpt {
namespace crc32c_impl {

bool cpu_has_sse42() noexcept {
  static const bool supported = __builtin_cpu_supports("sse4.2");
  return supported;
}

__attribute__((target("sse4.2"))) std::uint32_t update_sse42(std::uint32_t state, const std::uint8_t* data,
                                                             std::size_t size) noexcept {
  std::uint64_t state64 = state;
  for (; size >= 8; size -= 8, data += 8) {
    std::uint64_t word;
    std::memcpy(&word, data, sizeof(word));
    state64 = _mm_crc32_u64(state64, word);
  }
  auto state32 = static_cast<std::uint32_t>(state64);
  for (; size > 0; --size, ++data) state32 = _mm_crc32_u8(state32, *data);
  return state32;
}

}  // namespace crc32c_impl
}  // namespace ds_fastckpt

#endif  // DS_FASTCKPT_CRC32C_SSE42
