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
#include "mma.cuh"

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
// Candidates: sm_90a's warpgroup MMA on the same 128 × 128 tiles. NVRTC compiles every kernel for sm_90a
// on a sm_90 device (nvrtc.rs); elsewhere these kernels are a trap and the host never picks them. 256
// threads = 2 warpgroups; warpgroup w computes rows 64w .. 64w + 63 of the tile against all 128 columns
// with wgmma.mma_async.m64n128k16 (A and B read from shared memory through matrix descriptors, f32
// accumulators in registers, 64 a thread, as gram_mma's). Features go in steps of WK = 64 (one 128-byte
// row per sample) through WSTAGES = 3 stages of 2 sides × 128 rows × 128 bytes = 32 KiB: 96 KiB of
// dynamic shared memory, plus 1 KiB to align and the stages' mbarriers (GRAM_WGMMA_SHARED, the host's
// launch). The two differ in who fills a stage:
// - gram_wgmma: every thread's cp.async (16 bytes each, 8 a thread a step), two steps ahead;
// - gram_wgmma_tma: one thread's TMA copies (cp.async.bulk.tensor, one 128 × 64 box a side, through the
//   layer's tensor map that the host encoded), completing on the stage's mbarrier, three steps ahead.
//
// Shared layout: the canonical K-major layout with 128-byte swizzling of the PTX ISA (what a TMA copy
// with SWIZZLE_128B writes): sample r's 16-byte chunk c at r·128 + (c ^ (r & 7))·16, each side 1024-byte
// aligned; descriptor stride byte offset 1024 (8 rows), and the kk-th 16 features start 32·kk bytes into
// the row (the hardware applies the XOR to the address). A diagonal tile (bi = bj) loads one side and
// points both descriptors at it. Rows must be 16-byte aligned with d % 8 == 0 (the `vec` case, which a
// tensor map needs too); other layers take gram_mma_tile on the same shared memory. Never run on a GPU
// yet: SGLP_GRAM_KERNEL=wgmma or =wgmma_tma.
#define WK 64
#define WSTAGES 3
#define W_SIDE_BYTES (MM * WK * 2)
#define W_STAGE_BYTES (2 * W_SIDE_BYTES)
#define GRAM_WGMMA_SHARED 99392  // the host's GRAM_WGMMA_SHARED (src/similarity/cuda/mod.rs)
static_assert(GRAM_WGMMA_SHARED == WSTAGES * W_STAGE_BYTES + 1024 + 64,
              "3 stages of 32 KiB, 1 KiB to align them, 64 bytes for their mbarriers");

#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(SGLP_HOST_EMULATION)
#if !defined(SGLP_HOST_EMULATION)  // host twins: tests/gpu_emulator/cuda_host.h
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Shared memory written by the generic proxy (cp.async, stores) that wgmma reads next.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Keeps the compiler from moving reads of the accumulators above the wait (CUTLASS's
// warpgroup_fence_operand).
__device__ __forceinline__ void wgmma_fence_operand(float* d) {
#pragma unroll
    for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// D (64 × 128, f32, 64 a thread) += A (64 × 16) · B (128 × 16)ᵀ, both K-major in shared memory behind
// their descriptors. Accumulator layout: warp w of the warpgroup, lane (g, t): d[4j + h] at row
// 16w + g + 8·(h / 2), column 8j + 2t + h % 2.
// One asm for both operand types (TY: "bf16" or "f16"); scale-d = 1 (accumulate), no transposes (both
// operands K-major).
#define WGMMA_M64N128K16(TY) \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n" \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " \
                 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, " \
                 "%64, %65, p, 1, 1, 0, 0;\n}\n" \
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), \
              "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
              "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), \
              "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
              "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), \
              "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
              "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), \
              "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
              "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), \
              "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
              "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), \
              "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
              "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), \
              "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
              "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), \
              "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
            : "l"(desc_a), "l"(desc_b), "r"(1))
template <int DT>
__device__ __forceinline__ void wgmma_m64n128k16(float* d, u64 desc_a, u64 desc_b) {
    if (DT == DT_BF16)
        WGMMA_M64N128K16("bf16");
    else
        WGMMA_M64N128K16("f16");
}
#endif
#if !defined(SGLP_HOST_EMULATION)  // host twins: tests/gpu_emulator/cuda_host.h
// mbarrier (sm_80+) and TMA (sm_90) wrappers, on 64-bit barriers in shared memory.
__device__ __forceinline__ void mbar_init(u64* bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
// Makes the initialised barriers visible to the async proxy (the TMA unit) before their first use.
__device__ __forceinline__ void fence_mbar_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
// This thread's arrival, announcing `bytes` that copies will complete on the barrier's current phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(u64* bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
                 : "memory");
}
// Whether the phase of parity `parity` has completed.
__device__ __forceinline__ bool mbar_try_wait(u64* bar, u32 parity) {
    u32 done;
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
    return done != 0;
}
// The box at (c0: innermost, c1) of the 2-D tensor `map` describes (a CUtensorMap in global memory) into
// shared memory at `dst`, completing its bytes on `bar`.
__device__ __forceinline__ void tma_load_2d(void* dst, const void* map, int c0, int c1, u64* bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], "
        "[%4];\n" ::"r"(smem_addr(dst)),
        "l"(map), "r"(c0), "r"(c1), "r"(smem_addr(bar))
        : "memory");
}
#endif
__device__ __forceinline__ void mbar_wait(u64* bar, u32 parity) {
    while (!mbar_try_wait(bar, parity)) {
    }
}

