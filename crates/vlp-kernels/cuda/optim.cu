// AdamW on f32 master weights, in place, PyTorch's form:
//   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//   p = p * decay - step_size * m / (sqrt(v) * inv_sqrt_bias2 + eps)
// One launch updates both moments and the parameter.
#include "common.cuh"

extern "C" __global__ void vlp_adamw_f32(float* p, float* m, float* v, const float* g,
                                         uint64_t total, float beta1, float beta2,
                                         float inv_sqrt_bias2, float eps, float step_size,
                                         float decay) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < total;
       i += (uint64_t)gridDim.x * blockDim.x) {
    const float gi = g[i];
    const float mi = m[i] * beta1 + gi * (1.f - beta1);
    const float vi = v[i] * beta2 + gi * gi * (1.f - beta2);
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * decay - mi / (sqrtf(vi) * inv_sqrt_bias2 + eps) * step_size;
  }
}
