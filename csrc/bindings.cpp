// pybind11 module fastft._C: the torch-free native kernels.
//
// Tensors cross this boundary as raw data pointers (uintptr_t), sizes, strides in
// elements and dtype codes (common/codes.h); fastft/ops/*.py validates them first. The GIL
// is released while a kernel runs.
//
// Every parameter is named and keyword-only (py::kw_only): the kernels take up to 23 plain
// integers, and a call that swaps two of them must fail with a TypeError, not run. codes()
// exports the integer codes so that fastft/_native.py can check them against its own.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <utility>

#include "common/codes.h"
#include "kernels/cpu/kernels.h"
#include "kernels/cpu/rows.h"
#include "kernels/cuda/kernels.h"  // plain C++; CPU-only builds use its constants (codes())

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using fastft::Status;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

std::pair<int, int64_t> as_pair(Status s) { return {s.code, s.index}; }

// Names follow the py::arg names below: *_ptr are data pointers, *_dtype dtype codes,
// batch = B rows to write or gather, length = L positions pooled, dim = D features,
// cache_rows = N rows of the cache, strides are in elements.
std::pair<int, int64_t> cache_write_cpu(uintptr_t src_ptr, int src_dtype, int64_t batch,
                                        int64_t length, int64_t dim, int64_t src_stride_b,
                                        int64_t src_stride_l, int64_t src_stride_d,
                                        uintptr_t rows_ptr, uintptr_t dst_ptr, int dst_dtype,
                                        int64_t cache_rows, uintptr_t scales_ptr, int pool,
                                        uintptr_t mask_ptr, int mask_dtype, int64_t mask_stride_b,
                                        int64_t mask_stride_l, int num_threads) {
  return as_pair(fastft::cpu::cache_write(
      ptr<const void>(src_ptr), src_dtype, batch, length, dim, src_stride_b, src_stride_l,
      src_stride_d, ptr<const int64_t>(rows_ptr), ptr<void>(dst_ptr), dst_dtype, cache_rows,
      ptr<float>(scales_ptr), pool, ptr<const void>(mask_ptr), mask_dtype, mask_stride_b,
      mask_stride_l, num_threads));
}

std::pair<int, int64_t> cache_gather_cpu(uintptr_t src_ptr, int src_dtype, int64_t cache_rows,
                                         int64_t dim, uintptr_t scales_ptr, uintptr_t rows_ptr,
                                         int64_t batch, uintptr_t out_ptr, int out_dtype,
                                         int num_threads) {
  return as_pair(fastft::cpu::cache_gather(ptr<const void>(src_ptr), src_dtype, cache_rows, dim,
                                           ptr<const float>(scales_ptr),
                                           ptr<const int64_t>(rows_ptr), batch, ptr<void>(out_ptr),
                                           out_dtype, num_threads));
}

#ifdef FASTFT_WITH_CUDA
// CUDA entry points: the arguments of the CPU ones, plus whether the cache lives in pinned
// host memory (dst_on_host, src_on_host), a device scratch buffer for the row checks, the
// device index and the stream; no num_threads. They return (code, message); row errors
// are left in scratch[0] (see kernels.h).
std::pair<int, std::string> as_pair(fastft::cuda::LaunchStatus s) {
  return {s.code, std::move(s.message)};
}

std::pair<int, std::string> cache_write_cuda(
    uintptr_t src_ptr, int src_dtype, int64_t batch, int64_t length, int64_t dim,
    int64_t src_stride_b, int64_t src_stride_l, int64_t src_stride_d, uintptr_t rows_ptr,
    uintptr_t dst_ptr, int dst_dtype, int64_t cache_rows, uintptr_t scales_ptr, bool dst_on_host,
    int pool, uintptr_t mask_ptr, int mask_dtype, int64_t mask_stride_b, int64_t mask_stride_l,
    uintptr_t scratch_ptr, int64_t scratch_len, int device, uintptr_t stream) {
  return as_pair(fastft::cuda::cache_write(
      ptr<const void>(src_ptr), src_dtype, batch, length, dim, src_stride_b, src_stride_l,
      src_stride_d, ptr<const int64_t>(rows_ptr), ptr<void>(dst_ptr), dst_dtype, cache_rows,
      ptr<float>(scales_ptr), dst_on_host, pool, ptr<const void>(mask_ptr), mask_dtype,
      mask_stride_b, mask_stride_l, ptr<int64_t>(scratch_ptr), scratch_len, device, stream));
}