// Matrix descriptor of a K-major 128-byte-swizzled operand starting at `tile` (1024-aligned, or that plus
// 32·kk): start address >> 4 (bits 0–13), leading byte offset unused when swizzled (1, bits 16–29),
// stride byte offset 1024 >> 4 (bits 32–45), base offset 0, swizzle mode 1 = 128 bytes (bits 62–63).
__device__ __forceinline__ u64 wgmma_desc(const void* tile) {
    return (u64)((smem_addr(tile) & 0x3FFFF) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) |
           ((u64)1 << 62);
}

// cp.async of rows [r0, r0+128) × features [k0, k0+64) of x into the swizzled side S (16 KiB): 1024
// chunks of 16 bytes, 4 a thread, 8 threads to a row's 128 contiguous bytes. Chunks past `ke` (the end of
// this split's features, d or a multiple of 64) or rows past n are zeros.
__device__ __forceinline__ void stage_rows_swizzled(unsigned char* S, const u16* __restrict__ x, int n, int d,
                                                    int ke, int r0, int k0, int tid) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const int q = tid + e * 256, r = q >> 3, c = q & 7;
        const int gr = r0 + r, gk = k0 + c * 8;
        const bool ok = gr < n && gk < ke;
        cp_async_16(S + r * 128 + ((c ^ (r & 7)) << 4), ok ? (const void*)(x + (u64)gr * d + gk) : (const void*)x,
                    ok ? 16 : 0);
    }
}

// What both loaders know of the tile: its stages, rows (i0 for A, j0 for B, one side on the diagonal)
// and this split's features [kb, ke). (Plain structs and free functions, overloaded per loader: the
// emulator's host compile makes every __device__ function static.)
struct WgmmaTile {
    unsigned char* smem;
    int n, kb, ke, i0, j0, steps;
    bool diag;
};
__device__ __forceinline__ unsigned char* wgmma_stage(const WgmmaTile& t, int s) {
    return t.smem + (s % WSTAGES) * W_STAGE_BYTES;
}

// Stages filled by every thread's cp.async, two steps ahead. A step's copies land, then the fence makes
// them visible to the tensor cores (the async proxy), then the barrier makes everyone's visible and says
// every warpgroup is done with step s − 1, whose stage is refilled next.
struct CpAsyncStages {
    const u16* x;
    int d;
};
__device__ __forceinline__ void stages_issue(const CpAsyncStages& c, const WgmmaTile& t, int s, int tid) {
    unsigned char* st = wgmma_stage(t, s);
    stage_rows_swizzled(st, c.x, t.n, c.d, t.ke, t.i0, t.kb + s * WK, tid);
    if (!t.diag) stage_rows_swizzled(st + W_SIDE_BYTES, c.x, t.n, c.d, t.ke, t.j0, t.kb + s * WK, tid);
}
__device__ __forceinline__ void stages_prologue(const CpAsyncStages& c, const WgmmaTile& t, int tid) {
#pragma unroll
    for (int s = 0; s < WSTAGES - 1; ++s) {
        if (s < t.steps) stages_issue(c, t, s, tid);
        cp_async_commit();  // a group per step, empty or not: the wait below counts them
    }
}
__device__ __forceinline__ void stages_before_step(const CpAsyncStages& c, const WgmmaTile& t, int s, int tid) {
    cp_async_wait<WSTAGES - 2>();  // this thread's copies of step s have landed
    fence_proxy_async();
    __syncthreads();
    if (s + WSTAGES - 1 < t.steps) stages_issue(c, t, s + WSTAGES - 1, tid);
    cp_async_commit();
}
__device__ __forceinline__ void stages_after_step(const CpAsyncStages&, const WgmmaTile&, int, int) {}

