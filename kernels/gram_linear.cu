// gram_linear.cu — linear Gram matrices K_l = X_l X_lᵀ (n × n, f32) of one batch for every layer of a
// launch, layers of different widths and dtypes side by side (a per-launch LayerDesc table; grid.y picks
// the layer). Only tiles on/below the diagonal are computed; each off-diagonal tile is also written
// mirrored, so K is full and symmetric afterwards.
//
// gram_fma  (f32 / f64 inputs): 64×64 tiles, 256 threads, 4×4 outputs per thread, f32 FMA; inputs are
//           converted to f32 as they are staged in shared memory.
// gram_mma  (f16 / bf16 inputs): 128×128 tiles, 256 threads = 8 warps (4 along rows × 2 along cols),
//           warp tile 32×64, tensor cores via `mma.sync.m16n8k16` (16-bit operands, f32 accumulate).
//           `as_f16`: read every layer as f16 whatever its table says (after column_to_f16 rewrote
//           them, see centre_columns.cu).
// Candidates for the 16-bit Grams, each described where it is defined: gram_mma_pipelined (cp.async,
// ldmatrix), gram_wgmma and gram_wgmma_tma (Hopper's warpgroup MMA, stages filled by cp.async or TMA).
//
// grid = (T(T+1)/2, layers, splits), T = ⌈n / tile⌉; output K + desc.out_off, row-major n × n.
// Cost per layer: n²·d multiply-adds over the lower triangle (n²·d·2 FLOPs for the full product, about
// half computed); reads n·d inputs per tile row (re-read T times, from L2), writes n² f32.
//
// Split-K (grid.z = splits > 1, when a launch has too few tiles to fill the GPU: a few wide layers of a
// small batch): split z sums features [z·kc, (z+1)·kc) of each layer, kc = split_depth(d, splits), and
// writes plane z, at K + desc.out_off + z·plane. gram_reduce_splits then adds planes 1.. into plane 0 in
// order: no atomics, so the same shape on the same GPU gives the same bits.
#include "wgmma.cuh"

// Features per split: ⌈d / splits⌉ rounded up to 64 (a whole number of every kernel's steps, FK, MK and
// WK, so only the last split's last step reaches d: the `< d` bounds of the staging, and a TMA box's
// zero fill past d, stay exact).
__device__ __forceinline__ int split_depth(int d, int splits) { return ((d + splits - 1) / splits + 63) & ~63; }

// The feature range [*k0, *k1) of split blockIdx.z of a d-wide layer (empty when d is narrow).
__device__ __forceinline__ void split_range(int d, int* k0, int* k1) {
    const int kc = split_depth(d, gridDim.z);
    *k0 = min(d, (int)blockIdx.z * kc);
    *k1 = min(d, *k0 + kc);
}

// ---------------------------------------------------------------- f32 / f64 inputs: FMA path
#define FM 64
#define FK 16

extern "C" __global__ void __launch_bounds__(256)
gram_fma(const unsigned char* __restrict__ in, const LayerDesc* __restrict__ layers, int n, u64 plane,
         float* __restrict__ K) {
    const LayerDesc L = layers[blockIdx.y];
    const unsigned char* x = in + L.in_off;
    const int d = L.cols, dt = L.dtype;
    int kb, ke;
    split_range(d, &kb, &ke);
    int bi, bj;
    tri_tile(blockIdx.x, &bi, &bj);
    const int i0 = bi * FM, j0 = bj * FM;
    __shared__ __align__(16) float As[FK][FM + 4];
    __shared__ __align__(16) float Bs[FK][FM + 4];
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    float acc[4][4];
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] = 0.0f;

    for (int k0 = kb; k0 < ke; k0 += FK) {
        // Stage 64 rows × 16 features of each side, transposed (feature-major), as f32.
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int idx = tid + e * 256, r = idx >> 4, c = idx & 15;
            const int gk = k0 + c, gi = i0 + r, gj = j0 + r;
            As[c][r] = (gi < n && gk < d) ? load_as_f32(x, dt, (u64)gi * d + gk) : 0.0f;
            Bs[c][r] = (gj < n && gk < d) ? load_as_f32(x, dt, (u64)gj * d + gk) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < FK; ++k) {
            const float4 a = *(const float4*)&As[k][ty * 4];
            const float4 b = *(const float4*)&Bs[k][tx * 4];
            const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
            for (int r = 0; r < 4; ++r)
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[r][c] = fmaf(av[r], bv[c], acc[r][c]);
        }
        __syncthreads();
    }
    float* k_out = K + L.out_off + blockIdx.z * plane;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int gi = i0 + ty * 4 + r;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const int gj = j0 + tx * 4 + c;
            if (gi < n && gj < n) {
                k_out[(u64)gi * n + gj] = acc[r][c];
                if (bi != bj) k_out[(u64)gj * n + gi] = acc[r][c];
            }
        }
    }
}

