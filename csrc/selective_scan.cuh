// Chunked selective-scan kernels shared by Longhorn and Mamba-1 (see scan_params.h for the math).
//
// Work split. A block of 128 threads owns kCh channels of one batch row and one time chunk;
// LANES threads share a channel, each holding kNS = 16 / LANES of its states in registers
// (forward: the LANES threads of a channel sit in different warps, so each warp reads one
// group of k, q values per step; backward: in one quad of lanes).
// Time is walked in tiles of kTile steps: the block loads a tile of x, dt, z, dy (through their
// strides, so views need no copy; coalesced when the channels are adjacent; prefetched one tile
// ahead into registers), computes the per-(t, c) scalars once (delta, the gate, ...) into shared
// memory, then every thread runs the recurrence over the tile. An x whose steps are adjacent
// instead (the block's transpose of the convolution output) is read in runs along time and
// transposed through shared memory (the kXRun instances of the kernels).
// Resets. A tile with no reset step (nearly all) runs a loop without the per-state select that
// zeroes the decay; in that loop Longhorn's update is h += (delta k)(x - k h), which is
// a = 1 - delta k^2, u = delta x k in fewer instructions.
//
// Chunks. When B * C alone cannot fill the GPU, time is split into chunks that run in parallel:
//   1. summary_kernel: per chunk, the end state from zero S and the decay product P
//      (and, for the backward, the adjoint summary Sb = sum_t prod_{s<=t} a_s * gy_t * qout_t);
//   2. scan_combine: the state entering each chunk, H_j = P_{j-1} H_{j-1} + S_{j-1}, and the
//      adjoint entering each chunk from the right, R_{j-1} = Sb_j + P_j R_j;
//   3. fwd_kernel / bwd_kernel rerun each chunk from H_j (and R_j).
//
// Backward. g_t = dL/dh_t obeys g_t = a_{t+1} g_{t+1} + gy_t * qout_t, gy = dy * SiLU(z). The
// backward kernel sweeps its chunk forward once to checkpoint h at every tile start (a global
// workspace, one float4 per thread and tile, so a chunk may be as long as T and the summary pass
// is needed only when B * C alone cannot fill the GPU), then walks tiles in reverse: it
// recomputes the tile's states into registers (in Tr::kBwdParts parts) and runs g backwards
// through them. Sums over the states (dx, d delta) go through shared memory;
// sums over channels (dkin, dqout) use a transposing shuffle reduction within the warp and
// one float4 global atomic per block and step.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "scan_params.h"

namespace selective_scan {

constexpr int kN = kStateSize;
constexpr int kThreads = kBlockThreads;
constexpr int kLt = kTile;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int LANES>
struct Layout {
  static_assert(kN % LANES == 0 && 32 % LANES == 0, "LANES must divide the state size and the warp");
  static constexpr int kNS = kN / LANES;            // states per thread
  static constexpr int kCh = kThreads / LANES;      // channels per block
  static constexpr int kRowStride = LANES;          // rows between a thread's (t, c) elements
  static constexpr int kElems = kLt / kRowStride;   // (t, c) elements per thread and tile
  static_assert(kNS % 4 == 0, "states are read as float4");
  // Scan role: a warp holds 32 channels and one group of kNS states, so the k and q values a
  // step needs are the same for the whole warp (shared-memory broadcasts).
  __device__ static int group_of(int tid) { return (tid / 32) % LANES; }
  __device__ static int channel_of(int tid) { return (tid / 32 / LANES) * 32 + tid % 32; }
};

// ---------------------------------------------------------------------------------------------
// Scalar helpers

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float exp_fast(float x) { return exp2_approx(x * kLog2e); }
__device__ __forceinline__ float sigmoid_fast(float x) { return __fdividef(1.f, 1.f + exp_fast(-x)); }

__device__ __forceinline__ void atomic_add4(float* dst, float4 v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(dst), v);
#else
  atomicAdd(dst, v.x);
  atomicAdd(dst + 1, v.y);
  atomicAdd(dst + 2, v.z);
  atomicAdd(dst + 3, v.w);
#endif
}

template <int K>
__device__ __forceinline__ void load_vec(float (&dst)[K], const float* src) {
#pragma unroll
  for (int i = 0; i < K; i += 4) {
    const float4 v = *reinterpret_cast<const float4*>(src + i);
    dst[i] = v.x;
    dst[i + 1] = v.y;
    dst[i + 2] = v.z;
    dst[i + 3] = v.w;
  }
}

template <int K>
__device__ __forceinline__ void store_vec(float* dst, const float (&src)[K]) {
#pragma unroll
  for (int i = 0; i < K; i += 4) *reinterpret_cast<float4*>(dst + i) = make_float4(src[i], src[i + 1], src[i + 2], src[i + 3]);
}

// ---------------------------------------------------------------------------------------------
// The two scans. step_size: delta and d delta / d dt from dt (and |kin_t|^2). decay: a for one
// state. grad_state: one state's share of d delta (dda) and of dA, and its dkin term (vk), given
// g = dL/dh_t, hp = h_{t-1} (0 after a reset) and a (0 after a reset). grad_delta: d delta from
// x, sum_n g kin_n (dxa) and the summed dda.

