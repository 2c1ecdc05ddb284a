// Chunk carries of the chunked scan: one thread per (batch, channel, state) walks the chunks.
#include "scan_params.h"

namespace selective_scan {

__global__ void combine_kernel(const ScanParams p, bool fwd, bool bwd) {
  const size_t cn = static_cast<size_t>(p.channels) * kStateSize;
  const size_t idx = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.batch * cn) return;
  const size_t b = idx / cn, i = idx % cn;
  auto at = [&](int chunk) { return (b * p.nchunks + chunk) * cn + i; };
  if (fwd) {  // H_0 = h0, H_j = P_{j-1} H_{j-1} + S_{j-1}
    float h = p.h0 != nullptr ? p.h0[idx] : 0.f;
    for (int j = 0; j < p.nchunks; ++j) {
      p.ws_H[at(j)] = h;
      if (j + 1 < p.nchunks) h = fmaf(p.ws_P[at(j)], h, p.ws_S[at(j)]);
    }
  }
  if (bwd) {  // R_{last} = dhT, R_{j-1} = Sb_j + P_j R_j
    float r = p.dhT[idx];
    for (int j = p.nchunks - 1; j >= 0; --j) {
      p.ws_R[at(j)] = r;
      if (j > 0) r = fmaf(p.ws_P[at(j)], r, p.ws_Sb[at(j)]);
    }
  }
}

cudaError_t scan_combine(const ScanParams& p, bool fwd, bool bwd) {
  const size_t n = static_cast<size_t>(p.batch) * p.channels * kStateSize;
  const int threads = 256;
  combine_kernel<<<static_cast<unsigned>((n + threads - 1) / threads), threads, 0, p.stream>>>(p, fwd, bwd);
  return cudaGetLastError();
}

}  // namespace selective_scan
