// cuda_host.h — the CUDA C++ that kernels/*.cu use, on the host: g++ compiles the kernel sources
// unchanged (force-included before them, with SGLP_HOST_EMULATION defined) and runtime.cpp runs each
// thread of a block as a fiber, so that the real kernel code executes on the CPU under the fake driver
// (driver.cpp). See README.md beside this file for what that does and does not check.
//
// - `__shared__` is `static`: blocks run one after another, so a function-local static is exactly one
//   block's shared memory. It is filled with NaN bytes before each block.
// - `__syncthreads()` and the warp-collective operations (shuffles, mma.sync, ldmatrix) are barriers of
//   the fiber scheduler; the warp-collective ones exchange their operands through per-warp slots.
// - `cp.async` lands at the `cp.async.wait_group` that must wait for it (the latest moment the PTX ISA
//   allows: a read the kernel has not waited for sees stale data), or with SGLP_EMU_CP_ASYNC=eager at
//   once (a refill of a stage that other threads still read shows).
// - Dynamic shared memory (`DYNAMIC_SHARED`, kernels/common.cuh) is one window per launch, 1024-aligned,
//   NaN-filled before each block, with a guard page after it; `smem_addr` gives offsets in it.
// - `wgmma.mma_async` (Hopper) reads its operands through the matrix descriptors (128-byte swizzle) and
//   lands its results at the `wgmma.wait_group` that must wait for it, or with SGLP_EMU_WGMMA=eager at
//   once (unset: as SGLP_EMU_CP_ASYNC). Lazy products show a read of the accumulators before the wait, and
//   with eager copies a refill of a stage a product in flight still reads; eager products with lazy
//   copies show a product issued before its operands landed.
// - The PTX wrappers of kernels/common.cuh and kernels/mma.cuh get host twins here; their fragment
//   layouts follow the PTX ISA (mma.m16n8k16, ldmatrix.m8n8.x4, wgmma.m64nNk16).
#pragma once
#define SGLP_HOST_EMULATION 1

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <cstddef>

#define __global__
#define __device__ static
#define __forceinline__ inline
// Each file's shared arrays go to a section of their own (build.sh names it per kernel file), so that the
// runner can fill them with NaN bytes before every block: a read of shared memory the block has not
// written shows, as it would on a GPU, where shared memory starts undefined.
#ifndef SGLP_EMU_SECTION_ID
#define SGLP_EMU_SECTION_ID sglp_shared_other
#endif
#define SGLP_EMU_STR2(x) #x
#define SGLP_EMU_STR(x) SGLP_EMU_STR2(x)
#define __shared__ static __attribute__((section(SGLP_EMU_STR(SGLP_EMU_SECTION_ID))))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
static inline float2 make_float2(float x, float y) { return {x, y}; }
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

namespace emu {
// The running thread: its index in the block and its pending cp.async groups.
struct Thread;
extern Thread* current;
extern dim3 grid_dim, block_dim, block_idx;
const dim3& thread_idx();
void sync_block();
// The warp's lanes exchange `bytes` bytes each: `out` receives what lane `from_lane(lane)` put in.
void warp_exchange(const void* in, void* out, int bytes, int (*from_lane)(int lane, int arg), int arg);
// All lanes of the warp publish `in` (bytes each) and then each reads every lane's (`all` = 32 × bytes).
void warp_gather(const void* in, void* all, int bytes);
int lane();
void cp_async(void* dst, const void* src, int bytes);
void cp_async_commit();
void cp_async_wait(int pending);
// The launch's dynamic shared memory, and the offset of `p` in it (what cvta.to.shared gives).
unsigned char* dynamic_shared();
unsigned shared_offset(const void* p);
// wgmma.mma_async.m64n128k16.f32 (dt: 2 = f16, 3 = bf16) into this thread's 64 accumulators `d`; its
// commit and wait.
void wgmma_issue(int dt, float* d, unsigned long long desc_a, unsigned long long desc_b);
void wgmma_commit();
void wgmma_wait(int pending);
// fence.proxy.async.shared::cta: this thread's landed cp.async writes become visible to wgmma.
void fence_proxy_async();
// mbarriers and TMA (cp.async.bulk.tensor.2d), by shared offset.
void mbar_init(unsigned off, unsigned count);
void mbar_arrive_expect_tx(unsigned off, unsigned bytes);
bool mbar_try_wait(unsigned off, unsigned parity);
void tma_load_2d(unsigned dst, const void* map, int c0, int c1, unsigned bar);
// fence.proxy.tensormap::generic.acquire: this thread's TMA copies may use the tensor map at `map`.
void fence_tensormap_acquire(const void* map);
}  // namespace emu

