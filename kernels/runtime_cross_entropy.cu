// runtime_cross_entropy.cu — softmax cross-entropy over rows of `vocab` logits, target −1 = row not
// predicted. One block (256 threads) per row: the row's max, Σ exp(x − max) in f64, its log-sum-exp into
// lse[r] (predicted rows only, as the CPU) and its loss −log p(target) = lse − x[target] into
// row_loss[r] (0 for rows not predicted; the host sums them in row order). The fused variant also
// overwrites the row with the gradient of the mean loss, (softmax − onehot(target)) · scale with
// scale = 1 / (rows predicted), and zeroes rows not predicted.

#include "common.cuh"

__device__ float ce_block_max(float v) {
    __shared__ float part[32];
    __shared__ float total;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = part[0];
        for (int w = 1; w < (int)(blockDim.x >> 5); ++w) t = fmaxf(t, part[w]);
        total = t;
    }
    __syncthreads();
    return total;
}

extern "C" __global__ void cross_entropy_forward(const float* __restrict__ logits, int vocab,
                                                 const long long* __restrict__ targets, int rows,
                                                 float* __restrict__ lse, double* __restrict__ row_loss) {
    int r = blockIdx.x;
    if (r >= rows) return;
    long long t = targets[r];
    if (t < 0) {
        if (threadIdx.x == 0) row_loss[r] = 0.0;
        return;
    }
    const float* x = logits + (u64)r * vocab;
    float m = -__int_as_float(0x7f800000);
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) m = fmaxf(m, x[j]);
    m = ce_block_max(m);
    double s = 0.0;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) s += (double)expf(x[j] - m);
    s = block_sum_f64(s);
    if (threadIdx.x == 0) {
        double l = (double)m + log(s);
        lse[r] = (float)l;
        row_loss[r] = l - (double)x[t];
    }
}

extern "C" __global__ void cross_entropy_forward_grad(float* __restrict__ logits, int vocab,
                                                      const long long* __restrict__ targets, int rows,
                                                      double scale, float* __restrict__ lse,
                                                      double* __restrict__ row_loss) {
    int r = blockIdx.x;
    if (r >= rows) return;
    long long t = targets[r];
    float* x = logits + (u64)r * vocab;
    if (t < 0) {
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) x[j] = 0.0f;
        if (threadIdx.x == 0) row_loss[r] = 0.0;
        return;
    }
    float target_logit = x[t];  // read by every thread before any thread overwrites the row
    float m = -__int_as_float(0x7f800000);
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) m = fmaxf(m, x[j]);
    m = ce_block_max(m);  // its barriers order the reads of x[t] before the writes below
    double s = 0.0;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        float e = expf(x[j] - m);
        x[j] = e;
        s += (double)e;
    }
    s = block_sum_f64(s);
    float f = (float)(scale / s);
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) x[j] *= f;
    __syncthreads();
    if (threadIdx.x == 0) {
        x[t] -= (float)scale;
        double l = (double)m + log(s);
        lse[r] = (float)l;
        row_loss[r] = l - (double)target_logit;
    }
}
