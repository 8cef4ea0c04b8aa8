// wgmma.cuh — Hopper's warpgroup MMA machinery shared by the Gram candidates gram_wgmma / gram_wgmma_tma
// (gram_linear.cu) and the runtime's linear_wgmma (runtime_linear.cu): C tile (128 × 128, f32) = A rows
// [i0, i0+128) · B rows [j0, j0+128)ᵀ over a reduction range, both operands 16-bit and K-major (the
// reduction index contiguous in memory). Everything but the constants exists only when compiling for
// sm_90a (NVRTC builds every kernel for sm_90a on a sm_90 device, src/similarity/cuda/mod.rs's
// kernel_arch) or for the emulator; the kernels that use it trap elsewhere and the host never picks them.
//
// 256 threads = 2 warpgroups; warpgroup w computes rows 64w .. 64w + 63 of the tile against all 128
// columns with wgmma.mma_async.m64n128k16 (A and B read from shared memory through matrix descriptors,
// f32 accumulators in registers, 64 a thread). The reduction goes in steps of WK = 64 (one 128-byte row
// per operand row) through WSTAGES = 4 stages of 2 sides × 128 rows × 128 bytes = 32 KiB: 128 KiB of
// dynamic shared memory, plus 1 KiB to align and the stages' mbarriers (WGMMA_SHARED, the host's
// launches). A step's products are left running (wgmma.wait_group W_IN_FLIGHT = 1) while the next step
// waits for its data and issues its own, so the tensor cores do not idle through the barrier and the
// issue; a stage is refilled only once the products that read it are done, two steps later. Two loaders
// fill a stage:
// - CpAsyncStages: every thread's cp.async (16 bytes each, 8 a thread a step), W_AHEAD = 2 steps ahead;
// - TmaStages: one thread's TMA copies (cp.async.bulk.tensor, one 128 × 64 box a side, through a tensor
//   map the host encoded), completing on the stage's mbarrier, three steps ahead (the Gram's only).
//
// Shared layout: the canonical K-major layout with 128-byte swizzling of the PTX ISA (what a TMA copy
// with SWIZZLE_128B writes): row r's 16-byte chunk c at r·128 + (c ^ (r & 7))·16, each side 1024-byte
// aligned; descriptor stride byte offset 1024 (8 rows), and the kk-th 16 reduction indices start 32·kk
// bytes into the row (the hardware applies the XOR to the address). Rows must be 16-byte aligned and the
// reduction end a multiple of 8 (a 16-byte chunk is all in or all out).
#pragma once
#include "mma.cuh"

#define WK 64
#define WSTAGES 4
#define W_IN_FLIGHT 1                        // steps whose products may still run as the next one starts
#define W_AHEAD (WSTAGES - 1 - W_IN_FLIGHT)  // steps cp.async loads ahead of the one computed
#define W_SIDE_BYTES (MM * WK * 2)
#define W_STAGE_BYTES (2 * W_SIDE_BYTES)
#define WGMMA_SHARED 132160  // the host's WGMMA_SHARED (src/similarity/cuda/mod.rs)
static_assert(WGMMA_SHARED == WSTAGES * W_STAGE_BYTES + 1024 + 64,
              "4 stages of 32 KiB, 1 KiB to align them, 64 bytes for their mbarriers");
static_assert(W_AHEAD >= 1 && WSTAGES * 8 <= 64, "a step loads ahead; the mbarriers fit their 64 bytes");

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
// Makes the tensor map at `map` (global memory, written by a host copy before the launch) visible to this
// thread's TMA copies: without it the TMA unit may use a stale or half-written map (the CUDA programming
// guide, "Using TMA to transfer multi-dimensional arrays": scope .sys, as the host wrote it). Once per
// block and map, by the thread that issues the copies.
__device__ __forceinline__ void fence_tensormap_acquire(const void* map) {
    asm volatile("fence.proxy.tensormap::generic.acquire.sys [%0], 128;\n" ::"l"(map) : "memory");
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

// cp.async of rows [r0, r0+128) × reduction [k0, k0+64) of an operand x (row i at x + i·ld, 16-byte
// aligned) into the swizzled side S (16 KiB): 1024 chunks of 16 bytes, 4 a thread, 8 threads to a row's
// 128 contiguous bytes. Chunks at or past `ke` (the end of the reduction range: a multiple of 8) or rows
// past `rows` are zeros.
__device__ __forceinline__ void stage_rows_swizzled(unsigned char* S, const u16* __restrict__ x, u64 ld, int rows,
                                                    int ke, int r0, int k0, int tid) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const int q = tid + e * 256, r = q >> 3, c = q & 7;
        const int gr = r0 + r, gk = k0 + c * 8;
        const bool ok = gr < rows && gk < ke;
        cp_async_16(S + r * 128 + ((c ^ (r & 7)) << 4), ok ? (const void*)(x + (u64)gr * ld + gk) : (const void*)x,
                    ok ? 16 : 0);
    }
}