struct Longhorn {
  static constexpr bool kUsesKsq = true;
  static constexpr bool kUsesA = false;
  // The backward recomputes a tile's states in this many parts: 2 needs 36 registers for them
  // instead of 68, so at most 4 bytes spill, for 8 more steps of the recurrence per tile (2% faster here,
  // 9% slower for Mamba, whose backward keeps dA too; docs/benchmarks.md).
  static constexpr int kBwdParts = 2;
  __device__ static void step_size(float dt, float ksq, float& delta, float& ddt_scale) {
    const float e = exp_fast(fminf(-dt, 80.f));  // delta = sigmoid(dt) / (1 + sigmoid(dt) |k|^2)
    delta = __fdividef(1.f, 1.f + e + ksq);
    ddt_scale = e * delta * delta;
  }
  __device__ static float decay(float delta, float kk, float) { return fmaf(-delta, kk, 1.f); }
  __device__ static void grad_state(float g, float hp, float, float k, float kk, float delta, float dxv, float,
                                    float& dda, float&, float& vk) {
    const float gh = g * hp;  // a = 1 - delta k^2, u = delta x k
    dda = fmaf(gh, kk, dda);
    vk = fmaf(-2.f * delta * k, gh, g * dxv);
  }
  __device__ static float grad_delta(float x, float dxa, float dda) { return fmaf(x, dxa, -dda); }
};

struct Mamba {
  static constexpr bool kUsesKsq = false;
  static constexpr bool kUsesA = true;
  static constexpr int kBwdParts = 1;
  __device__ static void step_size(float dt, float, float& delta, float& ddt_scale) {
    delta = dt > 20.f ? dt : log1pf(exp_fast(dt));  // softplus
    ddt_scale = sigmoid_fast(dt);
  }
  // a2 = A * log2(e), so a = exp(delta * A) = 2^(delta * a2)
  __device__ static float decay(float delta, float, float a2) { return exp2_approx(delta * a2); }
  __device__ static void grad_state(float g, float hp, float a, float, float, float delta, float dxv, float a2,
                                    float& dda, float& dA, float& vk) {
    const float ga = g * hp * a;  // a = exp(delta A), u = delta x B
    dda = fmaf(ga, a2, dda);
    dA = fmaf(ga, delta, dA);
    vk = g * dxv;
  }
  __device__ static float grad_delta(float x, float dxa, float dda) { return fmaf(dda, kLn2, x * dxa); }
};

// a_t of one state: the scan's decay, or 0 at a reset step. kRst: the tile has a reset step
// (rs is only looked at then).
template <class Tr, bool kRst>
__device__ __forceinline__ float step_decay(float delta, float kk, float a2, bool rs) {
  const float a = Tr::decay(delta, kk, a2);
  return kRst && rs ? 0.f : a;
}

// ---------------------------------------------------------------------------------------------
// Tiles: registers holding the next tile's raw inputs, and the shared-memory stage.

template <typename T, int E>
struct RawTile {
  T x[E], dt[E], z[E], dy[E];
  float2 k, q;
  int rst;
};

struct KqSmem {
  alignas(16) float k[kLt][kN];
  alignas(16) float kk[kLt][kN];
  alignas(16) float q[kLt][kN];
  float ksq[kLt];
  int rst[kLt];
};

// Element (b, t, c) of a (B, T, C) input with the given element strides.
template <typename T>
__device__ __forceinline__ const T* column(const void* base, const int64_t (&stride)[3], int b, int t, int c) {
  return static_cast<const T*>(base) + (b * stride[0] + c * stride[2] + t * stride[1]);
}

// E consecutive elements from src, in vectors of up to 16 bytes; src is aligned to the vector.
template <typename T, int E>
__device__ __forceinline__ void load_run(const T* src, T (&dst)[E]) {
  constexpr int kBytes = E * static_cast<int>(sizeof(T));
  using V = std::conditional_t<kBytes % 16 == 0, uint4, std::conditional_t<kBytes % 8 == 0, uint2, T>>;
  constexpr int kPer = static_cast<int>(sizeof(V) / sizeof(T));
#pragma unroll
  for (int v = 0; v < E / kPer; ++v) {
    const V w = reinterpret_cast<const V*>(src)[v];
    memcpy(&dst[v * kPer], &w, sizeof(V));
  }
}

// x's elements, like the other (B, T, C) inputs', are a thread's own (t, c) elements of Layout<LANES>,
// except when x is time-major (x_time_major; the kernels' kXRun instances): then a thread reads
// kElems consecutive steps of one channel, so that a warp reads whole runs of x, and stage_x puts
// them where the element loops read them (x_at).
template <int LANES>
__device__ __forceinline__ int run_channel() { return threadIdx.x / LANES; }
template <int LANES>
__device__ __forceinline__ int run_start() { return (threadIdx.x % LANES) * Layout<LANES>::kElems; }

// This thread's run of x: steps ts + run_start .. + kElems of channel cbase + run_channel (zeros outside).
template <int LANES, typename T>
__device__ __forceinline__ void load_x_run(const ScanParams& p, int b, int ts, int t1, int cbase,
                                           T (&x)[Layout<LANES>::kElems]) {
  constexpr int E = Layout<LANES>::kElems;
  constexpr int kAlign = (E * sizeof(T) < 16 ? E * sizeof(T) : 16) / sizeof(T);  // elements per vector
  const int c = cbase + run_channel<LANES>(), t = ts + run_start<LANES>();
  const T* src = column<T>(p.x, p.x_stride, b, t, c);
  if (c < p.channels && t + E <= t1 && p.x_align % kAlign == 0) {
    load_run(src, x);
  } else {
#pragma unroll
    for (int i = 0; i < E; ++i) x[i] = c < p.channels && t + i < t1 ? src[i] : from_float<T>(0.f);
  }
}

