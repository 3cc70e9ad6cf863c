#include "direct_io.h"

#include <fcntl.h>

#include <cerrno>

#include "checked_syscall.h"
#include "io_error.h"

namespace ds_fastckpt {

OpenedFile open_direct_or_buffered(const std::string& path, int flags, mode_t mode) {
  flags |= O_CLOEXEC;
  const auto direct = try_syscall("open_direct", [&] { return ::open(path.c_str(), flags | O_DIRECT, mode); });
  if (direct.err == 0) return OpenedFile{UniqueFd(direct.value), true};
  if (direct.err != EINVAL) throw_io_error(direct.err, "open", path);
  const int fd = check_syscall("open", path, [&] { return ::open(path.c_str(), flags, mode); });
  return OpenedFile{UniqueFd(fd), false};
}

}  // namespace ds_fastckpt
