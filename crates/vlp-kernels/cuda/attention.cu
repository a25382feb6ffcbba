// Multi-head attention, FlashAttention-2 style, forward and backward, f32 and bf16 inputs
// with f32 arithmetic, head dims 16, 32 and 64.
//
// Inputs are the projections as the linears write them: `[B, L, heads * D]` with any batch
// and row strides (so q, k and v can be views into one packed qkv projection). For batch
// row b, head h: S = scale * Q K^T + mask (a per-key additive mask, [B or 1, Lk]),
// P = softmax(S), P' = P * keep (dropout, decided per element by a hash of its index in
// [B, heads, Lq, Lk], as the CPU op does), O = P' V.
//
// Forward: one thread per query row, key/value tiles in shared memory, an online softmax
// over sub-tiles of 16 keys; writes O and the log-sum-exp L of each row. Nothing of size
// Lq x Lk is stored.
// Backward, deterministic (every output element is summed by one thread in a fixed order):
//   delta_i = rowsum(dO_i * O_i);
//   per key j (one thread each): P_ij = exp(S_ij - L_i) recomputed, dV_j += P'_ij dO_i,
//     dP_ij = (dO_i . V_j) keep_ij, dS_ij = P_ij (dP_ij - delta_i), dK_j += scale dS_ij Q_i;
//   per query i (one thread each): dQ_i += scale dS_ij K_j.
#include "common.cuh"

struct Strided {
  long long batch, row;
};

#define FWD_THREADS 64
#define FWD_KEYS 64
#define SUB 16

template <typename T, int D>
__device__ void flash_fwd(const T* q, Strided qs, const T* k, Strided ks, const T* v, Strided vs,
                          const float* mask, long long mask_bs, T* out, float* lse, int heads,
                          int lq, int lk, float scale, Dropout drop, int use_drop) {
  __shared__ float kt[FWD_KEYS][D];
  __shared__ float vt[FWD_KEYS][D];
  __shared__ float mt[FWD_KEYS];
  const int b = blockIdx.z, h = blockIdx.y;
  const int i = blockIdx.x * FWD_THREADS + threadIdx.x;
  const bool active = i < lq;
  float qr[D], acc[D];
  const T* qp = q + b * qs.batch + (long long)(active ? i : 0) * qs.row + h * D;
#pragma unroll
  for (int d = 0; d < D; ++d) {
    qr[d] = active ? to_f(qp[d]) * scale : 0.f;
    acc[d] = 0.f;
  }
  float mx = -INFINITY, l = 0.f;
  const uint64_t drop_row = (((uint64_t)b * heads + h) * lq + (active ? i : 0)) * (uint64_t)lk;
  for (int j0 = 0; j0 < lk; j0 += FWD_KEYS) {
    const int nk = min(FWD_KEYS, lk - j0);
    __syncthreads();
    for (int e = threadIdx.x; e < nk * D; e += FWD_THREADS) {
      const int jj = e / D, d = e % D;
      kt[jj][d] = to_f(k[b * ks.batch + (long long)(j0 + jj) * ks.row + h * D + d]);
      vt[jj][d] = to_f(v[b * vs.batch + (long long)(j0 + jj) * vs.row + h * D + d]);
    }
    for (int e = threadIdx.x; e < nk; e += FWD_THREADS)
      mt[e] = mask ? mask[b * mask_bs + j0 + e] : 0.f;
    __syncthreads();
    if (!active) continue;
    for (int s0 = 0; s0 < nk; s0 += SUB) {
      const int ns = min(SUB, nk - s0);
      float s[SUB];
      float smax = -INFINITY;
#pragma unroll
      for (int t = 0; t < SUB; ++t) {
        if (t < ns) {
          float dot = 0.f;
#pragma unroll
          for (int d = 0; d < D; ++d) dot += qr[d] * kt[s0 + t][d];
          s[t] = dot + mt[s0 + t];
          smax = fmaxf(smax, s[t]);
        }
      }
      const float nm = fmaxf(mx, smax);
      if (nm == -INFINITY) continue;  // every key so far masked out with -inf
      const float corr = mx == -INFINITY ? 0.f : expf(mx - nm);
      l *= corr;
#pragma unroll
      for (int d = 0; d < D; ++d) acc[d] *= corr;
#pragma unroll
      for (int t = 0; t < SUB; ++t) {
        if (t < ns) {
          float p = expf(s[t] - nm);
          l += p;
          if (use_drop) p *= drop.keep(drop_row + j0 + s0 + t);
#pragma unroll
          for (int d = 0; d < D; ++d) acc[d] += p * vt[s0 + t][d];
        }
      }
      mx = nm;
    }
  }
  if (!active) return;
  const float inv = 1.f / l;
  T* op = out + ((long long)b * lq + i) * heads * D + h * D;
#pragma unroll
  for (int d = 0; d < D; ++d) op[d] = from_f<T>(acc[d] * inv);
  lse[((long long)b * heads + h) * lq + i] = mx + logf(l);
}

