#include "aio_reader.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "io_error.h"

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

AioFileReader::AioFileReader(std::string path, std::uint8_t* buffer, std::size_t capacity,
                             ReaderOptions options)
    : path_(std::move(path)) {
  if (options.block_size == 0 || options.block_size % kAlignment != 0 ||
      reinterpret_cast<std::uintptr_t>(buffer) % kAlignment != 0) {
    throw_io_error(EINVAL, "read (buffer and block_size must be 4096-aligned)", path_);
  }
  int fd = open_read(path_, O_DIRECT);
  if (fd < 0 && errno == EINVAL) fd = open_read(path_, 0);
  if (fd < 0) throw_io_error(errno, "open", path_);
  fd_ = UniqueFd(fd);

  struct stat st;
  if (::fstat(fd_.get(), &st) < 0) throw_io_error(errno, "fstat", path_);
  size_ = static_cast<std::uint64_t>(st.st_size);
  const std::uint64_t padded = (size_ + kAlignment - 1) / kAlignment * kAlignment;
  if (padded > capacity) throw_io_error(EOVERFLOW, "read (file grew beyond the buffer)", path_);
  queue_ = std::make_unique<AioQueue>(fd_.get(), path_, options.queue_depth, Direction::kRead);

  // Not (padded + block_size - 1) / block_size: that sum wraps for a block size near SIZE_MAX, and zero
  // blocks would leave wait() waiting for reads never queued.
  const std::uint64_t blocks = padded / options.block_size + (padded % options.block_size != 0 ? 1 : 0);
  auto enqueue_block = [&](std::uint64_t index) {
    const std::uint64_t offset = index * options.block_size;
    const auto len = static_cast<std::size_t>(std::min<std::uint64_t>(options.block_size, padded - offset));
    const auto expected = static_cast<std::size_t>(std::min<std::uint64_t>(len, size_ - offset));
    queue_->enqueue_read(buffer + offset, len, offset, expected);
  };
  if (blocks > 1) enqueue_block(blocks - 1);
  for (std::uint64_t index = 0; index + (blocks > 1 ? 1 : 0) < blocks; ++index) enqueue_block(index);
}

void AioFileReader::wait(std::uint64_t begin, std::uint64_t end) {
  if (!queue_) throw_io_error(EBADF, "read (reader is finished)", path_);
  queue_->wait_until_read(std::min(begin, size_), std::min(end, size_));
}

void AioFileReader::finish() {
  if (!queue_) return;
  try {
    queue_->drain_all();
  } catch (...) {
    queue_.reset();  // waits for whatever is still in flight
    fd_.close();
    throw;
  }
  queue_.reset();
  if (const int err = fd_.close()) throw_io_error(err, "close", path_);
}

}  // namespace ds_fastckpt