// ---------------------------------------------------------------- f16 / bf16 inputs: tensor cores
// Stage rows [r0, r0+128) × features [k0, k0+32) of x (16-bit elements) into S, zero outside.
// `vec`: rows start 16-byte aligned and d % 8 == 0, so 8 features move as one 16-byte load.
__device__ __forceinline__ void stage_rows_u16(u16 (*S)[MK + MPAD], const u16* __restrict__ x, int n,
                                               int d, int r0, int k0, bool vec, int tid) {
    if (vec) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int q = tid + e * 256, r = q >> 2, c = (q & 3) * 8;
            const int gr = r0 + r, gk = k0 + c;
            uint4 v = make_uint4(0u, 0u, 0u, 0u);
            if (gr < n && gk < d) v = *(const uint4*)(x + (u64)gr * d + gk);
            *(uint4*)&S[r][c] = v;
        }
    } else {
#pragma unroll 4
        for (int e = 0; e < 16; ++e) {
            const int idx = tid + e * 256, r = idx >> 5, c = idx & 31;
            const int gr = r0 + r, gk = k0 + c;
            S[r][c] = (gr < n && gk < d) ? x[(u64)gr * d + gk] : (u16)0;
        }
    }
}

// Store a warp's 32×64 accumulators (m16n8 layout: c0,c1 at (g, 2t..2t+1), c2,c3 at (g+8, 2t..2t+1)) into
// the n × n Gram at tile (bi, bj), mirrored below the diagonal tile: the epilogue of both mma kernels.
__device__ __forceinline__ void store_mma_tile(float (*acc)[8][4], int n, int bi, int bj, int wm, int wn,
                                               int g, int t, float* __restrict__ k_out) {
    const int i0 = bi * MM, j0 = bj * MM;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int h = 0; h < 4; ++h) {
                const int gi = i0 + mma_acc_row(wm, mt, g, h), gj = j0 + mma_acc_col(wn, nt, t, h);
                if (gi < n && gj < n) {
                    k_out[(u64)gi * n + gj] = acc[mt][nt][h];
                    if (bi != bj) k_out[(u64)gj * n + gi] = acc[mt][nt][h];
                }
            }
}

// Features [kb, ke) of tile (bi, bj); kb a multiple of MK, ke = d or a multiple of MK (split_range).
template <int DT>
__device__ void gram_mma_tile(const u16* __restrict__ x, int n, int d, int kb, int ke, int bi, int bj,
                              bool vec, u16 (*As)[MK + MPAD], u16 (*Bs)[MK + MPAD],
                              float* __restrict__ k_out) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp & 3, wn = warp >> 2;  // warp tile: rows wm*32.., cols wn*64..
    const int g = lane >> 2, t = lane & 3;
    const int i0 = bi * MM, j0 = bj * MM;
    float acc[2][8][4];
    zero_acc(acc);
    for (int k0 = kb; k0 < ke; k0 += MK) {
        stage_rows_u16(As, x, n, d, i0, k0, vec, tid);
        stage_rows_u16(Bs, x, n, d, j0, k0, vec, tid);
        __syncthreads();
        mma_warp_step<DT>(As, Bs, acc, wm, wn, g, t);
        __syncthreads();
    }
    store_mma_tile(acc, n, bi, bj, wm, wn, g, t, k_out);
}

