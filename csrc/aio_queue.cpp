#include "aio_queue.h"

#include <cerrno>

#include "fault_injection.h"
#include "io_error.h"

namespace ds_fastckpt {

AioQueue::AioQueue(int fd, std::string path, unsigned depth)
    : fd_(fd), path_(std::move(path)), slots_(depth) {
  if (depth == 0) throw_io_error(EINVAL, "io_setup (queue_depth must be positive)", path_);
  const int rc = io_setup(static_cast<int>(depth), &ctx_);
  if (rc < 0) {
    ctx_ = nullptr;
    throw_io_error(-rc, "io_setup", path_);
  }
}

AioQueue::~AioQueue() {
  if (ctx_ != nullptr) io_destroy(ctx_);
}

void AioQueue::enqueue(int tag, const std::uint8_t* buf, std::size_t len, std::uint64_t offset) {
  queued_.push_back(Chunk{tag, buf, len, offset});
  submit_queued();
}

void AioQueue::submit_queued() {
  for (Slot& slot : slots_) {
    if (queued_.empty()) return;
    if (slot.busy) continue;
    slot.chunk = queued_.front();
    io_prep_pwrite(&slot.cb, fd_, const_cast<std::uint8_t*>(slot.chunk.buf), slot.chunk.len,
                   static_cast<long long>(slot.chunk.offset));
    slot.cb.data = &slot;
    struct iocb* cbs[1] = {&slot.cb};
    int rc;
    do {
      rc = io_submit(ctx_, 1, cbs);
    } while (rc == -EINTR || rc == -EAGAIN);
    if (rc != 1) fail(rc < 0 ? -rc : EIO, "io_submit");
    queued_.pop_front();
    slot.busy = true;
    ++in_flight_;
  }
}

void AioQueue::reap_one_or_more() {
  struct io_event events[64];
  const long max_events = static_cast<long>(sizeof(events) / sizeof(events[0]));
  int n;
  do {
    n = io_getevents(ctx_, 1, max_events, events, nullptr);
  } while (n == -EINTR);
  if (n < 0) fail(-n, "io_getevents");
  // Account for every reaped event before reporting an error, so fail() waits
  // only for requests that are really still in flight.
  int first_error = 0;
  for (int i = 0; i < n; ++i) {
    const int err = complete(*static_cast<Slot*>(events[i].data), static_cast<long>(events[i].res));
    if (first_error == 0) first_error = err;
  }
  if (first_error != 0) fail(first_error, "write");
}

int AioQueue::complete(Slot& slot, long result) {
  slot.busy = false;
  --in_flight_;
  if (const int injected = faults::hit("write")) return injected;
  if (result < 0) return static_cast<int>(-result);
  const auto written = static_cast<std::size_t>(result);
  if (written == 0) return EIO;
  if (written < slot.chunk.len) {
    // A short write (typically the disk filling up): write the rest, so the
    // kernel reports the real error, e.g. ENOSPC, on the retry.
    queued_.push_front(Chunk{slot.chunk.tag, slot.chunk.buf + written, slot.chunk.len - written,
                             slot.chunk.offset + written});
  }
  return 0;
}

void AioQueue::fail(int err, const char* op) {
  queued_.clear();
  // Wait for the requests still in flight: they point into the caller's
  // staging memory, which may be reused as soon as we throw.
  while (in_flight_ > 0) {
    struct io_event events[64];
    const int n = io_getevents(ctx_, 1, 64, events, nullptr);
    if (n == -EINTR) continue;
    if (n < 0) break;
    for (int i = 0; i < n; ++i) static_cast<Slot*>(events[i].data)->busy = false;
    in_flight_ -= static_cast<unsigned>(n);
  }
  throw_io_error(err, op, path_);
}

bool AioQueue::has_outstanding(int tag) const {
  for (const Chunk& chunk : queued_) {
    if (chunk.tag == tag) return true;
  }
  for (const Slot& slot : slots_) {
    if (slot.busy && slot.chunk.tag == tag) return true;
  }
  return false;
}

void AioQueue::drain(int tag) {
  while (has_outstanding(tag)) {
    reap_one_or_more();
    submit_queued();
  }
}

void AioQueue::drain_all() {
  while (in_flight_ > 0 || !queued_.empty()) {
    if (in_flight_ > 0) reap_one_or_more();
    submit_queued();
  }
}

}  // namespace ds_fastckpt
