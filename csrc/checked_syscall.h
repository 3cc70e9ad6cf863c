// One checked syscall: the EINTR policy, the test fault hook, and an IoError with errno, op and path.
#pragma once

#include <cerrno>
#include <string>
#include <type_traits>
#include <utility>

#include "fault_injection.h"
#include "io_error.h"
#include "unique_fd.h"

namespace ds_fastckpt {

// What a call interrupted by a signal (EINTR) gets. Most calls are simply made
// again. close() and fsync() are not: Linux releases the descriptor even when
// close() fails, so a retry could close a descriptor another thread has just
// been given; and a failed fsync() may already have dropped the dirty pages,
// so a retry that succeeds would report data durable that never reached disk.
enum class OnEintr { kRetry, kFail };

// A call's return value, and its errno: 0 when it succeeded.
template <typename T>
struct SyscallResult {
  T value;
  int err;
};

// Runs `call`, a POSIX call that returns a negative value and sets errno when
// it fails. A fault armed at `point` (see fault_injection.h; nullptr for none)
// stands in for the call: the call is not made and fails with the armed errno.
template <typename Call>
SyscallResult<std::invoke_result_t<Call&>> try_syscall(const char* point, Call&& call,
                                                       OnEintr on_eintr = OnEintr::kRetry) {
  using Value = std::invoke_result_t<Call&>;
  if (point != nullptr) {
    if (const int injected = faults::hit(point)) return {static_cast<Value>(-1), injected};
  }
  while (true) {
    const Value value = call();
    if (value >= 0) return {value, 0};
    const int err = errno;
    if (err != EINTR || on_eintr == OnEintr::kFail) return {value, err};
  }
}

// try_syscall() with `op` as the fault point, throwing IoError(errno, op, path)
// ("<op> <path>", OSError in Python) when the call fails.
template <typename Call>
std::invoke_result_t<Call&> check_syscall(const char* op, const std::string& path, Call&& call,
                                          OnEintr on_eintr = OnEintr::kRetry) {
  const auto result = try_syscall(op, std::forward<Call>(call), on_eintr);
  if (result.err != 0) throw_io_error(result.err, op, path);
  return result.value;
}

// The same for libaio's io_* functions, which return -errno instead of setting
// errno. `also_retry` is one more errno that makes the call be repeated (0: none).
template <typename Call>
SyscallResult<std::invoke_result_t<Call&>> try_libaio(const char* point, Call&& call, int also_retry = 0) {
  using Value = std::invoke_result_t<Call&>;
  if (point != nullptr) {
    if (const int injected = faults::hit(point)) return {static_cast<Value>(-injected), injected};
  }
  while (true) {
    const Value value = call();
    if (value >= 0) return {value, 0};
    const int err = static_cast<int>(-value);
    if (err != EINTR && (also_retry == 0 || err != also_retry)) return {value, err};
  }
}

// Closes `fd` and throws IoError(errno, "close", path) when close() fails. The
// descriptor is released either way, so the "close" fault point is consulted
// after the call, not instead of it.
inline void close_checked(UniqueFd& fd, const std::string& path) {
  const int close_err = fd.close();
  const int injected = faults::hit("close");
  if (const int err = injected != 0 ? injected : close_err) throw_io_error(err, "close", path);
}

}  // namespace ds_fastckpt
