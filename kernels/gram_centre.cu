// gram_centre.cu — centring of the Gram matrices of one launch of layers, and packing into rows of G.
// Both estimators reduce to K̃_ij = K_ij − c_i − c_j (then a diagonal rule):
//   biased  (double centring HKH): c_i = rowmean_i − grandmean/2;
//   unbiased (U-centring, Song et al. 2012): with the diagonal zeroed, m_i = rowsum_i/(n−2),
//            c_i = m_i − Σm/(2(n−1)); the centred diagonal is zero.
// G row p-layout: the lower triangle row by row (element (i, j ≤ i) at i(i+1)/2 + j), the diagonal
// scaled by 1/√2, so ⟨K̃_l, K̃_m⟩ = 2·⟨G_l, G_m⟩ (the all-pairs product then works on n(n+1)/2 columns).
//
// Layout: K is `layers` consecutive n × n f32 matrices (layer y at y·n²).
// gram_row_sums   grid (⌈n/8⌉, layers), 256 threads: one warp per row, f64 sums. Reads n² f32.
// centre_offsets  grid (layers), 256 threads: c_i from the row sums (f64).            Reads/writes n f64.
// centre_pack     grid (⌈P/256⌉, layers), 256 threads, P = n(n+1)/2. Reads P f32 + 2P f64 (cached),
//                 writes P f32 into G + (g_row0 + y)·P; scales a linear Gram back by 2^(−2e) when its
//                 layer was rewritten as scaled f16 (`col_scale`, centre_columns.cu; not for RBF).
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256)
gram_row_sums(const float* __restrict__ K, int n, int zero_diag, double* __restrict__ rowsum) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int i = blockIdx.x * 8 + warp;
    if (i >= n) return;
    const float* row = K + (u64)blockIdx.y * n * n + (u64)i * n;
    double s = 0.0;
    for (int j = lane; j < n; j += 32)
        if (!(zero_diag && j == i)) s += (double)row[j];
    s = warp_sum_f64(s);
    if (lane == 0) rowsum[(u64)blockIdx.y * n + i] = s;
}

extern "C" __global__ void __launch_bounds__(256)
centre_offsets(const double* __restrict__ rowsum, int n, int unbiased, double* __restrict__ c) {
    __shared__ double part[8];
    const double* r = rowsum + (u64)blockIdx.x * n;
    double* co = c + (u64)blockIdx.x * n;
    const double dn = (double)n;
    // Unbiased: m_i = r_i/(n−2); biased: mean_i = r_i/n.
    const double scale = unbiased ? 1.0 / (dn - 2.0) : 1.0 / dn;
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += r[i] * scale;
    s = warp_sum_f64(s);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = s;
    __syncthreads();
    double total = 0.0;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total += part[w];
    // Unbiased: shift Σm/(2(n−1)); biased: grandmean/2 = (Σ mean_i / n)/2.
    const double shift = unbiased ? total / (2.0 * (dn - 1.0)) : 0.5 * total / dn;
    for (int i = threadIdx.x; i < n; i += blockDim.x) co[i] = r[i] * scale - shift;
}

extern "C" __global__ void __launch_bounds__(256)
centre_pack(const float* __restrict__ K, const double* __restrict__ c, int n, int unbiased,
            const u32* __restrict__ col_scale, int unscale, float* __restrict__ G, u64 g_row0, u64 P) {
    const u64 p = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= P) return;
    // Row i of the packed lower triangle: i(i+1)/2 ≤ p < (i+1)(i+2)/2.
    u64 i = (u64)((sqrt(8.0 * (double)p + 1.0) - 1.0) * 0.5);
    while (i * (i + 1) / 2 > p) --i;
    while ((i + 1) * (i + 2) / 2 <= p) ++i;
    const u64 j = p - i * (i + 1) / 2;
    const u64 y = blockIdx.y;
    const double* cy = c + y * n;
    double v = (double)K[y * n * n + i * n + j] - cy[i] - cy[j];
    if (i == j) v = unbiased ? 0.0 : v * 0.70710678118654752440;
    // Undo column_to_f16's 2^e on both factors of a linear Gram (e = 0 for f32/f64 layers; `unscale` = 0
    // for RBF, whose kernel matrix does not depend on the scale).
    if (unscale) v = ldexp(v, -2 * (int)col_scale[2 * y + 1]);
    G[(g_row0 + y) * P + p] = (float)v;
}
