#include "unique_fd.h"

#include <cerrno>
#include <unistd.h>

#include <utility>

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
  return ::close(fd) == 0 ? 0 : errno;
}

}  // namespace ds_fastckpt