// Stages filled by thread 0's TMA copies, three steps ahead: stage s % 3 completes on its mbarrier
// (phase (s / 3) % 2) when its bytes have landed; after a barrier that says every warpgroup is done with
// step s, its stage is refilled with step s + 3. The tensor map zero-fills rows past n and features past
// d; ke is d or a multiple of 64, so no box crosses into the next split's features.
struct TmaStages {
    const void* map;
    u64* full;  // WSTAGES mbarriers, in shared memory
};
__device__ __forceinline__ void stages_issue(const TmaStages& m, const WgmmaTile& t, int s) {
    u64* bar = &m.full[s % WSTAGES];
    unsigned char* st = wgmma_stage(t, s);
    mbar_arrive_expect_tx(bar, t.diag ? W_SIDE_BYTES : 2 * W_SIDE_BYTES);
    tma_load_2d(st, m.map, t.kb + s * WK, t.i0, bar);
    if (!t.diag) tma_load_2d(st + W_SIDE_BYTES, m.map, t.kb + s * WK, t.j0, bar);
}
__device__ __forceinline__ void stages_prologue(const TmaStages& m, const WgmmaTile& t, int tid) {
    if (tid == 0) {
        for (int s = 0; s < WSTAGES; ++s) mbar_init(&m.full[s], 1);
        fence_mbar_init();
    }
    __syncthreads();
    if (tid == 0)
        for (int s = 0; s < WSTAGES && s < t.steps; ++s) stages_issue(m, t, s);
}
__device__ __forceinline__ void stages_before_step(const TmaStages& m, const WgmmaTile&, int s, int) {
    mbar_wait(&m.full[s % WSTAGES], (s / WSTAGES) & 1);
}
__device__ __forceinline__ void stages_after_step(const TmaStages& m, const WgmmaTile& t, int s, int tid) {
    __syncthreads();
    if (tid == 0 && s + WSTAGES < t.steps) stages_issue(m, t, s + WSTAGES);
}

template <int DT, class Stages>
__device__ void gram_wgmma_tile(const Stages& stages, const WgmmaTile& tile, float* __restrict__ k_out) {
    const int tid = threadIdx.x, wg = tid >> 7, w = (tid >> 5) & 3, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
    stages_prologue(stages, tile, tid);
    for (int s = 0; s < tile.steps; ++s) {
        stages_before_step(stages, tile, s, tid);
        const unsigned char* st = wgmma_stage(tile, s);
        const u64 da = wgmma_desc(st + wg * 64 * 128), db = wgmma_desc(tile.diag ? st : st + W_SIDE_BYTES);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < WK / 16; ++kk) wgmma_m64n128k16<DT>(acc, da + 2 * kk, db + 2 * kk);  // +32 bytes
        wgmma_commit();
        wgmma_wait<0>();  // the stage may be refilled once everyone is past the next barrier
        wgmma_fence_operand(acc);
        stages_after_step(stages, tile, s, tid);
    }
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
        for (int h = 0; h < 4; ++h) {
            const int gi = tile.i0 + wg * 64 + w * 16 + g + 8 * (h >> 1), gj = tile.j0 + 8 * j + 2 * t + (h & 1);
            if (gi < tile.n && gj < tile.n) {
                k_out[(u64)gi * tile.n + gj] = acc[4 * j + h];
                if (!tile.diag) k_out[(u64)gj * tile.n + gi] = acc[4 * j + h];
            }
        }
}

// The body of both kernels: `maps` (the launch's tensor maps, 128 bytes a layer) selects TMA stages.
__device__ __forceinline__ void gram_wgmma_body(const unsigned char* __restrict__ in,
                                                const LayerDesc* __restrict__ layers, int n, int as_f16,
                                                u64 plane, const unsigned char* maps, float* __restrict__ K) {
    DYNAMIC_SHARED(raw);
    unsigned char* smem = raw + ((1024 - (smem_addr(raw) & 1023)) & 1023);  // swizzle atoms: 1024-aligned
    const GramBlock16 b = gram_block16(in, layers, as_f16, plane, K);
    if (!b.vec) {
        // Unaligned rows: gram_mma's register-staged path, its two tiles in this shared memory.
        u16(*As)[MK + MPAD] = (u16(*)[MK + MPAD])smem;
        u16(*Bs)[MK + MPAD] = (u16(*)[MK + MPAD])(smem + MM * (MK + MPAD) * 2);
        gram_mma_tile_of(b, n, false, As, Bs);
        return;
    }
    const WgmmaTile tile{smem, n, b.kb, b.ke, b.bi * MM, b.bj * MM, (b.ke - b.kb + WK - 1) / WK, b.bi == b.bj};
    if (maps) {
        const TmaStages st{maps + (u64)blockIdx.y * 128, (u64*)(smem + WSTAGES * W_STAGE_BYTES)};
        if (b.bf)
            gram_wgmma_tile<DT_BF16>(st, tile, b.k_out);
        else
            gram_wgmma_tile<DT_F16>(st, tile, b.k_out);
    } else {
        const CpAsyncStages st{b.x, b.d};
        if (b.bf)
            gram_wgmma_tile<DT_BF16>(st, tile, b.k_out);
        else
            gram_wgmma_tile<DT_F16>(st, tile, b.k_out);
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
