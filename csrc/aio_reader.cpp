#include "aio_reader.h"

#include <fcntl.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>

#include "checked_syscall.h"
#include "direct_io.h"
#include "io_error.h"

namespace ds_fastckpt {

AioFileReader::AioFileReader(std::string path, std::uint8_t* buffer, std::size_t capacity,
                             ReaderOptions options)
    : path_(std::move(path)) {
  if (options.block_size == 0 || options.block_size % kDirectAlignment != 0 ||
      reinterpret_cast<std::uintptr_t>(buffer) % kDirectAlignment != 0) {
    throw_io_error(EINVAL, "read (buffer and block_size must be " + std::to_string(kDirectAlignment) + "-aligned)",
                   path_);
  }
  fd_ = open_direct_or_buffered(path_, O_RDONLY).fd;

  struct stat st;
  check_syscall("fstat", path_, [&] { return ::fstat(fd_.get(), &st); });
  size_ = static_cast<std::uint64_t>(st.st_size);
  const std::uint64_t padded = round_up_to_alignment(size_);
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
  close_checked(fd_, path_);
}

}  // namespace ds_fastckpt
