// Errors from syscalls and libaio, carrying errno, the operation and the path.
#pragma once

#include <cerrno>
#include <string>
#include <system_error>

namespace ds_fastckpt {

// A failed syscall on a file. The binding turns it into Python's OSError with
// errno and filename set, so callers can tell ENOSPC from EIO from EACCES.
class IoError : public std::system_error {
 public:
  IoError(int err, const std::string& op, const std::string& path)
      : std::system_error(err, std::generic_category(), op + " " + path),
        op_(op),
        path_(path) {}

  const std::string& op() const noexcept { return op_; }
  const std::string& path() const noexcept { return path_; }

 private:
  std::string op_;
  std::string path_;
};

[[noreturn]] inline void throw_io_error(int err, const std::string& op, const std::string& path) {
  throw IoError(err, op, path);
}

}  // namespace ds_fastckpt
