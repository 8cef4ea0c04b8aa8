// hsic_pairs.cu — all pairs of packed centred Grams: Σ_p GA[a,p]·GB[b,p] for a < la, b < lb (rows of GA,
// GB have P = n(n+1)/2 f32 entries), into entry (row0+a)·ldo + col0+b of an ldo × ldo result. The host
// scales by 2/normaliser.
//
// grid = (splits = ⌈P/chunk⌉, tiles), 256 threads. A block owns one 32×32 tile of (a, b) and one chunk of
// p (split-K, so even a few layers fill the GPU). Each 32-wide step of p is a f32 dot product per output,
// added into an f64 accumulator; split s stores its partials in plane s of `partial` (ldo² f64 each, plain
// stores: each (split, entry) has one writer), and hsic_reduce_splits adds the planes in split order.
// No atomics: the same input gives the same bits. `partial` must be zeroed first (planes and entries no
// launch writes add zeros). tri ≠ 0: GA == GB, only tiles with tile_b ≤ tile_a (the caller mirrors).
// Cost: la·lb·P multiply-adds (half with tri); reads (la + lb)·P f32 per tile row/column of tiles.
#include "common.cuh"

#define PT 32  // tile edge (pairs)
#define PK 32  // p per step

extern "C" __global__ void __launch_bounds__(256)
hsic_pairs(const float* __restrict__ GA, int la, const float* __restrict__ GB, int lb, u64 P,
           u64 chunk, double* __restrict__ partial, int ldo, int row0, int col0, int tri) {
    int ta, tb;
    if (tri) {
        tri_tile(blockIdx.y, &ta, &tb);
    } else {
        const int ntb = (lb + PT - 1) / PT;
        ta = blockIdx.y / ntb;
        tb = blockIdx.y % ntb;
    }
    const int a0 = ta * PT, b0 = tb * PT;
    const u64 p_begin = (u64)blockIdx.x * chunk;
    double* out = partial + (u64)blockIdx.x * (u64)ldo * (u64)ldo;
    const u64 p_end = min(P, p_begin + chunk);
    __shared__ float As[PT][PK + 1];
    __shared__ float Bs[PT][PK + 1];
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    double acc[2][2] = {{0.0, 0.0}, {0.0, 0.0}};
    for (u64 p0 = p_begin; p0 < p_end; p0 += PK) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int idx = tid + e * 256, r = idx >> 5, k = idx & 31;
            const u64 p = p0 + k;
            As[r][k] = (a0 + r < la && p < p_end) ? GA[(u64)(a0 + r) * P + p] : 0.0f;
            Bs[r][k] = (b0 + r < lb && p < p_end) ? GB[(u64)(b0 + r) * P + p] : 0.0f;
        }
        __syncthreads();
        float s[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
#pragma unroll
        for (int k = 0; k < PK; ++k) {
            const float x0 = As[ty * 2][k], x1 = As[ty * 2 + 1][k];
            const float y0 = Bs[tx * 2][k], y1 = Bs[tx * 2 + 1][k];
            s[0][0] = fmaf(x0, y0, s[0][0]);
            s[0][1] = fmaf(x0, y1, s[0][1]);
            s[1][0] = fmaf(x1, y0, s[1][0]);
            s[1][1] = fmaf(x1, y1, s[1][1]);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
            for (int q = 0; q < 2; ++q) acc[r][q] += (double)s[r][q];
        __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int q = 0; q < 2; ++q) {
            const int a = a0 + ty * 2 + r, b = b0 + tx * 2 + q;
            if (a < la && b < lb) out[(u64)(row0 + a) * ldo + col0 + b] = acc[r][q];
        }
}

// hsic_reduce_splits — out[t] = Σ_{s < splits} partial[s·l² + t], s in order (deterministic). grid ⌈l²/256⌉.
extern "C" __global__ void __launch_bounds__(256)
hsic_reduce_splits(const double* __restrict__ partial, int splits, int l, double* __restrict__ out) {
    const u64 ll = (u64)l * (u64)l;
    const u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= ll) return;
    double s = 0.0;
    for (int k = 0; k < splits; ++k) s += partial[(u64)k * ll + t];
    out[t] = s;
}

// hsic_accumulate — the streamed sum over batches, kept on the device (Backend::submit): sum[i·l + j] +=
// scale · out[max(i, j)·l + min(i, j)] for all i, j < l, i.e. the lower triangle hsic_pairs filled,
// mirrored, times the batch's 2/normaliser. One add per element per batch, in batch order: the same
// input gives the same bits. grid ⌈l²/256⌉, 256 threads.
extern "C" __global__ void __launch_bounds__(256)
hsic_accumulate(const double* __restrict__ out, int l, double scale, double* __restrict__ sum) {
    const u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (u64)l * (u64)l) return;
    const int i = (int)(t / (u64)l), j = (int)(t % (u64)l);
    const int a = max(i, j), b = min(i, j);
    sum[t] += scale * out[(u64)a * l + b];
}
