#include "aio_reader.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "aio_queue.h"
#include "io_error.h"
#include "unique_fd.h"

namespace ds_fastckpt {

namespace {

constexpr std::size_t kAlignment = 4096;

int open_read(const std::string& path, int extra_flags) {
  int fd;
  do {
    fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | extra_flags);
  } while (fd < 0 && errno == EINTR);
  return fd;
}

}  // namespace

std::uint64_t read_whole_file(const std::string& path, std::uint8_t* buffer, std::size_t capacity,
                              ReaderOptions options) {
  if (options.block_size == 0 || options.block_size % kAlignment != 0 ||
      reinterpret_cast<std::uintptr_t>(buffer) % kAlignment != 0) {
    throw_io_error(EINVAL, "read (buffer and block_size must be 4096-aligned)", path);
  }
  int fd = open_read(path, O_DIRECT);
  if (fd < 0 && errno == EINVAL) fd = open_read(path, 0);
  if (fd < 0) throw_io_error(errno, "open", path);
  UniqueFd owner(fd);

  struct stat st;
  if (::fstat(owner.get(), &st) < 0) throw_io_error(errno, "fstat", path);
  const auto size = static_cast<std::uint64_t>(st.st_size);
  const std::uint64_t padded = (size + kAlignment - 1) / kAlignment * kAlignment;
  if (padded > capacity) throw_io_error(EOVERFLOW, "read (file grew beyond the buffer)", path);
  {
    AioQueue queue(owner.get(), path, options.queue_depth, Direction::kRead);
    for (std::uint64_t offset = 0; offset < padded; offset += options.block_size) {
      const auto len = static_cast<std::size_t>(std::min<std::uint64_t>(options.block_size, padded - offset));
      const auto expected = static_cast<std::size_t>(std::min<std::uint64_t>(len, size - offset));
      queue.enqueue_read(buffer + offset, len, offset, expected);
    }
    queue.drain_all();
  }
  if (const int err = owner.close()) throw_io_error(err, "close", path);
  return size;
}

}  // namespace ds_fastckpt
