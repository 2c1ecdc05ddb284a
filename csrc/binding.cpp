// Python binding of the selective-scan kernels: checks, allocation, workspaces, launch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "scan_params.h"

namespace ss = selective_scan;

namespace {

enum Kind : int64_t { kLonghorn = 0, kMamba = 1 };

ss::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ss::DType::kFloat32;
    case at::kHalf: return ss::DType::kFloat16;
    case at::kBFloat16: return ss::DType::kBFloat16;
    default: TORCH_CHECK(false, "selective scan: x must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// contiguous = false: any strides (the (B, T, C) inputs, read through their strides).
void check(const at::Tensor& t, const char* name, at::IntArrayRef shape, std::optional<at::ScalarType> dtype,
           bool contiguous = true) {
  TORCH_CHECK(t.is_cuda(), "selective scan: ", name, " must be a CUDA tensor");
  TORCH_CHECK(!contiguous || t.is_contiguous(), "selective scan: ", name, " must be contiguous");
  TORCH_CHECK(t.sizes() == shape, "selective scan: ", name, " has shape ", t.sizes(), ", expected ", shape);
  if (dtype) TORCH_CHECK(t.scalar_type() == *dtype, "selective scan: ", name, " must be ", *dtype, ", got ", t.scalar_type());
}

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t ? t->data_ptr<T>() : nullptr;
}

void set_strides(const at::Tensor& t, int64_t (&dst)[3]) {
  for (int i = 0; i < 3; ++i) dst[i] = t.stride(i);
}

// The largest of 8, 4, 2, 1 elements that divides x's address (in elements), batch stride and channel stride.
int time_run_alignment(const at::Tensor& x) {
  const auto addr = reinterpret_cast<std::uintptr_t>(x.data_ptr());
  const auto elem = static_cast<std::uintptr_t>(x.element_size());
  if (addr % elem != 0) return 1;
  for (int a = 8; a > 1; a /= 2) {
    if ((addr / elem) % a == 0 && x.stride(0) % a == 0 && x.stride(2) % a == 0) return a;
  }
  return 1;
}

// A new contiguous (B, T, C) tensor like x (empty_like would copy x's strides, which may be a view's).
at::Tensor new_btc(const at::Tensor& x) { return at::empty(x.sizes(), x.options()); }

// Fills the parameters shared by forward and backward and checks every input.
ss::ScanParams make_params(int64_t kind, const at::Tensor& x, const at::Tensor& dt, const at::Tensor& kin,
                           const at::Tensor& qout, const std::optional<at::Tensor>& A, const at::Tensor& D,
                           const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& h0,
                           const std::optional<at::Tensor>& reset, int64_t chunk_len) {
  TORCH_CHECK(kind == kLonghorn || kind == kMamba, "selective scan: unknown kind ", kind);
  TORCH_CHECK(x.dim() == 3, "selective scan: x must be (B, T, C)");
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), N = ss::kStateSize;
  check(x, "x", {B, T, C}, std::nullopt, false);
  check(dt, "dt", {B, T, C}, x.scalar_type(), false);
  check(kin, "kin", {B, T, N}, at::kFloat);
  check(qout, "qout", {B, T, N}, at::kFloat);
  check(D, "D", {C}, at::kFloat);
  if (kind == kMamba) {
    TORCH_CHECK(A.has_value(), "selective scan: Mamba needs A");
    check(*A, "A", {C, N}, at::kFloat);
  }
  if (z) check(*z, "z", {B, T, C}, x.scalar_type(), false);
  if (h0) check(*h0, "initial_state", {B, C, N}, at::kFloat);
  if (reset) check(*reset, "reset", {B, T}, at::kBool);
  TORCH_CHECK(chunk_len > 0 && chunk_len % ss::kTile == 0, "selective scan: chunk_len must be a positive multiple of ",
              ss::kTile);
  TORCH_CHECK(B * T * C < (int64_t{1} << 40), "selective scan: input too large");

