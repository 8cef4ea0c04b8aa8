// mma.cuh — the tensor-core machinery shared by the Gram kernels (gram_linear.cu) and the runtime's
// matrix products (runtime_linear.cu): `mma.sync.m16n8k16` on 16-bit operands with f32 accumulation, the
// 128 × 128 × 32 block tile both use (8 warps, 4 along rows × 2 along columns, warp tile 32 × 64), and
// the async-copy / ldmatrix wrappers of the pipelined Gram. Fragment layouts follow the PTX ISA; their
// index arithmetic is emulated in src/similarity/cuda/emulate_kernels.py and
// src/runtime/ops/emulate_runtime_kernels.py.
//
// Shared-memory tiles are `u16 S[MM][MK + MPAD]`: row = a sample (Gram) or an output row / column (GEMM),
// MK consecutive values of the reduction index along the row. A pair of 16-bit values at (row, 2c) and
// (row, 2c + 1) is one 32-bit word, the lower index in the low half (what the mma fragments hold).
#pragma once
#include "common.cuh"

#define MM 128
#define MK 32
#define MPAD 8  // halves of padding per shared row: 80-byte rows, conflict-free fragment loads

__device__ __forceinline__ u32 lds_u32(const u16* p) { return *(const u32*)p; }

#ifndef SGLP_HOST_EMULATION  // host twins: tests/gpu_emulator/cuda_host.h
template <int DT>
__device__ __forceinline__ void mma_16816(float* c, const u32* a, u32 b0, u32 b1) {
    if (DT == DT_BF16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}
#endif

// One warp's share of one MK-deep step of the block tile: acc[mt][nt] (rows wm·32 + mt·16 .., columns
// wn·64 + nt·8 ..) += As[rows][0..MK) · Bs[columns][0..MK)ᵀ. g = lane / 4, t = lane % 4 (the fragment
// coordinates). Accumulator layout (m16n8): h = 0, 1 at (g, 2t + h), h = 2, 3 at (g + 8, 2t + h − 2).
template <int DT>
__device__ __forceinline__ void mma_warp_step(const u16 (*As)[MK + MPAD], const u16 (*Bs)[MK + MPAD],
                                              float (*acc)[8][4], int wm, int wn, int g, int t) {
#pragma unroll
    for (int ks = 0; ks < MK; ks += 16) {
        u32 a[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
            const int r = wm * 32 + mt * 16 + g;
            a[mt][0] = lds_u32(&As[r][ks + 2 * t]);
            a[mt][1] = lds_u32(&As[r + 8][ks + 2 * t]);
            a[mt][2] = lds_u32(&As[r][ks + 2 * t + 8]);
            a[mt][3] = lds_u32(&As[r + 8][ks + 2 * t + 8]);
        }
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            const int c = wn * 64 + nt * 8 + g;
            const u32 b0 = lds_u32(&Bs[c][ks + 2 * t]);
            const u32 b1 = lds_u32(&Bs[c][ks + 2 * t + 8]);
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) mma_16816<DT>(acc[mt][nt], a[mt], b0, b1);
        }
    }
}

// Row and column in the block tile of accumulator acc[mt][nt][h] of warp (wm, wn), lane (g, t).
__device__ __forceinline__ int mma_acc_row(int wm, int mt, int g, int h) { return wm * 32 + mt * 16 + g + (h >> 1) * 8; }
__device__ __forceinline__ int mma_acc_col(int wn, int nt, int t, int h) { return wn * 64 + nt * 8 + 2 * t + (h & 1); }

__device__ __forceinline__ void zero_acc(float (*acc)[8][4]) {
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 8; ++b)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.0f;
}

#ifndef SGLP_HOST_EMULATION  // host twins: tests/gpu_emulator/cuda_host.h
// Two f32 → one word of two bf16 (round to nearest even), `lo` in the low half. sm_80+.
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// 16 bytes global → shared, asynchronously; `bytes` = 0 writes zeros (rows or features past the end).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
                 "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(u32* r, const void* smem) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(smem)));
}
#endif
