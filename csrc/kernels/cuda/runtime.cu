// What CUDA runtime this module carries and whether the installed driver can run it.
#include "device.cuh"

namespace fastft {
namespace cuda {

RuntimeInfo runtime_info() {
  RuntimeInfo info{0, 0, 0, std::string()};
  cudaRuntimeGetVersion(&info.runtime_version);
  cudaDriverGetVersion(&info.driver_version);  // 0 when no driver is installed
  // Initialises the driver (not a context). Fails cleanly without a driver or GPU, and with
  // cudaErrorInsufficientDriver when the driver is older than the runtime linked in here.
  cudaError_t err = cudaGetDeviceCount(&info.device_count);
  if (err != cudaSuccess) {
    info.device_count = 0;
    info.error = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    cudaGetLastError();
  }
  return info;
}

}  // namespace cuda
}  // namespace fastft
