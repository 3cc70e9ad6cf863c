#include "aio_writer.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>

#include "checked_syscall.h"
#include "crc32c.h"
#include "direct_io.h"
#include "io_error.h"

namespace ds_fastckpt {

namespace {

constexpr int kCreateFlags = O_WRONLY | O_CREAT | O_TRUNC;
constexpr int kOverwriteFlags = O_WRONLY | O_CREAT;
constexpr int kSharedFlags = O_WRONLY;  // its maker created and sized it; a missing file is an error
constexpr mode_t kCreateMode = 0666;  // narrowed by the umask, like open() in Python

// Queue tags: 0 and 1 are the staging halves; bytes written from the caller's
// memory are drained at close() or, when the caller waits for them, at once.
constexpr int kHeldTag = 2;
constexpr int kWaitedTag = 3;

// Below this many whole blocks a source is copied: the staging flush and the
// extra requests a direct write costs outweigh copying so few bytes.
constexpr std::size_t kMinInPlaceBytes = 64 * 1024;

void check_options(const WriterOptions& options, const std::string& path) {
  if (options.block_size == 0 || options.block_size % kDirectAlignment != 0) {
    const std::string alignment = std::to_string(kDirectAlignment);
    throw_io_error(EINVAL, "write (block_size must be a positive multiple of " + alignment + ")", path);
  }
}

// On ext4 an O_DIRECT write that extends the file completes inside
// io_submit(), which would serialise the caller's copying with the disk.
// Growing the size ahead (a sparse ftruncate) keeps the writes asynchronous;
// finish_file() truncates to the exact length. Doubling bounds the number of
// ftruncate calls, each of which waits for in-flight direct I/O.
void reserve_size(int fd, const std::string& path, std::uint64_t end, std::uint64_t& reserved) {
  if (end <= reserved) return;
  constexpr auto kMaxFileSize = static_cast<std::uint64_t>(std::numeric_limits<off_t>::max());
  if (end > kMaxFileSize) throw_io_error(EFBIG, "ftruncate", path);
  const std::uint64_t doubled = reserved > kMaxFileSize / 2 ? kMaxFileSize : 2 * reserved;
  const std::uint64_t target = std::max(end, doubled);
  check_syscall("ftruncate", path, [&] { return ::ftruncate(fd, static_cast<off_t>(target)); });
  reserved = target;
}

// Queues [data, data + size) in block_size requests.
void queue_chunks(AioQueue& queue, int tag, const std::uint8_t* data, std::size_t size, std::uint64_t offset,
                  std::size_t block_size) {
  // `done` advances by what was queued, never by block_size: a block size near
  // SIZE_MAX would wrap the sum back below `size` and queue the same bytes again.
  for (std::size_t done = 0; done < size;) {
    const std::size_t len = std::min(block_size, size - done);
    queue.enqueue(tag, data + done, len, offset + done);
    done += len;
  }
}

// Truncates away block padding and reserved space, makes the file durable, and
// closes it. The descriptor is closed on every path; a failed fsync is
// reported, never retried (see OnEintr).
void finish_file(UniqueFd& fd, const std::string& path, std::uint64_t exact_size,
                 std::uint64_t reserved_size, bool do_fsync) {
  try {
    if (reserved_size != exact_size) {
      check_syscall("ftruncate", path, [&] { return ::ftruncate(fd.get(), static_cast<off_t>(exact_size)); });
    }
    if (do_fsync) check_syscall("fsync", path, [&] { return ::fsync(fd.get()); }, OnEintr::kFail);
  } catch (...) {
    fd.close();
    throw;
  }
  close_checked(fd, path);
}

}  // namespace

AioWriter::AioWriter(std::string path, std::uint8_t* staging, std::size_t half_bytes,
                     WriterOptions options, ExistingFile existing)
    : path_(std::move(path)), options_(options), existing_(existing), halves_{staging, nullptr},
      half_bytes_(half_bytes) {
  check_options(options_, path_);
  const auto address = reinterpret_cast<std::uintptr_t>(staging);
  if (half_bytes_ == 0 || half_bytes_ % kDirectAlignment != 0 || address % kDirectAlignment != 0) {
    const std::string alignment = std::to_string(kDirectAlignment);
    throw_io_error(EINVAL, "open (staging buffer must be " + alignment + "-aligned whole blocks)", path_);
  }
  // Both halves must lie inside the address space; that they lie inside the
  // caller's buffer is the binding's check, which knows the buffer's size.
  std::uintptr_t staging_end;
  if (half_bytes_ > std::numeric_limits<std::size_t>::max() / 2 ||
      __builtin_add_overflow(address, 2 * half_bytes_, &staging_end)) {
    throw_io_error(EINVAL, "open (staging halves of " + std::to_string(half_bytes_) +
                               " bytes overflow the address space)", path_);
  }
  halves_[1] = staging + half_bytes_;
  const int flags = existing == ExistingFile::kTruncate    ? kCreateFlags
                    : existing == ExistingFile::kOverwrite ? kOverwriteFlags
                                                           : kSharedFlags;
  OpenedFile file = open_direct_or_buffered(path_, flags, kCreateMode);
  fd_ = std::move(file.fd);
  direct_ = file.direct;
  memory_alignment_ = direct_memory_alignment(fd_.get(), direct_);
  if (existing != ExistingFile::kTruncate) {  // the file's size is already set; close() truncates as needed
    struct stat st;
    check_syscall("fstat", path_, [&] { return ::fstat(fd_.get(), &st); });
    reserved_ = static_cast<std::uint64_t>(st.st_size);
  }
  queue_ = std::make_unique<AioQueue>(fd_.get(), path_, options_.queue_depth);
}

AioWriter::~AioWriter() { abort(); }

void AioWriter::require_open(const char* op) const {
  if (!fd_.valid()) throw_io_error(EBADF, std::string(op) + " (writer is closed)", path_);
}

void AioWriter::queue_active_half(std::size_t padded_bytes) {
  // A kShared file is never grown ahead: a size set here could cut into another writer's range at close().
  if (existing_ != ExistingFile::kShared) reserve_size(fd_.get(), path_, half_offset_ + padded_bytes, reserved_);
  queue_chunks(*queue_, active_, halves_[active_], padded_bytes, half_offset_, options_.block_size);
  half_offset_ += padded_bytes;
  fill_ = 0;
}

void AioWriter::write(const std::uint8_t* data, std::size_t size) {
  require_open("write");
  try {
    copy_and_queue(data, size);
  } catch (...) {
    abort();
    throw;
  }
}

void AioWriter::copy_and_queue(const std::uint8_t* data, std::size_t size) {
  while (size > 0) {
    const std::size_t n = std::min(size, half_bytes_ - fill_);
    // Hashed as it is copied; the queue's thread only submits and reaps, so a freed slot is refilled at once.
    checksum_ = crc32c_copy(checksum_, halves_[active_] + fill_, data, n);
    fill_ += n;
    accepted_ += n;
    data += n;
    size -= n;
    if (fill_ == half_bytes_) {
      queue_active_half(half_bytes_);
      active_ ^= 1;
      // The other half may still be on its way to disk; wait before reuse.
      queue_->drain(active_);
    }
  }
}

void AioWriter::write_in_place(const std::uint8_t* data, std::size_t size, bool until_written) {
  require_open("write");
  try {
    // Congruent: once the position reaches a block boundary, so does the address, to memory_alignment_.
    const bool congruent = reinterpret_cast<std::uintptr_t>(data) % memory_alignment_ == accepted_ % memory_alignment_;
    const std::size_t head = (kDirectAlignment - accepted_ % kDirectAlignment) % kDirectAlignment;
    if (!congruent || size < head || size - head < kMinInPlaceBytes) {
      copy_and_queue(data, size);
      return;
    }
    copy_and_queue(data, head);
    const std::size_t body = (size - head) / kDirectAlignment * kDirectAlignment;
    queue_staged_blocks();
    queue_in_place(data + head, body, until_written);
    copy_and_queue(data + head + body, size - head - body);
  } catch (...) {
    abort();
    throw;
  }
}

// Sends what is staged (whole blocks: the position is at a block boundary) so
// that bytes from elsewhere can follow it in the file.
void AioWriter::queue_staged_blocks() {
  if (fill_ == 0) return;
  queue_active_half(fill_);
  active_ ^= 1;
  queue_->drain(active_);
}

void AioWriter::queue_in_place(const std::uint8_t* data, std::size_t size, bool until_written) {
  if (existing_ != ExistingFile::kShared) reserve_size(fd_.get(), path_, half_offset_ + size, reserved_);
  const int tag = until_written ? kWaitedTag : kHeldTag;
  // Each chunk is hashed right after it is queued: the disk writes the first
  // chunks while this thread hashes the later ones.
  for (std::size_t done = 0; done < size;) {
    const std::size_t len = std::min(options_.block_size, size - done);
    queue_->enqueue(tag, data + done, len, half_offset_ + done);
    checksum_ = crc32c_extend(checksum_, data + done, len);
    done += len;
  }
  half_offset_ += size;
  accepted_ += size;
  in_place_ += size;
  if (until_written) queue_->drain(tag);
}

void AioWriter::end_segment() {
  if (accepted_ > segment_start_) {
    segments_.push_back(Segment{segment_start_, accepted_ - segment_start_, checksum_});
    total_checksum_ = crc32c_combine(total_checksum_, checksum_, accepted_ - segment_start_);
  }
  checksum_ = 0;
  segment_start_ = accepted_;
}

void AioWriter::skip(std::uint64_t size) {
  require_open("skip");
  try {
    if (accepted_ % kDirectAlignment != 0 || size % kDirectAlignment != 0) {
      throw_io_error(EINVAL, "skip (position " + std::to_string(accepted_) + " and length " + std::to_string(size) +
                                 " must be multiples of " + std::to_string(kDirectAlignment) + ")", path_);
    }
    std::uint64_t end;
    if (__builtin_add_overflow(accepted_, size, &end)) throw_io_error(EFBIG, "skip", path_);
    queue_staged_blocks();
    end_segment();
    half_offset_ = end;
    accepted_ = end;
    segment_start_ = end;
  } catch (...) {
    abort();
    throw;
  }
}

void AioWriter::close() {
  require_open("close");
  const bool shared = existing_ == ExistingFile::kShared;
  try {
    if (shared && accepted_ > reserved_) {
      throw_io_error(EFBIG, "close (wrote up to byte " + std::to_string(accepted_) + " of a shared file of " +
                                std::to_string(reserved_) + " bytes)", path_);
    }
    if (fill_ > 0) {
      const std::size_t padded = round_up_to_alignment(fill_);
      std::memset(halves_[active_] + fill_, 0, padded - fill_);
      queue_active_half(padded);
    }
    queue_->drain_all();
    end_segment();
  } catch (...) {
    abort();
    throw;
  }
  queue_.reset();
  // A shared file keeps the size its maker set; only the padding of its last block, if this writer wrote it, goes.
  const std::uint64_t exact = shared ? reserved_ : accepted_;
  finish_file(fd_, path_, exact, shared ? std::max(reserved_, half_offset_) : reserved_, options_.fsync);
}

void AioWriter::abort() noexcept {
  queue_.reset();
  fd_.close();
}

void write_aligned_file(const std::string& path, const std::uint8_t* data, std::size_t size,
                        WriterOptions options, ExistingFile existing) {
  check_options(options, path);
  if (existing == ExistingFile::kShared) throw_io_error(EINVAL, "write (a shared file is not written whole)", path);
  if (reinterpret_cast<std::uintptr_t>(data) % kDirectAlignment != 0 ||
      size % kDirectAlignment != 0) {
    const std::string alignment = std::to_string(kDirectAlignment);
    throw_io_error(EINVAL, "write (buffer must be " + alignment + "-aligned whole blocks)", path);
  }
  const bool overwrite = existing == ExistingFile::kOverwrite;
  UniqueFd fd = open_direct_or_buffered(path, overwrite ? kOverwriteFlags : kCreateFlags, kCreateMode).fd;
  std::uint64_t reserved = 0;
  if (overwrite) {
    struct stat st;
    check_syscall("fstat", path, [&] { return ::fstat(fd.get(), &st); });
    reserved = static_cast<std::uint64_t>(st.st_size);
  }
  {
    reserve_size(fd.get(), path, size, reserved);
    AioQueue queue(fd.get(), path, options.queue_depth);
    queue_chunks(queue, 0, data, size, 0, options.block_size);
    queue.drain_all();
  }
  finish_file(fd, path, size, reserved, options.fsync);
}

}  // namespace ds_fastckpt
