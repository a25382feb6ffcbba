// Shared helpers: f32 <-> storage type, warp and block reductions, the dropout hash.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16(x); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum of `v` over the block (blockDim.x a multiple of 32, at most 1024), in a fixed order,
// returned to every thread. `sh` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* sh) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  if (wid == 0) {
    float w = lane < nw ? sh[lane] : 0.f;
    w = warp_sum(w);
    if (lane == 0) sh[0] = w;
  }
  __syncthreads();
  return sh[0];
}

__device__ __forceinline__ float block_max(float v, float* sh) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  if (wid == 0) {
    float w = lane < nw ? sh[lane] : -INFINITY;
    w = warp_max(w);
    if (lane == 0) sh[0] = w;
  }
  __syncthreads();
  return sh[0];
}

// The dropout decision of element `i` (the CPU's `DropoutMask::keep`): a 32-bit hash of the
// index keyed by the call's seed; kept (times `scale`) when it is at least `threshold`.
__device__ __forceinline__ uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  return x ^ (x >> 16);
}

struct Dropout {
  uint32_t key0, key1;
  uint64_t threshold;
  float scale;
  __device__ __forceinline__ float keep(uint64_t i) const {
    uint32_t h = hash32(hash32((uint32_t)i ^ key0) + key1);
    return (uint64_t)h >= threshold ? scale : 0.f;
  }
};