// delta[b, h, i] = sum_d dO[b, i, h*D + d] * O[b, i, h*D + d]; O and dO contiguous.
template <typename T>
__device__ void flash_delta(const T* o, const T* g, float* delta, int batch, int heads, int lq,
                            int d) {
  const long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  const long long total = (long long)batch * heads * lq;
  if (idx >= total) return;
  const int i = idx % lq;
  const int h = (idx / lq) % heads;
  const int b = idx / ((long long)lq * heads);
  const long long base = ((long long)b * lq + i) * heads * d + (long long)h * d;
  float s = 0.f;
  for (int e = 0; e < d; ++e) s += to_f(o[base + e]) * to_f(g[base + e]);
  delta[idx] = s;
}

#define KV_THREADS 64
#define KV_QROWS 16

// dK and dV: one thread per key. Its k and v rows live in shared memory (padded against
// bank conflicts); query rows come in tiles of KV_QROWS that every thread reads.
template <typename T, int D>
__device__ void flash_bwd_kv(const T* q, Strided qs, const T* k, Strided ks, const T* v,
                             Strided vs, const float* mask, long long mask_bs, const T* g,
                             const float* lse, const float* delta, T* dk, Strided dks, T* dv,
                             Strided dvs, int heads, int lq, int lk, float scale, Dropout drop,
                             int use_drop) {
  __shared__ float kr[KV_THREADS][D + 1];
  __shared__ float vr[KV_THREADS][D + 1];
  __shared__ float qt[KV_QROWS][D];
  __shared__ float gt[KV_QROWS][D];
  __shared__ float lt[KV_QROWS];
  __shared__ float dt[KV_QROWS];
  const int b = blockIdx.z, h = blockIdx.y;
  const int j0 = blockIdx.x * KV_THREADS;
  const int j = j0 + threadIdx.x;
  const bool active = j < lk;
  const int nkeys = min(KV_THREADS, lk - j0);
  for (int e = threadIdx.x; e < nkeys * D; e += KV_THREADS) {
    const int jj = e / D, d = e % D;
    kr[jj][d] = to_f(k[b * ks.batch + (long long)(j0 + jj) * ks.row + h * D + d]);
    vr[jj][d] = to_f(v[b * vs.batch + (long long)(j0 + jj) * vs.row + h * D + d]);
  }
  const float mj = (active && mask) ? mask[b * mask_bs + j] : 0.f;
  float dka[D], dva[D];
#pragma unroll
  for (int d = 0; d < D; ++d) {
    dka[d] = 0.f;
    dva[d] = 0.f;
  }
  const int t = threadIdx.x;
  for (int i0 = 0; i0 < lq; i0 += KV_QROWS) {
    const int nq = min(KV_QROWS, lq - i0);
    __syncthreads();
    for (int e = threadIdx.x; e < nq * D; e += KV_THREADS) {
      const int ii = e / D, d = e % D;
      qt[ii][d] = to_f(q[b * qs.batch + (long long)(i0 + ii) * qs.row + h * D + d]);
      gt[ii][d] = to_f(g[((long long)b * lq + i0 + ii) * heads * D + h * D + d]);
    }
    for (int e = threadIdx.x; e < nq; e += KV_THREADS) {
      const long long r = ((long long)b * heads + h) * lq + i0 + e;
      lt[e] = lse[r];
      dt[e] = delta[r];
    }
    __syncthreads();
    if (!active) continue;
    for (int ii = 0; ii < nq; ++ii) {
      float s = 0.f, dp = 0.f;
#pragma unroll
      for (int d = 0; d < D; ++d) {
        s += qt[ii][d] * kr[t][d];
        dp += gt[ii][d] * vr[t][d];
      }
      s = s * scale + mj;
      const float p = lt[ii] == -INFINITY ? 0.f : expf(s - lt[ii]);
      float keep = 1.f;
      if (use_drop) keep = drop.keep((((uint64_t)b * heads + h) * lq + i0 + ii) * (uint64_t)lk + j);
      const float pk = p * keep;
      const float ds = p * (dp * keep - dt[ii]);
#pragma unroll
      for (int d = 0; d < D; ++d) {
        dva[d] += pk * gt[ii][d];
        dka[d] += ds * qt[ii][d];
      }
    }
  }
  if (!active) return;
  T* dkp = dk + b * dks.batch + (long long)j * dks.row + h * D;
  T* dvp = dv + b * dvs.batch + (long long)j * dvs.row + h * D;
#pragma unroll
  for (int d = 0; d < D; ++d) {
    dkp[d] = from_f<T>(dka[d] * scale);
    dvp[d] = from_f<T>(dva[d]);
  }
}