// Shared-memory stage of a tile's x when it is read in runs (empty otherwise); rows padded so
// that the run stores do not collide.
template <int CH, bool kXRun>
struct XStage {
  float v[kLt][CH + 2];
};
template <int CH>
struct XStage<CH, false> {};

template <int LANES, bool kXRun, class XS, typename T>
__device__ __forceinline__ void stage_x(XS& xs, const T (&x)[Layout<LANES>::kElems]) {
  if constexpr (kXRun) {
#pragma unroll
    for (int i = 0; i < Layout<LANES>::kElems; ++i) xs.v[run_start<LANES>() + i][run_channel<LANES>()] = to_float(x[i]);
  }
}

// x of this thread's element i (row, channel ecl) of the tile; after stage_x and a barrier.
template <int LANES, bool kXRun, class XS, typename T>
__device__ __forceinline__ float x_at(const XS& xs, const T (&x)[Layout<LANES>::kElems], int i, int row, int ecl) {
  if constexpr (kXRun) return xs.v[row][ecl];
  else return to_float(x[i]);
}

// Loads the tile starting at ts: (t, c) elements for this thread, 2 of the tile's k and q values.
template <int LANES, bool kXRun, bool kQ, bool kZ, bool kDy, typename T>
__device__ __forceinline__ void load_tile(const ScanParams& p, int b, int ts, int t1, int cbase,
                                          RawTile<T, Layout<LANES>::kElems>& r) {
  using L = Layout<LANES>;
  const int tid = threadIdx.x;
  const int c = cbase + tid % L::kCh;
  const int row0 = tid / L::kCh;
  const bool use_z = kZ && p.z != nullptr;
  // Each tensor: the thread's first element, then a fixed step between its elements.
  const int t_first = ts + row0;
  const T* xp = column<T>(p.x, p.x_stride, b, t_first, c);  // x: unless time-major
  const T* dp = column<T>(p.dt, p.dt_stride, b, t_first, c);
  const T* zp = use_z ? column<T>(p.z, p.z_stride, b, t_first, c) : nullptr;
  const T* gp = kDy ? column<T>(p.dy, p.dy_stride, b, t_first, c) : nullptr;
  if constexpr (kXRun) load_x_run<LANES>(p, b, ts, t1, cbase, r.x);
#pragma unroll
  for (int i = 0; i < L::kElems; ++i) {
    const int t = t_first + i * L::kRowStride;
    const bool ok = c < p.channels && t < t1;
    const int64_t di = i * L::kRowStride;
    if constexpr (!kXRun) r.x[i] = ok ? xp[di * p.x_stride[1]] : from_float<T>(0.f);
    r.dt[i] = ok ? dp[di * p.dt_stride[1]] : from_float<T>(0.f);
    if (use_z) r.z[i] = ok ? zp[di * p.z_stride[1]] : from_float<T>(0.f);
    if (kDy) r.dy[i] = ok ? gp[di * p.dy_stride[1]] : from_float<T>(0.f);
  }
  const int kt = ts + tid / 8;
  const bool kok = kt < t1;
  const size_t koff = (static_cast<size_t>(b) * p.seqlen + kt) * kN + (tid % 8) * 2;
  r.k = kok ? *reinterpret_cast<const float2*>(p.kin + koff) : make_float2(0.f, 0.f);
  if (kQ) r.q = kok ? *reinterpret_cast<const float2*>(p.qout + koff) : make_float2(0.f, 0.f);
  r.rst = (p.reset != nullptr && kok && (tid % 8) == 0) ? static_cast<int>(p.reset[static_cast<size_t>(b) * p.seqlen + kt]) : 0;
}

// Writes the tile's k, k^2, q, |k|^2 and reset flags to shared memory (8 threads per step).
template <bool kQ, typename R>
__device__ __forceinline__ void stage_kq(KqSmem& s, const R& r) {
  const int tid = threadIdx.x, row = tid / 8, col = (tid % 8) * 2;
  const float k0 = r.k.x, k1 = r.k.y;
  *reinterpret_cast<float2*>(&s.k[row][col]) = r.k;
  *reinterpret_cast<float2*>(&s.kk[row][col]) = make_float2(k0 * k0, k1 * k1);
  if (kQ) *reinterpret_cast<float2*>(&s.q[row][col]) = r.q;
  float ksq = k0 * k0 + k1 * k1;
  ksq += __shfl_xor_sync(0xffffffffu, ksq, 1);
  ksq += __shfl_xor_sync(0xffffffffu, ksq, 2);
  ksq += __shfl_xor_sync(0xffffffffu, ksq, 4);
  if (tid % 8 == 0) {
    s.ksq[row] = ksq;
    s.rst[row] = r.rst;
  }
}

// Calls f(kRst) with kRst a compile-time bool: whether any step of the tile resets. Tiles without
// a reset (nearly all) run without the per-state select that zeroes the decay.
template <typename F>
__device__ __forceinline__ void with_resets(bool any, F&& f) {
  if (any) f(std::true_type{});
  else f(std::false_type{});
}

__device__ __forceinline__ size_t ws_index(const ScanParams& p, int b, int chunk, int c) {
  return ((static_cast<size_t>(b) * p.nchunks + chunk) * p.channels + c) * kN;
}

