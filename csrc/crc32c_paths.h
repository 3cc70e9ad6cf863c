// The CRC-32C implementations behind crc32c_extend(), one per file, and which of them this build has.
#pragma once

#include <cstddef>
#include <cstdint>

// The SSE4.2 path is compiled on every x86-64 build (a function-level target
// attribute enables the instruction) and used where the CPU has it.
#if defined(__x86_64__)
#define DS_FASTCKPT_CRC32C_SSE42 1
#else
#define DS_FASTCKPT_CRC32C_SSE42 0
#endif

// The ARMv8 path needs the ACLE __crc32c* intrinsics to be declared without a
// -march that enables +crc for the whole file: GCC's arm_acle.h declares them
// under its own target pragma (GCC 8 and later), clang's only from 16 on.
// Elsewhere (an older clang without +crc) the portable path is used. Linux
// only: the CPU check reads the kernel's HWCAP bits; little-endian only: the
// eight-byte step hands crc32cx the bytes as a little-endian word.
#if defined(__aarch64__) && defined(__linux__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ &&       \
    (defined(__ARM_FEATURE_CRC32) || (defined(__clang__) && __clang_major__ >= 16) ||                 \
     (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 8))
#define DS_FASTCKPT_CRC32C_ARMV8 1
#else
#define DS_FASTCKPT_CRC32C_ARMV8 0
#endif

namespace ds_fastckpt {
namespace crc32c_impl {

// The raw CRC register `state` advanced over `size` zero bytes: state times
// x^(8 size) modulo the polynomial. Register updates are linear, so a register
// run from 0 over b combines with one run over a: shift_state(r_a, |b|) ^ r_b.
std::uint32_t shift_state(std::uint32_t state, std::uint64_t size) noexcept;

// The instruction paths hash three neighbouring stripes of kStripe bytes side
// by side: a crc32 instruction has a latency of three cycles and a throughput
// of one per cycle, so three independent registers run about three times as
// fast as one. join_stripes() gives the register over all three from those run
// over each (the first from the state before them, the other two from 0); it
// costs about what 1 KiB of hashing does, once per 3 * kStripe bytes.
constexpr std::size_t kStripe = 32768;
std::uint32_t join_stripes(std::uint32_t first, std::uint32_t second, std::uint32_t third) noexcept;

// Each update_* function advances the raw CRC register `state` (the complement
// of the CRC value) over [data, data + size); crc32c_extend() does the
// complementing. Every one gives the same result for the same input.

std::uint32_t update_portable(std::uint32_t state, const std::uint8_t* data, std::size_t size) noexcept;

// Each copy_* function copies [src, src + size) to dst (not overlapping) and
// advances `state` over the same bytes as update_* does, reading each source
// byte once: a copy that is also hashed costs one pass over memory, not two.
std::uint32_t copy_portable(std::uint32_t state, std::uint8_t* dst, const std::uint8_t* src, std::size_t size) noexcept;

#if DS_FASTCKPT_CRC32C_SSE42
bool cpu_has_sse42() noexcept;
std::uint32_t update_sse42(std::uint32_t state, const std::uint8_t* data, std::size_t size) noexcept;
std::uint32_t copy_sse42(std::uint32_t state, std::uint8_t* dst, const std::uint8_t* src, std::size_t size) noexcept;
#endif

#if DS_FASTCKPT_CRC32C_ARMV8
bool cpu_has_armv8_crc32() noexcept;
std::uint32_t update_armv8(std::uint32_t state, const std::uint8_t* data, std::size_t size) noexcept;
std::uint32_t copy_armv8(std::uint32_t state, std::uint8_t* dst, const std::uint8_t* src, std::size_t size) noexcept;
#endif

}  // namespace crc32c_impl
}  // namespace ds_fastckpt
