// Whole-file reads with libaio + O_DIRECT into an aligned buffer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace ds_fastckpt {

struct ReaderOptions {
  std::size_t block_size;  // bytes per libaio request, a multiple of 4096
  unsigned queue_depth;    // requests in flight
};

// Reads all of `path` into `buffer` (4096-aligned, `capacity` bytes, at least
// the file size rounded up to 4096) with `queue_depth` reads in flight, and
// returns the file size. Falls back to buffered reads where O_DIRECT is
// refused (EINVAL). Throws IoError with errno and path.
std::uint64_t read_whole_file(const std::string& path, std::uint8_t* buffer, std::size_t capacity,
                              ReaderOptions options);

}  // namespace ds_fastckpt
