// Mamba scan, backward: instantiates the shared kernels of selective_scan.cuh.
#include "selective_scan.cuh"

namespace selective_scan {
cudaError_t mamba_scan_bwd(const ScanParams& p) { return scan_bwd<Mamba>(p); }
}  // namespace selective_scan