// State entering this block's chunk: the combine output, or h0, or zeros.
template <int NS>
__device__ __forceinline__ void load_entry_state(const ScanParams& p, int b, int chunk, int c, int s0, float (&h)[NS]) {
#pragma unroll
  for (int j = 0; j < NS; ++j) h[j] = 0.f;
  if (c >= p.channels) return;
  if (p.nchunks > 1) {
    load_vec(h, p.ws_H + ws_index(p, b, chunk, c) + s0);
  } else if (p.h0 != nullptr) {
    load_vec(h, p.h0 + (static_cast<size_t>(b) * p.channels + c) * kN + s0);
  }
}

template <class Tr, int NS>
__device__ __forceinline__ void load_a2(const ScanParams& p, int c, int s0, float (&a2)[NS]) {
#pragma unroll
  for (int j = 0; j < NS; ++j) a2[j] = 0.f;
  if (Tr::kUsesA && c < p.channels) {
    load_vec(a2, p.A + static_cast<size_t>(c) * kN + s0);
#pragma unroll
    for (int j = 0; j < NS; ++j) a2[j] *= kLog2e;
  }
}

// ---------------------------------------------------------------------------------------------
// 1. Chunk summaries (S, P; with kAdj also Sb), one chunk per blockIdx.y.

template <int CH, bool kXRun>
struct SummarySmem {
  KqSmem kq;
  XStage<CH, kXRun> xs;
  float delta[kLt][CH], dxv[kLt][CH], gy[kLt][CH];
};

template <class Tr, int LANES, typename T, bool kXRun, bool kAdj>
__global__ void __launch_bounds__(kThreads) summary_kernel(const ScanParams p) {
  using L = Layout<LANES>;
  __shared__ SummarySmem<L::kCh, kXRun> sm;
  const int tid = threadIdx.x, b = blockIdx.z, chunk = blockIdx.y, cbase = blockIdx.x * L::kCh;
  const int cl = L::channel_of(tid), s0 = L::group_of(tid) * L::kNS, c = cbase + cl;
  const int ecl = tid % L::kCh, erow = tid / L::kCh;
  const int t0 = chunk * p.chunk_len, t1 = min(t0 + p.chunk_len, p.seqlen);

  float h[L::kNS], P[L::kNS], Sb[L::kNS], a2[L::kNS];
#pragma unroll
  for (int j = 0; j < L::kNS; ++j) h[j] = 0.f, P[j] = 1.f, Sb[j] = 0.f;
  load_a2<Tr>(p, c, s0, a2);

  RawTile<T, L::kElems> raw;
  load_tile<LANES, kXRun, kAdj, kAdj, kAdj>(p, b, t0, t1, cbase, raw);
  for (int ts = t0; ts < t1; ts += kLt) {
    stage_kq<kAdj>(sm.kq, raw);
    stage_x<LANES, kXRun>(sm.xs, raw.x);
    const bool tile_rst = __syncthreads_or(raw.rst != 0);  // any reset in this tile
#pragma unroll
    for (int i = 0; i < L::kElems; ++i) {
      const int row = erow + i * L::kRowStride;
      const bool ok = cbase + ecl < p.channels && ts + row < t1;
      float delta, unused;
      Tr::step_size(to_float(raw.dt[i]), sm.kq.ksq[row], delta, unused);
      delta = ok ? delta : 0.f;
      sm.delta[row][ecl] = delta;
      sm.dxv[row][ecl] = delta * x_at<LANES, kXRun>(sm.xs, raw.x, i, row, ecl);
      if (kAdj) {
        float gate = 1.f;
        if (p.z != nullptr) {
          const float zf = to_float(raw.z[i]);
          gate = zf * sigmoid_fast(zf);
        }
        sm.gy[row][ecl] = ok ? to_float(raw.dy[i]) * gate : 0.f;
      }
    }
    __syncthreads();
    if (ts + kLt < t1) load_tile<LANES, kXRun, kAdj, kAdj, kAdj>(p, b, ts + kLt, t1, cbase, raw);
    with_resets(tile_rst, [&](auto rst_c) {
      constexpr bool kRst = decltype(rst_c)::value;
#pragma unroll 4
      for (int s = 0; s < kLt; ++s) {
        const float delta = sm.delta[s][cl], dxv = sm.dxv[s][cl];
        const bool rs = kRst && sm.kq.rst[s] != 0;
        float k[L::kNS], kk[L::kNS], q[L::kNS];
        load_vec(k, &sm.kq.k[s][s0]);
        load_vec(kk, &sm.kq.kk[s][s0]);
        if (kAdj) load_vec(q, &sm.kq.q[s][s0]);
        const float gy = kAdj ? sm.gy[s][cl] : 0.f;
#pragma unroll
        for (int j = 0; j < L::kNS; ++j) {
          const float a = step_decay<Tr, kRst>(delta, kk[j], a2[j], rs);
          h[j] = fmaf(a, h[j], dxv * k[j]);
          P[j] *= a;
          if (kAdj) Sb[j] = fmaf(P[j], gy * q[j], Sb[j]);
        }
      }
    });
    __syncthreads();
  }
  if (c < p.channels) {
    const size_t w = ws_index(p, b, chunk, c) + s0;
    store_vec(p.ws_S + w, h);
    store_vec(p.ws_P + w, P);
    if (kAdj) store_vec(p.ws_Sb + w, Sb);
  }
}

// ---------------------------------------------------------------------------------------------
// 3a. Forward: y for one chunk from its entry state; the last chunk writes hT.

template <int CH, bool kXRun>
struct FwdSmem {
  KqSmem kq;
  XStage<CH, kXRun> xs;
  float delta[kLt][CH], dxv[kLt][CH], x[kLt][CH], gate[kLt][CH];
  float y[kThreads / CH][kLt][CH];  // partial readouts, one per state group
};

