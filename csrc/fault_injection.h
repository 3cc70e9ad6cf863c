// Test-only fault injection: make the N-th hit of a named syscall fail with a chosen errno.
#pragma once

#include <string>

namespace ds_fastckpt {
namespace faults {

// Points: "open_direct", "open", "write", "read", "ftruncate", "fsync", "close"
// (the ones Python's inject_fault() arms); every call made through checked_syscall.h
// is a point named for its op. An injected fault stands in for the call, which
// is not made; "close" closes first (the descriptor is released either way),
// and "write"/"read" replace the result of a completed libaio request.
// The fault fires once, on hit number `skip` + 1 after arming.
void arm(const std::string& point, int err, int skip);
void disarm_all();

// Returns the errno to inject at `point`, or 0. A relaxed atomic check keeps
// this free when nothing is armed.
int hit(const char* point);

}  // namespace faults
}  // namespace ds_fastckpt