// What both loaders know of the tile: its stages, rows (i0 of A, j0 of B; one side when `diag`, a Gram's
// diagonal tile, where A = B) and the reduction range [kb, ke) in `steps` steps of WK. (Plain structs
// and free functions, overloaded per loader: the emulator's host compile makes every __device__
// function static.)
struct WgmmaTile {
    unsigned char* smem;
    int kb, ke, i0, j0, steps;
    bool diag;
};
__device__ __forceinline__ unsigned char* wgmma_stage(const WgmmaTile& t, int s) {
    return t.smem + (s % WSTAGES) * W_STAGE_BYTES;
}

// Stages filled by every thread's cp.async, W_AHEAD steps ahead. A step's copies land, then the fence
// makes them visible to the tensor cores (the async proxy), then the barrier makes everyone's visible and
// says every warpgroup has waited for the products of step s − 1 − W_IN_FLIGHT, whose stage is refilled
// next (with step s + W_AHEAD).
struct CpAsyncStages {
    const u16* a;  // A's rows (i), lda apart, rows_a of them; B's likewise (the same rows for a Gram)
    u64 lda;
    int rows_a;
    const u16* b;
    u64 ldb;
    int rows_b;
};
__device__ __forceinline__ void stages_issue(const CpAsyncStages& c, const WgmmaTile& t, int s, int tid) {
    unsigned char* st = wgmma_stage(t, s);
    stage_rows_swizzled(st, c.a, c.lda, c.rows_a, t.ke, t.i0, t.kb + s * WK, tid);
    if (!t.diag) stage_rows_swizzled(st + W_SIDE_BYTES, c.b, c.ldb, c.rows_b, t.ke, t.j0, t.kb + s * WK, tid);
}
__device__ __forceinline__ void stages_prologue(const CpAsyncStages& c, const WgmmaTile& t, int tid) {
#pragma unroll
    for (int s = 0; s < W_AHEAD; ++s) {
        if (s < t.steps) stages_issue(c, t, s, tid);
        cp_async_commit();  // a group per step, empty or not: the wait below counts them
    }
}
__device__ __forceinline__ void stages_before_step(const CpAsyncStages& c, const WgmmaTile& t, int s, int tid) {
    cp_async_wait<W_AHEAD - 1>();  // this thread's copies of step s have landed
    fence_proxy_async();
    __syncthreads();
    if (s + W_AHEAD < t.steps) stages_issue(c, t, s + W_AHEAD, tid);
    cp_async_commit();
}
__device__ __forceinline__ void stages_after_step(const CpAsyncStages&, const WgmmaTile&, int, int) {}

// Stages filled by thread 0's TMA copies: the prologue fills all WSTAGES; stage s % WSTAGES completes on
// its mbarrier (phase (s / WSTAGES) % 2) when its bytes have landed; after step s a barrier says every
// warpgroup has waited for the products of step r = s − W_IN_FLIGHT, whose stage is refilled with step
// r + WSTAGES. The tensor map zero-fills rows past n and features past d; ke is d or a multiple of 64,
// so no box crosses into the next split's features.
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
        fence_tensormap_acquire(m.map);  // thread 0 issues every copy of the block
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
    const int r = s - W_IN_FLIGHT;
    if (tid == 0 && r >= 0 && r + WSTAGES < t.steps) stages_issue(m, t, r + WSTAGES);
}

// This block's dynamic shared memory (WGMMA_SHARED bytes at launch), 1024-aligned for the swizzle atoms.
__device__ __forceinline__ unsigned char* wgmma_smem() {
    DYNAMIC_SHARED(raw);
    return raw + ((1024 - (smem_addr(raw) & 1023)) & 1023);
}

// acc (this thread's 64 accumulators of the warpgroup's 64 × 128 part of the tile, zeroed here) =
// Σ over the tile's reduction range of A rows · B rowsᵀ: the stages filled as `Stages` says, each step
// WK / 16 wgmma k-steps on the stage's two sides.
template <int DT, class Stages>
__device__ __forceinline__ void wgmma_tile_product(const Stages& stages, const WgmmaTile& tile, float* acc) {
    const int tid = threadIdx.x, wg = tid >> 7;
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
        wgmma_wait<W_IN_FLIGHT>();  // step s − W_IN_FLIGHT's products are done: its stage may be refilled
        wgmma_fence_operand(acc);
        stages_after_step(stages, tile, s, tid);
    }
    wgmma_wait<0>();
    wgmma_fence_operand(acc);
}

// Row and column in the tile of accumulator acc[4j + h] of thread `tid` (warp w of warpgroup wg, lane
// (g, t)): row 64·wg + 16·w + g + 8·(h / 2), column 8j + 2t + h % 2.
__device__ __forceinline__ int wgmma_acc_row(int tid, int h) {
    return (tid >> 7) * 64 + ((tid >> 5) & 3) * 16 + ((tid & 31) >> 2) + 8 * (h >> 1);
}
__device__ __forceinline__ int wgmma_acc_col(int tid, int j, int h) { return 8 * j + 2 * (tid & 3) + (h & 1); }
#endif  // sm_90a or the emulator