  ss::ScanParams p;
  p.batch = static_cast<int>(B);
  p.seqlen = static_cast<int>(T);
  p.channels = static_cast<int>(C);
  p.chunk_len = static_cast<int>(chunk_len);
  p.nchunks = static_cast<int>(std::max<int64_t>(1, (T + chunk_len - 1) / chunk_len));
  p.dtype = dtype_of(x);
  p.x = x.data_ptr();
  p.dt = dt.data_ptr();
  p.z = z ? z->data_ptr() : nullptr;
  set_strides(x, p.x_stride);
  p.x_time_major = x.stride(1) == 1 && x.stride(2) != 1;
  p.x_align = p.x_time_major ? time_run_alignment(x) : 1;
  set_strides(dt, p.dt_stride);
  if (z) set_strides(*z, p.z_stride);
  p.kin = kin.data_ptr<float>();
  p.qout = qout.data_ptr<float>();
  p.A = kind == kMamba ? A->data_ptr<float>() : nullptr;
  p.D = D.data_ptr<float>();
  p.h0 = opt_ptr<float>(h0);
  p.reset = opt_ptr<bool>(reset);
  p.stream = c10::cuda::getCurrentCUDAStream().stream();
  return p;
}

void check_launch(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "selective scan: kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor workspace(const at::Tensor& x, const ss::ScanParams& p) {
  return at::empty({p.batch, p.nchunks, p.channels, ss::kStateSize}, x.options().dtype(at::kFloat));
}

}  // namespace

// Returns (y, hT, entry_states): entry_states (B, ceil(T / entry_len), C, N) holds the state entering
// steps 0, entry_len, 2 entry_len, ... (the backward's chunks of entry_len steps), or is empty when
// entry_len is 0 or covers T.
std::vector<at::Tensor> scan_fwd(int64_t kind, const at::Tensor& x, const at::Tensor& dt, const at::Tensor& kin,
                                 const at::Tensor& qout, const std::optional<at::Tensor>& A, const at::Tensor& D,
                                 const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& h0,
                                 const std::optional<at::Tensor>& reset, int64_t fwd_lanes, int64_t chunk_len,
                                 int64_t entry_len) {
  const c10::cuda::CUDAGuard guard(x.device());
  ss::ScanParams p = make_params(kind, x, dt, kin, qout, A, D, z, h0, reset, chunk_len);
  TORCH_CHECK(entry_len >= 0 && entry_len % ss::kTile == 0, "selective scan: entry_len must be a multiple of ",
              ss::kTile);
  at::Tensor y = new_btc(x);
  at::Tensor hT = h0 ? at::empty_like(*h0) : at::zeros({p.batch, p.channels, ss::kStateSize}, x.options().dtype(at::kFloat));
  const int64_t n_entry = entry_len > 0 ? (p.seqlen + entry_len - 1) / entry_len : 0;
  at::Tensor entry = n_entry > 1 ? at::empty({p.batch, n_entry, p.channels, ss::kStateSize}, x.options().dtype(at::kFloat))
                                 : at::empty({0}, x.options().dtype(at::kFloat));
  if (p.seqlen == 0) {
    if (h0) hT.copy_(*h0);
    return {y, hT, entry};
  }
  if (n_entry > 1) {
    p.entry_states = entry.data_ptr<float>();
    p.entry_len = static_cast<int>(entry_len);
    p.n_entry = static_cast<int>(n_entry);
  }
  at::Tensor P, S, H;
  if (p.nchunks > 1) {
    P = workspace(x, p), S = workspace(x, p), H = workspace(x, p);
    p.ws_P = P.data_ptr<float>(), p.ws_S = S.data_ptr<float>(), p.ws_H = H.data_ptr<float>();
  }
  p.y = y.data_ptr();
  p.hT = hT.data_ptr<float>();
  check_launch(kind == kLonghorn ? ss::longhorn_scan_fwd(p, static_cast<int>(fwd_lanes))
                                 : ss::mamba_scan_fwd(p, static_cast<int>(fwd_lanes)));
  return {y, hT, entry};
}

