#include "unique_fd.h"

#include <unistd.h>

#include <utility>

#include "checked_syscall.h"

namespace ds_fastckpt {

namespace {
std::atomic<std::uint64_t> g_opened{0};
std::atomic<std::uint64_t> g_closed{0};
}  // namespace

FdCounts fd_counts() noexcept { return FdCounts{g_opened.load(), g_closed.load()}; }

UniqueFd::UniqueFd(int fd) noexcept : fd_(fd) {
  if (fd_ >= 0) g_opened.fetch_add(1);
}

UniqueFd::~UniqueFd() { close(); }

UniqueFd::UniqueFd(UniqueFd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}

UniqueFd& UniqueFd::operator=(UniqueFd&& other) noexcept {
  if (this != &other) {
    close();
    fd_ = std::exchange(other.fd_, -1);
  }
  return *this;
}

int UniqueFd::close() noexcept {
  if (fd_ < 0) return 0;
  const int fd = std::exchange(fd_, -1);
  g_closed.fetch_add(1);
  // Not retried on EINTR: see OnEintr. No fault point here; close_checked() has it.
  return try_syscall(nullptr, [fd] { return ::close(fd); }, OnEintr::kFail).err;
}

}  // namespace ds_fastckpt