// What a block of a 16-bit Gram launch works on (every tensor-core kernel's start): its layer's rows x
// (d features each), its tile (bi, bj), this split's features [kb, ke) and its output plane; `vec`: rows
// 16-byte aligned with d % 8 == 0 (16-byte loads, cp.async, TMA); `bf`: the values are bf16.
struct GramBlock16 {
    const u16* x;
    int d, bi, bj, kb, ke;
    bool vec, bf;
    float* k_out;
};
__device__ __forceinline__ GramBlock16 gram_block16(const unsigned char* __restrict__ in,
                                                    const LayerDesc* __restrict__ layers, int as_f16,
                                                    u64 plane, float* __restrict__ K) {
    const LayerDesc L = layers[blockIdx.y];
    GramBlock16 b;
    b.x = (const u16*)(in + L.in_off);
    b.d = L.cols;
    tri_tile(blockIdx.x, &b.bi, &b.bj);
    split_range(L.cols, &b.kb, &b.ke);
    b.vec = (L.cols % 8 == 0) && (L.in_off % 16 == 0);
    b.bf = L.dtype == DT_BF16 && !as_f16;
    b.k_out = K + L.out_off + blockIdx.z * plane;
    return b;
}

// gram_mma_tile for the block, in its dtype (`vec`: whether to take the 16-byte loads).
__device__ __forceinline__ void gram_mma_tile_of(const GramBlock16& b, int n, bool vec, u16 (*As)[MK + MPAD],
                                                 u16 (*Bs)[MK + MPAD]) {
    if (b.bf)
        gram_mma_tile<DT_BF16>(b.x, n, b.d, b.kb, b.ke, b.bi, b.bj, vec, As, Bs, b.k_out);
    else
        gram_mma_tile<DT_F16>(b.x, n, b.d, b.kb, b.ke, b.bi, b.bj, vec, As, Bs, b.k_out);
}

extern "C" __global__ void __launch_bounds__(256)
gram_mma(const unsigned char* __restrict__ in, const LayerDesc* __restrict__ layers, int n,
         int as_f16, u64 plane, float* __restrict__ K) {
    __shared__ __align__(16) u16 As[MM][MK + MPAD];
    __shared__ __align__(16) u16 Bs[MM][MK + MPAD];
    const GramBlock16 b = gram_block16(in, layers, as_f16, plane, K);
    gram_mma_tile_of(b, n, b.vec, As, Bs);
}

// ---------------------------------------------------------------- gram_mma_pipelined (candidate)
// The same tiles, warps and mma as gram_mma, for layers whose rows are 16-byte aligned with d % 8 == 0
// (the `vec` case; others take gram_mma_tile): a 2-stage cp.async pipeline (the next 128×32 slices of
// both sides load into shared memory while the tensor cores work on the current ones; no staging through
// registers) and ldmatrix.x4 fragment loads (one instruction for a 16×16 A fragment or two 8-column B
// fragments, instead of four / two 32-bit LDS). Shared: 2 stages × 2 sides × 128 rows × 80 bytes = 40 KiB.
// Rows are 80 bytes apart, so the 8 row addresses of each 8×8 ldmatrix matrix fall in distinct 16-byte
// bank groups (0, 80, 160, ... mod 128): conflict-free. Index arithmetic emulated in
// src/similarity/cuda/emulate_kernels.py (`gram_mma_pipelined`). Never run on a GPU yet: the host uses it
// only when SGLP_GRAM_KERNEL=pipelined, until it is measured against gram_mma.

// Issue the cp.async of rows [r0, r0+128) × features [k0, k0+32) into S: 512 16-byte pieces, 2 a thread.
__device__ __forceinline__ void stage_rows_async(u16 (*S)[MK + MPAD], const u16* __restrict__ x, int n,
                                                 int d, int r0, int k0, int tid) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        const int q = tid + e * 256, r = q >> 2, c = (q & 3) * 8;
        const int gr = r0 + r, gk = k0 + c;
        const bool ok = gr < n && gk < d;  // d % 8 == 0: a piece is all in or all out
        cp_async_16(&S[r][c], ok ? (const void*)(x + (u64)gr * d + gk) : (const void*)x, ok ? 16 : 0);
    }
}