template <class Tr, int LANES, typename T, bool kXRun>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const ScanParams p) {
  using L = Layout<LANES>;
  __shared__ FwdSmem<L::kCh, kXRun> sm;
  const int tid = threadIdx.x, b = blockIdx.z, chunk = blockIdx.y, cbase = blockIdx.x * L::kCh;
  const int cl = L::channel_of(tid), s0 = L::group_of(tid) * L::kNS, c = cbase + cl;
  const int ecl = tid % L::kCh, erow = tid / L::kCh, ec = cbase + ecl;
  const int t0 = chunk * p.chunk_len, t1 = min(t0 + p.chunk_len, p.seqlen);
  const float Dc = ec < p.channels ? p.D[ec] : 0.f;

  float h[L::kNS], a2[L::kNS];
  load_entry_state(p, b, chunk, c, s0, h);
  load_a2<Tr>(p, c, s0, a2);

  RawTile<T, L::kElems> raw;
  load_tile<LANES, kXRun, true, true, false>(p, b, t0, t1, cbase, raw);
  for (int ts = t0; ts < t1; ts += kLt) {
    stage_kq<true>(sm.kq, raw);
    stage_x<LANES, kXRun>(sm.xs, raw.x);
    const bool tile_rst = __syncthreads_or(raw.rst != 0);  // any reset in this tile
#pragma unroll
    for (int i = 0; i < L::kElems; ++i) {
      const int row = erow + i * L::kRowStride;
      const bool ok = ec < p.channels && ts + row < t1;
      const float x = x_at<LANES, kXRun>(sm.xs, raw.x, i, row, ecl);
      float delta, unused;
      Tr::step_size(to_float(raw.dt[i]), sm.kq.ksq[row], delta, unused);
      delta = ok ? delta : 0.f;
      float gate = 1.f;
      if (p.z != nullptr) {
        const float zf = to_float(raw.z[i]);
        gate = zf * sigmoid_fast(zf);
      }
      sm.delta[row][ecl] = delta;
      sm.dxv[row][ecl] = delta * x;
      sm.x[row][ecl] = x;
      sm.gate[row][ecl] = gate;
    }
    __syncthreads();
    if (ts + kLt < t1) load_tile<LANES, kXRun, true, true, false>(p, b, ts + kLt, t1, cbase, raw);
    with_resets(tile_rst, [&](auto rst_c) {
      constexpr bool kRst = decltype(rst_c)::value;
#pragma unroll 4
      for (int s = 0; s < kLt; ++s) {
        const float delta = sm.delta[s][cl], dxv = sm.dxv[s][cl];
        const bool rs = kRst && sm.kq.rst[s] != 0;
        float k[L::kNS], kk[L::kNS], q[L::kNS];
        load_vec(k, &sm.kq.k[s][s0]);
        load_vec(kk, &sm.kq.kk[s][s0]);
        load_vec(q, &sm.kq.q[s][s0]);
        float y = 0.f;
        if constexpr (!kRst && Tr::kUsesKsq) {  // Longhorn: h += (delta k) (x - k h), 4 instructions with y
          const float x = sm.x[s][cl];
#pragma unroll
          for (int j = 0; j < L::kNS; ++j) {
            h[j] = fmaf(delta * k[j], fmaf(-k[j], h[j], x), h[j]);
            y = fmaf(q[j], h[j], y);
          }
        } else {
#pragma unroll
          for (int j = 0; j < L::kNS; ++j) {
            const float a = step_decay<Tr, kRst>(delta, kk[j], a2[j], rs);
            h[j] = fmaf(a, h[j], dxv * k[j]);
            y = fmaf(q[j], h[j], y);
          }
        }
        sm.y[L::group_of(tid)][s][cl] = y;
      }
    });
    __syncthreads();
#pragma unroll
    for (int i = 0; i < L::kElems; ++i) {
      const int row = erow + i * L::kRowStride, t = ts + row;
      if (ec < p.channels && t < t1) {
        float y = Dc * sm.x[row][ecl];
#pragma unroll
        for (int g = 0; g < LANES; ++g) y += sm.y[g][row][ecl];
        y *= sm.gate[row][ecl];
        static_cast<T*>(p.y)[(static_cast<size_t>(b) * p.seqlen + t) * p.channels + ec] = from_float<T>(y);
      }
    }
  }
  if (chunk == p.nchunks - 1 && c < p.channels) store_vec(p.hT + (static_cast<size_t>(b) * p.channels + c) * kN + s0, h);
}

// ---------------------------------------------------------------------------------------------
// 3b. Backward for one chunk, 4 lanes per channel (4 states per thread).

constexpr int kBwdLanes = 4;
constexpr int kBwdBlocksPerSm = 4;  // launch bounds: at most 65536 / (4 * 128) = 128 registers

// Where thread tid of block (b, channel block cb) keeps h at the start of tile `tile` (of all T).
__device__ __forceinline__ float4* bwd_ckpt(const ScanParams& p, int b, int tile, int tid) {
  const size_t tiles = (p.seqlen + kLt - 1) / kLt;
  return reinterpret_cast<float4*>(p.ws_ckpt) + ((b * tiles + tile) * gridDim.x + blockIdx.x) * kThreads + tid;
}