#define threadIdx (emu::thread_idx())
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#define __syncthreads() emu::sync_block()

// ---- integer and float helpers of CUDA's device library ----
static inline int max(int a, int b) { return a > b ? a : b; }
static inline int min(int a, int b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
static inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
using std::isfinite;
using std::isinf;
using std::isnan;
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
#define __expf expf
static inline float __fdividef(float a, float b) { return a / b; }

template <class To, class From>
static inline To bit_cast_(From f) {
    static_assert(sizeof(To) == sizeof(From));
    To t;
    memcpy(&t, &f, sizeof t);
    return t;
}
static inline float __int_as_float(int i) { return bit_cast_<float>(i); }
static inline float __uint_as_float(unsigned i) { return bit_cast_<float>(i); }
static inline int __float_as_int(float f) { return bit_cast_<int>(f); }
static inline unsigned __float_as_uint(float f) { return bit_cast_<unsigned>(f); }
static inline double __longlong_as_double(long long i) { return bit_cast_<double>(i); }
static inline long long __double_as_longlong(double d) { return bit_cast_<long long>(d); }

// Fibers of one block run on one OS thread and switch only at barriers: atomics are plain updates.
template <class T>
static inline T atomicAdd(T* p, T v) {
    T old = *p;
    *p = old + v;
    return old;
}
template <class T>
static inline T atomicMax(T* p, T v) {
    T old = *p;
    if (v > old) *p = v;
    return old;
}
template <class T>
static inline T atomicMin(T* p, T v) {
    T old = *p;
    if (v < old) *p = v;
    return old;
}

// ---- warp-collective operations ----
static inline int emu_lane_xor(int lane, int arg) { return lane ^ arg; }
static inline int emu_lane_down(int lane, int arg) { return lane + arg < 32 ? lane + arg : lane; }
static inline int emu_lane_idx(int, int arg) { return arg; }
template <class T>
static inline T __shfl_xor_sync(unsigned, T v, int mask) {
    T out;
    emu::warp_exchange(&v, &out, sizeof(T), emu_lane_xor, mask);
    return out;
}
template <class T>
static inline T __shfl_down_sync(unsigned, T v, unsigned delta) {
    T out;
    emu::warp_exchange(&v, &out, sizeof(T), emu_lane_down, (int)delta);
    return out;
}
template <class T>
static inline T __shfl_sync(unsigned, T v, int src) {
    T out;
    emu::warp_exchange(&v, &out, sizeof(T), emu_lane_idx, src);
    return out;
}

// ---- host twins of the PTX wrappers in kernels/common.cuh and kernels/mma.cuh ----
static inline float f16_bits_to_f32(unsigned short h) { return (float)bit_cast_<_Float16>(h); }
static inline unsigned short f32_to_f16_bits(float f) {
    return bit_cast_<unsigned short>((_Float16)f);  // round to nearest even, as cvt.rn.f16.f32
}
static inline unsigned short f32_to_bf16_bits(float f) {
    unsigned u = bit_cast_<unsigned>(f);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x7fffffu)) return (unsigned short)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return (unsigned short)(u >> 16);
}
// common.cuh's bf16_bits_to_f32, which mma_16816 below cannot see (this file comes first).
static inline float bf16_bits_to_f32_(unsigned short h) { return bit_cast_<float>((unsigned)h << 16); }
static inline unsigned pack_bf16x2(float lo, float hi) {
    return (unsigned)f32_to_bf16_bits(lo) | ((unsigned)f32_to_bf16_bits(hi) << 16);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: lane (g = lane / 4, t = lane % 4) holds
// A: a[0] = (g, 2t..2t+1), a[1] = (g + 8, 2t..), a[2] = (g, 2t + 8..), a[3] = (g + 8, 2t + 8..);
// B: b0 = (k = 2t..2t+1, n = g), b1 = (k = 2t + 8.., n = g); C: c[0..1] = (g, 2t..), c[2..3] = (g + 8, 2t..).
// Products are exact in f32 and summed in f64 here; the tensor core's own order and rounding differ by
// a few f32 ulps, which the tests' tolerances allow.
struct EmuMmaOperands {
    unsigned a[4], b0, b1;
};
template <int DT>
static inline void mma_16816(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    EmuMmaOperands mine = {{a[0], a[1], a[2], a[3]}, b0, b1}, all[32];
    emu::warp_gather(&mine, all, sizeof mine);
    auto half = [](unsigned word, int hi) -> float {
        unsigned short h = (unsigned short)(hi ? word >> 16 : word & 0xffffu);
        return DT == 3 ? bf16_bits_to_f32_(h) : f16_bits_to_f32(h);
    };
    // A(row, k) and B(k, col) read back from the lane that holds them.
    auto A = [&](int row, int k) -> float {
        int g = row & 7, hi_row = row >> 3, hi_k = k >> 3, t = (k & 7) >> 1;
        return half(all[g * 4 + t].a[hi_row + 2 * hi_k], k & 1);
    };
    auto B = [&](int k, int col) -> float {
        int t = (k & 7) >> 1;
        const EmuMmaOperands& o = all[col * 4 + t];
        return half(k >> 3 ? o.b1 : o.b0, k & 1);
    };
    const int l = emu::lane(), g = l >> 2, t = l & 3;
    for (int h = 0; h < 4; ++h) {
        const int row = g + (h >> 1) * 8, col = 2 * t + (h & 1);
        double s = c[h];
        for (int k = 0; k < 16; ++k) s += (double)A(row, k) * (double)B(k, col);
        c[h] = (float)s;
    }
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lane i gives the address of row i % 8 of matrix i / 8; lane
// l receives, of each matrix j, the 32-bit word l % 4 of row l / 4.
static inline void ldmatrix_x4(unsigned* r, const void* smem) {
    if ((uintptr_t)smem % 16 != 0) __builtin_trap();  // each row address must be 16-byte aligned
    const void* rows[32];
    emu::warp_gather(&smem, rows, sizeof smem);
    const int l = emu::lane();
    for (int j = 0; j < 4; ++j) r[j] = ((const unsigned*)rows[j * 8 + l / 4])[l % 4];
}

static inline unsigned smem_addr(const void* p) { return emu::shared_offset(p); }
static inline void cp_async_16(void* smem, const void* gmem, int bytes) { emu::cp_async(smem, gmem, bytes); }
static inline void cp_async_commit() { emu::cp_async_commit(); }
template <int N>
static inline void cp_async_wait() {
    emu::cp_async_wait(N);
}

// wgmma (sm_90a): wgmma.fence orders nothing the emulator reorders; fence.proxy.async makes this
// thread's cp.async writes visible to wgmma (runtime.cpp checks each wgmma's operands); the product,
// commit and wait are runtime.cpp's (descriptors decoded there).
static inline void wgmma_fence() {}
static inline void fence_proxy_async() { emu::fence_proxy_async(); }
static inline void wgmma_fence_operand(float*) {}
static inline void wgmma_commit() { emu::wgmma_commit(); }
template <int N>
static inline void wgmma_wait() {
    emu::wgmma_wait(N);
}
template <int DT>
static inline void wgmma_m64n128k16(float* d, unsigned long long desc_a, unsigned long long desc_b) {
    emu::wgmma_issue(DT, d, desc_a, desc_b);
}
static inline void mbar_init(unsigned long long* bar, unsigned count) { emu::mbar_init(smem_addr(bar), count); }
static inline void fence_mbar_init() {}
static inline void mbar_arrive_expect_tx(unsigned long long* bar, unsigned bytes) {
    emu::mbar_arrive_expect_tx(smem_addr(bar), bytes);
}
static inline bool mbar_try_wait(unsigned long long* bar, unsigned parity) {
    return emu::mbar_try_wait(smem_addr(bar), parity);
}
static inline void fence_tensormap_acquire(const void* map) { emu::fence_tensormap_acquire(map); }
static inline void tma_load_2d(void* dst, const void* map, int c0, int c1, unsigned long long* bar) {
    emu::tma_load_2d(smem_addr(dst), map, c0, c1, smem_addr(bar));
}
