#include "aio_queue.h"

#include <algorithm>
#include <cerrno>
#include <iterator>

#include "checked_syscall.h"
#include "fault_injection.h"
#include "io_error.h"

namespace ds_fastckpt {

namespace {

// io_destroy() waits for an RCU grace period: about 50 ms here, longer than
// writing a 16 MiB file. Idle contexts are therefore kept for the next file
// instead of destroyed; the kernel frees them when the process exits.
class IdleContexts {
 public:
  io_context_t take(unsigned depth) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = idle_.begin(); it != idle_.end(); ++it) {
      if (it->first == depth) {
        io_context_t ctx = it->second;
        idle_.erase(it);
        return ctx;
      }
    }
    return nullptr;
  }

  void give(unsigned depth, io_context_t ctx) {
    std::lock_guard<std::mutex> lock(mutex_);
    idle_.emplace_back(depth, ctx);
  }

 private:
  std::mutex mutex_;
  std::vector<std::pair<unsigned, io_context_t>> idle_;
};

// The depth, once it is known to be one io_setup() can accept; checked before the slots are allocated.
std::size_t checked_depth(unsigned depth, const std::string& path) {
  if (depth == 0 || depth > kMaxQueueDepth) {
    throw_io_error(EINVAL, "io_setup (queue_depth must be 1 to " + std::to_string(kMaxQueueDepth) + ")", path);
  }
  return depth;
}

IdleContexts& idle_contexts() {
  static IdleContexts* contexts = new IdleContexts();  // never destroyed: used until exit
  return *contexts;
}

}  // namespace

AioQueue::AioQueue(int fd, std::string path, unsigned depth, Direction direction)
    : fd_(fd), path_(std::move(path)), direction_(direction), slots_(checked_depth(depth, path_)) {
  ctx_ = idle_contexts().take(depth);
  if (ctx_ == nullptr) {
    const auto setup = try_libaio("io_setup", [&] { return io_setup(static_cast<int>(depth), &ctx_); });
    if (setup.err != 0) {
      ctx_ = nullptr;
      throw_io_error(setup.err, "io_setup", path_);
    }
  }
  worker_ = std::thread([this] { run(); });
}

AioQueue::~AioQueue() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
    queued_.clear();
  }
  work_.notify_one();
  worker_.join();  // returns once nothing is in flight, or completions were lost
  if (context_reusable_) {
    idle_contexts().give(static_cast<unsigned>(slots_.size()), ctx_);
  } else {
    // Waits for whatever the kernel may still be doing. Unchecked: a destructor
    // has no one to report to, and the context is unusable either way.
    io_destroy(ctx_);
  }
}

// Fills every free slot from the queue, then waits for completions with the
// lock released, so callers can enqueue and drain meanwhile. Nothing else runs
// here: a slot freed by a completion is refilled at once.
void AioQueue::run() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    work_.wait(lock, [this] { return stopping_ || in_flight_ > 0 || !queued_.empty(); });
    if (stopping_ && in_flight_ == 0) return;
    submit_queued_locked();
    if (in_flight_ == 0) continue;

    lock.unlock();
    struct io_event events[64];
    const auto got = try_libaio("io_getevents", [&] { return io_getevents(ctx_, 1, 64, events, nullptr); });
    lock.lock();

    if (got.err != 0) {
      // Without completions we cannot know when the kernel is done with the
      // caller's memory; io_destroy() in the destructor waits for it.
      fail_locked(got.err, "io_getevents");
      for (Slot& slot : slots_) slot.busy = false;
      in_flight_ = 0;
      context_reusable_ = false;
    }
    for (int i = 0; i < got.value; ++i) {
      complete_locked(*static_cast<Slot*>(events[i].data), static_cast<long>(events[i].res));
    }
    progress_.notify_all();
  }
}

void AioQueue::submit_queued_locked() {
  for (Slot& slot : slots_) {
    if (queued_.empty() || error_ != 0) return;
    if (slot.busy) continue;
    slot.chunk = queued_.front();
    auto* buf = const_cast<std::uint8_t*>(slot.chunk.buf);
    const auto offset = static_cast<long long>(slot.chunk.offset);
    if (direction_ == Direction::kRead) {
      io_prep_pread(&slot.cb, fd_, buf, slot.chunk.len, offset);
    } else {
      io_prep_pwrite(&slot.cb, fd_, buf, slot.chunk.len, offset);
    }
    slot.cb.data = &slot;
    struct iocb* cbs[1] = {&slot.cb};
    // EAGAIN: the kernel is short of resources for the moment; the request is valid.
    const auto submitted = try_libaio("io_submit", [&] { return io_submit(ctx_, 1, cbs); }, EAGAIN);
    if (submitted.err != 0 || submitted.value != 1) {
      fail_locked(submitted.err != 0 ? submitted.err : EIO, "io_submit");
      progress_.notify_all();
      return;
    }
    queued_.pop_front();
    slot.busy = true;
    ++in_flight_;
  }
}