#define Q_THREADS 64
#define Q_KEYS 32

// dQ: one thread per query row; its dO row lives in shared memory (padded), key/value
// tiles of Q_KEYS are shared by the block.
template <typename T, int D>
__device__ void flash_bwd_q(const T* q, Strided qs, const T* k, Strided ks, const T* v, Strided vs,
                            const float* mask, long long mask_bs, const T* g, const float* lse,
                            const float* delta, T* dq, Strided dqs, int heads, int lq, int lk,
                            float scale, Dropout drop, int use_drop) {
  __shared__ float gr[Q_THREADS][D + 1];
  __shared__ float kt[Q_KEYS][D];
  __shared__ float vt[Q_KEYS][D];
  __shared__ float mt[Q_KEYS];
  const int b = blockIdx.z, h = blockIdx.y;
  const int i0 = blockIdx.x * Q_THREADS;
  const int i = i0 + threadIdx.x;
  const bool active = i < lq;
  const int nrows = min(Q_THREADS, lq - i0);
  for (int e = threadIdx.x; e < nrows * D; e += Q_THREADS) {
    const int ii = e / D, d = e % D;
    gr[ii][d] = to_f(g[((long long)b * lq + i0 + ii) * heads * D + h * D + d]);
  }
  float qr[D], dqa[D];
  const T* qp = q + b * qs.batch + (long long)(active ? i : 0) * qs.row + h * D;
#pragma unroll
  for (int d = 0; d < D; ++d) {
    qr[d] = active ? to_f(qp[d]) : 0.f;
    dqa[d] = 0.f;
  }
  const long long r = ((long long)b * heads + h) * lq + (active ? i : 0);
  const float li = active ? lse[r] : 0.f;
  const float di = active ? delta[r] : 0.f;
  const int t = threadIdx.x;
  for (int j0 = 0; j0 < lk; j0 += Q_KEYS) {
    const int nk = min(Q_KEYS, lk - j0);
    __syncthreads();
    for (int e = threadIdx.x; e < nk * D; e += Q_THREADS) {
      const int jj = e / D, d = e % D;
      kt[jj][d] = to_f(k[b * ks.batch + (long long)(j0 + jj) * ks.row + h * D + d]);
      vt[jj][d] = to_f(v[b * vs.batch + (long long)(j0 + jj) * vs.row + h * D + d]);
    }
    for (int e = threadIdx.x; e < nk; e += Q_THREADS)
      mt[e] = mask ? mask[b * mask_bs + j0 + e] : 0.f;
    __syncthreads();
    if (!active || li == -INFINITY) continue;
    for (int jj = 0; jj < nk; ++jj) {
      float s = 0.f, dp = 0.f;
#pragma unroll
      for (int d = 0; d < D; ++d) {
        s += qr[d] * kt[jj][d];
        dp += gr[t][d] * vt[jj][d];
      }
      s = s * scale + mt[jj];
      const float p = expf(s - li);
      float keep = 1.f;
      if (use_drop) keep = drop.keep((uint64_t)r * lk + j0 + jj);
      const float ds = p * (dp * keep - di);
#pragma unroll
      for (int d = 0; d < D; ++d) dqa[d] += ds * kt[jj][d];
    }
  }
  if (!active) return;
  T* dqp = dq + b * dqs.batch + (long long)i * dqs.row + h * D;
#pragma unroll
  for (int d = 0; d < D; ++d) dqp[d] = from_f<T>(dqa[d] * scale);
}

