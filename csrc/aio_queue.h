// A bounded libaio submission queue for writes to one file.
#pragma once

#include <libaio.h>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <string>
#include <vector>

namespace ds_fastckpt {

// Writes chunks of caller-owned memory to one descriptor with at most `depth`
// requests in flight. Chunks carry a tag (the staging half they come from) so a
// caller can wait for one half while the other keeps the disk busy.
//
// The memory behind every enqueued chunk must stay valid until drain() of its
// tag returns or the queue is destroyed; the destructor waits for in-flight
// requests (io_destroy blocks on them), so no write outlives the queue.
class AioQueue {
 public:
  AioQueue(int fd, std::string path, unsigned depth);
  ~AioQueue();

  AioQueue(const AioQueue&) = delete;
  AioQueue& operator=(const AioQueue&) = delete;

  // Queues a write of [buf, buf + len) at file offset `offset` and submits as
  // many queued chunks as there are free slots.
  void enqueue(int tag, const std::uint8_t* buf, std::size_t len, std::uint64_t offset);

  // Blocks until no chunk with `tag` is queued or in flight. Throws IoError on
  // the first failed chunk, after every in-flight request has completed.
  void drain(int tag);
  void drain_all();

 private:
  struct Chunk {
    int tag;
    const std::uint8_t* buf;
    std::size_t len;
    std::uint64_t offset;
  };
  struct Slot {
    struct iocb cb;
    Chunk chunk;
    bool busy = false;
  };

  void submit_queued();
  void reap_one_or_more();
  // Returns the errno of a failed request, 0 otherwise.
  int complete(Slot& slot, long result);
  void fail(int err, const char* op);
  bool has_outstanding(int tag) const;

  int fd_;
  std::string path_;
  io_context_t ctx_ = nullptr;
  std::vector<Slot> slots_;
  std::deque<Chunk> queued_;
  unsigned in_flight_ = 0;
};

}  // namespace ds_fastckpt
