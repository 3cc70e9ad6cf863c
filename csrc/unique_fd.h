// Sole owner of one file descriptor, and process-wide counts of what the op opened and closed.
#pragma once

#include <atomic>
#include <cstdint>

namespace ds_fastckpt {

struct FdCounts {
  std::uint64_t opened;
  std::uint64_t closed;
};

// Counts of descriptors that passed through UniqueFd: fd accounting reads them
// to prove the op closes everything it opens.
FdCounts fd_counts() noexcept;

// Move-only owner of a file descriptor. The destructor closes it, so an fd is
// released on every path: normal close, exception unwinding, garbage collection.
// The fd-leak this project exists to prevent was an fd that nobody owned.
class UniqueFd {
 public:
  UniqueFd() noexcept = default;
  explicit UniqueFd(int fd) noexcept;
  ~UniqueFd();

  UniqueFd(UniqueFd&& other) noexcept;
  UniqueFd& operator=(UniqueFd&& other) noexcept;
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;

  int get() const noexcept { return fd_; }
  bool valid() const noexcept { return fd_ >= 0; }

  // Closes now and returns close()'s errno (0 on success). The descriptor is
  // released even when close() reports an error: retrying close() on Linux
  // could close an fd another thread has just been given.
  int close() noexcept;

 private:
  int fd_ = -1;
};

}  // namespace ds_fastckpt
