// CRC-32C (Castagnoli), the checksum recorded in checkpoint manifests.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace ds_fastckpt {

// Extends `crc` (0 for a new stream) over [data, data + size), so that
// crc32c_extend(crc32c_extend(0, a), b) is the CRC of a followed by b. Uses the
// fastest path this CPU runs (crc32c_paths()); every path gives the same value,
// so files written on one host verify on another.
std::uint32_t crc32c_extend(std::uint32_t crc, const std::uint8_t* data, std::size_t size);

// Copies [src, src + size) to dst (the two must not overlap) and returns
// crc32c_extend(crc, src, size), reading the source once: what the writer
// copies into staging is hashed on the way, not read again.
std::uint32_t crc32c_copy(std::uint32_t crc, std::uint8_t* dst, const std::uint8_t* src, std::size_t size);

// The CRC-32C of a followed by b, from crc_a = CRC of a, crc_b = CRC of b and
// size_b = b's length, without reading either: CRC ranges computed apart (by
// several threads or ranks) combine exactly. O(log size_b).
std::uint32_t crc32c_combine(std::uint32_t crc_a, std::uint32_t crc_b, std::uint64_t size_b) noexcept;

// The implementations behind crc32c_extend(), named so that tests can check
// each one this host runs, and benchmarks can time them.
enum class Crc32cPath {
  kPortable,  // slice-by-8 tables: any CPU
  kSse42,     // the SSE4.2 crc32 instruction: x86-64
  kArmv8,     // the ARMv8 CRC32 extension (crc32c*): AArch64 Linux
};

// "portable", "sse4.2" or "armv8".
const char* crc32c_path_name(Crc32cPath path) noexcept;

// The paths this build and CPU can run, fastest first: crc32c_extend() uses
// the first. The portable path is always the last.
const std::vector<Crc32cPath>& crc32c_paths();

// crc32c_extend() on one given path. Throws std::invalid_argument for a path
// this build or CPU cannot run.
std::uint32_t crc32c_extend_with(Crc32cPath path, std::uint32_t crc, const std::uint8_t* data, std::size_t size);

// crc32c_copy() on one given path; throws like crc32c_extend_with().
std::uint32_t crc32c_copy_with(Crc32cPath path, std::uint32_t crc, std::uint8_t* dst, const std::uint8_t* src,
                               std::size_t size);

}  // namespace ds_fastckpt
