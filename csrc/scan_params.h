// Host-visible interface of the selective-scan kernels (Longhorn, Mamba-1).
//
// Both scans are, per batch b, channel c and state n, the diagonal recurrence
//
//     h_t[c, n] = a_t[c, n] * h_{t-1}[c, n] + delta_t[c] * x_t[c] * kin_t[n]
//     y_t[c]    = (sum_n qout_t[n] * h_t[c, n] + D[c] * x_t[c]) * SiLU(z_t[c])
//
// with a = 1 - delta * kin^2 (Longhorn, delta = 1 / (1 + exp(-dt) + |kin|^2)) or
// a = exp(delta * A[c, n]) (Mamba, delta = softplus(dt)). A reset at step t sets a_t = 0.
// This header is plain C++ so that the binding (compiled by the host compiler) and the
// kernels (compiled by nvcc) share it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace selective_scan {

constexpr int kStateSize = 16;     // N: the only state size with kernels
constexpr int kTile = 16;          // time steps staged per tile
constexpr int kBlockThreads = 128;
constexpr int kBwdBlockChannels = 64;  // channels per backward block
constexpr int kBwdCheckpointSteps = 4;  // steps between the backward's state checkpoints

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct ScanParams {
  int batch = 0, seqlen = 0, channels = 0;
  int chunk_len = 0, nchunks = 1;  // time is split into nchunks chunks of chunk_len steps (a multiple of kTile)
  DType dtype = DType::kFloat32;   // dtype of x, dt, z, dy, y, dx, ddt, dz; everything else is float32

  // Element strides (batch, time, channel) of x, dt, z, dy: these may be views (a transpose, a
  // slice of a wider projection). y, dx, ddt, dz are written contiguous.
  int64_t x_stride[3] = {0, 0, 0}, dt_stride[3] = {0, 0, 0}, z_stride[3] = {0, 0, 0}, dy_stride[3] = {0, 0, 0};
  // x with unit time stride (the block's transpose of the convolution output) is read along time,
  // x_align elements at a time where its pointer and batch and channel strides allow (1, 2, 4 or 8).
  bool x_time_major = false;
  int x_align = 1;

  // Inputs. (B, T, C): x, dt, z, dy. (B, T, N): kin, qout. (C, N): A. (C,): D. (B, C, N): h0, dhT. (B, T): reset.
  const void* x = nullptr;
  const void* dt = nullptr;
  const void* z = nullptr;  // optional gate
  const void* dy = nullptr;
  const float* kin = nullptr;
  const float* qout = nullptr;
  const float* A = nullptr;
  const float* D = nullptr;
  const float* h0 = nullptr;     // optional
  const bool* reset = nullptr;   // optional
  const float* dhT = nullptr;

  // Outputs. dkin, dqout, dK, dA, dD are accumulated with atomics and must start at zero.
  void* y = nullptr;
  void* dx = nullptr;
  void* ddt = nullptr;
  void* dz = nullptr;
  float* hT = nullptr;
  float* dkin = nullptr;
  float* dqout = nullptr;
  float* dK = nullptr;  // (B, T): gradient w.r.t. |kin_t|^2 (Longhorn only)
  float* dA = nullptr;
  float* dD = nullptr;
  float* dh0 = nullptr;

  // Per-chunk workspaces, (B, nchunks, C, N) float32: chunk decay product, chunk end state from zero,
  // adjoint chunk summary, state entering each chunk, adjoint entering each chunk from the right.
  float* ws_P = nullptr;
  float* ws_S = nullptr;
  float* ws_Sb = nullptr;
  float* ws_H = nullptr;
  float* ws_R = nullptr;
  // Backward: ws_H already holds the state entering each chunk (the forward's entry_states), so the
  // backward needs no summary pass: its first sweep sums each chunk's P and Sb as it runs.
  bool entry_states_given = false;

  // Forward, optional: the state entering every entry_len steps (t = 0, entry_len, ...), the backward's
  // chunk starts, written to entry_states, (B, n_entry, C, N) float32.
  float* entry_states = nullptr;
  int entry_len = 0, n_entry = 0;
  // Backward only: h every kBwdCheckpointSteps steps, two float4 per thread of each backward block,
  // (B, ceil(T / kTile), kTile / kBwdCheckpointSteps, ceil(C / kBwdBlockChannels), kBlockThreads, 2)
  // float4 (bwd_ckpt in selective_scan.cuh): 16 bytes per (b, t, channel).
  float* ws_ckpt = nullptr;

  cudaStream_t stream = nullptr;
};

// Forward: y and hT (and entry_states, when given). fwd_lanes (2 or 4) threads share one channel's states.
cudaError_t longhorn_scan_fwd(const ScanParams& p, int fwd_lanes);
cudaError_t mamba_scan_fwd(const ScanParams& p, int fwd_lanes);
// Backward: dx, ddt, dz, dkin, dqout, dK, dA, dD, dh0. Needs ws_ckpt (bwd_ckpt_floats); in chunks, ws_P,
// ws_Sb, ws_R, and ws_H with ws_S (a summary pass) or the given entry states.
cudaError_t longhorn_scan_bwd(const ScanParams& p);
cudaError_t mamba_scan_bwd(const ScanParams& p);
// Chunk carries: ws_H from (h0, ws_P, ws_S) when fwd, ws_R from (dhT, ws_P, ws_Sb) when bwd.
cudaError_t scan_combine(const ScanParams& p, bool fwd, bool bwd);

// Size of the backward's ws_ckpt in floats.
inline int64_t bwd_ckpt_floats(const ScanParams& p) {
  return static_cast<int64_t>(p.batch) * ((p.seqlen + kTile - 1) / kTile) * (kTile / kBwdCheckpointSteps) *
         ((p.channels + kBwdBlockChannels - 1) / kBwdBlockChannels) * kBlockThreads * 8;
}

}  // namespace selective_scan
