#include "crc32c.h"

#include <stdexcept>
#include <string>

#include "crc32c_paths.h"

namespace ds_fastckpt {

namespace crc32c_impl {

namespace {

constexpr std::uint32_t kReflectedPolynomial = 0x82F63B78u;

// a * b modulo the polynomial, bits reflected as the CRC keeps them (bit 31 is x^0).
std::uint32_t multiply(std::uint32_t a, std::uint32_t b) noexcept {
  std::uint32_t product = 0;
  for (std::uint32_t bit = 1u << 31; bit != 0; bit >>= 1) {
    if (a & bit) product ^= b;
    b = (b & 1) ? (b >> 1) ^ kReflectedPolynomial : b >> 1;  // b *= x
  }
  return product;
}

// x^(2^k) modulo the polynomial for every k a 64-bit count of bits needs.
struct PowersOfX {
  std::uint32_t of_two_to[67];
  PowersOfX() noexcept {
    of_two_to[0] = 1u << 30;  // x^1
    for (int k = 1; k < 67; ++k) of_two_to[k] = multiply(of_two_to[k - 1], of_two_to[k - 1]);
  }
};

}  // namespace

std::uint32_t shift_state(std::uint32_t state, std::uint64_t size) noexcept {
  static const PowersOfX powers;
  // x^(8 size) is the product of x^(2^(k+3)) over the bits k set in size.
  for (int k = 3; size != 0; size >>= 1, ++k) {
    if (size & 1) state = multiply(powers.of_two_to[k], state);
  }
  return state;
}

std::uint32_t join_stripes(std::uint32_t first, std::uint32_t second, std::uint32_t third) noexcept {
  return shift_state(shift_state(first, kStripe) ^ second, kStripe) ^ third;
}

}  // namespace crc32c_impl

namespace {

using Update = std::uint32_t (*)(std::uint32_t, const std::uint8_t*, std::size_t) noexcept;
using Copy = std::uint32_t (*)(std::uint32_t, std::uint8_t*, const std::uint8_t*, std::size_t) noexcept;

std::vector<Crc32cPath> detect_paths() {
  std::vector<Crc32cPath> paths;
#if DS_FASTCKPT_CRC32C_ARMV8
  if (crc32c_impl::cpu_has_armv8_crc32()) paths.push_back(Crc32cPath::kArmv8);
#endif
#if DS_FASTCKPT_CRC32C_SSE42
  if (crc32c_impl::cpu_has_sse42()) paths.push_back(Crc32cPath::kSse42);
#endif
  paths.push_back(Crc32cPath::kPortable);
  return paths;
}

// The implementation of `path` in this build, or nullptr; whether the CPU
// runs it is crc32c_paths()'s question.
Update update_of(Crc32cPath path) noexcept {
  switch (path) {
    case Crc32cPath::kPortable:
      return &crc32c_impl::update_portable;
    case Crc32cPath::kSse42:
#if DS_FASTCKPT_CRC32C_SSE42
      return &crc32c_impl::update_sse42;
#else
      return nullptr;
#endif
    case Crc32cPath::kArmv8:
#if DS_FASTCKPT_CRC32C_ARMV8
      return &crc32c_impl::update_armv8;
#else
      return nullptr;
#endif
  }
  return nullptr;
}

// The fused copy of `path` in this build, or nullptr, as update_of().
Copy copy_of(Crc32cPath path) noexcept {
  switch (path) {
    case Crc32cPath::kPortable:
      return &crc32c_impl::copy_portable;
    case Crc32cPath::kSse42:
#if DS_FASTCKPT_CRC32C_SSE42
      return &crc32c_impl::copy_sse42;
#else
      return nullptr;
#endif
    case Crc32cPath::kArmv8:
#if DS_FASTCKPT_CRC32C_ARMV8
      return &crc32c_impl::copy_armv8;
#else
      return nullptr;
#endif
  }
  return nullptr;
}

// Throws std::invalid_argument unless this CPU and build run `path`.
void require_runnable(Crc32cPath path) {
  for (const Crc32cPath runnable : crc32c_paths()) {
    if (runnable == path) return;
  }
  throw std::invalid_argument(std::string("CRC-32C path '") + crc32c_path_name(path) +
                              "' cannot run on this CPU or build");
}

}  // namespace

const char* crc32c_path_name(Crc32cPath path) noexcept {
  switch (path) {
    case Crc32cPath::kPortable:
      return "portable";
    case Crc32cPath::kSse42:
      return "sse4.2";
    case Crc32cPath::kArmv8:
      return "armv8";
  }
  return "unknown";
}

const std::vector<Crc32cPath>& crc32c_paths() {
  static const std::vector<Crc32cPath> paths = detect_paths();
  return paths;
}

std::uint32_t crc32c_extend(std::uint32_t crc, const std::uint8_t* data, std::size_t size) {
  static const Update fastest = update_of(crc32c_paths().front());
  return ~fastest(~crc, data, size);
}

std::uint32_t crc32c_copy(std::uint32_t crc, std::uint8_t* dst, const std::uint8_t* src, std::size_t size) {
  static const Copy fastest = copy_of(crc32c_paths().front());
  return ~fastest(~crc, dst, src, size);
}

std::uint32_t crc32c_combine(std::uint32_t crc_a, std::uint32_t crc_b, std::uint64_t size_b) noexcept {
  // The complements taken at each end cancel out: only a's register moves on over b's length.
  return crc32c_impl::shift_state(crc_a, size_b) ^ crc_b;
}

std::uint32_t crc32c_extend_with(Crc32cPath path, std::uint32_t crc, const std::uint8_t* data, std::size_t size) {
  require_runnable(path);
  return ~update_of(path)(~crc, data, size);
}

std::uint32_t crc32c_copy_with(Crc32cPath path, std::uint32_t crc, std::uint8_t* dst, const std::uint8_t* src,
                               std::size_t size) {
  require_runnable(path);
  return ~copy_of(path)(~crc, dst, src, size);
}

}  // namespace ds_fastckpt
