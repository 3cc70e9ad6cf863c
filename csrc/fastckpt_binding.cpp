// Python binding of the writer: torch tensors in, OSError out, GIL released during I/O, one call at a time.
#include <pybind11/stl.h>
#include <torch/python.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "aio_reader.h"
#include "aio_writer.h"
#include "crc32c.h"
#include "direct_io.h"
#include "fault_injection.h"
#include "io_error.h"
#include "unique_fd.h"

namespace py = pybind11;

namespace ds_fastckpt {
namespace {

// The kDirectAlignment-aligned start of `buffer`, after checking that `needed` bytes fit
// from there. Every size is compared, never added first: a sum near SIZE_MAX
// wraps to a small number and would pass the check (half_bytes=2**63 did).
std::uint8_t* aligned_bytes(const torch::Tensor& buffer, std::size_t needed, const char* what) {
  if (!buffer.device().is_cpu() || buffer.scalar_type() != torch::kUInt8 || !buffer.is_contiguous()) {
    throw py::value_error(std::string(what) + " must be a contiguous uint8 CPU tensor");
  }
  const auto base = reinterpret_cast<std::uintptr_t>(buffer.data_ptr());
  const std::size_t skip = (kDirectAlignment - base % kDirectAlignment) % kDirectAlignment;
  const auto size = static_cast<std::size_t>(buffer.numel());
  if (skip > size || needed > size - skip) {
    throw py::value_error(std::string(what) + " holds " + std::to_string(size) + " bytes, " +
                          std::to_string(size > skip ? size - skip : 0) + " of them " +
                          std::to_string(kDirectAlignment) + "-aligned; " +
                          std::to_string(needed) + " aligned bytes are needed");
  }
  return reinterpret_cast<std::uint8_t*>(base + skip);
}

// The native writer and reader are single-threaded objects whose calls run with
// the GIL released, so without this two Python threads could be inside one at
// once (two writes interleaving their copies, or close() destroying the queue
// a write is using: both crashed). A call that finds another one running is
// refused with RuntimeError naming both, before it touches anything. The lock
// is only tried, never waited for, while the GIL is held: the running call
// needs the GIL back to return.
class ExclusiveCall {
 public:
  ExclusiveCall(std::mutex& mutex, std::atomic<const char*>& running, const char* type, const char* call)
      : lock_(mutex, std::try_to_lock), running_(running) {
    if (!lock_.owns_lock()) {
      const char* other = running.load();
      throw std::runtime_error(std::string(type) + "." + call + "() was called while " + type + "." +
                               (other != nullptr ? other : "another call") +
                               "() is running on another thread: a writer is used by one thread at a time, "
                               "so finish (join) the other thread's call first");
    }
    running_.store(call);
  }
  ~ExclusiveCall() { running_.store(nullptr); }

  ExclusiveCall(const ExclusiveCall&) = delete;
  ExclusiveCall& operator=(const ExclusiveCall&) = delete;

 private:
  std::unique_lock<std::mutex> lock_;
  std::atomic<const char*>& running_;
};

// `AioWriter.__new__(AioWriter)` makes an instance whose C++ object was never
// constructed, and pybind11 hands its methods uninitialized memory as `this`.
// Every method therefore takes the Python object and goes through this check,
// which asks pybind11 whether __init__ has completed (holder_constructed).
template <typename T>
T& constructed(py::handle self) {
  if (!py::isinstance<T>(self)) {
    throw py::type_error(std::string(T::kName) + " method called on a " + Py_TYPE(self.ptr())->tp_name);
  }
  auto* instance = reinterpret_cast<py::detail::instance*>(self.ptr());
  py::detail::value_and_holder held = instance->get_value_and_holder(py::detail::get_type_info(typeid(T)));
  if (!held || !held.holder_constructed()) {
    throw py::type_error(std::string(T::kName) + " object was never initialized: create it with " + T::kName +
                         "(...), not with __new__");
  }
  return *held.value_ptr<T>();
}

ExistingFile existing_file(const std::string& name) {
  if (name == "truncate") return ExistingFile::kTruncate;
  if (name == "overwrite") return ExistingFile::kOverwrite;
  if (name == "shared") return ExistingFile::kShared;
  throw py::value_error("existing=" + name + " is not allowed: use 'truncate', 'overwrite' or 'shared'");
}

// Keeps the staging tensor alive for as long as the native writer can touch it:
// members are destroyed in reverse order, so the writer (which waits for its
// in-flight requests) goes before the memory it writes from.
class PyAioWriter {
 public:
  static constexpr const char* kName = "AioWriter";

