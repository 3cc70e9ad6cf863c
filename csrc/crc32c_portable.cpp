// Slice-by-8: eight bytes per step through eight 256-entry tables, about 4x
// the byte-at-a-time table, on any CPU.
#include <array>
#include <cstring>

#include "crc32c_paths.h"

namespace ds_fastckpt {
namespace crc32c_impl {

namespace {

constexpr std::uint32_t kPolynomial = 0x82F63B78u;  // Castagnoli, bit-reflected

// kTables[0][b] is the CRC register after byte b; kTables[k][b] after byte b
// followed by k zero bytes, so eight bytes combine with one lookup each.
using Tables = std::array<std::array<std::uint32_t, 256>, 8>;

constexpr Tables make_tables() {
  Tables tables{};
  for (std::uint32_t byte = 0; byte < 256; ++byte) {
    std::uint32_t crc = byte;
    for (int bit = 0; bit < 8; ++bit) crc = (crc >> 1) ^ ((crc & 1u) != 0 ? kPolynomial : 0u);
    tables[0][byte] = crc;
  }
  for (std::size_t k = 1; k < tables.size(); ++k) {
    for (std::size_t byte = 0; byte < 256; ++byte) {
      const std::uint32_t previous = tables[k - 1][byte];
      tables[k][byte] = (previous >> 8) ^ tables[0][previous & 0xFFu];
    }
  }
  return tables;
}

constexpr Tables kTables = make_tables();

// Little-endian regardless of the host's byte order, from any alignment; on a
// little-endian CPU the compiler turns this into a single load.
inline std::uint32_t load_le32(const std::uint8_t* p) noexcept {
  return static_cast<std::uint32_t>(p[0]) | static_cast<std::uint32_t>(p[1]) << 8 |
         static_cast<std::uint32_t>(p[2]) << 16 | static_cast<std::uint32_t>(p[3]) << 24;
}

}  // namespace

std::uint32_t update_portable(std::uint32_t state, const std::uint8_t* data, std::size_t size) noexcept {
  for (; size >= 8; data += 8, size -= 8) {
    const std::uint32_t low = state ^ load_le32(data);
    const std::uint32_t high = load_le32(data + 4);
    state = kTables[7][low & 0xFFu] ^ kTables[6][(low >> 8) & 0xFFu] ^ kTables[5][(low >> 16) & 0xFFu] ^
            kTables[4][low >> 24] ^ kTables[3][high & 0xFFu] ^ kTables[2][(high >> 8) & 0xFFu] ^
            kTables[1][(high >> 16) & 0xFFu] ^ kTables[0][high >> 24];
  }
  for (; size > 0; ++data, --size) state = (state >> 8) ^ kTables[0][(state ^ *data) & 0xFFu];
  return state;
}

// Tables leave no instruction to fuse the copy into: each slice of the source
// is copied and then hashed from the copy while it is still in the L1 cache,
// so memory is still read once.
std::uint32_t copy_portable(std::uint32_t state, std::uint8_t* dst, const std::uint8_t* src,
                            std::size_t size) noexcept {
  constexpr std::size_t kSlice = 4096;
  for (std::size_t done = 0; done < size;) {
    const std::size_t len = size - done < kSlice ? size - done : kSlice;
    std::memcpy(dst + done, src + done, len);
    state = update_portable(state, dst + done, len);
    done += len;
  }
  return state;
}

}  // namespace crc32c_impl
}  // namespace ds_fastckpt
