// Sequential libaio + O_DIRECT file writer with double-buffered staging.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "aio_queue.h"
#include "direct_io.h"
#include "unique_fd.h"

namespace ds_fastckpt {

struct WriterOptions {
  std::size_t block_size;    // bytes per libaio request, a multiple of kDirectAlignment
  unsigned queue_depth;      // requests in flight
  bool fsync;                // fsync before close
};

// What opening does to a file already at the path.
enum class ExistingFile {
  kTruncate,   // O_TRUNC: its blocks are freed and the file is written anew
  kOverwrite,  // its blocks are kept and written over in place; close() cuts what is left past the end
  kShared,     // sized by whoever made it and written in ranges by several writers at once: opened without
               // O_CREAT or O_TRUNC and never resized, except to cut the padding of a tail this writer wrote
};

// A run of bytes written back to back, between two skip()s: where it starts in
// the file, how long it is, and its CRC-32C.
struct Segment {
  std::uint64_t offset;
  std::uint64_t length;
  std::uint32_t crc;
};

// Writes one file front to back, or, with skip(), the ranges of a kShared file
// that are this writer's. Call order: (write() | skip())* then close(), or abort().
//
// The caller lends `staging`: two halves of `half_bytes` each, aligned to
// kDirectAlignment, alive until close()/abort() returns or the writer is
// destroyed. write() copies into the active half, hashing in the same pass;
// when it is full its I/O is queued and copying continues into the other
// half, so copying overlaps disk writes. write_in_place() skips the copy for
// memory that O_DIRECT can write from. The unaligned tail is written padded to a whole block and the file
// is then truncated to its exact length, without reopening it.
//
// One call at a time: a writer is not thread-safe (the Python binding refuses
// a second concurrent call). Every size is checked without overflow.
//
// kOverwrite exists for recycling a retired checkpoint's file: an O_DIRECT
// write over allocated blocks needs no allocation, and the blocks are never
// freed, which on a filesystem mounted with `discard` costs about as much as
// writing them.
class AioWriter {
 public:
  AioWriter(std::string path, std::uint8_t* staging, std::size_t half_bytes, WriterOptions options,
            ExistingFile existing = ExistingFile::kTruncate);
  ~AioWriter();

  AioWriter(const AioWriter&) = delete;
  AioWriter& operator=(const AioWriter&) = delete;

  // Copies `size` bytes into staging and queues full halves. On failure the
  // writer is aborted (descriptor closed) before the error propagates.
  void write(const std::uint8_t* data, std::size_t size);

  // Writes `size` bytes straight from their memory where O_DIRECT allows:
  // when (address - file position) is a multiple of memory_alignment(), the
  // whole blocks in the middle go to disk from `data` and are hashed on this
  // thread while the disk writes them; the unaligned edges, and all of a
  // source that is not congruent or too small to gain, are copied into
  // staging like write(). With `until_written` false, the memory must stay
  // valid and unchanged until close() or abort() returns; with it true, this
  // returns once the bytes written from `data` are on disk (a pinned block
  // the caller reuses). Failure aborts the writer, as write().
  void write_in_place(const std::uint8_t* data, std::size_t size, bool until_written);

  // Moves the file position forward by `size` bytes without writing them:
  // another writer of a kShared file writes them. The position and `size`
  // must be multiples of kDirectAlignment. Ends the current segment.
  void skip(std::uint64_t size);

  // Writes what is staged, truncates to the exact size, fsyncs (unless
  // disabled) and closes. The descriptor is closed whether or not this throws.
  void close();

  // Closes without flushing or fsyncing; waits for in-flight requests first.
  void abort() noexcept;

  std::uint64_t bytes_written() const noexcept { return accepted_; }
  // Of those, the bytes write_in_place() sent to disk straight from the caller's memory.
  std::uint64_t bytes_in_place() const noexcept { return in_place_; }
  // CRC-32C of the bytes written, in order (the file's, when nothing was
  // skipped); complete once close() has returned.
  std::uint32_t checksum() const noexcept { return total_checksum_; }
  // The runs written between skips, in file order; complete once close() has returned.
  const std::vector<Segment>& segments() const noexcept { return segments_; }
  bool is_direct() const noexcept { return direct_; }
  // The alignment of memory write_in_place() writes from directly (see direct_memory_alignment()).
  std::size_t memory_alignment() const noexcept { return memory_alignment_; }
  bool is_open() const noexcept { return fd_.valid(); }

 private:
  void copy_and_queue(const std::uint8_t* data, std::size_t size);
  void queue_active_half(std::size_t padded_bytes);
  void queue_staged_blocks();
  void queue_in_place(const std::uint8_t* data, std::size_t size, bool until_written);
  void require_open(const char* op) const;
  void end_segment();

  std::string path_;
  WriterOptions options_;
  ExistingFile existing_;
  UniqueFd fd_;
  bool direct_ = true;
  std::size_t memory_alignment_ = kDirectAlignment;
  std::unique_ptr<AioQueue> queue_;
  std::uint8_t* halves_[2];
  std::size_t half_bytes_;
  int active_ = 0;
  std::size_t fill_ = 0;
  std::uint64_t half_offset_ = 0;
  std::uint64_t reserved_ = 0;  // file size set ahead of the writes; a kShared file's size
  std::uint64_t accepted_ = 0;  // the file position: bytes written and skipped
  std::uint64_t in_place_ = 0;
  std::uint64_t segment_start_ = 0;
  std::uint32_t checksum_ = 0;  // of the current segment
  std::uint32_t total_checksum_ = 0;
  std::vector<Segment> segments_;
};

// Writes `size` bytes from an aligned buffer straight to `path` with the same
// queue, no staging copy and no checksum: the ceiling of what the disk
// accepts from this op. kOverwrite writes over the blocks of the file already
// there, as fio does over the file it laid out: the ceiling of a save that
// recycles a retired checkpoint's file. kShared is refused (EINVAL).
void write_aligned_file(const std::string& path, const std::uint8_t* data, std::size_t size,
                        WriterOptions options, ExistingFile existing = ExistingFile::kTruncate);

}  // namespace ds_fastckpt