#define ATTN_INSTANCES(T, S, D)                                                                   \
  extern "C" __global__ void __launch_bounds__(FWD_THREADS) vlp_flash_fwd_##S##_d##D(             \
      const T* q, long long qb, long long qr, const T* k, long long kb, long long kr,             \
      const T* v, long long vb, long long vr, const float* mask, long long mask_bs, T* out,       \
      float* lse, int heads, int lq, int lk, float scale, uint32_t key0, uint32_t key1,           \
      uint64_t threshold, float dscale, int use_drop) {                                           \
    flash_fwd<T, D>(q, Strided{qb, qr}, k, Strided{kb, kr}, v, Strided{vb, vr}, mask, mask_bs,    \
                    out, lse, heads, lq, lk, scale, Dropout{key0, key1, threshold, dscale},       \
                    use_drop);                                                                    \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(KV_THREADS) vlp_flash_bwd_kv_##S##_d##D(           \
      const T* q, long long qb, long long qr, const T* k, long long kb, long long kr,             \
      const T* v, long long vb, long long vr, const float* mask, long long mask_bs, const T* g,   \
      const float* lse, const float* delta, T* dk, long long dkb, long long dkr, T* dv,           \
      long long dvb, long long dvr, int heads, int lq, int lk, float scale, uint32_t key0,        \
      uint32_t key1, uint64_t threshold, float dscale, int use_drop) {                            \
    flash_bwd_kv<T, D>(q, Strided{qb, qr}, k, Strided{kb, kr}, v, Strided{vb, vr}, mask,          \
                       mask_bs, g, lse, delta, dk, Strided{dkb, dkr}, dv, Strided{dvb, dvr},      \
                       heads, lq, lk, scale, Dropout{key0, key1, threshold, dscale}, use_drop);   \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(Q_THREADS) vlp_flash_bwd_q_##S##_d##D(             \
      const T* q, long long qb, long long qr, const T* k, long long kb, long long kr,             \
      const T* v, long long vb, long long vr, const float* mask, long long mask_bs, const T* g,   \
      const float* lse, const float* delta, T* dq, long long dqb, long long dqr, int heads,       \
      int lq, int lk, float scale, uint32_t key0, uint32_t key1, uint64_t threshold,              \
      float dscale, int use_drop) {                                                               \
    flash_bwd_q<T, D>(q, Strided{qb, qr}, k, Strided{kb, kr}, v, Strided{vb, vr}, mask, mask_bs,  \
                      g, lse, delta, dq, Strided{dqb, dqr}, heads, lq, lk, scale,                 \
                      Dropout{key0, key1, threshold, dscale}, use_drop);                          \
  }

#define ATTN_DTYPE(T, S)                                                                  \
  ATTN_INSTANCES(T, S, 16)                                                                \
  ATTN_INSTANCES(T, S, 32)                                                                \
  ATTN_INSTANCES(T, S, 64)                                                                \
  extern "C" __global__ void vlp_flash_delta_##S(const T* o, const T* g, float* delta,    \
                                                 int batch, int heads, int lq, int d) {   \
    flash_delta<T>(o, g, delta, batch, heads, lq, d);                                     \
  }

ATTN_DTYPE(float, f32)
ATTN_DTYPE(bf16, bf16)
