// hsic_pairs.cu — all pairs of packed centred Grams: out[(row0+a)·ldo + col0+b] += Σ_p GA[a,p]·GB[b,p]
// for a < la, b < lb (rows of GA, GB have P = n(n+1)/2 f32 entries). The host scales by 2/normaliser.
//
// grid = (⌈P/chunk⌉, tiles), 256 threads. A block owns one 32×32 tile of (a, b) and one chunk of p
// (split-K, so even a few layers fill the GPU). Each 32-wide step of p is a f32 dot product per output,
// added into an f64 accumulator; the block's f64 partials go to `out` by f64 atomicAdd. `out` must be
// zeroed first. tri ≠ 0: GA == GB, only tiles with tile_b ≤ tile_a (the caller mirrors).
// Cost: la·lb·P multiply-adds (half with tri); reads (la + lb)·P f32 per tile row/column of tiles.
#include "common.cuh"

#define PT 32  // tile edge (pairs)
#define PK 32  // p per step

extern "C" __global__ void __launch_bounds__(256)
hsic_pairs(const float* __restrict__ GA, int la, const float* __restrict__ GB, int lb, u64 P,
           u64 chunk, double* __restrict__ out, int ldo, int row0, int col0, int tri) {
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
            if (a < la && b < lb) atomicAdd(&out[(u64)(row0 + a) * ldo + col0 + b], acc[r][q]);
        }
}