template <int DT>
__device__ void gram_mma_pipelined_tile(const u16* __restrict__ x, int n, int d, int kb, int ke, int bi,
                                        int bj, u16 (*As)[MM][MK + MPAD], u16 (*Bs)[MM][MK + MPAD],
                                        float* __restrict__ k_out) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp & 3, wn = warp >> 2;
    const int g = lane >> 2, t = lane & 3;
    const int i0 = bi * MM, j0 = bj * MM;
    float acc[2][8][4];
    zero_acc(acc);
    const int steps = (ke - kb + MK - 1) / MK;
    if (steps == 0) {  // a split past this layer's width: its plane gets zeros
        store_mma_tile(acc, n, bi, bj, wm, wn, g, t, k_out);
        return;
    }
    stage_rows_async(As[0], x, n, d, i0, kb, tid);
    stage_rows_async(Bs[0], x, n, d, j0, kb, tid);
    cp_async_commit();
    // ldmatrix lane addresses: A — row (lane & 15), feature half (lane >> 4); B — two 8-row (sample)
    // groups, row (lane & 7) + 8·(lane >> 4), feature half ((lane >> 3) & 1).
    const int a_row = lane & 15, a_col = (lane >> 4) * 8;
    const int b_row = (lane & 7) + ((lane >> 4) << 3), b_col = ((lane >> 3) & 1) * 8;
    for (int s = 0; s < steps; ++s) {
        const int cur = s & 1;
        if (s + 1 < steps) {
            stage_rows_async(As[cur ^ 1], x, n, d, i0, kb + (s + 1) * MK, tid);
            stage_rows_async(Bs[cur ^ 1], x, n, d, j0, kb + (s + 1) * MK, tid);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
#pragma unroll
        for (int ks = 0; ks < MK; ks += 16) {
            u32 a[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
                ldmatrix_x4(a[mt], &As[cur][wm * 32 + mt * 16 + a_row][ks + a_col]);
#pragma unroll
            for (int np = 0; np < 4; ++np) {
                u32 b[4];  // b0, b1 of column tile 2·np, then of 2·np + 1
                ldmatrix_x4(b, &Bs[cur][wn * 64 + np * 16 + b_row][ks + b_col]);
#pragma unroll
                for (int mt = 0; mt < 2; ++mt) {
                    mma_16816<DT>(acc[mt][2 * np], a[mt], b[0], b[1]);
                    mma_16816<DT>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
                }
            }
        }
        __syncthreads();  // everyone is done with `cur` before step s + 2 refills it
    }
    store_mma_tile(acc, n, bi, bj, wm, wn, g, t, k_out);
}

extern "C" __global__ void __launch_bounds__(256)
gram_mma_pipelined(const unsigned char* __restrict__ in, const LayerDesc* __restrict__ layers, int n,
                   int as_f16, u64 plane, float* __restrict__ K) {
    __shared__ __align__(16) u16 As[2][MM][MK + MPAD];
    __shared__ __align__(16) u16 Bs[2][MM][MK + MPAD];
    const GramBlock16 b = gram_block16(in, layers, as_f16, plane, K);
    if (!b.vec)  // unaligned rows: gram_mma's register-staged path, on the first stage's buffers
        gram_mma_tile_of(b, n, false, As[0], Bs[0]);
    else if (b.bf)
        gram_mma_pipelined_tile<DT_BF16>(b.x, n, b.d, b.kb, b.ke, b.bi, b.bj, As, Bs, b.k_out);
    else
        gram_mma_pipelined_tile<DT_F16>(b.x, n, b.d, b.kb, b.ke, b.bi, b.bj, As, Bs, b.k_out);
}

// ---------------------------------------------------------------- gram_wgmma, gram_wgmma_tma (Hopper)
// Candidates: sm_90a's warpgroup MMA on the same 128 × 128 tiles (wgmma.cuh: 2 warpgroups, 64-feature
// steps through 4 swizzled stages in dynamic shared memory). The two differ in who fills a stage:
// gram_wgmma every thread's cp.async (CpAsyncStages, A = B = the layer's rows), gram_wgmma_tma one
// thread's TMA copies through the layer's tensor map (TmaStages). A diagonal tile (bi = bj) loads one
// side and points both descriptors at it. Rows must be 16-byte aligned with d % 8 == 0 (the `vec` case,
// which a tensor map needs too); other layers take gram_mma_tile on the same shared memory. Never run on
// a GPU yet: SGLP_GRAM_KERNEL=wgmma or =wgmma_tma.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(SGLP_HOST_EMULATION)
template <int DT, class Stages>
__device__ void gram_wgmma_tile(const Stages& stages, const WgmmaTile& tile, int n, float* __restrict__ k_out) {
    const int tid = threadIdx.x;
    float acc[64];
    wgmma_tile_product<DT>(stages, tile, acc);
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
        for (int h = 0; h < 4; ++h) {
            const int gi = tile.i0 + wgmma_acc_row(tid, h), gj = tile.j0 + wgmma_acc_col(tid, j, h);
            if (gi < n && gj < n) {
                k_out[(u64)gi * n + gj] = acc[4 * j + h];
                if (!tile.diag) k_out[(u64)gj * n + gi] = acc[4 * j + h];
            }
        }
}

// The body of both kernels: `maps` (the launch's tensor maps, 128 bytes a layer) selects TMA stages.
__device__ __forceinline__ void gram_wgmma_body(const unsigned char* __restrict__ in,
                                                const LayerDesc* __restrict__ layers, int n, int as_f16,
                                                u64 plane, const unsigned char* maps, float* __restrict__ K) {
    unsigned char* smem = wgmma_smem();
    const GramBlock16 b = gram_block16(in, layers, as_f16, plane, K);
    if (!b.vec) {
        // Unaligned rows: gram_mma's register-staged path, its two tiles in this shared memory.
        u16(*As)[MK + MPAD] = (u16(*)[MK + MPAD])smem;
        u16(*Bs)[MK + MPAD] = (u16(*)[MK + MPAD])(smem + MM * (MK + MPAD) * 2);
        gram_mma_tile_of(b, n, false, As, Bs);
        return;
    }
    const WgmmaTile tile{smem, b.kb, b.ke, b.bi * MM, b.bj * MM, (b.ke - b.kb + WK - 1) / WK, b.bi == b.bj};
    if (maps) {
        const TmaStages st{maps + (u64)blockIdx.y * 128, (u64*)(smem + WSTAGES * W_STAGE_BYTES)};
        if (b.bf)
            gram_wgmma_tile<DT_BF16>(st, tile, n, b.k_out);
        else
            gram_wgmma_tile<DT_F16>(st, tile, n, b.k_out);
    } else {
        const CpAsyncStages st{b.x, (u64)b.d, n, b.x, (u64)b.d, n};
        if (b.bf)
            gram_wgmma_tile<DT_BF16>(st, tile, n, b.k_out);
        else
            gram_wgmma_tile<DT_F16>(st, tile, n, b.k_out);
    }
}
#endif

extern "C" __global__ void __launch_bounds__(256, 1)
gram_wgmma(const unsigned char* __restrict__ in, const LayerDesc* __restrict__ layers, int n, int as_f16,
           u64 plane, float* __restrict__ K) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(SGLP_HOST_EMULATION)
    gram_wgmma_body(in, layers, n, as_f16, plane, nullptr, K);
#else
    __trap();  // sm_90a only: the host launches it on no other device
#endif
}

