// A bounded libaio submission queue for writes to, or reads from, one file, serviced by its own thread.
#pragma once

#include <libaio.h>

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace ds_fastckpt {

// Writes chunks of caller-owned memory to one descriptor with at most `depth`
// requests in flight. A worker thread submits queued chunks and reaps
// completions, so the disk stays busy while the caller copies the next chunk;
// the caller only enqueues and, when it needs memory back, drains.
//
// The worker only submits and reaps, so that a freed slot is refilled at once;
// hashing what is written is the caller's business (AioWriter hashes a staging
// half while its writes are in flight).
//
// Chunks carry a tag (the staging half they come from) so a caller can wait
// for one half while the other keeps the disk busy. The memory behind every
// enqueued chunk must stay valid until drain() of its tag returns or the
// queue is destroyed; the destructor waits for in-flight requests. The libaio
// context is reused by the next queue of the same depth.
enum class Direction { kWrite, kRead };

// The deepest queue accepted. Each slot costs about 100 bytes here and 64 more
// in the kernel's completion ring, and io_setup() refuses more events than
// fs.aio-max-nr (65536 by default) anyway; checking first turns a depth such as
// 2**31 into EINVAL instead of a std::bad_alloc from allocating its slots.
constexpr unsigned kMaxQueueDepth = 65536;

class AioQueue {
 public:
  AioQueue(int fd, std::string path, unsigned depth, Direction direction = Direction::kWrite);
  ~AioQueue();

  AioQueue(const AioQueue&) = delete;
  AioQueue& operator=(const AioQueue&) = delete;

  // Queues a write of [buf, buf + len) at file offset `offset`. Throws the
  // first error of an earlier chunk, if any.
  void enqueue(int tag, const std::uint8_t* buf, std::size_t len, std::uint64_t offset);

  // Read queues only: reads [offset, offset + len) into buf, of which at least
  // `expected` bytes must arrive (less than len for the block-padded end of a file).
  void enqueue_read(std::uint8_t* buf, std::size_t len, std::uint64_t offset, std::size_t expected);

  // Blocks until no chunk with `tag` is queued or in flight. Throws IoError
  // for the first failed chunk; after a failure nothing more is submitted.
  void drain(int tag);
  void drain_all();

  // Read queues only: blocks until every byte of [begin, end) has been read,
  // in whatever order the reads completed. Throws IoError on a failed read.
  void wait_until_read(std::uint64_t begin, std::uint64_t end);

 private:
  struct Chunk {
    int tag;
    const std::uint8_t* buf;
    std::size_t len;
    std::uint64_t offset;
    std::size_t expected;  // bytes that must be transferred; len for writes
  };
  struct Slot {
    struct iocb cb;
    Chunk chunk;
    bool busy = false;
  };

  void run();
  // The *_locked functions run with mutex_ held.
  void submit_queued_locked();
  void complete_locked(Slot& slot, long result);
  bool has_outstanding_locked(int tag) const;
  void mark_read_locked(std::uint64_t begin, std::uint64_t end);
  bool was_read_locked(std::uint64_t begin, std::uint64_t end) const;
  void fail_locked(int err, const char* op);
  void throw_if_failed_locked() const;

  int fd_;
  std::string path_;
  Direction direction_;
  io_context_t ctx_ = nullptr;
  std::vector<Slot> slots_;

  std::mutex mutex_;
  std::condition_variable work_;      // worker: chunks queued or stopping
  std::condition_variable progress_;  // callers: a chunk finished or failed
  std::deque<Chunk> queued_;
  unsigned in_flight_ = 0;
  bool stopping_ = false;
  bool context_reusable_ = true;  // false once completions may have been lost
  std::map<std::uint64_t, std::uint64_t> read_ranges_;  // disjoint [begin, end) ranges already read
  int error_ = 0;
  const char* error_op_ = nullptr;
  std::thread worker_;
};

}  // namespace ds_fastckpt
