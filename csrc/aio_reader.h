// Whole-file reads with libaio + O_DIRECT into an aligned buffer, usable while still in progress.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "aio_queue.h"
#include "unique_fd.h"

namespace ds_fastckpt {

struct ReaderOptions {
  std::size_t block_size;  // bytes per libaio request, a multiple of kDirectAlignment (direct_io.h)
  unsigned queue_depth;    // requests in flight
};

// Reads all of `path` into `buffer` (kDirectAlignment-aligned, `capacity`
// bytes, at least the file size rounded up to kDirectAlignment) with
// `queue_depth` reads in flight. The constructor starts the reads and returns:
// the last block first (a zip archive is read from its central directory at
// the end), then the rest in order, so a caller can consume the front while
// the back is still arriving. Falls back to buffered reads where O_DIRECT is
// refused (open_direct_or_buffered()). Errors are IoError with errno and path.
//
// Call order: wait(begin, end)* then finish(); destroying the reader without
// finish() waits for reads in flight and closes the file. wait() may be called
// from several threads at once; finish() must not overlap any other call (the
// Python binding makes it wait for them).
class AioFileReader {
 public:
  AioFileReader(std::string path, std::uint8_t* buffer, std::size_t capacity, ReaderOptions options);

  AioFileReader(const AioFileReader&) = delete;
  AioFileReader& operator=(const AioFileReader&) = delete;

  std::uint64_t size() const noexcept { return size_; }

  // Blocks until [begin, min(end, size)) is in the buffer.
  void wait(std::uint64_t begin, std::uint64_t end);

  // Waits for every read and closes the file, also when a read failed.
  void finish();

 private:
  std::string path_;
  UniqueFd fd_;
  std::uint64_t size_ = 0;
  std::unique_ptr<AioQueue> queue_;  // declared after fd_: destroyed, and drained, before it
};

}  // namespace ds_fastckpt
