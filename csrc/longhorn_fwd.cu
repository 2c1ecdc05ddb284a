// Longhorn scan, forward: instantiates the shared kernels of selective_scan.cuh.
#include "selective_scan.cuh"

namespace selective_scan {
cudaError_t longhorn_scan_fwd(const ScanParams& p, int fwd_lanes) { return scan_fwd<Longhorn>(p, fwd_lanes); }
}  // namespace selective_scan