  PyAioWriter(const std::string& path, torch::Tensor staging, std::size_t half_bytes,
              std::size_t block_size, unsigned queue_depth, bool fsync, const std::string& existing)
      : staging_(std::move(staging)) {
    const ExistingFile mode = existing_file(existing);
    std::size_t both_halves;
    if (__builtin_mul_overflow(half_bytes, std::size_t{2}, &both_halves)) {
      throw py::value_error("half_bytes=" + std::to_string(half_bytes) +
                            " is not allowed: two halves of it overflow the address space");
    }
    std::uint8_t* base = aligned_bytes(staging_, both_halves, "staging buffer");
    py::gil_scoped_release release;
    writer_ = std::make_unique<AioWriter>(path, base, half_bytes, WriterOptions{block_size, queue_depth, fsync},
                                          mode);
  }

  void skip(std::uint64_t size) {
    ExclusiveCall call(mutex_, running_, "AioWriter", "skip");
    py::gil_scoped_release release;
    writer_->skip(size);
  }

  void write(const py::buffer& data) {
    // Before the lock: requesting a buffer can run Python code, which might call
    // this writer again on this thread.
    py::buffer_info info = data.request();
    if (!PyBuffer_IsContiguous(info.view(), 'C')) throw py::value_error("write() needs a C-contiguous buffer");
    const auto* bytes = static_cast<const std::uint8_t*>(info.ptr);
    const auto size = static_cast<std::size_t>(info.size) * static_cast<std::size_t>(info.itemsize);
    ExclusiveCall call(mutex_, running_, "AioWriter", "write");
    py::gil_scoped_release release;
    writer_->write(bytes, size);
  }

  // The caller keeps `data` alive and unchanged until close() or abort()
  // returns, unless `until_written` (AioFileWriter.write_in_place holds it).
  void write_in_place(const py::buffer& data, bool until_written) {
    py::buffer_info info = data.request();
    if (!PyBuffer_IsContiguous(info.view(), 'C')) {
      throw py::value_error("write_in_place() needs a C-contiguous buffer");
    }
    const auto* bytes = static_cast<const std::uint8_t*>(info.ptr);
    const auto size = static_cast<std::size_t>(info.size) * static_cast<std::size_t>(info.itemsize);
    ExclusiveCall call(mutex_, running_, "AioWriter", "write_in_place");
    py::gil_scoped_release release;
    writer_->write_in_place(bytes, size, until_written);
  }

  void close() {
    ExclusiveCall call(mutex_, running_, "AioWriter", "close");
    py::gil_scoped_release release;
    writer_->close();
  }

  // The cleanup path (an exception in a with-block, a dropped writer) must not
  // fail, so abort waits for a running call instead of refusing; the GIL is
  // released first, which the running call needs to return.
  void abort() {
    py::gil_scoped_release release;
    std::lock_guard<std::mutex> lock(mutex_);
    running_.store("abort");
    writer_->abort();
    running_.store(nullptr);
  }

