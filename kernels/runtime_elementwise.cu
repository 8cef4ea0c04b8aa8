// runtime_elementwise.cu — the runtime's elementwise ops (SiLU, the logistic sigmoid, ReLU, ReLU², GELU
// exact and tanh-approximated, xIELU with its two learned parameters, soft-capping, a constant factor, clamping, multiply, add, accumulate, the
// column-block gather of GPT-NeoX's fused q/k/v, rows scaled by one value each) and the sum of squares of a gradient,
// forward and backward side by side. Buffers are flat f32 of `n` elements; every kernel but
// row_scale_backward (one block per row) is a grid-stride loop (any grid covers any n). Backwards
// accumulate (+=), as on the CPU (src/runtime/ops/cpu.rs).

#include "common.cuh"

__device__ __forceinline__ float rt_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// y = x σ(x)
extern "C" __global__ void silu_forward(const float* __restrict__ x, float* __restrict__ y, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float v = x[i];
        y[i] = v * rt_sigmoid(v);
    }
}

// dx += dy σ(x) (1 + x (1 − σ(x)))
extern "C" __global__ void silu_backward(const float* __restrict__ x, const float* __restrict__ dy,
                                         float* __restrict__ dx, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float v = x[i];
        float s = rt_sigmoid(v);
        dx[i] += dy[i] * s * (1.0f + v * (1.0f - s));
    }
}

// y = σ(x) (Qwen2-MoE's shared-expert gate)
extern "C" __global__ void sigmoid_forward(const float* __restrict__ x, float* __restrict__ y, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        y[i] = rt_sigmoid(x[i]);
}

// dx += dy σ(x) (1 − σ(x))
extern "C" __global__ void sigmoid_backward(const float* __restrict__ x, const float* __restrict__ dy,
                                            float* __restrict__ dx, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float s = rt_sigmoid(x[i]);
        dx[i] += dy[i] * s * (1.0f - s);
    }
}

// y = max(x, 0) (OPT's MLP; NaN stays NaN, as in PyTorch)
extern "C" __global__ void relu_forward(const float* __restrict__ x, float* __restrict__ y, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float v = x[i];
        y[i] = v < 0.0f ? 0.0f : v;
    }
}

// dx += dy where x > 0 (the slope at 0 is 0, as in PyTorch)
extern "C" __global__ void relu_backward(const float* __restrict__ x, const float* __restrict__ dy,
                                         float* __restrict__ dx, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        if (x[i] > 0.0f) dx[i] += dy[i];
}

// y = max(x, 0)² (Arcee's MLP, transformers' "relu2")
extern "C" __global__ void relu2_forward(const float* __restrict__ x, float* __restrict__ y, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float r = x[i] < 0.0f ? 0.0f : x[i];
        y[i] = r * r;
    }
}

// dx += 2 max(x, 0) dy
extern "C" __global__ void relu2_backward(const float* __restrict__ x, const float* __restrict__ dy,
                                          float* __restrict__ dx, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        if (x[i] > 0.0f) dx[i] += 2.0f * x[i] * dy[i];
}

// GELU, tanh approximation (PyTorch's approximate="tanh", Gemma's GeGLU): x/2 (1 + tanh u),
// u = √(2/π) (x + 0.044715 x³), computed as x σ(2u) (the same value, no cancellation near 0).
#define GELU_K 0.7978846f
#define GELU_C 0.044715f

// y = x σ(2u)
extern "C" __global__ void gelu_tanh_forward(const float* __restrict__ x, float* __restrict__ y, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float v = x[i];
        y[i] = v * rt_sigmoid(2.0f * GELU_K * (v + GELU_C * v * v * v));
    }
}

// dx += dy (s + x s (1 − s) 2u'), s = σ(2u), u' = √(2/π) (1 + 3 · 0.044715 x²)
extern "C" __global__ void gelu_tanh_backward(const float* __restrict__ x, const float* __restrict__ dy,
                                              float* __restrict__ dx, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float v = x[i];
        float s = rt_sigmoid(2.0f * GELU_K * (v + GELU_C * v * v * v));
        float du = GELU_K * (1.0f + 3.0f * GELU_C * v * v);
        dx[i] += dy[i] * (s + v * s * (1.0f - s) * 2.0f * du);
    }
}

// GELU, exact (PyTorch's gelu, GPT-NeoX's MLP): x Φ(x) = x/2 (1 + erf(x / √2)).
extern "C" __global__ void gelu_forward(const float* __restrict__ x, float* __restrict__ y, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float v = x[i];
        y[i] = 0.5f * v * (1.0f + erff(v * 0.70710678f));
    }
}

// dx += dy (Φ(x) + x φ(x)), φ(x) = e^(−x²/2) / √(2π)
extern "C" __global__ void gelu_backward(const float* __restrict__ x, const float* __restrict__ dy,
                                         float* __restrict__ dx, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float v = x[i];
        float cdf = 0.5f * (1.0f + erff(v * 0.70710678f));
        float pdf = 0.39894228f * expf(-0.5f * v * v);
        dx[i] += dy[i] * (cdf + v * pdf);
    }
}