struct BwdSmem {
  KqSmem kq;
  XStage<32, true> x;  // the tile's x: staged there when read in runs, else written by sweep 2's element loop
  float delta[kLt][32], dxv[kLt][32], gy[kLt][32], ddt_scale[kLt][32], dsilu[kLt][32];
  float dxa[kBwdLanes][kLt][32], dda[kBwdLanes][kLt][32], ys[kBwdLanes][kLt][32];  // per state group
  alignas(16) float red[kLt][2 * kN];  // per step: dkin (16), dqout (16), summed over the block's channels
};

// Sums 8 values over the 32 lanes of a warp; returns the sum of the value with index
// 4 * bit4 + 2 * bit3 + bit2 of the lane (9 shuffles instead of 40).
__device__ __forceinline__ float transpose_reduce8(const float (&v)[8], int lane) {
  const bool hi = lane & 16, mid = lane & 8, lo = lane & 4;
  float r[4], s[2];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float send = hi ? v[i] : v[i + 4];
    r[i] = (hi ? v[i + 4] : v[i]) + __shfl_xor_sync(0xffffffffu, send, 16);
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float send = mid ? r[i] : r[i + 2];
    s[i] = (mid ? r[i + 2] : r[i]) + __shfl_xor_sync(0xffffffffu, send, 8);
  }
  const float send = lo ? s[0] : s[1];
  float sum = (lo ? s[1] : s[0]) + __shfl_xor_sync(0xffffffffu, send, 4);
  sum += __shfl_xor_sync(0xffffffffu, sum, 2);
  return sum + __shfl_xor_sync(0xffffffffu, sum, 1);
}