std::pair<int, std::string> cache_gather_cuda(uintptr_t src_ptr, int src_dtype,
                                              int64_t cache_rows, int64_t dim,
                                              uintptr_t scales_ptr, bool src_on_host,
                                              uintptr_t rows_ptr, int64_t batch,
                                              uintptr_t out_ptr, int out_dtype,
                                              uintptr_t scratch_ptr, int device,
                                              uintptr_t stream) {
  return as_pair(fastft::cuda::cache_gather(
      ptr<const void>(src_ptr), src_dtype, cache_rows, dim, ptr<const float>(scales_ptr),
      src_on_host, ptr<const int64_t>(rows_ptr), batch, ptr<void>(out_ptr), out_dtype,
      ptr<int64_t>(scratch_ptr), device, stream));
}

py::dict cuda_runtime_info() {
  const fastft::cuda::RuntimeInfo r = fastft::cuda::runtime_info();
  py::dict info;
  info["runtime_version"] = r.runtime_version;
  info["driver_version"] = r.driver_version;
  info["device_count"] = r.device_count;
  info["error"] = r.error;
  return info;
}

// "75,80,90" -> ["75", "80", "90"]
py::list split_archs(const std::string& archs) {
  py::list out;
  size_t start = 0;
  while (start <= archs.size()) {
    size_t end = archs.find(',', start);
    if (end == std::string::npos) end = archs.size();
    if (end > start) out.append(archs.substr(start, end - start));
    start = end + 1;
  }
  return out;
}
#endif

// The integer codes of common/codes.h and cuda/kernels.h as {table: {name: int}}. Python
// keeps its own copy (fastft/_native.py NATIVE_CODES) and compares it with this one when it
// loads the module, so a code changed on one side only is caught before any kernel runs.
// The CUDA tables are plain constants, exported by CPU-only builds too.
py::dict codes() {
  py::dict dtypes;
  dtypes["float32"] = int(fastft::kF32);
  dtypes["float16"] = int(fastft::kF16);
  dtypes["bfloat16"] = int(fastft::kBF16);
  dtypes["int8"] = int(fastft::kI8);
  dtypes["bool"] = int(fastft::kBool);
  dtypes["uint8"] = int(fastft::kBool);  // masks: read as bytes, nonzero = true
  dtypes["int32"] = int(fastft::kI32);
  dtypes["int64"] = int(fastft::kI64);

  py::dict pools;
  pools["none"] = int(fastft::kPoolNone);
  pools["mean"] = int(fastft::kPoolMean);
  pools["max"] = int(fastft::kPoolMax);
  pools["masked_mean"] = int(fastft::kPoolMaskedMean);
  pools["first"] = int(fastft::kPoolFirst);

  py::dict statuses;
  statuses["ok"] = int(fastft::kOk);
  statuses["row_out_of_range"] = int(fastft::kRowOutOfRange);
  statuses["duplicate_row"] = int(fastft::kDuplicateRow);
  statuses["bad_argument"] = int(fastft::kBadArgument);

  py::dict cuda_launch;
  cuda_launch["ok"] = int(fastft::cuda::kLaunchOk);
  cuda_launch["bad_argument"] = int(fastft::cuda::kLaunchBadArgument);
  cuda_launch["cuda_error"] = int(fastft::cuda::kLaunchCudaError);

  py::dict cuda_rows;  // scratch[0] read as int64: rows_ok, or (kind << kind_shift) | index
  cuda_rows["rows_ok"] = static_cast<int64_t>(fastft::cuda::kRowsOk);
  cuda_rows["kind_shift"] = fastft::cuda::kRowKindShift;
  cuda_rows["kind_out_of_range"] = fastft::cuda::kRowKindOutOfRange;
  cuda_rows["kind_duplicate_row"] = fastft::cuda::kRowKindDuplicate;

  py::dict out;
  out["dtypes"] = dtypes;
  out["pools"] = pools;
  out["statuses"] = statuses;
  out["cuda_launch"] = cuda_launch;
  out["cuda_rows"] = cuda_rows;
  return out;
}

