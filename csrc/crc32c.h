// CRC-32C (Castagnoli), the checksum recorded in checkpoint manifests.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ds_fastckpt {

// Extends `crc` (0 for a new stream) over [data, data + size). Uses the
// SSE4.2 crc32 instruction when the CPU has it, a table otherwise; both give
// the same value, so files written on one host verify on another.
std::uint32_t crc32c_extend(std::uint32_t crc, const std::uint8_t* data, std::size_t size);

}  // namespace ds_fastckpt
