// rbf.cu — RBF kernel matrices from linear Grams, in place: K_ij ← exp(−d²_ij/(2t²·m)),
// d²_ij = K_ii + K_jj − 2K_ij, m = the median of all n² d² entries of the layer (diagonal included; the
// mean of the two middle values when n² is even, as numpy.median). K: `layers` consecutive n × n f32.
//
// The median is found exactly by radix selection on the f32 bit patterns (mapped to unsigned keys that
// sort like the floats), three passes of 11/11/10 bits, for two ranks at once (the two middle values).
// rbf_copy_diag     grid (⌈n/256⌉, layers):            diag[y·n + i] = K_ii.
// rbf_sqdist        grid (⌈n²/256⌉, layers):           K ← d². Reads/writes n² f32.
// rbf_select_init   grid (1), threads ≥ 2·layers:      state (prefix, mask, rank) per (layer, rank).
// rbf_select_hist   grid (blocks, layers, 2), 256 thr: histogram of the next digit among keys matching
//                   the prefix; 2048 shared bins, flushed to hist[(y·2 + z)·2048 + bin]. Reads n² f32.
// rbf_select_step   grid (layers·2), 1 thread:         picks the digit holding the rank; clears hist.
// rbf_exp           grid (⌈n²/256⌉, layers):           K ← exp(−d²/(2t²m)). Reads/writes n² f32.
#include "common.cuh"

#define RBF_BINS 2048

__device__ __forceinline__ u32 float_key(float f) {
    const u32 u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key_float(u32 k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

extern "C" __global__ void rbf_copy_diag(const float* __restrict__ K, int n, float* __restrict__ diag) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) diag[(u64)blockIdx.y * n + i] = K[(u64)blockIdx.y * n * n + (u64)i * n + i];
}

extern "C" __global__ void rbf_sqdist(float* __restrict__ K, const float* __restrict__ diag, int n) {
    const u64 e = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u64 nn = (u64)n * n;
    if (e >= nn) return;
    const u64 i = e / n, j = e % n;
    const float* dg = diag + (u64)blockIdx.y * n;
    float* k = K + (u64)blockIdx.y * nn;
    k[e] = dg[i] + dg[j] - 2.0f * k[e];
}

// state[(y·2 + z)·4 + {0,1,2}] = prefix, mask, remaining rank; z = 0: the lower middle rank, z = 1: n²/2.
extern "C" __global__ void rbf_select_init(u32* __restrict__ state, int layers, u64 nn) {
    const int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= 2 * layers) return;
    const u64 hi = nn / 2, lo = (nn % 2 == 1) ? hi : hi - 1;
    state[s * 4 + 0] = 0u;
    state[s * 4 + 1] = 0u;
    state[s * 4 + 2] = (u32)((s & 1) ? hi : lo);
    state[s * 4 + 3] = 0u;
}

extern "C" __global__ void __launch_bounds__(256)
rbf_select_hist(const float* __restrict__ K, u64 nn, const u32* __restrict__ state,
                u32* __restrict__ hist, int shift, int bits) {
    __shared__ u32 bins[RBF_BINS];
    for (int b = threadIdx.x; b < RBF_BINS; b += blockDim.x) bins[b] = 0u;
    __syncthreads();
    const int s = blockIdx.y * 2 + blockIdx.z;
    const u32 prefix = state[s * 4 + 0], mask = state[s * 4 + 1], digit_mask = (1u << bits) - 1u;
    const float* k = K + (u64)blockIdx.y * nn;
    for (u64 e = (u64)blockIdx.x * blockDim.x + threadIdx.x; e < nn; e += (u64)gridDim.x * blockDim.x) {
        const u32 key = float_key(k[e]);
        if ((key & mask) == prefix) atomicAdd(&bins[(key >> shift) & digit_mask], 1u);
    }
    __syncthreads();
    u32* h = hist + (u64)s * RBF_BINS;
    for (int b = threadIdx.x; b < RBF_BINS; b += blockDim.x)
        if (bins[b]) atomicAdd(&h[b], bins[b]);
}

extern "C" __global__ void rbf_select_step(u32* __restrict__ state, u32* __restrict__ hist, int shift,
                                           int bits) {
    const int s = blockIdx.x;
    if (threadIdx.x != 0) return;
    u32* h = hist + (u64)s * RBF_BINS;
    const u32 rank = state[s * 4 + 2], nb = 1u << bits;
    u32 before = 0u, digit = nb - 1u;
    for (u32 b = 0; b < nb; ++b) {
        const u32 cnt = h[b];
        if (rank < before + cnt) {
            digit = b;
            break;
        }
        before += cnt;
    }
    for (u32 b = 0; b < RBF_BINS; ++b) h[b] = 0u;
    state[s * 4 + 0] |= digit << shift;
    state[s * 4 + 1] |= (nb - 1u) << shift;
    state[s * 4 + 2] = rank - before;
}

extern "C" __global__ void rbf_exp(float* __restrict__ K, u64 nn, const u32* __restrict__ state,
                                   double threshold) {
    const u64 e = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= nn) return;
    const int y = blockIdx.y;
    const double m = 0.5 * ((double)key_float(state[(y * 2) * 4]) +
                            (double)key_float(state[(y * 2 + 1) * 4]));
    const float scale = (float)(-1.0 / (2.0 * threshold * threshold * m));
    float* k = K + (u64)y * nn;
    k[e] = expf(k[e] * scale);
}
