// Python binding of the writer: torch tensors in, OSError out, GIL released during I/O.
#include <torch/python.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>

#include "aio_reader.h"
#include "aio_writer.h"
#include "crc32c.h"
#include "fault_injection.h"
#include "io_error.h"
#include "unique_fd.h"

namespace py = pybind11;

namespace ds_fastckpt {
namespace {

std::uint8_t* aligned_bytes(const torch::Tensor& buffer, std::size_t needed, const char* what) {
  TORCH_CHECK(buffer.device().is_cpu() && buffer.scalar_type() == torch::kUInt8 &&
                  buffer.is_contiguous(),
              what, " must be a contiguous uint8 CPU tensor");
  auto base = reinterpret_cast<std::uintptr_t>(buffer.data_ptr());
  const std::uintptr_t aligned = (base + kDirectAlignment - 1) / kDirectAlignment * kDirectAlignment;
  TORCH_CHECK(aligned - base + needed <= static_cast<std::size_t>(buffer.numel()), what,
              " holds ", buffer.numel(), " bytes; ", needed, " aligned bytes are needed");
  return reinterpret_cast<std::uint8_t*>(aligned);
}

// Keeps the staging tensor alive for as long as the native writer can touch it:
// members are destroyed in reverse order, so the writer (which waits for its
// in-flight requests) goes before the memory it writes from.
class PyAioWriter {
 public:
  PyAioWriter(const std::string& path, torch::Tensor staging, std::size_t half_bytes,
              std::size_t block_size, unsigned queue_depth, bool fsync)
      : staging_(std::move(staging)) {
    std::uint8_t* base = aligned_bytes(staging_, 2 * half_bytes, "staging buffer");
    py::gil_scoped_release release;
    writer_ = std::make_unique<AioWriter>(path, base, half_bytes,
                                          WriterOptions{block_size, queue_depth, fsync});
  }

  void write(const py::buffer& data) {
    py::buffer_info info = data.request();
    TORCH_CHECK(PyBuffer_IsContiguous(info.view(), 'C'), "write() needs a C-contiguous buffer");
    const auto* bytes = static_cast<const std::uint8_t*>(info.ptr);
    const auto size = static_cast<std::size_t>(info.size * info.itemsize);
    py::gil_scoped_release release;
    writer_->write(bytes, size);
  }

  void close() {
    py::gil_scoped_release release;
    writer_->close();
  }

  void abort() {
    py::gil_scoped_release release;
    writer_->abort();
  }

  std::uint64_t bytes_written() const { return writer_->bytes_written(); }
  std::uint32_t checksum() const { return writer_->checksum(); }
  bool is_direct() const { return writer_->is_direct(); }
  bool is_open() const { return writer_->is_open(); }

 private:
  torch::Tensor staging_;
  std::unique_ptr<AioWriter> writer_;
};

void write_aligned(const std::string& path, const torch::Tensor& buffer, std::size_t size,
                   std::size_t block_size, unsigned queue_depth, bool fsync) {
  const std::uint8_t* data = aligned_bytes(buffer, size, "buffer");
  py::gil_scoped_release release;
  write_aligned_file(path, data, size, WriterOptions{block_size, queue_depth, fsync});
}

// Keeps the buffer alive for as long as the native reader may write into it.
class PyFileReader {
 public:
  PyFileReader(const std::string& path, torch::Tensor buffer, std::size_t block_size, unsigned queue_depth)
      : buffer_(std::move(buffer)) {
    std::uint8_t* data = aligned_bytes(buffer_, 0, "buffer");
    const std::size_t capacity = static_cast<std::size_t>(buffer_.numel()) -
                                 static_cast<std::size_t>(data - buffer_.data_ptr<std::uint8_t>());
    py::gil_scoped_release release;
    reader_ = std::make_unique<AioFileReader>(path, data, capacity, ReaderOptions{block_size, queue_depth});
  }

  std::uint64_t size() const { return reader_->size(); }

  void wait(std::uint64_t begin, std::uint64_t end) {
    py::gil_scoped_release release;
    reader_->wait(begin, end);
  }

  void finish() {
    py::gil_scoped_release release;
    reader_->finish();
  }

 private:
  torch::Tensor buffer_;
  std::unique_ptr<AioFileReader> reader_;
};

std::uint32_t crc32c(const py::buffer& data, std::uint32_t crc) {
  py::buffer_info info = data.request();
  TORCH_CHECK(PyBuffer_IsContiguous(info.view(), 'C'), "crc32c() needs a C-contiguous buffer");
  const auto* bytes = static_cast<const std::uint8_t*>(info.ptr);
  const auto size = static_cast<std::size_t>(info.size * info.itemsize);
  py::gil_scoped_release release;
  return crc32c_extend(crc, bytes, size);
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
  using ds_fastckpt::PyAioWriter;
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
      .def(py::init<const std::string&, torch::Tensor, std::size_t, std::size_t, unsigned, bool>(),
           py::arg("path"), py::arg("staging"), py::arg("half_bytes"), py::arg("block_size"),
           py::arg("queue_depth"), py::arg("fsync"))
      .def("write", &PyAioWriter::write, py::arg("data"))
      .def("close", &PyAioWriter::close)
      .def("abort", &PyAioWriter::abort)
      .def_property_readonly("bytes_written", &PyAioWriter::bytes_written)
      .def_property_readonly("checksum", &PyAioWriter::checksum)
      .def_property_readonly("is_direct", &PyAioWriter::is_direct)
      .def_property_readonly("is_open", &PyAioWriter::is_open);

  m.def("write_aligned", &ds_fastckpt::write_aligned, py::arg("path"), py::arg("buffer"),
        py::arg("size"), py::arg("block_size"), py::arg("queue_depth"), py::arg("fsync"));
  py::class_<ds_fastckpt::PyFileReader>(m, "FileReader")
      .def(py::init<const std::string&, torch::Tensor, std::size_t, unsigned>(), py::arg("path"),
           py::arg("buffer"), py::arg("block_size"), py::arg("queue_depth"))
      .def_property_readonly("size", &ds_fastckpt::PyFileReader::size)
      .def("wait", &ds_fastckpt::PyFileReader::wait, py::arg("begin"), py::arg("end"))
      .def("finish", &ds_fastckpt::PyFileReader::finish);
  m.def("crc32c", &ds_fastckpt::crc32c, py::arg("data"), py::arg("crc") = 0,
        "CRC-32C of a buffer, extending `crc`; the checksum manifests record.");
  m.def("_arm_fault", &ds_fastckpt::faults::arm, py::arg("point"), py::arg("errno"), py::arg("skip"),
        "Test hook: fail hit number skip+1 of a syscall point with errno.");
  m.def("_disarm_faults", &ds_fastckpt::faults::disarm_all);
  m.def("fd_counters", &ds_fastckpt::fd_counters,
        "Descriptors opened and closed by this op since the process started.");
}
