// The SSE4.2 crc32 instruction, eight bytes at a time in three stripes side by side: x86-64 CPUs since 2008.
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

namespace {

inline std::uint64_t load_word(const std::uint8_t* data) noexcept {
  std::uint64_t word;
  std::memcpy(&word, data, sizeof(word));
  return word;
}

inline std::uint64_t copy_word(std::uint8_t* dst, const std::uint8_t* src) noexcept {
  const std::uint64_t word = load_word(src);
  std::memcpy(dst, &word, sizeof(word));
  return word;
}

}  // namespace

__attribute__((target("sse4.2"))) std::uint32_t update_sse42(std::uint32_t state, const std::uint8_t* data,
                                                             std::size_t size) noexcept {
  for (; size >= 3 * kStripe; size -= 3 * kStripe, data += 3 * kStripe) {
    std::uint64_t first = state, second = 0, third = 0;
    for (std::size_t i = 0; i < kStripe; i += 8) {
      first = _mm_crc32_u64(first, load_word(data + i));
      second = _mm_crc32_u64(second, load_word(data + kStripe + i));
      third = _mm_crc32_u64(third, load_word(data + 2 * kStripe + i));
    }
    state = join_stripes(static_cast<std::uint32_t>(first), static_cast<std::uint32_t>(second),
                         static_cast<std::uint32_t>(third));
  }
  std::uint64_t state64 = state;
  for (; size >= 8; size -= 8, data += 8) {
    state64 = _mm_crc32_u64(state64, load_word(data));
  }
  auto state32 = static_cast<std::uint32_t>(state64);
  for (; size > 0; --size, ++data) state32 = _mm_crc32_u8(state32, *data);
  return state32;
}

__attribute__((target("sse4.2"))) std::uint32_t copy_sse42(std::uint32_t state, std::uint8_t* dst,
                                                           const std::uint8_t* src, std::size_t size) noexcept {
  for (; size >= 3 * kStripe; size -= 3 * kStripe, src += 3 * kStripe, dst += 3 * kStripe) {
    std::uint64_t first = state, second = 0, third = 0;
    for (std::size_t i = 0; i < kStripe; i += 8) {
      first = _mm_crc32_u64(first, copy_word(dst + i, src + i));
      second = _mm_crc32_u64(second, copy_word(dst + kStripe + i, src + kStripe + i));
      third = _mm_crc32_u64(third, copy_word(dst + 2 * kStripe + i, src + 2 * kStripe + i));
    }
    state = join_stripes(static_cast<std::uint32_t>(first), static_cast<std::uint32_t>(second),
                         static_cast<std::uint32_t>(third));
  }
  std::uint64_t state64 = state;
  for (; size >= 8; size -= 8, src += 8, dst += 8) state64 = _mm_crc32_u64(state64, copy_word(dst, src));
  auto state32 = static_cast<std::uint32_t>(state64);
  for (; size > 0; --size, ++src, ++dst) state32 = _mm_crc32_u8(state32, *dst = *src);
  return state32;
}

}  // namespace crc32c_impl
}  // namespace ds_fastckpt

#endif  // DS_FASTCKPT_CRC32C_SSE42