// Returns (dx, ddt, dkin, dqout, dA, dD, dz, dh0); dA is empty for Longhorn, dz empty without z.
// entry_states: the forward's, for chunks of chunk_len steps (then no summary pass runs), or None.
std::vector<at::Tensor> scan_bwd(int64_t kind, const at::Tensor& x, const at::Tensor& dt, const at::Tensor& kin,
                                 const at::Tensor& qout, const std::optional<at::Tensor>& A, const at::Tensor& D,
                                 const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& h0,
                                 const std::optional<at::Tensor>& reset, const at::Tensor& dy, const at::Tensor& dhT,
                                 int64_t chunk_len, const std::optional<at::Tensor>& entry_states) {
  const c10::cuda::CUDAGuard guard(x.device());
  ss::ScanParams p = make_params(kind, x, dt, kin, qout, A, D, z, h0, reset, chunk_len);
  check(dy, "dy", {p.batch, p.seqlen, p.channels}, x.scalar_type(), false);
  set_strides(dy, p.dy_stride);
  check(dhT, "d final_state", {p.batch, p.channels, ss::kStateSize}, at::kFloat);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dx = new_btc(x), ddt = new_btc(x);
  at::Tensor dz = z ? new_btc(x) : at::empty({0}, x.options());
  at::Tensor dkin = at::zeros_like(kin), dqout = at::zeros_like(qout);
  at::Tensor dK = at::zeros({p.batch, p.seqlen}, f32);
  at::Tensor dA = kind == kMamba ? at::zeros_like(*A) : at::empty({0}, f32);
  at::Tensor dD = at::zeros_like(D);
  at::Tensor dh0 = at::empty_like(dhT);
  if (p.seqlen == 0) {
    dh0.copy_(dhT);
    return {dx, ddt, dkin, dqout, dA, dD, dz, dh0};
  }
  at::Tensor P, S, Sb, H, R;
  if (p.nchunks > 1) {
    P = workspace(x, p), Sb = workspace(x, p), R = workspace(x, p);
    p.ws_P = P.data_ptr<float>(), p.ws_Sb = Sb.data_ptr<float>(), p.ws_R = R.data_ptr<float>();
    if (entry_states) {
      check(*entry_states, "entry_states", {p.batch, p.nchunks, p.channels, ss::kStateSize}, at::kFloat);
      p.ws_H = const_cast<float*>(entry_states->data_ptr<float>());  // read only
      p.entry_states_given = true;
    } else {
      S = workspace(x, p), H = workspace(x, p);
      p.ws_S = S.data_ptr<float>(), p.ws_H = H.data_ptr<float>();
    }
  }
  at::Tensor ckpt = at::empty({ss::bwd_ckpt_floats(p)}, f32);
  p.ws_ckpt = ckpt.data_ptr<float>();
  p.dy = dy.data_ptr();
  p.dhT = dhT.data_ptr<float>();
  p.dx = dx.data_ptr();
  p.ddt = ddt.data_ptr();
  p.dz = z ? dz.data_ptr() : nullptr;
  p.dkin = dkin.data_ptr<float>();
  p.dqout = dqout.data_ptr<float>();
  p.dK = dK.data_ptr<float>();
  p.dA = kind == kMamba ? dA.data_ptr<float>() : nullptr;
  p.dD = dD.data_ptr<float>();
  p.dh0 = dh0.data_ptr<float>();
  check_launch(kind == kLonghorn ? ss::longhorn_scan_bwd(p) : ss::mamba_scan_bwd(p));
  if (kind == kLonghorn) dkin.add_(kin * dK.unsqueeze(-1), 2.0);  // delta depends on |k|^2
  return {dx, ddt, dkin, dqout, dA, dD, dz, dh0};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Chunked selective-scan kernels (Longhorn, Mamba-1), forward and backward";
  m.def("scan_fwd", &scan_fwd, "Selective scan forward: (y, final_state, entry_states)");
  m.def("scan_bwd", &scan_bwd, "Selective scan backward: (dx, ddt, dkin, dqout, dA, dD, dz, dh0)");
  m.attr("STATE_SIZE") = ss::kStateSize;
  m.attr("TILE") = ss::kTile;
}
