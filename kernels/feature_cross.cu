// feature_cross.cu — the feature route on the GPU: C = ZᵀZ (D × D, f64) of one batch, Z = the batch's
// layers side by side (n × D row-major, f64: the host builds it as the CPU backend does, centred in f64 for
// the unbiased estimator). Only tiles on/below the diagonal are computed (the host mirrors them); f64 FMA,
// because C's entries are sums the feature route's formulas subtract from each other.
//
// cross_f64  grid (T(T+1)/2), T = ⌈D/64⌉, 256 threads: a 64×64 tile of C per block, 4×4 per thread,
//            8 rows of Z staged per step for both sides (coalesced: consecutive threads, consecutive
//            columns). Cost: n·D²/2 multiply-adds performed (of n·D²); reads n·D per tile row of tiles.
//            Writes every element of its tile (the host reads only j ≤ i).
#include "common.cuh"

#define CT 64  // tile edge
#define CK 8   // rows of Z per step

extern "C" __global__ void __launch_bounds__(256)
cross_f64(const double* __restrict__ Z, int n, int D, double* __restrict__ C) {
    int bi, bj;
    tri_tile(blockIdx.x, &bi, &bj);
    const int i0 = bi * CT, j0 = bj * CT;
    __shared__ double As[CK][CT];
    __shared__ double Bs[CK][CT];
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    double acc[4][4];
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] = 0.0;
    for (int r0 = 0; r0 < n; r0 += CK) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int idx = tid + e * 256, r = idx >> 6, c = idx & 63;
            const bool row_ok = r0 + r < n;
            As[r][c] = (row_ok && i0 + c < D) ? Z[(u64)(r0 + r) * D + i0 + c] : 0.0;
            Bs[r][c] = (row_ok && j0 + c < D) ? Z[(u64)(r0 + r) * D + j0 + c] : 0.0;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < CK; ++k) {
            double a[4], b[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                a[q] = As[k][ty * 4 + q];
                b[q] = Bs[k][tx * 4 + q];
            }
#pragma unroll
            for (int r = 0; r < 4; ++r)
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[r][c] = fma(a[r], b[c], acc[r][c]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const int i = i0 + ty * 4 + r, j = j0 + tx * 4 + c;
            if (i < D && j < D) C[(u64)i * D + j] = acc[r][c];
        }
}
