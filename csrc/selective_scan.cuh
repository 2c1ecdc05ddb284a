// Chunked selective-scan kernels shared by Longhorn and Mamba-1 (see scan_params.h for the math).
//
// Work split. A block of 128 threads owns kCh channels of one batch row and one time chunk;
// LANES threads share a channel, each holding kNS = 16 / LANES of its states in registers
// (the LANES threads of a channel sit in different warps, so each warp reads one group of k, q
// values per step; the backward's layout is its own, below).
// Time is walked in tiles of kTile steps: the block loads a tile of x, dt, z, dy (through their
// strides, so views need no copy; coalesced when the channels are adjacent; prefetched one tile
// ahead into registers), computes the per-(t, c) scalars once (delta, the gate, ...) into shared
// memory, then every thread runs the recurrence over the tile. In the forward and the summary, an
// x whose steps are adjacent instead (a transposed view) is read in runs along time and transposed
// through shared memory (the kXRun instances); the backward reads such an x element by element.
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
// The forward also writes the state entering each of the backward's chunks (entry_states; its chunks
// are not the forward's). Given those, the backward skips step 1: its first sweep, which runs each
// chunk forward from H_j anyway, sums P and Sb as it goes (kSweepFirst), the combine makes R_j, and a
// second launch runs the reverse sweep (kSweepSecond).
//
// Backward. g_t = dL/dh_t obeys g_t = a_{t+1} g_{t+1} + gy_t * qout_t, gy = dy * SiLU(z). The
// backward kernel (its own layout: 2 channels x 4 states a thread, 64 channels a block) sweeps its
// chunk forward once to checkpoint h every kBwdCheckpointSteps steps (a global workspace, 16 bytes
// per (b, t, channel), so a chunk may be as long as T and the summary pass is needed only when
// B * C alone cannot fill the GPU), then walks tiles in reverse and each tile's parts in reverse:
// it reruns the part's steps from its checkpoint into registers and runs g backwards through them.
// Sums over the states (dx, d delta) go through shuffles and shared memory; sums over channels
// (dkin, dqout) first over a thread's two channels, then a transposing shuffle reduction within the
// half-warp and one float4 global atomic per block and step.
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
// 1 / x for x >= 1 (and +inf): one MUFU.RCP. __fdividef(1, x) adds a rescaling for huge and tiny x
// (four more instructions) that these denominators never need.
__device__ __forceinline__ float rcp_approx(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
// log2(x): one MUFU.LG2.
__device__ __forceinline__ float lg2_approx(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float exp_fast(float x) { return exp2_approx(x * kLog2e); }
__device__ __forceinline__ float sigmoid_fast(float x) { return rcp_approx(1.f + exp_fast(-x)); }

__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

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
// state. grad_state: one (channel, state)'s share of d delta (dda), of dA and of dkin (added to dk,
// dkb), given g = dL/dh_t, hp = h_{t-1} (0 after a reset) and a (0 after a reset). dkin: a
// state's dkin from its dk, dkb summed over channels. grad_delta: d delta from x, sum_n g kin_n
// (dxa) and the summed dda.

struct Longhorn {
  static constexpr bool kUsesKsq = true;
  static constexpr bool kUsesA = false;
  __device__ static void step_size(float dt, float ksq, float& delta, float& ddt_scale) {
    const float e = exp_fast(fminf(-dt, 80.f));  // delta = sigmoid(dt) / (1 + sigmoid(dt) |k|^2)
    delta = rcp_approx(1.f + e + ksq);
    ddt_scale = e * delta * delta;
  }
  __device__ static float decay(float delta, float kk, float) { return fmaf(-delta, kk, 1.f); }
  // a = 1 - delta k^2, u = delta x k: dkin_n = sum_c g dxv - 2 k_n sum_c delta g hp, so the thread
  // sums dk = g dxv and dkb = delta g hp over its channels and dkin applies the -2 k_n once.
  __device__ static void grad_state(float g, float hp, float, float kk, float delta, float dxv, float,
                                    float& dda, float&, float& dk, float& dkb) {
    const float gh = g * hp;
    dda = fmaf(gh, kk, dda);
    dk = fmaf(g, dxv, dk);
    dkb = fmaf(delta, gh, dkb);
  }
  __device__ static float dkin(float k, float dk, float dkb) { return fmaf(-2.f * k, dkb, dk); }
  __device__ static float grad_delta(float x, float dxa, float dda) { return fmaf(x, dxa, -dda); }
};

struct Mamba {
  static constexpr bool kUsesKsq = false;
  static constexpr bool kUsesA = true;
  // delta = softplus(dt) = max(dt, 0) + log1p(e), ddt_scale = sigmoid(dt), both from e = exp(-|dt|)
  // (log1pf and a second exp took about 40 instructions): log1p(e) is its series to e^5 where
  // e < 1/16 (relative error below e^5 / 6), else ln 2 * lg2(1 + e) (lg2.approx: absolute error
  // about 2^-22 on [1, 2], relative below 3e-6 there).
  __device__ static void step_size(float dt, float, float& delta, float& ddt_scale) {
    const float e = exp2_approx(-fabsf(dt) * kLog2e), u = 1.f + e, r = rcp_approx(u);
    const float series = e * fmaf(e, fmaf(e, fmaf(e, fmaf(e, 0.2f, -0.25f), 1.f / 3.f), -0.5f), 1.f);
    delta = fmaxf(dt, 0.f) + (e < 0.0625f ? series : kLn2 * lg2_approx(u));
    ddt_scale = dt >= 0.f ? r : e * r;
  }
  // a2 = A * log2(e), so a = exp(delta * A) = 2^(delta * a2)
  __device__ static float decay(float delta, float, float a2) { return exp2_approx(delta * a2); }
  __device__ static void grad_state(float g, float hp, float a, float, float delta, float dxv, float a2,
                                    float& dda, float& dA, float& dk, float&) {
    const float ga = g * hp * a;  // a = exp(delta A), u = delta x B
    dda = fmaf(ga, a2, dda);
    dA = fmaf(ga, delta, dA);
    dk = fmaf(g, dxv, dk);
  }
  __device__ static float dkin(float, float dk, float) { return dk; }
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

// One thread's column (b, ., c) of a (B, T, C) input (base null where the input is absent), built
// once per kernel. A tile's loads start at at(t) and move `rows` steps at a time by adding `step`:
// a 64-bit add per element, where indexing each element would multiply.
template <typename T>
struct Column {
  const T* base;  // element (b, 0, c)
  int64_t tstride, step;
  __device__ Column(const void* src, const int64_t (&stride)[3], int b, int c, int rows)
      : base(src == nullptr ? nullptr : column<T>(src, stride, b, 0, c)), tstride(stride[1]), step(rows * stride[1]) {}
  __device__ const T* at(int t) const { return base + t * tstride; }
};

// The columns of the per-(t, c) inputs at the thread's elementwise channel c (dy only if kDy).
template <typename T, bool kDy>
struct InputColumns {
  Column<T> x, dt, z, dy;
  __device__ InputColumns(const ScanParams& p, int b, int c, int rows)
      : x(p.x, p.x_stride, b, c, rows), dt(p.dt, p.dt_stride, b, c, rows), z(p.z, p.z_stride, b, c, rows),
        dy(kDy ? p.dy : nullptr, p.dy_stride, b, c, rows) {}
};

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

// 2 of the k (and, kQ, q) values of the tile starting at ts, and its reset flags (8 threads per step).
template <bool kQ, typename R>
__device__ __forceinline__ void load_kq(const ScanParams& p, int b, int ts, int t1, R& r) {
  const int tid = threadIdx.x, kt = ts + tid / 8;
  const bool kok = kt < t1;
  const size_t koff = (static_cast<size_t>(b) * p.seqlen + kt) * kN + (tid % 8) * 2;
  r.k = kok ? *reinterpret_cast<const float2*>(p.kin + koff) : make_float2(0.f, 0.f);
  if (kQ) r.q = kok ? *reinterpret_cast<const float2*>(p.qout + koff) : make_float2(0.f, 0.f);
  const bool reads_reset = p.reset != nullptr && kok && (tid % 8) == 0;
  r.rst = reads_reset ? static_cast<int>(p.reset[static_cast<size_t>(b) * p.seqlen + kt]) : 0;
}

// Loads the tile starting at ts: (t, c) elements for this thread, 2 of the tile's k and q values.
// col: the thread's columns (at channel cbase + tid % kCh).
template <int LANES, bool kXRun, bool kQ, bool kZ, bool kDy, typename T>
__device__ __forceinline__ void load_tile(const ScanParams& p, const InputColumns<T, kDy>& col, int b, int ts,
                                          int t1, int cbase, RawTile<T, Layout<LANES>::kElems>& r) {
  using L = Layout<LANES>;
  const int tid = threadIdx.x;
  const bool okc = cbase + tid % L::kCh < p.channels, use_z = kZ && col.z.base != nullptr;
  // Each tensor: the thread's first element, then a fixed step between its elements.
  const int t_first = ts + tid / L::kCh;
  const T* xp = col.x.at(t_first);  // x: unless time-major
  const T* dp = col.dt.at(t_first);
  const T* zp = col.z.at(t_first);
  const T* gp = col.dy.at(t_first);
  if constexpr (kXRun) load_x_run<LANES>(p, b, ts, t1, cbase, r.x);
  const T zero = from_float<T>(0.f);
#pragma unroll
  for (int i = 0; i < L::kElems; ++i) {
    const bool ok = okc && t_first + i * L::kRowStride < t1;
    if constexpr (!kXRun) r.x[i] = ok ? *xp : zero;
    r.dt[i] = ok ? *dp : zero;
    if (kZ) r.z[i] = ok && use_z ? *zp : zero;  // a predicated load, no branch
    if (kDy) r.dy[i] = ok ? *gp : zero;
    xp += col.x.step, dp += col.dt.step, zp += col.z.step, gp += col.dy.step;
  }
  load_kq<kQ>(p, b, ts, t1, r);
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

  const InputColumns<T, kAdj> col(p, b, cbase + ecl, L::kRowStride);
  RawTile<T, L::kElems> raw;
  load_tile<LANES, kXRun, kAdj, kAdj, kAdj>(p, col, b, t0, t1, cbase, raw);
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
    if (ts + kLt < t1) load_tile<LANES, kXRun, kAdj, kAdj, kAdj>(p, col, b, ts + kLt, t1, cbase, raw);
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
  float delta[kLt][CH], dxv[kLt][CH], x[kLt][CH];
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

  const InputColumns<T, false> col(p, b, ec, L::kRowStride);
  T* const y_out = static_cast<T*>(p.y) + static_cast<size_t>(b) * p.seqlen * p.channels + ec;
  RawTile<T, L::kElems> raw;
  load_tile<LANES, kXRun, true, true, false>(p, col, b, t0, t1, cbase, raw);
  // The next backward chunk start at or after t0 (entry_states; none before t1 without them).
  int entry = p.entry_states != nullptr ? (t0 + p.entry_len - 1) / p.entry_len : 0;
  int entry_t = p.entry_states != nullptr ? entry * p.entry_len : t1;
  for (int ts = t0; ts < t1; ts += kLt) {
    if (ts == entry_t) {  // h enters a backward chunk here
      if (c < p.channels) {
        store_vec(p.entry_states + ((static_cast<size_t>(b) * p.n_entry + entry) * p.channels + c) * kN + s0, h);
      }
      ++entry, entry_t += p.entry_len;
    }
    stage_kq<true>(sm.kq, raw);
    stage_x<LANES, kXRun>(sm.xs, raw.x);
    const bool tile_rst = __syncthreads_or(raw.rst != 0);  // any reset in this tile
    float skip[L::kElems], gates[L::kElems];  // D x and SiLU(z) of the thread's elements, for its y
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
      skip[i] = Dc * x;
      gates[i] = gate;
    }
    __syncthreads();
    if (ts + kLt < t1) load_tile<LANES, kXRun, true, true, false>(p, col, b, ts + kLt, t1, cbase, raw);
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
    T* const y_row = y_out + static_cast<int64_t>(ts + erow) * p.channels;
#pragma unroll
    for (int i = 0; i < L::kElems; ++i) {
      const int row = erow + i * L::kRowStride;
      if (ec < p.channels && ts + row < t1) {
        float y = skip[i];
#pragma unroll
        for (int g = 0; g < LANES; ++g) y += sm.y[g][row][ecl];
        y_row[static_cast<int64_t>(i * L::kRowStride) * p.channels] = from_float<T>(y * gates[i]);
      }
    }
  }
  if (chunk == p.nchunks - 1 && c < p.channels) store_vec(p.hT + (static_cast<size_t>(b) * p.channels + c) * kN + s0, h);
}

// ---------------------------------------------------------------------------------------------
// 3b. Backward for one chunk.
//
// Scan role: a thread holds 2 adjacent channels and one group of 4 states. The two half-warps of a
// warp hold two state groups of the same 16 channel pairs, warps w and w ^ 1 the four groups, and
// warps 0-1 / 2-3 the block's channels 0-31 / 32-63. A thread's two channels share its loads of each
// step's k and q, and their dkin, dqout terms are added in registers before the sums over channels.
// Elementwise role: a thread holds one channel pair (tid % 32) at the rows tid / 32 + 4 i of a tile,
// read and written two channels at a time.

constexpr int kBwdLanes = 4;                               // state groups
constexpr int kBwdPairs = kBwdBlockChannels / 2;           // channel pairs per block
constexpr int kBwdPart = kBwdCheckpointSteps;              // steps between sweep 1's checkpoints
constexpr int kBwdPartsPerTile = kLt / kBwdPart;
constexpr int kBwdRows = kLt * kBwdPairs / kThreads;       // rows of a tile per thread, elementwise role
constexpr int kBwdBlocksPerSm = 4;  // launch bounds: at most 65536 / (4 * 128) = 128 registers
static_assert(kBwdPairs == 32 && kBwdRows == 4, "backward layout: 64 channels, 4 warps of 2 state groups");

// Where thread tid keeps its two channels' states at the start of part `part` of tile `tile` (of all T).
__device__ __forceinline__ float4* bwd_ckpt(const ScanParams& p, int b, int tile, int part, int tid) {
  const size_t tiles = (p.seqlen + kLt - 1) / kLt;
  const size_t slot = ((b * tiles + tile) * kBwdPartsPerTile + part) * gridDim.x + blockIdx.x;
  return reinterpret_cast<float4*>(p.ws_ckpt) + (slot * kThreads + tid) * 2;
}

// The raw inputs of one tile for the elementwise role: two channels per row.
template <typename T>
struct PairTile {
  T x[kBwdRows][2], dt[kBwdRows][2], z[kBwdRows][2], dy[kBwdRows][2];
  float2 k, q;
  int rst;
};

// Two adjacent elements as one word.
template <typename T>
using PairWord = std::conditional_t<sizeof(T) == 4, uint2, uint32_t>;

// Elements c and c + 1 of a row. kVec: one load (both valid or both not, adjacent, aligned).
template <bool kVec, typename T>
__device__ __forceinline__ void load_pair(const T* src, int64_t cstride, bool ok0, bool ok1, T (&v)[2]) {
  if constexpr (kVec) {
    using V = PairWord<T>;
    const V w = ok0 ? *reinterpret_cast<const V*>(src) : V{};
    memcpy(v, &w, sizeof(V));
  } else {
    v[0] = ok0 ? src[0] : from_float<T>(0.f);
    v[1] = ok1 ? src[cstride] : from_float<T>(0.f);
  }
}

template <bool kVec, typename T>
__device__ __forceinline__ void store_pair(T* dst, bool ok0, bool ok1, float v0, float v1) {
  if constexpr (kVec) {
    if (ok0) {
      const T v[2] = {from_float<T>(v0), from_float<T>(v1)};
      PairWord<T> w;
      memcpy(&w, v, sizeof(w));
      *reinterpret_cast<PairWord<T>*>(dst) = w;
    }
  } else {
    if (ok0) dst[0] = from_float<T>(v0);
    if (ok1) dst[1] = from_float<T>(v1);
  }
}

// Loads the tile starting at ts: the elementwise role's (row, channel pair) elements and 2 of the
// tile's k and q values (kAll: also z, dy and q, which sweep 1 does not need).
template <bool kVec, bool kAll, typename T>
__device__ __forceinline__ void load_pair_tile(const ScanParams& p, const InputColumns<T, true>& col, int b, int ts,
                                               int t1, int cbase, PairTile<T>& r) {
  const int tid = threadIdx.x;
  const int c = cbase + 2 * (tid % kBwdPairs), t_first = ts + tid / kBwdPairs;
  const bool c0 = c < p.channels, c1 = c + 1 < p.channels, use_z = kAll && col.z.base != nullptr;
  const T *xp = col.x.at(t_first), *dp = col.dt.at(t_first), *zp = col.z.at(t_first), *gp = col.dy.at(t_first);
#pragma unroll
  for (int i = 0; i < kBwdRows; ++i) {
    const int t = t_first + i * (kThreads / kBwdPairs);
    const bool ok0 = c0 && t < t1, ok1 = c1 && t < t1;
    load_pair<kVec>(xp, p.x_stride[2], ok0, ok1, r.x[i]);
    load_pair<kVec>(dp, p.dt_stride[2], ok0, ok1, r.dt[i]);
    if (kAll) load_pair<kVec>(zp, p.z_stride[2], ok0 && use_z, ok1 && use_z, r.z[i]);
    if (kAll) load_pair<kVec>(gp, p.dy_stride[2], ok0, ok1, r.dy[i]);
    xp += col.x.step, dp += col.dt.step, zp += col.z.step, gp += col.dy.step;
  }
  load_kq<kAll>(p, b, ts, t1, r);
}

struct BwdSmem {
  KqSmem kq;
  // Per (step, channel): written by the elementwise role, read by the scan role as float2 pairs.
  alignas(16) float x[kLt][kBwdBlockChannels], delta[kLt][kBwdBlockChannels], dxv[kLt][kBwdBlockChannels];
  alignas(16) float gy[kLt][kBwdBlockChannels], ddt_scale[kLt][kBwdBlockChannels], dsilu[kLt][kBwdBlockChannels];
  // Sums over the states of warps 2w' and 2w' + 1 (index w & 1): sum_n g kin_n, the d delta terms, sum_n qout_n h_n.
  alignas(16) float dxa[2][kLt][kBwdBlockChannels], dda[2][kLt][kBwdBlockChannels], ys[2][kLt][kBwdBlockChannels];
  // Per step and channel half (w >> 1): dkin (16), dqout (16), summed over the half's 32 channels.
  alignas(16) float red[kLt][2][2 * kN];
};

// Sums V values over the lanes that differ in the bits M, M / 2, ..., 1 of the lane index, for
// V <= 2M: each halving step sends half the values across one bit (V - 1 shuffles in all, where a
// butterfly per value would take V log2(2M)). The lane gets the sum of value transpose_index(lane).
template <int V, int M>
__device__ __forceinline__ float transpose_sum(const float (&v)[V], int lane) {
  if constexpr (V == 1) {
    float s = v[0];
#pragma unroll
    for (int m = M; m >= 1; m >>= 1) s += __shfl_xor_sync(0xffffffffu, s, m);
    return s;
  } else {
    static_assert(M >= 1 && V % 2 == 0, "V must be a power of two no larger than 2M");
    const bool up = lane & M;
    float r[V / 2];
#pragma unroll
    for (int i = 0; i < V / 2; ++i) {
      const float send = up ? v[i] : v[i + V / 2];
      r[i] = (up ? v[i + V / 2] : v[i]) + __shfl_xor_sync(0xffffffffu, send, M);
    }
    if constexpr (M == 1) return r[0];
    else return transpose_sum<V / 2, M / 2>(r, lane);
  }
}
template <int V, int M>
__device__ __forceinline__ int transpose_index(int lane) {
  if constexpr (V == 1) return 0;
  else return ((lane & M) ? V / 2 : 0) + transpose_index<V / 2, M / 2>(lane);
}

// What one backward launch runs. kSweepBoth: both sweeps, from entry states that are h0 (one chunk) or
// the summary pass's. With the forward's entry states, two launches around the combine: kSweepFirst,
// whose sweep also sums each chunk's decay product P and adjoint summary Sb (the summary pass's
// third output, without its rerun of the chunk), then kSweepSecond.
constexpr int kSweepFirst = 1, kSweepSecond = 2, kSweepBoth = 3;

// 4 blocks per SM (at most 128 registers, 55 KiB of shared memory each).
template <class Tr, typename T, bool kVec, int kSweeps>
__global__ void __launch_bounds__(kThreads, kBwdBlocksPerSm) bwd_kernel(const ScanParams p) {
  constexpr bool kCarry = kSweeps == kSweepFirst;  // sweep 1 sums P and Sb
  constexpr int NS = kN / kBwdLanes;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  BwdSmem& sm = *reinterpret_cast<BwdSmem*>(smem_raw);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, b = blockIdx.z, chunk = blockIdx.y;
  const int cbase = blockIdx.x * kBwdBlockChannels;
  // Scan role: channels cl, cl + 1 (of the block), states s0 .. s0 + 3.
  const int half = lane / 16, s0 = (2 * (warp & 1) + half) * NS;
  const int cl = 2 * ((warp >> 1) * 16 + lane % 16), c = cbase + cl;
  // Elementwise role: channels el, el + 1 at rows erow + 4 i.
  const int el = 2 * (tid % kBwdPairs), erow = tid / kBwdPairs, ec = cbase + el;
  const bool e0 = ec < p.channels, e1 = ec + 1 < p.channels;
  const int t0 = chunk * p.chunk_len, t1 = min(t0 + p.chunk_len, p.seqlen);
  const int ntiles = (t1 - t0 + kLt - 1) / kLt, tile0 = t0 / kLt;
  const bool use_z = p.z != nullptr;

  const InputColumns<T, true> col(p, b, ec, kThreads / kBwdPairs);
  float h[2][NS], a2[2][NS];
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    if (kSweeps & kSweepFirst) load_entry_state(p, b, chunk, c + m, s0, h[m]);
    load_a2<Tr>(p, c + m, s0, a2[m]);
  }

  // The per-(t, c) scalars of a tile, from the raw inputs, to shared memory (elementwise role): delta
  // and delta x; what_c 1: also gy (sweep 1 with kCarry); 2: also what sweep 2 needs (x, gy, the d dt
  // and SiLU' factors).
  auto stage_elements = [&](const PairTile<T>& raw, int ts, auto what_c) {
    constexpr bool kGy = decltype(what_c)::value >= 1, kAll = decltype(what_c)::value == 2;
#pragma unroll
    for (int i = 0; i < kBwdRows; ++i) {
      const int row = erow + i * (kThreads / kBwdPairs);
      const bool okt = ts + row < t1;
      float v[6][2];  // x, delta, delta x, gy, d delta / d dt, SiLU' * dy
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        const bool ok = okt && (m == 0 ? e0 : e1);
        const float x = to_float(raw.x[i][m]);
        float delta, ddt_scale;
        Tr::step_size(to_float(raw.dt[i][m]), sm.kq.ksq[row], delta, ddt_scale);
        delta = ok ? delta : 0.f;
        v[0][m] = x, v[1][m] = delta, v[2][m] = delta * x, v[4][m] = ddt_scale;
        if (kGy) {
          const float dy = to_float(raw.dy[i][m]);
          float gate = 1.f, dsilu = 0.f;
          if (use_z) {
            const float zf = to_float(raw.z[i][m]), sz = sigmoid_fast(zf);
            gate = zf * sz;
            dsilu = dy * sz * fmaf(zf, 1.f - sz, 1.f);
          }
          v[3][m] = ok ? dy * gate : 0.f;
          v[5][m] = dsilu;
        }
      }
      *reinterpret_cast<float2*>(&sm.delta[row][el]) = make_float2(v[1][0], v[1][1]);
      *reinterpret_cast<float2*>(&sm.dxv[row][el]) = make_float2(v[2][0], v[2][1]);
      if (kGy) *reinterpret_cast<float2*>(&sm.gy[row][el]) = make_float2(v[3][0], v[3][1]);
      if (kAll) {
        *reinterpret_cast<float2*>(&sm.x[row][el]) = make_float2(v[0][0], v[0][1]);
        *reinterpret_cast<float2*>(&sm.ddt_scale[row][el]) = make_float2(v[4][0], v[4][1]);
        *reinterpret_cast<float2*>(&sm.dsilu[row][el]) = make_float2(v[5][0], v[5][1]);
      }
    }
  };

  // Step s of the tile from the stage: delta, delta x (and, kQ, gy) of channels cl, cl + 1, whether
  // it resets (kRst), and the thread's states' k, k^2 (and qout).
  struct Step {
    float2 delta, dxv, gy;
    bool rs;
    float k[NS], kk[NS], q[NS];
  };
  auto load_step = [&](int s, auto rst_c, auto q_c) {
    constexpr bool kRst = decltype(rst_c)::value, kQ = decltype(q_c)::value;
    Step st;
    st.delta = *reinterpret_cast<const float2*>(&sm.delta[s][cl]);
    st.dxv = *reinterpret_cast<const float2*>(&sm.dxv[s][cl]);
    st.rs = kRst && sm.kq.rst[s] != 0;
    load_vec(st.k, &sm.kq.k[s][s0]);
    load_vec(st.kk, &sm.kq.kk[s][s0]);
    if constexpr (kQ) {
      st.gy = *reinterpret_cast<const float2*>(&sm.gy[s][cl]);
      load_vec(st.q, &sm.kq.q[s][s0]);
    }
    return st;
  };

  // h after step s of the tile, from hp (h before it), for both channels.
  auto advance = [&](int s, auto rst_c, const float (&hp)[2][NS], float (&hn)[2][NS]) {
    constexpr bool kRst = decltype(rst_c)::value;
    const Step st = load_step(s, rst_c, std::false_type{});
#pragma unroll
    for (int j = 0; j < NS; ++j) {
      hn[0][j] = fmaf(step_decay<Tr, kRst>(st.delta.x, st.kk[j], a2[0][j], st.rs), hp[0][j], st.dxv.x * st.k[j]);
      hn[1][j] = fmaf(step_decay<Tr, kRst>(st.delta.y, st.kk[j], a2[1][j], st.rs), hp[1][j], st.dxv.y * st.k[j]);
    }
  };
  auto store_ckpt = [&](float4* dst, const float (&v)[2][NS]) {
    dst[0] = make_float4(v[0][0], v[0][1], v[0][2], v[0][3]);
    dst[1] = make_float4(v[1][0], v[1][1], v[1][2], v[1][3]);
  };

  // h, P and Sb after step s of the tile (kCarry): P *= a, Sb += P gy qout, as the summary pass sums them.
  auto advance_carry = [&](int s, auto rst_c, float (&hc)[2][NS], float (&P)[2][NS], float (&Sb)[2][NS]) {
    constexpr bool kRst = decltype(rst_c)::value;
    const Step st = load_step(s, rst_c, std::true_type{});
#pragma unroll
    for (int j = 0; j < NS; ++j) {
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        const float a = step_decay<Tr, kRst>(m ? st.delta.y : st.delta.x, st.kk[j], a2[m][j], st.rs);
        hc[m][j] = fmaf(a, hc[m][j], (m ? st.dxv.y : st.dxv.x) * st.k[j]);
        P[m][j] *= a;
        Sb[m][j] = fmaf(P[m][j], (m ? st.gy.y : st.gy.x) * st.q[j], Sb[m][j]);
      }
    }
  };

  PairTile<T> raw;
  // Sweep 1: forward through the chunk, checkpointing h every kBwdPart steps.
  if constexpr ((kSweeps & kSweepFirst) != 0) {
    float P[2][NS], Sb[2][NS];
#pragma unroll
    for (int m = 0; m < 2; ++m) {
#pragma unroll
      for (int j = 0; j < NS; ++j) P[m][j] = 1.f, Sb[m][j] = 0.f;
    }
    load_pair_tile<kVec, kCarry>(p, col, b, t0, t1, cbase, raw);
    for (int it = 0; it < ntiles; ++it) {
      const int ts = t0 + it * kLt;
      stage_kq<kCarry>(sm.kq, raw);
      const bool tile_rst = __syncthreads_or(raw.rst != 0);  // any reset in this tile
      stage_elements(raw, ts, std::integral_constant<int, kCarry ? 1 : 0>{});
      __syncthreads();
      if (it + 1 < ntiles) load_pair_tile<kVec, kCarry>(p, col, b, ts + kLt, t1, cbase, raw);
      with_resets(tile_rst, [&](auto rst_c) {
#pragma unroll 1
        for (int part = 0; part < kBwdPartsPerTile; ++part) {
          store_ckpt(bwd_ckpt(p, b, tile0 + it, part, tid), h);
#pragma unroll
          for (int s = 0; s < kBwdPart; ++s) {
            if constexpr (kCarry) advance_carry(part * kBwdPart + s, rst_c, h, P, Sb);
            else advance(part * kBwdPart + s, rst_c, h, h);
          }
        }
      });
      __syncthreads();
    }
    if constexpr (kCarry) {
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        if (c + m >= p.channels) continue;
        const size_t w = ws_index(p, b, chunk, c + m) + s0;
        store_vec(p.ws_P + w, P[m]);
        store_vec(p.ws_Sb + w, Sb[m]);
      }
    }
  }

  if constexpr ((kSweeps & kSweepSecond) != 0) {
    // Sweep 2: tiles in reverse. g holds a_{t+1} * g_{t+1}, starting from the adjoint entering
    // from the next chunk (or dhT).
    float g[2][NS], dA[2][NS];
#pragma unroll
    for (int m = 0; m < 2; ++m) {
#pragma unroll
      for (int j = 0; j < NS; ++j) g[m][j] = 0.f, dA[m][j] = 0.f;
      if (c + m < p.channels) {
        if (p.nchunks > 1) load_vec(g[m], p.ws_R + ws_index(p, b, chunk, c + m) + s0);
        else load_vec(g[m], p.dhT + (static_cast<size_t>(b) * p.channels + c + m) * kN + s0);
      }
    }
    const float D0 = e0 ? p.D[ec] : 0.f, D1 = e1 ? p.D[ec + 1] : 0.f;
    float dD0 = 0.f, dD1 = 0.f;
    load_pair_tile<kVec, true>(p, col, b, t0 + (ntiles - 1) * kLt, t1, cbase, raw);
    // The checkpoint of the next part to run (they run from the last), loaded one part ahead.
    const float4* ck_src = bwd_ckpt(p, b, tile0 + ntiles - 1, kBwdPartsPerTile - 1, tid);
    float4 ck[2] = {ck_src[0], ck_src[1]};
    for (int it = ntiles - 1; it >= 0; --it) {
      const int ts = t0 + it * kLt;
      stage_kq<true>(sm.kq, raw);
      const bool tile_rst = __syncthreads_or(raw.rst != 0);
      stage_elements(raw, ts, std::integral_constant<int, 2>{});
      __syncthreads();
      if (it > 0) {
        load_pair_tile<kVec, true>(p, col, b, ts - kLt, t1, cbase, raw);
        // The previous tile's checkpoints into L2: the loads of ck below then wait on L2, not DRAM,
        // and hold no registers early (at 128 registers the compiler moves them next to their use).
#pragma unroll
        for (int part = 0; part < kBwdPartsPerTile; ++part) prefetch_l2(bwd_ckpt(p, b, tile0 + it - 1, part, tid));
      }

      // Each part of the tile, from the last: rerun its steps from its checkpoint, keeping the states
      // (hist[s] = h before step base + s), then run g backwards through them. The parts loop is
      // not unrolled: unrolled, the kernel was 3x larger, spilled and stalled on instruction fetch.
      with_resets(tile_rst, [&](auto rst_c) {
        constexpr bool kRst = decltype(rst_c)::value;
#pragma unroll 1
        for (int part = kBwdPartsPerTile - 1; part >= 0; --part) {
          const int base = part * kBwdPart;
          float hist[kBwdPart + 1][2][NS];
#pragma unroll
          for (int m = 0; m < 2; ++m) {
            hist[0][m][0] = ck[m].x, hist[0][m][1] = ck[m].y, hist[0][m][2] = ck[m].z, hist[0][m][3] = ck[m].w;
          }
          if (part > 0 || it > 0) {
            const float4* src = part > 0 ? bwd_ckpt(p, b, tile0 + it, part - 1, tid)
                                         : bwd_ckpt(p, b, tile0 + it - 1, kBwdPartsPerTile - 1, tid);
            ck[0] = src[0], ck[1] = src[1];
          }
#pragma unroll
          for (int s = 0; s < kBwdPart; ++s) advance(base + s, rst_c, hist[s], hist[s + 1]);
#pragma unroll
          for (int i = kBwdPart - 1; i >= 0; --i) {
            const int s = base + i;
            // load_step's loads, written out: through its Step struct nvcc 13.0 schedules this loop
            // differently (Mamba's bf16 instance: 80 more instructions).
            const float2 delta = *reinterpret_cast<const float2*>(&sm.delta[s][cl]);
            const float2 dxv = *reinterpret_cast<const float2*>(&sm.dxv[s][cl]);
            const float2 gy = *reinterpret_cast<const float2*>(&sm.gy[s][cl]);
            const bool rs = kRst && sm.kq.rst[s] != 0;
            float k[NS], kk[NS], q[NS];
            load_vec(k, &sm.kq.k[s][s0]);
            load_vec(kk, &sm.kq.kk[s][s0]);
            load_vec(q, &sm.kq.q[s][s0]);
            float dxa[2] = {0.f, 0.f}, dda[2] = {0.f, 0.f}, ys[2] = {0.f, 0.f};
            float v[2 * NS];  // dkin (NS), dqout (NS), summed over the two channels
#pragma unroll
            for (int j = 0; j < NS; ++j) {
              float dk = 0.f, dkb = 0.f, dq = 0.f;
#pragma unroll
              for (int m = 0; m < 2; ++m) {
                const float dl = m ? delta.y : delta.x, xv = m ? dxv.y : dxv.x, gm = m ? gy.y : gy.x;
                const float a = step_decay<Tr, kRst>(dl, kk[j], a2[m][j], rs);
                const float hp = kRst && rs ? 0.f : hist[i][m][j], hn = hist[i + 1][m][j];
                const float gj = fmaf(gm, q[j], g[m][j]);
                dxa[m] = fmaf(gj, k[j], dxa[m]);
                ys[m] = fmaf(q[j], hn, ys[m]);
                dq = fmaf(gm, hn, dq);
                Tr::grad_state(gj, hp, a, kk[j], dl, xv, a2[m][j], dda[m], dA[m][j], dk, dkb);
                g[m][j] = a * gj;
              }
              v[j] = Tr::dkin(k[j], dk, dkb);
              v[NS + j] = dq;
            }
            // dkin, dqout over the half-warp's 16 channel pairs, then the block's sum in finalize.
            const float r = transpose_sum<2 * NS, 8>(v, lane);
            const int idx = transpose_index<2 * NS, 8>(lane);
            if ((lane & 1) == 0) sm.red[s][warp >> 1][(idx < NS ? 0 : kN - NS) + s0 + idx] = r;
            // The per-channel sums over the warp's two state groups: lane half 0 keeps channel cl, 1 keeps cl + 1.
            const float sx = half ? dxa[0] : dxa[1], sd = half ? dda[0] : dda[1], sy = half ? ys[0] : ys[1];
            const float rx = (half ? dxa[1] : dxa[0]) + __shfl_xor_sync(0xffffffffu, sx, 16);
            const float rd = (half ? dda[1] : dda[0]) + __shfl_xor_sync(0xffffffffu, sd, 16);
            const float ry = (half ? ys[1] : ys[0]) + __shfl_xor_sync(0xffffffffu, sy, 16);
            sm.dxa[warp & 1][s][cl + half] = rx;
            sm.dda[warp & 1][s][cl + half] = rd;
            sm.ys[warp & 1][s][cl + half] = ry;
          }
        }
      });
      __syncthreads();

      // Per-(t, c) gradients (elementwise role); the |k|^2 term of Longhorn is summed over the block's channels.
      float dkr[kBwdRows];
      const size_t off0 = (static_cast<size_t>(b) * p.seqlen + ts + erow) * p.channels + ec;  // dx, ddt, dz: contiguous
#pragma unroll
      for (int i = 0; i < kBwdRows; ++i) {
        const int row = erow + i * (kThreads / kBwdPairs), t = ts + row;
        const bool okt = t < t1;
        auto pair = [&](const float (&a)[kLt][kBwdBlockChannels]) {
          return *reinterpret_cast<const float2*>(&a[row][el]);
        };
        const float2 x = pair(sm.x), delta = pair(sm.delta), gy = pair(sm.gy);
        const float2 sc = pair(sm.ddt_scale), ds = pair(sm.dsilu);
        const float2 xa0 = pair(sm.dxa[0]), xa1 = pair(sm.dxa[1]), da0 = pair(sm.dda[0]), da1 = pair(sm.dda[1]);
        const float2 ys0 = pair(sm.ys[0]), ys1 = pair(sm.ys[1]);
        const float dxa[2] = {xa0.x + xa1.x, xa0.y + xa1.y}, dda[2] = {da0.x + da1.x, da0.y + da1.y};
        const float ys[2] = {ys0.x + ys1.x, ys0.y + ys1.y}, xs[2] = {x.x, x.y}, dl[2] = {delta.x, delta.y};
        const float gs[2] = {gy.x, gy.y}, Ds[2] = {D0, D1};
        float dx[2], ddt[2], dz[2], dk = 0.f;
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          const float ddelta = Tr::grad_delta(xs[m], dxa[m], dda[m]);
          dx[m] = fmaf(dl[m], dxa[m], Ds[m] * gs[m]);
          ddt[m] = ddelta * (m ? sc.y : sc.x);
          dz[m] = (m ? ds.y : ds.x) * fmaf(Ds[m], xs[m], ys[m]);
          dk = fmaf(-dl[m] * dl[m], ddelta, dk);  // delta is 0 outside the sequence and the channels
        }
        dD0 = fmaf(gs[0], xs[0], dD0), dD1 = fmaf(gs[1], xs[1], dD1);  // gy is 0 outside too
        dkr[i] = dk;
        const size_t off = off0 + static_cast<size_t>(i * (kThreads / kBwdPairs)) * p.channels;
        store_pair<kVec>(static_cast<T*>(p.dx) + off, okt && e0, okt && e1, dx[0], dx[1]);
        store_pair<kVec>(static_cast<T*>(p.ddt) + off, okt && e0, okt && e1, ddt[0], ddt[1]);
        if (use_z) store_pair<kVec>(static_cast<T*>(p.dz) + off, okt && e0, okt && e1, dz[0], dz[1]);
      }
      if (Tr::kUsesKsq) {
        const float r = transpose_sum<kBwdRows, 16>(dkr, lane);
        const int t = ts + erow + transpose_index<kBwdRows, 16>(lane) * (kThreads / kBwdPairs);
        if ((lane & 7) == 0 && t < t1) atomicAdd(p.dK + static_cast<size_t>(b) * p.seqlen + t, r);
      }
      {
        const int row = tid / 8, part = tid % 8, t = ts + row;
        if (t < t1) {
          const float4 u = *reinterpret_cast<const float4*>(&sm.red[row][0][part * 4]);
          const float4 w = *reinterpret_cast<const float4*>(&sm.red[row][1][part * 4]);
          float* dst = (part < 4 ? p.dkin : p.dqout) + (static_cast<size_t>(b) * p.seqlen + t) * kN + (part % 4) * 4;
          atomic_add4(dst, make_float4(u.x + w.x, u.y + w.y, u.z + w.z, u.w + w.w));
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int m = 0; m < 2; ++m) {
      if (c + m >= p.channels) continue;
      if (chunk == 0) store_vec(p.dh0 + (static_cast<size_t>(b) * p.channels + c + m) * kN + s0, g[m]);
      if (Tr::kUsesA) {
#pragma unroll
        for (int j = 0; j < NS; ++j) atomicAdd(p.dA + static_cast<size_t>(c + m) * kN + s0 + j, dA[m][j]);
      }
    }
    if (e0) atomicAdd(p.dD + ec, dD0);
    if (e1) atomicAdd(p.dD + ec + 1, dD1);
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

// Whether the backward may read x, dt, z and dy two channels at a time: unit channel strides, an even
// number of channels, and even strides and pointers aligned to two elements.
inline bool pairs_aligned(const ScanParams& p, size_t elem) {
  auto ok = [&](const void* ptr, const int64_t (&s)[3]) {
    return ptr == nullptr ||
           (s[2] == 1 && s[0] % 2 == 0 && s[1] % 2 == 0 && reinterpret_cast<uintptr_t>(ptr) % (2 * elem) == 0);
  };
  return p.channels % 2 == 0 && ok(p.x, p.x_stride) && ok(p.dt, p.dt_stride) && ok(p.z, p.z_stride) &&
         ok(p.dy, p.dy_stride);
}

template <class Tr, typename T, bool kVec, int kSweeps>
cudaError_t launch_bwd(const ScanParams& p) {
  const dim3 grid((p.channels + kBwdBlockChannels - 1) / kBwdBlockChannels, p.nchunks, p.batch);
  constexpr int kSmem = sizeof(BwdSmem);  // over the 48 KiB of static shared memory: dynamic, opted in
  auto kernel = bwd_kernel<Tr, T, kVec, kSweeps>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (err == cudaSuccess) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
  }
  if (err != cudaSuccess) return err;
  kernel<<<grid, kThreads, kSmem, p.stream>>>(p);
  return cudaGetLastError();
}

// In chunks with the forward's entry states: sweep 1 (with P and Sb), the adjoint combine, sweep 2.
// Without them: the summary pass (P, S, Sb), both combines, then both sweeps in one launch.
template <class Tr, typename T, bool kVec>
cudaError_t launch_bwd_chunks(const ScanParams& p) {
  if (p.nchunks == 1) return launch_bwd<Tr, T, kVec, kSweepBoth>(p);
  cudaError_t err;
  if (p.entry_states_given) {
    err = launch_bwd<Tr, T, kVec, kSweepFirst>(p);
    if (err == cudaSuccess) err = scan_combine(p, false, true);
    return err == cudaSuccess ? launch_bwd<Tr, T, kVec, kSweepSecond>(p) : err;
  }
  err = dispatch_x_layout(p, [&](auto run) {
    constexpr bool kXRun = decltype(run)::value;
    using L = Layout<kBwdLanes>;
    const dim3 grid((p.channels + L::kCh - 1) / L::kCh, p.nchunks, p.batch);
    summary_kernel<Tr, kBwdLanes, T, kXRun, true><<<grid, kThreads, 0, p.stream>>>(p);
    return scan_combine(p, true, true);
  });
  return err == cudaSuccess ? launch_bwd<Tr, T, kVec, kSweepBoth>(p) : err;
}

template <class Tr>
cudaError_t scan_bwd(const ScanParams& p) {
  if (p.chunk_len % kLt != 0 || p.ws_ckpt == nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    return pairs_aligned(p, sizeof(T)) ? launch_bwd_chunks<Tr, T, true>(p) : launch_bwd_chunks<Tr, T, false>(p);
  });
}

}  // namespace selective_scan