  std::uint64_t bytes_written() {
    ExclusiveCall call(mutex_, running_, "AioWriter", "bytes_written");
    return writer_->bytes_written();
  }
  std::uint64_t bytes_in_place() {
    ExclusiveCall call(mutex_, running_, "AioWriter", "bytes_in_place");
    return writer_->bytes_in_place();
  }
  std::uint32_t checksum() {
    ExclusiveCall call(mutex_, running_, "AioWriter", "checksum");
    return writer_->checksum();
  }
  // (offset, length, crc32c) of each run written between skips.
  std::vector<std::tuple<std::uint64_t, std::uint64_t, std::uint32_t>> segments() {
    ExclusiveCall call(mutex_, running_, "AioWriter", "segments");
    std::vector<std::tuple<std::uint64_t, std::uint64_t, std::uint32_t>> runs;
    for (const Segment& segment : writer_->segments()) runs.emplace_back(segment.offset, segment.length, segment.crc);
    return runs;
  }
  bool is_open() {
    ExclusiveCall call(mutex_, running_, "AioWriter", "is_open");
    return writer_->is_open();
  }
  bool is_direct() const { return writer_->is_direct(); }  // fixed when the file is opened
  std::size_t memory_alignment() const { return writer_->memory_alignment(); }  // likewise

 private:
  torch::Tensor staging_;
  std::unique_ptr<AioWriter> writer_;
  std::mutex mutex_;
  std::atomic<const char*> running_{nullptr};
};

void write_aligned(const std::string& path, const torch::Tensor& buffer, std::size_t size,
                   std::size_t block_size, unsigned queue_depth, bool fsync, const std::string& existing) {
  const ExistingFile mode = existing_file(existing);
  if (mode == ExistingFile::kShared) {
    throw py::value_error("existing=shared is not allowed for write_aligned: use 'truncate' or 'overwrite'");
  }
  const std::uint8_t* data = aligned_bytes(buffer, size, "buffer");
  py::gil_scoped_release release;
  write_aligned_file(path, data, size, WriterOptions{block_size, queue_depth, fsync}, mode);
}

// Keeps the buffer alive for as long as the native reader may write into it.
//
// Several threads may wait() at once (the queue's own mutex serializes them);
// finish() destroys the queue they wait on, so it takes the lock exclusively
// and waits for them to return. Both release the GIL before they block on the
// lock: a thread inside wait() needs the GIL back to return.
class PyFileReader {
 public:
  static constexpr const char* kName = "FileReader";

  PyFileReader(const std::string& path, torch::Tensor buffer, std::size_t block_size, unsigned queue_depth)
      : buffer_(std::move(buffer)) {
    std::uint8_t* data = aligned_bytes(buffer_, 0, "buffer");
    const std::size_t capacity = static_cast<std::size_t>(buffer_.numel()) -
                                 static_cast<std::size_t>(data - buffer_.data_ptr<std::uint8_t>());
    py::gil_scoped_release release;
    reader_ = std::make_unique<AioFileReader>(path, data, capacity, ReaderOptions{block_size, queue_depth});
  }

  std::uint64_t size() const { return reader_->size(); }  // fixed when the file is opened

  void wait(std::uint64_t begin, std::uint64_t end) {
    py::gil_scoped_release release;
    std::shared_lock<std::shared_mutex> lock(mutex_);
    reader_->wait(begin, end);
  }

  void finish() {
    py::gil_scoped_release release;
    std::unique_lock<std::shared_mutex> lock(mutex_);
    reader_->finish();
  }

