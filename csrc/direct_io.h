// O_DIRECT: the alignment it needs, and opening a file with it where the filesystem allows it.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "unique_fd.h"

namespace ds_fastckpt {

// O_DIRECT needs buffer addresses, lengths and file offsets aligned to the
// device's logical block size; 4096 covers every block device we target. The
// one alignment of the whole op; Python's ds_fastckpt.native.op.DIRECT_ALIGNMENT
// is the same number (the binding exports this one as DIRECT_ALIGNMENT).
constexpr std::size_t kDirectAlignment = 4096;

// `n` rounded up to a multiple of kDirectAlignment; `n` must be at most
// UINT64_MAX - 4095 (file sizes and buffer lengths are far below that).
constexpr std::uint64_t round_up_to_alignment(std::uint64_t n) {
  return (n + kDirectAlignment - 1) / kDirectAlignment * kDirectAlignment;
}

struct OpenedFile {
  UniqueFd fd;
  bool direct;  // false where the filesystem refused O_DIRECT and the descriptor is buffered
};

// The alignment O_DIRECT needs of the memory a write of `fd` comes from:
// what the kernel reports through statx(STATX_DIOALIGN) (512 on a virtio disk,
// often 4 on NVMe), 1 for a buffered descriptor (`direct` false), and
// kDirectAlignment where statx cannot say (kernels before 6.1, filesystems
// that do not report it) or reports an offset alignment kDirectAlignment is
// not a multiple of.
std::size_t direct_memory_alignment(int fd, bool direct);

// Opens `path` with `flags | O_DIRECT | O_CLOEXEC` (`mode` applies with
// O_CREAT). A filesystem that refuses O_DIRECT (EINVAL: tmpfs before Linux
// 6.6, some FUSE and network filesystems) gets a buffered descriptor instead.
// Fault points "open_direct", then "open" for the buffered retry. Throws
// IoError(errno, "open", path) when neither open succeeds.
OpenedFile open_direct_or_buffered(const std::string& path, int flags, mode_t mode = 0);

}  // namespace ds_fastckpt