// y = c · tanh(x / c) (Gemma 2's final_logit_softcapping)
extern "C" __global__ void softcap_forward(const float* __restrict__ x, float* __restrict__ y, u64 n, float c) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        y[i] = tanh_cap<false>(x[i], c);
}

// dx += dy (1 − tanh²(x / c))
extern "C" __global__ void softcap_backward(const float* __restrict__ x, const float* __restrict__ dy,
                                            float* __restrict__ dx, u64 n, float c) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float slope;
        tanh_cap_slope<false>(x[i], c, &slope);
        dx[i] += dy[i] * slope;
    }
}

// y = s · x (Granite's residual_multiplier and logits_scaling)
extern "C" __global__ void scale_forward(const float* __restrict__ x, float* __restrict__ y, u64 n, float s) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        y[i] = s * x[i];
}

// dx += s · dy (x unread: the signature is softcap_backward's)
extern "C" __global__ void scale_backward(const float* __restrict__ x, const float* __restrict__ dy,
                                          float* __restrict__ dx, u64 n, float s) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        dx[i] += s * dy[i];
}
// y = clamp(x, −c, c) (OLMo's clip_qkv)
extern "C" __global__ void clamp_forward(const float* __restrict__ x, float* __restrict__ y, u64 n, float c) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        y[i] = fminf(fmaxf(x[i], -c), c);
}

// dx += dy where |x| ≤ c (PyTorch's clamp passes the gradient at the bounds)
extern "C" __global__ void clamp_backward(const float* __restrict__ x, const float* __restrict__ dy,
                                          float* __restrict__ dx, u64 n, float c) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        if (fabsf(x[i]) <= c) dx[i] += dy[i];
}

// y = clamp(x, −c, c) + 1 (GPT-OSS's expert up projection; its backward is clamp_backward)
extern "C" __global__ void clamp_plus_one_forward(const float* __restrict__ x, float* __restrict__ y, u64 n,
                                                  float c) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        y[i] = fminf(fmaxf(x[i], -c), c) + 1.0f;
}

// y = m σ(alpha m), m = min(x, limit) (GPT-OSS's expert gate)
extern "C" __global__ void oss_gate_forward(const float* __restrict__ x, float* __restrict__ y, u64 n,
                                            float alpha, float limit) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float m = fminf(x[i], limit);
        y[i] = m / (1.0f + expf(-alpha * m));
    }
}

// dx += dy σ(αx) (1 + αx (1 − σ(αx))) where x ≤ limit (PyTorch's clamp passes the gradient at the bound)
extern "C" __global__ void oss_gate_backward(const float* __restrict__ x, const float* __restrict__ dy,
                                             float* __restrict__ dx, u64 n, float alpha, float limit) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float v = x[i];
        if (v <= limit) {
            float s = 1.0f / (1.0f + expf(-alpha * v));
            dx[i] += dy[i] * s * (1.0f + alpha * v * (1.0f - s));
        }
    }
}

// xIELU (Apertus): y = αp x² + β x for x > 0, else αn (expm1(min(x, eps)) − x) + β x, with αp = softplus(ap[0])
// and αn = β + softplus(an[0]) from the layer's two raw parameters (one value each, on the device).
__device__ __forceinline__ float rt_softplus(float v) { return v > 20.0f ? v : log1pf(expf(v)); }

extern "C" __global__ void xielu_forward(const float* __restrict__ x, const float* __restrict__ ap,
                                         const float* __restrict__ an, float* __restrict__ y, u64 n, float beta,
                                         float eps) {
    float alpha_p = rt_softplus(ap[0]), alpha_n = beta + rt_softplus(an[0]);
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float v = x[i];
        y[i] = v > 0.0f ? alpha_p * v * v + beta * v : alpha_n * (expm1f(fminf(v, eps)) - v) + beta * v;
    }
}

// dx += y'(x) dy; per block, the sums over its elements of dy x² (x > 0) and dy (expm1(min(x, eps)) − x)
// (x ≤ 0) into partials[2 b], partials[2 b + 1]: xielu_reduce_params adds them in order.
extern "C" __global__ void xielu_backward(const float* __restrict__ x, const float* __restrict__ ap,
                                          const float* __restrict__ an, const float* __restrict__ dy,
                                          float* __restrict__ dx, u64 n, float beta, float eps,
                                          double* __restrict__ partials) {
    float alpha_p = rt_softplus(ap[0]), alpha_n = beta + rt_softplus(an[0]);
    double sp = 0.0, sn = 0.0;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float v = x[i], g = dy[i];
        if (v > 0.0f) {
            dx[i] += g * (2.0f * alpha_p * v + beta);
            sp += (double)g * v * v;
        } else {
            float m = fminf(v, eps);
            dx[i] += g * (alpha_n * ((v < eps ? expf(m) : 0.0f) - 1.0f) + beta);
            sn += (double)g * ((double)expm1f(m) - v);
        }
    }
    sp = block_sum_f64(sp);
    sn = block_sum_f64(sn);
    if (threadIdx.x == 0) {
        partials[2 * blockIdx.x] = sp;
        partials[2 * blockIdx.x + 1] = sn;
    }
}

