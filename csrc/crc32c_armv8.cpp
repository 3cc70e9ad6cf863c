// The ARMv8 CRC32 extension, eight bytes at a time: optional in ARMv8.0,
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

DS_FASTCKPT_TARGET_CRC std::uint32_t update_armv8(std::uint32_t state, const std::uint8_t* data,
                                                  std::size_t size) noexcept {
  for (; size >= 8; size -= 8, data += 8) {
    std::uint64_t word;
    std::memcpy(&word, data, sizeof(word));  // little-endian (crc32c_paths.h), as crc32cx expects
    state = __crc32cd(state, word);
  }
  for (; size > 0; --size, ++data) state = __crc32cb(state, *data);
  return state;
}

}  // namespace crc32c_impl
}  // namespace ds_fastckpt

#endif  // DS_FASTCKPT_CRC32C_ARMV8