 private:
  torch::Tensor buffer_;
  std::unique_ptr<AioFileReader> reader_;
  std::shared_mutex mutex_;
};

PyAioWriter& as_writer(py::handle self) { return constructed<PyAioWriter>(self); }
PyFileReader& as_reader(py::handle self) { return constructed<PyFileReader>(self); }

// CRC-32C of a C-contiguous buffer on `path` (nullptr: the fastest), extending `crc`, without the GIL.
std::uint32_t crc32c_of_buffer(const py::buffer& data, std::uint32_t crc, const Crc32cPath* path) {
  py::buffer_info info = data.request();
  if (!PyBuffer_IsContiguous(info.view(), 'C')) throw py::value_error("crc32c() needs a C-contiguous buffer");
  const auto* bytes = static_cast<const std::uint8_t*>(info.ptr);
  const auto size = static_cast<std::size_t>(info.size) * static_cast<std::size_t>(info.itemsize);
  py::gil_scoped_release release;
  return path != nullptr ? crc32c_extend_with(*path, crc, bytes, size) : crc32c_extend(crc, bytes, size);
}

std::uint32_t crc32c(const py::buffer& data, std::uint32_t crc) { return crc32c_of_buffer(data, crc, nullptr); }

// Test hook: copies `source` into `destination` (same length, C-contiguous) by the named path's fused copy.
std::uint32_t crc32c_copy_named(const std::string& name, const py::buffer& destination, const py::buffer& source,
                                std::uint32_t crc) {
  py::buffer_info to = destination.request(true);
  py::buffer_info from = source.request();
  if (!PyBuffer_IsContiguous(to.view(), 'C') || !PyBuffer_IsContiguous(from.view(), 'C')) {
    throw py::value_error("_crc32c_copy_with() needs C-contiguous buffers");
  }
  const auto size = static_cast<std::size_t>(from.size) * static_cast<std::size_t>(from.itemsize);
  if (static_cast<std::size_t>(to.size) * static_cast<std::size_t>(to.itemsize) != size) {
    throw py::value_error("_crc32c_copy_with() needs a destination as long as the source");
  }
  for (const Crc32cPath path : crc32c_paths()) {
    if (name != crc32c_path_name(path)) continue;
    py::gil_scoped_release release;
    return crc32c_copy_with(path, crc, static_cast<std::uint8_t*>(to.ptr), static_cast<const std::uint8_t*>(from.ptr),
                            size);
  }
  throw py::value_error("path='" + name + "' is not allowed: see _crc32c_paths()");
}

std::vector<std::string> crc32c_path_names() {
  std::vector<std::string> names;
  for (const Crc32cPath path : crc32c_paths()) names.emplace_back(crc32c_path_name(path));
  return names;
}

std::uint32_t crc32c_with(const std::string& name, const py::buffer& data, std::uint32_t crc) {
  for (const Crc32cPath path : crc32c_paths()) {
    if (name == crc32c_path_name(path)) return crc32c_of_buffer(data, crc, &path);
  }
  std::string allowed;
  for (const std::string& runnable : crc32c_path_names()) allowed += (allowed.empty() ? "" : ", ") + runnable;
  throw py::value_error("path='" + name + "' is not allowed: this CPU and build run " + allowed);
}

py::dict fd_counters() {
  const FdCounts counts = fd_counts();
  py::dict out;
  out["opened"] = counts.opened;
  out["closed"] = counts.closed;
  return out;
}

}  // namespace
}  // namespace ds_fastckpt

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using ds_fastckpt::as_reader;
  using ds_fastckpt::as_writer;
  using ds_fastckpt::PyAioWriter;
  using ds_fastckpt::PyFileReader;
  m.doc() = "ds_fastckpt native libaio + O_DIRECT writer";

  // OSError(errno, strerror, filename) picks the matching subclass
  // (FileNotFoundError, PermissionError, ...) and keeps errno and path.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const ds_fastckpt::IoError& e) {
      const int err = e.code().value();
      const std::string message = std::string(std::strerror(err)) + " (" + e.op() + ")";
      py::object exc = py::reinterpret_borrow<py::object>(PyExc_OSError)(err, message, e.path());
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
    }
  });

  py::class_<PyAioWriter>(m, "AioWriter")
      .def(py::init<const std::string&, torch::Tensor, std::size_t, std::size_t, unsigned, bool, const std::string&>(),
           py::arg("path"), py::arg("staging"), py::arg("half_bytes"), py::arg("block_size"),
           py::arg("queue_depth"), py::arg("fsync"), py::arg("existing") = "truncate")
      .def(
          "skip", [](py::handle self, std::uint64_t size) { as_writer(self).skip(size); }, py::arg("size"))
      .def_property_readonly("segments", [](py::handle self) { return as_writer(self).segments(); })
      .def(
          "write", [](py::handle self, const py::buffer& data) { as_writer(self).write(data); },
          py::arg("data"))
      .def(
          "write_in_place",
          [](py::handle self, const py::buffer& data, bool until_written) {
            as_writer(self).write_in_place(data, until_written);
          },
          py::arg("data"), py::arg("until_written"))
      .def("close", [](py::handle self) { as_writer(self).close(); })
      .def("abort", [](py::handle self) { as_writer(self).abort(); })
      .def_property_readonly("bytes_written", [](py::handle self) { return as_writer(self).bytes_written(); })
      .def_property_readonly("checksum", [](py::handle self) { return as_writer(self).checksum(); })
      .def_property_readonly("bytes_in_place",
                             [](py::handle self) { return as_writer(self).bytes_in_place(); })
      .def_property_readonly("is_direct", [](py::handle self) { return as_writer(self).is_direct(); })
      .def_property_readonly("memory_alignment",
                             [](py::handle self) { return as_writer(self).memory_alignment(); })
      .def_property_readonly("is_open", [](py::handle self) { return as_writer(self).is_open(); });

  m.def("write_aligned", &ds_fastckpt::write_aligned, py::arg("path"), py::arg("buffer"),
        py::arg("size"), py::arg("block_size"), py::arg("queue_depth"), py::arg("fsync"),
        py::arg("existing") = "truncate");
  py::class_<PyFileReader>(m, "FileReader")
      .def(py::init<const std::string&, torch::Tensor, std::size_t, unsigned>(), py::arg("path"),
           py::arg("buffer"), py::arg("block_size"), py::arg("queue_depth"))
      .def_property_readonly("size", [](py::handle self) { return as_reader(self).size(); })
      .def(
          "wait",
          [](py::handle self, std::uint64_t begin, std::uint64_t end) { as_reader(self).wait(begin, end); },
          py::arg("begin"), py::arg("end"))
      .def("finish", [](py::handle self) { as_reader(self).finish(); });
  m.def("crc32c", &ds_fastckpt::crc32c, py::arg("data"), py::arg("crc") = 0,
        "CRC-32C of a buffer, extending `crc`; the checksum manifests record.");
  m.def("crc32c_combine", &ds_fastckpt::crc32c_combine, py::arg("crc_a"), py::arg("crc_b"), py::arg("size_b"),
        "CRC-32C of a followed by b, from the CRCs of a and b and b's length, without the data.");
  m.def("_crc32c_paths", &ds_fastckpt::crc32c_path_names,
        "Test hook: the CRC-32C implementations this CPU runs, fastest (the one crc32c() uses) first.");
  m.def("_crc32c_with", &ds_fastckpt::crc32c_with, py::arg("path"), py::arg("data"), py::arg("crc") = 0,
        "Test hook: crc32c() computed by the named implementation, one of _crc32c_paths().");
  m.def("_crc32c_copy_with", &ds_fastckpt::crc32c_copy_named, py::arg("path"), py::arg("destination"),
        py::arg("source"), py::arg("crc") = 0,
        "Test hook: copies source into destination and returns its CRC-32C, by the named fused copy.");
  m.attr("DIRECT_ALIGNMENT") = py::int_(ds_fastckpt::kDirectAlignment);
  m.def("_arm_fault", &ds_fastckpt::faults::arm, py::arg("point"), py::arg("errno"), py::arg("skip"),
        "Test hook: fail hit number skip+1 of a syscall point with errno.");
  m.def("_disarm_faults", &ds_fastckpt::faults::disarm_all);
  m.def("fd_counters", &ds_fastckpt::fd_counters,
        "Descriptors opened and closed by this op since the process started.");
}
