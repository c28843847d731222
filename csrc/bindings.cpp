// pybind11 module fastft._C: the torch-free native kernels.
//
// Tensors cross this boundary as raw data pointers (uintptr_t), sizes, strides in
// elements and dtype codes (common/codes.h); fastft/ops/*.py validates them first. The GIL
// is released while a kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <utility>

#include "common/codes.h"
#include "kernels/cpu/kernels.h"
#include "kernels/cpu/rows.h"
#ifdef FASTFT_WITH_CUDA
#include "kernels/cuda/kernels.h"
#endif

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

std::pair<int, int64_t> cache_write_cpu(uintptr_t src, int src_dtype, int64_t B, int64_t L,
                                        int64_t D, int64_t sb, int64_t sl, int64_t sd,
                                        uintptr_t rows, uintptr_t dst, int dst_dtype, int64_t N,
                                        uintptr_t scales, int pool, uintptr_t mask,
                                        int mask_dtype, int64_t mb, int64_t ml, int threads) {
  return as_pair(fastft::cpu::cache_write(ptr<const void>(src), src_dtype, B, L, D, sb, sl, sd,
                                          ptr<const int64_t>(rows), ptr<void>(dst), dst_dtype, N,
                                          ptr<float>(scales), pool, ptr<const void>(mask),
                                          mask_dtype, mb, ml, threads));
}

std::pair<int, int64_t> cache_gather_cpu(uintptr_t src, int src_dtype, int64_t N, int64_t D,
                                         uintptr_t scales, uintptr_t rows, int64_t B,
                                         uintptr_t out, int out_dtype, int threads) {
  return as_pair(fastft::cpu::cache_gather(ptr<const void>(src), src_dtype, N, D,
                                           ptr<const float>(scales), ptr<const int64_t>(rows), B,
                                           ptr<void>(out), out_dtype, threads));
}

#ifdef FASTFT_WITH_CUDA
// CUDA entry points: same argument order as the CPU ones, plus whether the cache lives in
// pinned host memory, a device scratch buffer for the row checks, the device index and the
// stream. They return (code, message); row errors are left in scratch[0] (see kernels.h).
std::pair<int, std::string> as_pair(fastft::cuda::LaunchStatus s) {
  return {s.code, std::move(s.message)};
}

std::pair<int, std::string> cache_write_cuda(
    uintptr_t src, int src_dtype, int64_t B, int64_t L, int64_t D, int64_t sb, int64_t sl,
    int64_t sd, uintptr_t rows, uintptr_t dst, int dst_dtype, int64_t N, uintptr_t scales,
    bool dst_on_host, int pool, uintptr_t mask, int mask_dtype, int64_t mb, int64_t ml,
    uintptr_t scratch, int64_t scratch_len, int device, uintptr_t stream) {
  return as_pair(fastft::cuda::cache_write(
      ptr<const void>(src), src_dtype, B, L, D, sb, sl, sd, ptr<const int64_t>(rows),
      ptr<void>(dst), dst_dtype, N, ptr<float>(scales), dst_on_host, pool,
      ptr<const void>(mask), mask_dtype, mb, ml, ptr<int64_t>(scratch), scratch_len, device,
      stream));
}

std::pair<int, std::string> cache_gather_cuda(uintptr_t src, int src_dtype, int64_t N,
                                              int64_t D, uintptr_t scales, bool src_on_host,
                                              uintptr_t rows, int64_t B, uintptr_t out,
                                              int out_dtype, uintptr_t scratch, int device,
                                              uintptr_t stream) {
  return as_pair(fastft::cuda::cache_gather(
      ptr<const void>(src), src_dtype, N, D, ptr<const float>(scales), src_on_host,
      ptr<const int64_t>(rows), B, ptr<void>(out), out_dtype, ptr<int64_t>(scratch), device,
      stream));
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
        "Pool, cast or quantize, and scatter a [B, L, D] batch into cache rows.");
  m.def("cache_gather_cpu", &cache_gather_cpu, py::call_guard<py::gil_scoped_release>(),
        "Gather cache rows and dequantize them into a [B, D] buffer.");
  m.def("build_info", &build_info, "How this module was built.");
#ifdef FASTFT_WITH_CUDA
  m.def("cache_write_cuda", &cache_write_cuda, py::call_guard<py::gil_scoped_release>(),
        "CUDA cache_write: launch on the given stream; row errors land in scratch[0].");
  m.def("cache_gather_cuda", &cache_gather_cuda, py::call_guard<py::gil_scoped_release>(),
        "CUDA cache_gather: launch on the given stream; row errors land in scratch[0].");
  m.def("cuda_write_scratch_len", &fastft::cuda::write_scratch_len,
        "int64 scratch elements cache_write_cuda needs for a batch of B rows.");
  m.def("cuda_runtime_info", &cuda_runtime_info,  // builds a dict: keeps the GIL
        "Linked CUDA runtime and driver versions, device count, error if unusable.");
#endif
}
