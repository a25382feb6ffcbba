// Row kernels over the last dimension of contiguous tensors, each for f32 and bf16 with
// f32 arithmetic: LayerNorm (forward saves mean and rstd), bias + GELU (erf), broadcast
// add, deterministic column sums (bias and gain gradients: fixed partitions of rows, each
// summed in order, then the partitions in order), softmax and log-softmax, dropout, EMA.
#include "common.cuh"

template <typename T>
__device__ void ln_fwd(const T* x, const T* w, const T* b, T* y, float* mean_out,
                       float* rstd_out, int n, float eps) {
  __shared__ float sh[32];
  const size_t row = blockIdx.x;
  const T* xr = x + row * n;
  T* yr = y + row * n;
  float s = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += to_f(xr[i]);
  const float mean = block_sum(s, sh) / n;
  float q = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    float d = to_f(xr[i]) - mean;
    q += d * d;
  }
  const float rstd = rsqrtf(block_sum(q, sh) / n + eps);
  for (int i = threadIdx.x; i < n; i += blockDim.x)
    yr[i] = from_f<T>((to_f(xr[i]) - mean) * rstd * to_f(w[i]) + to_f(b[i]));
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// dx = rstd * (g*w - mean(g*w) - xhat * mean(g*w*xhat)).
template <typename T>
__device__ void ln_bwd(const T* x, const T* w, const T* g, const float* mean,
                       const float* rstd, T* dx, int n) {
  __shared__ float sh[32];
  const size_t row = blockIdx.x;
  const T* xr = x + row * n;
  const T* gr = g + row * n;
  const float mu = mean[row], rs = rstd[row];
  float a = 0.f, c = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    float gw = to_f(gr[i]) * to_f(w[i]);
    a += gw;
    c += gw * (to_f(xr[i]) - mu) * rs;
  }
  const float ma = block_sum(a, sh) / n;
  const float mc = block_sum(c, sh) / n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    float xh = (to_f(xr[i]) - mu) * rs;
    float gw = to_f(gr[i]) * to_f(w[i]);
    dx[row * n + i] = from_f<T>(rs * (gw - ma - xh * mc));
  }
}

// Partial column sums over one partition of rows: block (32, 8), grid (ceil(n/32), parts).
// `pa` gets sum(g * xhat) (the gain's gradient) when x is given, `pb` gets sum(g).
template <typename T>
__device__ void col_partials(const T* g, const T* x, const float* mean, const float* rstd,
                             float* pa, float* pb, int rows, int n, int rows_per_part) {
  __shared__ float sa[8][33];
  __shared__ float sb[8][33];
  const int col = blockIdx.x * 32 + threadIdx.x;
  const int r0 = blockIdx.y * rows_per_part;
  const int r1 = min(rows, r0 + rows_per_part);
  float a = 0.f, b = 0.f;
  if (col < n) {
    for (int r = r0 + threadIdx.y; r < r1; r += 8) {
      float gv = to_f(g[(size_t)r * n + col]);
      b += gv;
      if (x) a += gv * (to_f(x[(size_t)r * n + col]) - mean[r]) * rstd[r];
    }
  }
  sa[threadIdx.y][threadIdx.x] = a;
  sb[threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.y == 0 && col < n) {
    float ta = 0.f, tb = 0.f;
    for (int k = 0; k < 8; ++k) {
      ta += sa[k][threadIdx.x];
      tb += sb[k][threadIdx.x];
    }
    if (pa) pa[(size_t)blockIdx.y * n + col] = ta;
    pb[(size_t)blockIdx.y * n + col] = tb;
  }
}

template <typename T>
__device__ void col_finish(const float* part, T* out, int parts, int n) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= n) return;
  float s = 0.f;
  for (int p = 0; p < parts; ++p) s += part[(size_t)p * n + col];
  out[col] = from_f<T>(s);
}

__device__ __forceinline__ float gelu(float u) { return 0.5f * u * (1.f + erff(u * 0.70710678118654752f)); }
__device__ __forceinline__ float gelu_grad(float u) {
  return 0.5f * (1.f + erff(u * 0.70710678118654752f)) + u * 0.39894228040143268f * expf(-0.5f * u * u);
}