// 4 blocks per SM (at most 128 registers): on the H200 (2026-12-03) 3 blocks, with no spills, were 30% (Longhorn)
// and 18% (Mamba) slower, and 5 blocks (96 registers, spilling) slower still (docs/benchmarks.md).
template <class Tr, typename T, bool kXRun>
__global__ void __launch_bounds__(kThreads, kBwdBlocksPerSm) bwd_kernel(const ScanParams p) {
  using L = Layout<kBwdLanes>;
  static_assert(L::kCh == kBwdBlockChannels && L::kNS == 4, "backward layout: each warp holds the 32 channels, one state group");
  constexpr int NS = L::kNS;
  __shared__ BwdSmem sm;
  const int tid = threadIdx.x, lane = tid % 32, b = blockIdx.z, chunk = blockIdx.y, cbase = blockIdx.x * L::kCh;
  const int cl = L::channel_of(tid), sg = L::group_of(tid), s0 = sg * NS, c = cbase + cl;
  const int ecl = tid % L::kCh, erow = tid / L::kCh, ec = cbase + ecl;
  const int t0 = chunk * p.chunk_len, t1 = min(t0 + p.chunk_len, p.seqlen);
  const int ntiles = (t1 - t0 + kLt - 1) / kLt, tile0 = t0 / kLt;
  const bool use_z = p.z != nullptr;
  const float Dc = ec < p.channels ? p.D[ec] : 0.f;

  float h[NS], a2[NS];
  load_entry_state(p, b, chunk, c, s0, h);
  load_a2<Tr>(p, c, s0, a2);

  // Sweep 1: forward through the chunk, checkpointing h at every tile start (the last tile's
  // states are only needed in sweep 2).
  RawTile<T, L::kElems> raw;
  if (ntiles > 1) load_tile<kBwdLanes, kXRun, false, false, false>(p, b, t0, t1, cbase, raw);
  for (int it = 0; it < ntiles; ++it) {
    const int ts = t0 + it * kLt;
    *bwd_ckpt(p, b, tile0 + it, tid) = make_float4(h[0], h[1], h[2], h[3]);
    if (it + 1 == ntiles) break;
    stage_kq<false>(sm.kq, raw);
    stage_x<kBwdLanes, kXRun>(sm.x, raw.x);
    const bool tile_rst = __syncthreads_or(raw.rst != 0);  // any reset in this tile
#pragma unroll
    for (int i = 0; i < L::kElems; ++i) {
      const int row = erow + i * L::kRowStride;
      const bool ok = ec < p.channels && ts + row < t1;
      float delta, unused;
      Tr::step_size(to_float(raw.dt[i]), sm.kq.ksq[row], delta, unused);
      delta = ok ? delta : 0.f;
      sm.delta[row][ecl] = delta;
      sm.dxv[row][ecl] = delta * x_at<kBwdLanes, kXRun>(sm.x, raw.x, i, row, ecl);
    }
    __syncthreads();
    if (it + 1 < ntiles) load_tile<kBwdLanes, kXRun, false, false, false>(p, b, ts + kLt, t1, cbase, raw);
    with_resets(tile_rst, [&](auto rst_c) {
      constexpr bool kRst = decltype(rst_c)::value;
#pragma unroll 4
      for (int s = 0; s < kLt; ++s) {
        const float delta = sm.delta[s][cl], dxv = sm.dxv[s][cl];
        const bool rs = kRst && sm.kq.rst[s] != 0;
        float k[NS], kk[NS];
        load_vec(k, &sm.kq.k[s][s0]);
        load_vec(kk, &sm.kq.kk[s][s0]);
#pragma unroll
        for (int j = 0; j < NS; ++j) {
          const float a = step_decay<Tr, kRst>(delta, kk[j], a2[j], rs);
          h[j] = fmaf(a, h[j], dxv * k[j]);
        }
      }
    });
    __syncthreads();
  }

  // Sweep 2: tiles in reverse. g holds a_{t+1} * g_{t+1}, starting from the adjoint entering
  // from the next chunk (or dhT).
  float g[NS], dA[NS];
#pragma unroll
  for (int j = 0; j < NS; ++j) g[j] = 0.f, dA[j] = 0.f;
  if (c < p.channels) {
    if (p.nchunks > 1) load_vec(g, p.ws_R + ws_index(p, b, chunk, c) + s0);
    else load_vec(g, p.dhT + (static_cast<size_t>(b) * p.channels + c) * kN + s0);
  }
  float dD_acc = 0.f;
  load_tile<kBwdLanes, kXRun, true, true, true>(p, b, t0 + (ntiles - 1) * kLt, t1, cbase, raw);
  float4 h_start = *bwd_ckpt(p, b, tile0 + ntiles - 1, tid);  // written by this thread in sweep 1
  for (int it = ntiles - 1; it >= 0; --it) {
    const int ts = t0 + it * kLt;
    stage_kq<true>(sm.kq, raw);
    stage_x<kBwdLanes, kXRun>(sm.x, raw.x);
    const bool tile_rst = __syncthreads_or(raw.rst != 0);  // any reset in this tile
#pragma unroll
    for (int i = 0; i < L::kElems; ++i) {
      const int row = erow + i * L::kRowStride;
      const bool ok = ec < p.channels && ts + row < t1;
      const float x = x_at<kBwdLanes, kXRun>(sm.x, raw.x, i, row, ecl), dy = to_float(raw.dy[i]);
      float delta, ddt_scale;
      Tr::step_size(to_float(raw.dt[i]), sm.kq.ksq[row], delta, ddt_scale);
      delta = ok ? delta : 0.f;
      float gate = 1.f, dsilu = 0.f;
      if (use_z) {
        const float zf = to_float(raw.z[i]), sz = sigmoid_fast(zf);
        gate = zf * sz;
        dsilu = dy * sz * fmaf(zf, 1.f - sz, 1.f);
      }
      sm.delta[row][ecl] = delta;
      sm.dxv[row][ecl] = delta * x;
      sm.x.v[row][ecl] = x;
      sm.gy[row][ecl] = ok ? dy * gate : 0.f;
      sm.ddt_scale[row][ecl] = ddt_scale;
      sm.dsilu[row][ecl] = dsilu;
    }
    __syncthreads();
    const float4 h4 = h_start;
    if (it > 0) {
      load_tile<kBwdLanes, kXRun, true, true, true>(p, b, ts - kLt, t1, cbase, raw);
      h_start = *bwd_ckpt(p, b, tile0 + it - 1, tid);
    }

    // Recompute the tile's states and run g backwards through them, in Tr::kBwdParts parts of the
    // tile from the last to the first: each part reruns the recurrence from the tile start to its
    // own first step (h only), then keeps its steps' states, hist[s] = h before step base + s.
    with_resets(tile_rst, [&](auto rst_c) {
      constexpr bool kRst = decltype(rst_c)::value;
      static_assert(kLt % Tr::kBwdParts == 0, "kBwdParts must divide the tile");
      constexpr int kPart = kLt / Tr::kBwdParts;
      // h after step s, from hp (h before it).
      auto advance = [&](int s, const float (&hp)[NS], float (&hn)[NS]) {
        const float delta = sm.delta[s][cl], dxv = sm.dxv[s][cl];
        const bool rs = kRst && sm.kq.rst[s] != 0;
        float k[NS], kk[NS];
        load_vec(k, &sm.kq.k[s][s0]);
        load_vec(kk, &sm.kq.kk[s][s0]);
#pragma unroll
        for (int j = 0; j < NS; ++j) {
          const float a = step_decay<Tr, kRst>(delta, kk[j], a2[j], rs);
          hn[j] = fmaf(a, hp[j], dxv * k[j]);
        }
      };
#pragma unroll
      for (int part = Tr::kBwdParts - 1; part >= 0; --part) {
        const int base = part * kPart;
        float hist[kPart + 1][NS];
        hist[0][0] = h4.x, hist[0][1] = h4.y, hist[0][2] = h4.z, hist[0][3] = h4.w;
#pragma unroll
        for (int s = 0; s < base; ++s) advance(s, hist[0], hist[0]);
#pragma unroll
        for (int s = 0; s < kPart; ++s) advance(base + s, hist[s], hist[s + 1]);
#pragma unroll
        for (int i = kPart - 1; i >= 0; --i) {
          const int s = base + i;
          const float delta = sm.delta[s][cl], dxv = sm.dxv[s][cl], gy = sm.gy[s][cl];
          const bool rs = kRst && sm.kq.rst[s] != 0;
          float k[NS], kk[NS], q[NS];
          load_vec(k, &sm.kq.k[s][s0]);
          load_vec(kk, &sm.kq.kk[s][s0]);
          load_vec(q, &sm.kq.q[s][s0]);
          float dxa = 0.f, dda = 0.f, ys = 0.f, v[2 * NS];
#pragma unroll
          for (int j = 0; j < NS; ++j) {
            const float a = step_decay<Tr, kRst>(delta, kk[j], a2[j], rs);
            const float hp = kRst && rs ? 0.f : hist[i][j], hn = hist[i + 1][j];
            const float gj = fmaf(gy, q[j], g[j]);
            dxa = fmaf(gj, k[j], dxa);
            ys = fmaf(q[j], hn, ys);
            v[NS + j] = gy * hn;
            Tr::grad_state(gj, hp, a, k[j], kk[j], delta, dxv, a2[j], dda, dA[j], v[j]);
            g[j] = a * gj;
          }
          sm.dxa[sg][s][cl] = dxa;
          sm.dda[sg][s][cl] = dda;
          sm.ys[sg][s][cl] = ys;
          const float r = transpose_reduce8(v, lane);
          const int idx = ((lane >> 4) & 1) * 4 + ((lane >> 3) & 1) * 2 + ((lane >> 2) & 1);
          if ((lane & 3) == 0) sm.red[s][(idx < NS ? 0 : kN - NS) + s0 + idx] = r;
        }
      }
    });
    __syncthreads();

    // Per-(t, c) gradients; the |k|^2 term of Longhorn is summed over the warp's 32 channels.
#pragma unroll
    for (int i = 0; i < L::kElems; ++i) {
      const int row = erow + i * L::kRowStride, t = ts + row;
      const bool ok = ec < p.channels && t < t1;
      const float delta = sm.delta[row][ecl], x = sm.x.v[row][ecl], gy = sm.gy[row][ecl];
      float dxa = 0.f, dda = 0.f, ys = 0.f;
#pragma unroll
      for (int g = 0; g < kBwdLanes; ++g) dxa += sm.dxa[g][row][ecl], dda += sm.dda[g][row][ecl], ys += sm.ys[g][row][ecl];
      const float ddelta = Tr::grad_delta(x, dxa, dda);
      if (ok) {
        const size_t off = (static_cast<size_t>(b) * p.seqlen + t) * p.channels + ec;
        static_cast<T*>(p.dx)[off] = from_float<T>(fmaf(delta, dxa, Dc * gy));
        static_cast<T*>(p.ddt)[off] = from_float<T>(ddelta * sm.ddt_scale[row][ecl]);
        if (use_z) static_cast<T*>(p.dz)[off] = from_float<T>(sm.dsilu[row][ecl] * fmaf(Dc, x, ys));
        dD_acc = fmaf(gy, x, dD_acc);
      }
      if (Tr::kUsesKsq) {
        float dk = ok ? -delta * delta * ddelta : 0.f;
#pragma unroll
        for (int m = 16; m >= 1; m >>= 1) dk += __shfl_xor_sync(0xffffffffu, dk, m);
        if (lane == 0 && t < t1) atomicAdd(p.dK + static_cast<size_t>(b) * p.seqlen + t, dk);
      }
    }
    {
      const int row = tid / 8, part = tid % 8, t = ts + row;
      if (t < t1) {
        const float4 v4 = *reinterpret_cast<const float4*>(&sm.red[row][part * 4]);
        float* dst = (part < 4 ? p.dkin : p.dqout) + (static_cast<size_t>(b) * p.seqlen + t) * kN + (part % 4) * 4;
        atomic_add4(dst, v4);
      }
    }
    __syncthreads();
  }
  if (chunk == 0 && c < p.channels) store_vec(p.dh0 + (static_cast<size_t>(b) * p.channels + c) * kN + s0, g);
  if (ec < p.channels) atomicAdd(p.dD + ec, dD_acc);
  if (Tr::kUsesA && c < p.channels) {
#pragma unroll
    for (int j = 0; j < NS; ++j) atomicAdd(p.dA + static_cast<size_t>(c) * kN + s0 + j, dA[j]);
  }
}

