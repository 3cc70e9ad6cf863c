// The ARMv8 CRC32 extension, eight bytes at a time in three stripes side by side: optional in ARMv8.0,
// mandatory from ARMv8.1 (Neoverse, Grace, Graviton 2 and later).
#include "crc32c_paths.h"

#if DS_FASTCKPT_CRC32C_ARMV8

#include <arm_acle.h>
#include <sys/auxv.h>

#include <cstring>

#ifndef HWCAP_CRC32
#define HWCAP_CRC32 (1UL << 7)  // arch/arm64/include/uapi/asm/hwcap.h, for C libraries that lack it
#endif

// Enables the instructions for this function only; the rest of the op keeps
// the baseline architecture, so it still loads on a CPU without them.
#if defined(__clang__)
#define DS_FASTCKPT_TARGET_CRC __attribute__((target("crc")))
#else
#define DS_FASTCKPT_TARGET_CRC __attribute__((target("+crc")))
#endif

namespace ds_fastckpt {
namespace crc32c_impl {

bool cpu_has_armv8_crc32() noexcept {
  static const bool supported = (getauxval(AT_HWCAP) & HWCAP_CRC32) != 0;
  return supported;
}

namespace {

inline std::uint64_t load_word(const std::uint8_t* data) noexcept {
  std::uint64_t word;
  std::memcpy(&word, data, sizeof(word));  // little-endian (crc32c_paths.h), as crc32cx expects
  return word;
}

inline std::uint64_t copy_word(std::uint8_t* dst, const std::uint8_t* src) noexcept {
  const std::uint64_t word = load_word(src);
  std::memcpy(dst, &word, sizeof(word));
  return word;
}

}  // namespace

DS_FASTCKPT_TARGET_CRC std::uint32_t update_armv8(std::uint32_t state, const std::uint8_t* data,
                                                  std::size_t size) noexcept {
  for (; size >= 3 * kStripe; size -= 3 * kStripe, data += 3 * kStripe) {  // see kStripe
    std::uint32_t first = state, second = 0, third = 0;
    for (std::size_t i = 0; i < kStripe; i += 8) {
      first = __crc32cd(first, load_word(data + i));
      second = __crc32cd(second, load_word(data + kStripe + i));
      third = __crc32cd(third, load_word(data + 2 * kStripe + i));
    }
    state = join_stripes(first, second, third);
  }
  for (; size >= 8; size -= 8, data += 8) state = __crc32cd(state, load_word(data));
  for (; size > 0; --size, ++data) state = __crc32cb(state, *data);
  return state;
}

DS_FASTCKPT_TARGET_CRC std::uint32_t copy_armv8(std::uint32_t state, std::uint8_t* dst, const std::uint8_t* src,
                                                std::size_t size) noexcept {
  for (; size >= 3 * kStripe; size -= 3 * kStripe, src += 3 * kStripe, dst += 3 * kStripe) {
    std::uint32_t first = state, second = 0, third = 0;
    for (std::size_t i = 0; i < kStripe; i += 8) {
      first = __crc32cd(first, copy_word(dst + i, src + i));
      second = __crc32cd(second, copy_word(dst + kStripe + i, src + kStripe + i));
      third = __crc32cd(third, copy_word(dst + 2 * kStripe + i, src + 2 * kStripe + i));
    }
    state = join_stripes(first, second, third);
  }
  for (; size >= 8; size -= 8, src += 8, dst += 8) state = __crc32cd(state, copy_word(dst, src));
  for (; size > 0; --size, ++src, ++dst) state = __crc32cb(state, *dst = *src);
  return state;
}

}  // namespace crc32c_impl
}  // namespace ds_fastckpt

#endif  // DS_FASTCKPT_CRC32C_ARMV8