template <typename T>
__device__ void bias_gelu_fwd(const T* x, const T* b, T* y, uint64_t total, int n) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < total;
       i += (uint64_t)gridDim.x * blockDim.x)
    y[i] = from_f<T>(gelu(to_f(x[i]) + to_f(b[i % n])));
}

template <typename T>
__device__ void bias_gelu_bwd(const T* x, const T* b, const T* g, T* dx, uint64_t total, int n) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < total;
       i += (uint64_t)gridDim.x * blockDim.x)
    dx[i] = from_f<T>(to_f(g[i]) * gelu_grad(to_f(x[i]) + to_f(b[i % n])));
}

template <typename T>
__device__ void add_row(const T* x, const T* b, T* y, uint64_t total, int n) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < total;
       i += (uint64_t)gridDim.x * blockDim.x)
    y[i] = from_f<T>(to_f(x[i]) + to_f(b[i % n]));
}

template <typename T>
__device__ void dropout(const T* x, T* y, uint64_t total, Dropout d) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < total;
       i += (uint64_t)gridDim.x * blockDim.x)
    y[i] = from_f<T>(to_f(x[i]) * d.keep(i));
}

// One block per row. `log`: log-softmax.
template <typename T>
__device__ void softmax_fwd(const T* x, T* y, int n, int log) {
  __shared__ float sh[32];
  const size_t row = blockIdx.x;
  const T* xr = x + row * n;
  T* yr = y + row * n;
  float m = -INFINITY;
  for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, to_f(xr[i]));
  m = block_max(m, sh);
  float s = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += expf(to_f(xr[i]) - m);
  s = block_sum(s, sh);
  if (log) {
    const float ls = logf(s);
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = from_f<T>(to_f(xr[i]) - m - ls);
  } else {
    const float inv = 1.f / s;
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = from_f<T>(expf(to_f(xr[i]) - m) * inv);
  }
}

// softmax: dx = y * (g - sum(g*y)); log-softmax: dx = g - exp(y) * sum(g).
template <typename T>
__device__ void softmax_bwd(const T* y, const T* g, T* dx, int n, int log) {
  __shared__ float sh[32];
  const size_t row = blockIdx.x;
  const T* yr = y + row * n;
  const T* gr = g + row * n;
  float s = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x)
    s += log ? to_f(gr[i]) : to_f(gr[i]) * to_f(yr[i]);
  s = block_sum(s, sh);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    float yv = to_f(yr[i]), gv = to_f(gr[i]);
    dx[row * n + i] = from_f<T>(log ? gv - expf(yv) * s : yv * (gv - s));
  }
}

template <typename T>
__device__ void ema(T* t, const T* s, uint64_t total, float m) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < total;
       i += (uint64_t)gridDim.x * blockDim.x)
    t[i] = from_f<T>(to_f(t[i]) * m + to_f(s[i]) * (1.f - m));
}