// `maps`: per layer of the launch, its CUtensorMap (128 bytes, 64-aligned; encoded by the host for the
// 16-bit aligned layers: dims {d, n}, box {64, 128}, 128-byte swizzle, zero fill).
extern "C" __global__ void __launch_bounds__(256, 1)
gram_wgmma_tma(const unsigned char* __restrict__ in, const LayerDesc* __restrict__ layers, int n, int as_f16,
               u64 plane, const unsigned char* __restrict__ maps, float* __restrict__ K) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(SGLP_HOST_EMULATION)
    gram_wgmma_body(in, layers, n, as_f16, plane, maps, K);
#else
    __trap();
#endif
}

// ---------------------------------------------------------------- split-K reduction
// gram_reduce_splits — K[e] = (…(K[e] + K[plane + e]) + …) + K[(splits−1)·plane + e] for e < plane: the
// split planes of a launch added into plane 0, in split order (deterministic). grid ⌈plane / 256⌉.
extern "C" __global__ void __launch_bounds__(256)
gram_reduce_splits(float* __restrict__ K, u64 plane, int splits) {
    const u64 e = (u64)blockIdx.x * 256 + threadIdx.x;
    if (e >= plane) return;
    float s = K[e];
    for (int z = 1; z < splits; ++z) s += K[(u64)z * plane + e];
    K[e] = s;
}