// ---------------------------------------------------------------------------------------------
// Host launchers.

template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// Calls f(kXRun) with kXRun a compile-time bool: whether x is read in runs along time.
template <typename F>
cudaError_t dispatch_x_layout(const ScanParams& p, F&& f) {
  if (p.x_time_major) return f(std::true_type{});
  return f(std::false_type{});
}

template <class Tr, int LANES, typename T, bool kXRun>
cudaError_t launch_fwd(const ScanParams& p) {
  using L = Layout<LANES>;
  const dim3 grid((p.channels + L::kCh - 1) / L::kCh, p.nchunks, p.batch);
  if (p.nchunks > 1) {
    summary_kernel<Tr, LANES, T, kXRun, false><<<dim3(grid.x, p.nchunks - 1, p.batch), kThreads, 0, p.stream>>>(p);
    const cudaError_t err = scan_combine(p, true, false);
    if (err != cudaSuccess) return err;
  }
  fwd_kernel<Tr, LANES, T, kXRun><<<grid, kThreads, 0, p.stream>>>(p);
  return cudaGetLastError();
}

template <class Tr>
cudaError_t scan_fwd(const ScanParams& p, int lanes) {
  if (p.chunk_len % kLt != 0 || (lanes != 2 && lanes != 4)) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    return dispatch_x_layout(p, [&](auto run) {
      constexpr bool kXRun = decltype(run)::value;
      return lanes == 2 ? launch_fwd<Tr, 2, T, kXRun>(p) : launch_fwd<Tr, 4, T, kXRun>(p);
    });
  });
}

template <class Tr>
cudaError_t scan_bwd(const ScanParams& p) {
  if (p.chunk_len % kLt != 0 || p.ws_ckpt == nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    return dispatch_x_layout(p, [&](auto run) {
      constexpr bool kXRun = decltype(run)::value;
      const dim3 grid((p.channels + kBwdBlockChannels - 1) / kBwdBlockChannels, p.nchunks, p.batch);
      if (p.nchunks > 1) {
        summary_kernel<Tr, kBwdLanes, T, kXRun, true><<<grid, kThreads, 0, p.stream>>>(p);
        const cudaError_t err = scan_combine(p, true, true);
        if (err != cudaSuccess) return err;
      }
      bwd_kernel<Tr, T, kXRun><<<grid, kThreads, 0, p.stream>>>(p);
      return cudaGetLastError();
    });
  });
}

}  // namespace selective_scan