#define ROWS_INSTANCES(T, S)                                                                   \
  extern "C" __global__ void vlp_ln_fwd_##S(const T* x, const T* w, const T* b, T* y,          \
                                            float* mean, float* rstd, int n, float eps) {      \
    ln_fwd<T>(x, w, b, y, mean, rstd, n, eps);                                                 \
  }                                                                                            \
  extern "C" __global__ void vlp_ln_bwd_##S(const T* x, const T* w, const T* g,                \
                                            const float* mean, const float* rstd, T* dx,       \
                                            int n) {                                           \
    ln_bwd<T>(x, w, g, mean, rstd, dx, n);                                                     \
  }                                                                                            \
  extern "C" __global__ void vlp_ln_param_partials_##S(const T* g, const T* x,                 \
                                                       const float* mean, const float* rstd,   \
                                                       float* pw, float* pb, int rows, int n,  \
                                                       int rows_per_part) {                    \
    col_partials<T>(g, x, mean, rstd, pw, pb, rows, n, rows_per_part);                         \
  }                                                                                            \
  extern "C" __global__ void vlp_col_partials_##S(const T* g, float* pb, int rows, int n,      \
                                                  int rows_per_part) {                         \
    col_partials<T>(g, (const T*)0, (const float*)0, (const float*)0, (float*)0, pb, rows, n,  \
                    rows_per_part);                                                            \
  }                                                                                            \
  extern "C" __global__ void vlp_col_finish_##S(const float* part, T* out, int parts, int n) { \
    col_finish<T>(part, out, parts, n);                                                        \
  }                                                                                            \
  extern "C" __global__ void vlp_bias_gelu_fwd_##S(const T* x, const T* b, T* y,               \
                                                   uint64_t total, int n) {                    \
    bias_gelu_fwd<T>(x, b, y, total, n);                                                       \
  }                                                                                            \
  extern "C" __global__ void vlp_bias_gelu_bwd_##S(const T* x, const T* b, const T* g, T* dx,  \
                                                   uint64_t total, int n) {                    \
    bias_gelu_bwd<T>(x, b, g, dx, total, n);                                                   \
  }                                                                                            \
  extern "C" __global__ void vlp_add_row_##S(const T* x, const T* b, T* y, uint64_t total,     \
                                             int n) {                                          \
    add_row<T>(x, b, y, total, n);                                                             \
  }                                                                                            \
  extern "C" __global__ void vlp_dropout_##S(const T* x, T* y, uint64_t total, uint32_t key0,  \
                                             uint32_t key1, uint64_t threshold, float scale) { \
    dropout<T>(x, y, total, Dropout{key0, key1, threshold, scale});                            \
  }                                                                                            \
  extern "C" __global__ void vlp_softmax_fwd_##S(const T* x, T* y, int n, int log) {           \
    softmax_fwd<T>(x, y, n, log);                                                              \
  }                                                                                            \
  extern "C" __global__ void vlp_softmax_bwd_##S(const T* y, const T* g, T* dx, int n,         \
                                                 int log) {                                    \
    softmax_bwd<T>(y, g, dx, n, log);                                                          \
  }                                                                                            \
  extern "C" __global__ void vlp_ema_##S(T* t, const T* s, uint64_t total, float m) {          \
    ema<T>(t, s, total, m);                                                                    \
  }

ROWS_INSTANCES(float, f32)
ROWS_INSTANCES(bf16, bf16)

// Soft-target cross-entropy per row: loss = lse * sum(t) - sum(t * x) (forward), and
// dx = g * (exp(x - lse) * sum(t) - t) (backward, the row's lse recomputed).
template <typename T>
__device__ void soft_xent_stats(const T* xr, const T* tr, int n, float* sh, float& lse,
                                float& st, float& stx) {
  float m = -INFINITY;
  for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, to_f(xr[i]));
  m = block_max(m, sh);
  float s = 0.f, a = 0.f, b = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float x = to_f(xr[i]), t = to_f(tr[i]);
    s += expf(x - m);
    a += t;
    b += t * x;
  }
  s = block_sum(s, sh);
  st = block_sum(a, sh);
  stx = block_sum(b, sh);
  lse = m + logf(s);
}

template <typename T>
__device__ void soft_xent_fwd(const T* x, const T* t, T* loss, int n) {
  __shared__ float sh[32];
  const size_t row = blockIdx.x;
  float lse, st, stx;
  soft_xent_stats<T>(x + row * n, t + row * n, n, sh, lse, st, stx);
  if (threadIdx.x == 0) loss[row] = from_f<T>(lse * st - stx);
}

template <typename T>
__device__ void soft_xent_bwd(const T* x, const T* t, const T* g, T* dx, int n) {
  __shared__ float sh[32];
  const size_t row = blockIdx.x;
  const T* xr = x + row * n;
  const T* tr = t + row * n;
  float lse, st, stx;
  soft_xent_stats<T>(xr, tr, n, sh, lse, st, stx);
  const float gr = to_f(g[row]);
  for (int i = threadIdx.x; i < n; i += blockDim.x)
    dx[row * n + i] = from_f<T>(gr * (expf(to_f(xr[i]) - lse) * st - to_f(tr[i])));
}

#define XENT_INSTANCES(T, S)                                                                  \
  extern "C" __global__ void vlp_soft_xent_fwd_##S(const T* x, const T* t, T* loss, int n) {  \
    soft_xent_fwd<T>(x, t, loss, n);                                                          \
  }                                                                                           \
  extern "C" __global__ void vlp_soft_xent_bwd_##S(const T* x, const T* t, const T* g, T* dx, \
                                                   int n) {                                   \
    soft_xent_bwd<T>(x, t, g, dx, n);                                                         \
  }

XENT_INSTANCES(float, f32)
XENT_INSTANCES(bf16, bf16)
