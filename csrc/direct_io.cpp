#include "direct_io.h"

#include <fcntl.h>
#include <sys/stat.h>

#include <cerrno>

#include "checked_syscall.h"
#include "io_error.h"

namespace ds_fastckpt {

std::size_t direct_memory_alignment(int fd, bool direct) {
  if (!direct) return 1;
#ifdef STATX_DIOALIGN
  struct statx st {};
  if (::statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &st) == 0 && (st.stx_mask & STATX_DIOALIGN) != 0 &&
      st.stx_dio_mem_align != 0 && st.stx_dio_offset_align != 0 && kDirectAlignment % st.stx_dio_offset_align == 0 &&
      kDirectAlignment % st.stx_dio_mem_align == 0) {
    return st.stx_dio_mem_align;
  }
#endif
  return kDirectAlignment;
}

OpenedFile open_direct_or_buffered(const std::string& path, int flags, mode_t mode) {
  flags |= O_CLOEXEC;
  const auto direct = try_syscall("open_direct", [&] { return ::open(path.c_str(), flags | O_DIRECT, mode); });
  if (direct.err == 0) return OpenedFile{UniqueFd(direct.value), true};
  if (direct.err != EINVAL) throw_io_error(direct.err, "open", path);
  const int fd = check_syscall("open", path, [&] { return ::open(path.c_str(), flags, mode); });
  return OpenedFile{UniqueFd(fd), false};
}

}  // namespace ds_fastckpt