py::dict build_info() {
  py::dict info;
  info["version"] = FASTFT_VERSION;
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
#ifdef _OPENMP
  info["openmp"] = true;
  info["openmp_version"] = _OPENMP;
#else
  info["openmp"] = false;
#endif
  info["cpu_f16c"] = fastft::cpu::has_f16c();
  info["cpu_avx2"] = fastft::cpu::has_avx2();
#ifdef FASTFT_WITH_CUDA
  info["cuda"] = true;  // kernels compiled; fastft.has_cuda() also needs a usable device
  info["cuda_archs"] = split_archs(FASTFT_CUDA_ARCHS);
  info["cuda_version"] = FASTFT_CUDA_VERSION;
  info["cuda_runtime"] = "static";
#else
  info["cuda"] = false;
  info["cuda_archs"] = py::list();
  info["cuda_version"] = py::none();
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastft native kernels (CPU; CUDA when built with nvcc). Torch-free.";
  m.def("cache_write_cpu", &cache_write_cpu, py::call_guard<py::gil_scoped_release>(),
        "Pool, cast or quantize, and scatter a [B, L, D] batch into cache rows.", py::kw_only(),
        py::arg("src_ptr"), py::arg("src_dtype"), py::arg("batch"), py::arg("length"),
        py::arg("dim"), py::arg("src_stride_b"), py::arg("src_stride_l"),
        py::arg("src_stride_d"), py::arg("rows_ptr"), py::arg("dst_ptr"), py::arg("dst_dtype"),
        py::arg("cache_rows"), py::arg("scales_ptr"), py::arg("pool"), py::arg("mask_ptr"),
        py::arg("mask_dtype"), py::arg("mask_stride_b"), py::arg("mask_stride_l"),
        py::arg("num_threads"));
  m.def("cache_gather_cpu", &cache_gather_cpu, py::call_guard<py::gil_scoped_release>(),
        "Gather cache rows and dequantize them into a [B, D] buffer.", py::kw_only(),
        py::arg("src_ptr"), py::arg("src_dtype"), py::arg("cache_rows"), py::arg("dim"),
        py::arg("scales_ptr"), py::arg("rows_ptr"), py::arg("batch"), py::arg("out_ptr"),
        py::arg("out_dtype"), py::arg("num_threads"));
  m.def("codes", &codes, "The integer codes shared with Python: {table: {name: int}}.");
  m.def("build_info", &build_info, "How this module was built.");
#ifdef FASTFT_WITH_CUDA
  m.def("cache_write_cuda", &cache_write_cuda, py::call_guard<py::gil_scoped_release>(),
        "CUDA cache_write: launch on the given stream; row errors land in scratch[0].",
        py::kw_only(), py::arg("src_ptr"), py::arg("src_dtype"), py::arg("batch"),
        py::arg("length"), py::arg("dim"), py::arg("src_stride_b"), py::arg("src_stride_l"),
        py::arg("src_stride_d"), py::arg("rows_ptr"), py::arg("dst_ptr"), py::arg("dst_dtype"),
        py::arg("cache_rows"), py::arg("scales_ptr"), py::arg("dst_on_host"), py::arg("pool"),
        py::arg("mask_ptr"), py::arg("mask_dtype"), py::arg("mask_stride_b"),
        py::arg("mask_stride_l"), py::arg("scratch_ptr"), py::arg("scratch_len"),
        py::arg("device"), py::arg("stream"));
  m.def("cache_gather_cuda", &cache_gather_cuda, py::call_guard<py::gil_scoped_release>(),
        "CUDA cache_gather: launch on the given stream; row errors land in scratch[0].",
        py::kw_only(), py::arg("src_ptr"), py::arg("src_dtype"), py::arg("cache_rows"),
        py::arg("dim"), py::arg("scales_ptr"), py::arg("src_on_host"), py::arg("rows_ptr"),
        py::arg("batch"), py::arg("out_ptr"), py::arg("out_dtype"), py::arg("scratch_ptr"),
        py::arg("device"), py::arg("stream"));
  m.def("cuda_write_scratch_len", &fastft::cuda::write_scratch_len,
        "int64 scratch elements cache_write_cuda needs for a batch of B rows.", py::kw_only(),
        py::arg("batch"));
  m.def("cuda_runtime_info", &cuda_runtime_info,  // builds a dict: keeps the GIL
        "Linked CUDA runtime and driver versions, device count, error if unusable.");
#endif
}