// dap[0] += σ(ap[0]) Σ_b partials[2 b], dan[0] += σ(an[0]) Σ_b partials[2 b + 1] (softplus' = σ); one thread.
extern "C" __global__ void xielu_reduce_params(const double* __restrict__ partials, int blocks,
                                               const float* __restrict__ ap, const float* __restrict__ an,
                                               float* __restrict__ dap, float* __restrict__ dan) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    double sp = 0.0, sn = 0.0;
    for (int b = 0; b < blocks; ++b) {
        sp += partials[2 * b];
        sn += partials[2 * b + 1];
    }
    dap[0] += (float)(sp * (double)rt_sigmoid(ap[0]));
    dan[0] += (float)(sn * (double)rt_sigmoid(an[0]));
}

// y = a ⊙ b
extern "C" __global__ void mul_forward(const float* __restrict__ a, const float* __restrict__ b,
                                       float* __restrict__ y, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        y[i] = a[i] * b[i];
}

// da += dy ⊙ b, db += dy ⊙ a
extern "C" __global__ void mul_backward(const float* __restrict__ a, const float* __restrict__ b,
                                        const float* __restrict__ dy, float* __restrict__ da,
                                        float* __restrict__ db, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float g = dy[i];
        da[i] += g * b[i];
        db[i] += g * a[i];
    }
}

// y = a + b (the residual connections; its backward is `accumulate` into each input's gradient)
extern "C" __global__ void add_forward(const float* __restrict__ a, const float* __restrict__ b,
                                       float* __restrict__ y, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        y[i] = a[i] + b[i];
}

// dst += src
extern "C" __global__ void accumulate(float* __restrict__ dst, const float* __restrict__ src, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        dst[i] += src[i];
}

// Σ g² in f64: one partial per block (blockDim.x = 256), summed in block order by the host, so the same
// input gives the same bits.
extern "C" __global__ void sum_sq_partials(const float* __restrict__ g, u64 n, double* __restrict__ partials) {
    __shared__ double warp_sums[8];
    double s = 0.0;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        double v = (double)g[i];
        s += v * v;
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_sums[warp] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) t += warp_sums[w];
        partials[blockIdx.x] = t;
    }
}

// Column blocks: y[r, g·block + i] = x[r, g·stride + offset + i], rows of `width` = groups · stride in x;
// one thread per value of y (consecutive threads, consecutive columns of a block: coalesced).
extern "C" __global__ void column_blocks_forward(const float* __restrict__ x, float* __restrict__ y, u64 rows,
                                                 int width, int block, int stride, int offset) {
    u64 out_w = (u64)(width / stride) * block, n = rows * out_w;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        u64 r = i / out_w, c = i % out_w;
        y[i] = x[r * width + (c / block) * stride + offset + c % block];
    }
}

// The scatter back: dx[r, g·stride + offset + i] += dy[r, g·block + i] (each dx value from one thread).
extern "C" __global__ void column_blocks_backward(const float* __restrict__ dy, float* __restrict__ dx,
                                                  u64 rows, int width, int block, int stride, int offset) {
    u64 out_w = (u64)(width / stride) * block, n = rows * out_w;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        u64 r = i / out_w, c = i % out_w;
        dx[r * width + (c / block) * stride + offset + c % block] += dy[i];
    }
}

// Rows of d values scaled by one value each (a mixture-of-experts expert's output by its routing weight):
// y[r, j] = s[r] · x[r, j], n = rows · d.
extern "C" __global__ void row_scale_forward(const float* __restrict__ x, const float* __restrict__ s,
                                             float* __restrict__ y, u64 d, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        y[i] = s[i / d] * x[i];
}

// dx[r] += s[r] · dy[r], ds[r] += Σ_j dy[r, j] x[r, j]: one block per row (blockDim.x a multiple of 32),
// the dot product summed in f64 (as the CPU twin).
extern "C" __global__ void row_scale_backward(const float* __restrict__ x, const float* __restrict__ s,
                                              const float* __restrict__ dy, float* __restrict__ dx,
                                              float* __restrict__ ds, int d, int rows) {
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (u64)r * d;
    const float* gr = dy + (u64)r * d;
    float* dxr = dx + (u64)r * d;
    const float f = s[r];
    double dot = 0.0;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float g = gr[j];
        dxr[j] += f * g;
        dot += (double)g * (double)xr[j];
    }
    dot = block_sum_f64(dot);
    if (threadIdx.x == 0) ds[r] += (float)dot;
}