void AioQueue::complete_locked(Slot& slot, long result) {
  slot.busy = false;
  --in_flight_;
  const bool reading = direction_ == Direction::kRead;
  const char* op = reading ? "read" : "write";
  if (const int injected = faults::hit(op)) result = -injected;
  if (result < 0) return fail_locked(static_cast<int>(-result), op);
  const auto done = static_cast<std::size_t>(result);
  if (reading && done > 0) {
    mark_read_locked(slot.chunk.offset, slot.chunk.offset + std::min(done, slot.chunk.expected));
  }
  if (done >= slot.chunk.expected) return;
  if (done == 0) return fail_locked(EIO, reading ? "read (file ended early)" : "write (no progress)");
  if (error_ == 0) {
    // A short transfer (for writes typically the disk filling up): do the
    // rest, so the kernel reports the real error, e.g. ENOSPC, on the retry.
    const Chunk& chunk = slot.chunk;
    queued_.push_front(Chunk{chunk.tag, chunk.buf + done, chunk.len - done, chunk.offset + done,
                             chunk.expected - done});
  }
}

void AioQueue::fail_locked(int err, const char* op) {
  if (error_ == 0) {
    error_ = err;
    error_op_ = op;
  }
  queued_.clear();
}

void AioQueue::throw_if_failed_locked() const {
  if (error_ != 0) throw_io_error(error_, error_op_, path_);
}

void AioQueue::mark_read_locked(std::uint64_t begin, std::uint64_t end) {
  auto next = read_ranges_.upper_bound(begin);
  if (next != read_ranges_.begin()) {
    auto previous = std::prev(next);
    if (previous->second >= begin) {  // overlaps or touches the range before
      begin = previous->first;
      end = std::max(end, previous->second);
      next = read_ranges_.erase(previous);
    }
  }
  while (next != read_ranges_.end() && next->first <= end) {
    end = std::max(end, next->second);
    next = read_ranges_.erase(next);
  }
  read_ranges_.emplace(begin, end);
}

bool AioQueue::was_read_locked(std::uint64_t begin, std::uint64_t end) const {
  if (begin >= end) return true;
  auto range = read_ranges_.upper_bound(begin);
  if (range == read_ranges_.begin()) return false;
  --range;
  return range->first <= begin && range->second >= end;
}

void AioQueue::wait_until_read(std::uint64_t begin, std::uint64_t end) {
  std::unique_lock<std::mutex> lock(mutex_);
  progress_.wait(lock, [&] { return error_ != 0 || was_read_locked(begin, end); });
  throw_if_failed_locked();
}

bool AioQueue::has_outstanding_locked(int tag) const {
  for (const Chunk& chunk : queued_) {
    if (chunk.tag == tag) return true;
  }
  for (const Slot& slot : slots_) {
    if (slot.busy && slot.chunk.tag == tag) return true;
  }
  return false;
}

void AioQueue::enqueue(int tag, const std::uint8_t* buf, std::size_t len, std::uint64_t offset) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    throw_if_failed_locked();
    queued_.push_back(Chunk{tag, buf, len, offset, len});
  }
  work_.notify_one();
}

void AioQueue::enqueue_read(std::uint8_t* buf, std::size_t len, std::uint64_t offset,
                            std::size_t expected) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    throw_if_failed_locked();
    queued_.push_back(Chunk{0, buf, len, offset, expected});
  }
  work_.notify_one();
}

void AioQueue::drain(int tag) {
  std::unique_lock<std::mutex> lock(mutex_);
  progress_.wait(lock, [this, tag] { return !has_outstanding_locked(tag); });
  throw_if_failed_locked();
}

void AioQueue::drain_all() {
  std::unique_lock<std::mutex> lock(mutex_);
  progress_.wait(lock, [this] { return queued_.empty() && in_flight_ == 0; });
  throw_if_failed_locked();
}

}  // namespace ds_fastckpt
