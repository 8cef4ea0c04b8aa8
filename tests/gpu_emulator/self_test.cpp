// self_test.cpp — the emulator's own tests: that each thing README.md says it catches, it catches.
// Built and run by build.sh (`self_test` beside libcuda.so); prints one line per check and exits 1 on a
// failed one. Each check launches a small kernel written here, in CUDA C++ as kernels/*.cu are.
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "runtime.h"

typedef int CUresult;
extern "C" CUresult cuMemAlloc_v2(unsigned long long* p, size_t bytes);
extern "C" CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned flags);
extern "C" CUresult cuStreamCreate(void** s, unsigned flags);
extern "C" CUresult cuStreamSynchronize(void* s);
extern "C" CUresult cuMemcpyHtoDAsync_v2(unsigned long long dst, const void* src, size_t bytes, void* s);
extern "C" CUresult cuMemcpyDtoHAsync_v2(void* dst, unsigned long long src, size_t bytes, void* s);
extern "C" CUresult cuModuleGetFunction(void** f, void* module, const char* name);
extern "C" CUresult cuTensorMapEncodeTiled(void* map, int dtype, unsigned rank, void* address,
                                           const unsigned long long* dims, const unsigned long long* strides,
                                           const unsigned* box, const unsigned* elem_strides, int interleave,
                                           int swizzle, int l2, int oob_fill);
extern "C" CUresult cuFuncSetAttribute(void* f, int attribute, int value);
extern "C" CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                   unsigned bz, unsigned shared_bytes, void* s, void** params, void** extra);

// ---- kernels ----

// Warp 1 reads what warp 0 wrote, with or without the barrier between.
extern "C" __global__ void cross_warp_read(int barrier, float* out) {
    __shared__ float s[64];
    s[threadIdx.x] = (float)threadIdx.x + 1.0f;
    if (barrier) __syncthreads();
    out[threadIdx.x] = s[(threadIdx.x + 32) % 64];
}

// Each thread copies 16 bytes with cp.async and reads them back, waiting first or not.
extern "C" __global__ void async_copy_read(const float* in, int wait, float* out) {
    __shared__ __align__(16) float s[4 * 32];
    cp_async_16(&s[4 * threadIdx.x], &in[4 * threadIdx.x], 16);
    cp_async_commit();
    if (wait) cp_async_wait<0>();
    out[threadIdx.x] = s[4 * threadIdx.x];
}

// Refills the buffer other warps still read, with or without the barrier that should come first.
extern "C" __global__ void refill_while_read(const float* in, int barrier, float* out) {
    __shared__ __align__(16) float s[4 * 64];
    cp_async_16(&s[4 * threadIdx.x], &in[4 * threadIdx.x], 16);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    const float mine = s[4 * ((threadIdx.x + 32) % 64)];  // read another warp's part
    if (barrier) __syncthreads();
    cp_async_16(&s[4 * threadIdx.x], &in[256 + 4 * threadIdx.x], 16);  // the next step's data
    cp_async_commit();
    cp_async_wait<0>();
    out[threadIdx.x] = mine;
}

// A warp sum after half of the warp has returned (undefined in CUDA).
extern "C" __global__ void shuffle_after_exit(float* out) {
    if (threadIdx.x >= 16) return;
    float v = 1.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    out[threadIdx.x] = v;
}

// A warp sum of the lane indices: 0 + 1 + … + 31 in every lane.
extern "C" __global__ void warp_sum(float* out) {
    float v = (float)(threadIdx.x & 31);
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    out[threadIdx.x] = v;
}

// One m16n8k16 product, the fragments loaded as kernels/mma.cuh's mma_warp_step loads them (A 16×16
// row-major, B given as 8 rows of 16 = Bᵀ), C written back through mma_acc_row / mma_acc_col's layout.
extern "C" __global__ void one_mma(const unsigned short* a, const unsigned short* bt, float* c) {
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    auto word = [](const unsigned short* p) { return (unsigned)p[0] | ((unsigned)p[1] << 16); };
    unsigned af[4] = {word(&a[g * 16 + 2 * t]), word(&a[(g + 8) * 16 + 2 * t]), word(&a[g * 16 + 2 * t + 8]),
                      word(&a[(g + 8) * 16 + 2 * t + 8])};
    const unsigned b0 = word(&bt[g * 16 + 2 * t]), b1 = word(&bt[g * 16 + 2 * t + 8]);
    float acc[4] = {0, 0, 0, 0};
    mma_16816<3>(acc, af, b0, b1);
    for (int h = 0; h < 4; ++h) c[(g + (h >> 1) * 8) * 8 + 2 * t + (h & 1)] = acc[h];
}

// One wgmma.m64n128k16 (bf16) by the warpgroup, A and B K-major and 128-byte swizzled at shared offsets
// `a_at` and `b_at` (descriptors with stride byte offset 1024, as the PTX ISA's canonical layout has
// them); D goes out as 64 × 128, row-major, read back through the accumulator layout; `wait`: whether D
// is read after the product's wait (else before it, then waited for).
static void wgmma_into(unsigned a_at, unsigned b_at, int wait, float* d_out) {
    auto desc = [](unsigned start) {
        return (unsigned long long)(start >> 4) | (1ull << 16) | ((unsigned long long)(1024 >> 4) << 32) | (1ull << 62);
    };
    float d[64];
    for (int i = 0; i < 64; ++i) d[i] = 0.0f;
    wgmma_fence();
    wgmma_m64n128k16<3>(d, desc(a_at), desc(b_at));
    wgmma_commit();
    if (wait) wgmma_wait<0>();
    const int w = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    for (int j = 0; j < 16; ++j)
        for (int h = 0; h < 4; ++h) d_out[(16 * w + g + 8 * (h >> 1)) * 128 + 8 * j + 2 * t + (h & 1)] = d[4 * j + h];
    if (!wait) wgmma_wait<0>();
}

// One wgmma.m64n128k16 (bf16) by one warpgroup: A (64 × 16) and B (128 × 16), K-major, stored by plain
// stores in the 128-byte-swizzled layout (16-byte chunk c of row r at r·128 + (c ^ (r % 8))·16) as the
// second 16 features of their rows (chunks 2 and 3: the descriptors start 32 bytes in, as a kernel's
// second k-step does), A at shared offset 0 and B at 8192. D goes out as 64 × 128, row-major, read back
// through the accumulator layout; `wait`: whether the kernel waits for the product before reading D.
extern "C" __global__ void one_wgmma(const unsigned short* a, const unsigned short* b, int wait, float* d_out) {
    unsigned char* smem = emu::dynamic_shared();
    auto put = [&](unsigned base, int row, int k, unsigned short v) {
        const int c = 2 + k / 8;
        memcpy(smem + base + row * 128 + ((c ^ (row & 7)) << 4) + (k % 8) * 2, &v, 2);
    };
    for (int e = threadIdx.x; e < 64 * 16; e += 128) put(0, e / 16, e % 16, a[e]);
    for (int e = threadIdx.x; e < 128 * 16; e += 128) put(8192, e / 16, e % 16, b[e]);
    __syncthreads();
    wgmma_into(0 + 32, 8192 + 32, wait, d_out);
}

// As one_wgmma, the operands staged by cp.async (16 bytes a copy: chunks 0 and 1 of each swizzled row,
// the descriptors at the row starts) and waited for; `fence`: whether each thread runs fence.proxy.async
// before the barrier. Without it the emulator stops the kernel at the wgmma (on a GPU the product may
// read stale bytes: cp.async writes through the generic proxy, wgmma reads through the async one).
extern "C" __global__ void wgmma_after_cp_async(const unsigned short* a, const unsigned short* b, int fence,
                                                float* d_out) {
    unsigned char* smem = emu::dynamic_shared();
    for (int q = threadIdx.x; q < 2 * (64 + 128); q += 128) {
        const bool in_a = q < 128;
        const int row = (in_a ? q : q - 128) / 2, c = q % 2;
        const unsigned short* src = (in_a ? a : b) + row * 16 + c * 8;
        cp_async_16(smem + (in_a ? 0 : 8192) + row * 128 + ((c ^ (row & 7)) << 4), src, 16);
    }
    cp_async_commit();
    cp_async_wait<0>();
    if (fence) fence_proxy_async();
    __syncthreads();
    wgmma_into(0, 8192, 1, d_out);
}

// One TMA box (64 × 128 16-bit values at column c0, row c1 of the map's tensor) into dynamic shared
// memory, completing on an mbarrier; every thread then reads back its rows, unswizzling, waiting on the
// barrier first or not. out[r·64 + e] = element (c0 + e, c1 + r) as the box holds it. `acquire`: whether
// the issuing thread acquires the map first (without, the emulator stops the kernel at the copy).
extern "C" __global__ void one_tma(const void* map, int c0, int c1, int wait, int acquire, unsigned short* out) {
    unsigned char* smem = emu::dynamic_shared();
    unsigned long long* bar = (unsigned long long*)(smem + 16384);
    if (threadIdx.x == 0) {
        if (acquire) fence_tensormap_acquire(map);
        mbar_init(bar, 1);
        mbar_arrive_expect_tx(bar, 16384);
        tma_load_2d(smem, map, c0, c1, bar);
    }
    __syncthreads();
    if (wait)
        while (!mbar_try_wait(bar, 0)) {
        }
    for (int r = threadIdx.x; r < 128; r += blockDim.x)
        for (int e = 0; e < 64; ++e) {
            size_t off = (size_t)r * 128 + (size_t)e * 2;
            off ^= ((off >> 7) & 7) << 4;
            memcpy(&out[r * 64 + e], smem + off, 2);
        }
    if (!wait)
        while (!mbar_try_wait(bar, 0)) {
        }
}

// Reads shared memory that this block has not written.
extern "C" __global__ void read_unwritten(int write_first, float* out) {
    __shared__ float s[32];
    if (write_first) s[threadIdx.x] = 2.0f;
    out[threadIdx.x] = s[threadIdx.x];
}

// Writes one element past the end of `out` (n elements).
extern "C" __global__ void write_past_end(float* out, int n) { out[n + threadIdx.x] = 1.0f; }

// A 16-byte vector load from an address 4 bytes past a 16-byte boundary.
extern "C" __global__ void misaligned_vector_load(const float* p, float* out) {
    const float4 v = *(const float4*)(p + 1);
    out[threadIdx.x] = v.x;
}

SGLP_EMU_REGISTER(misaligned_vector_load)
SGLP_EMU_REGISTER(cross_warp_read)
SGLP_EMU_REGISTER(async_copy_read)
SGLP_EMU_REGISTER(refill_while_read)
SGLP_EMU_REGISTER(shuffle_after_exit)
SGLP_EMU_REGISTER(warp_sum)
SGLP_EMU_REGISTER(one_mma)
SGLP_EMU_REGISTER(one_wgmma)
SGLP_EMU_REGISTER(wgmma_after_cp_async)
SGLP_EMU_REGISTER(one_tma)
SGLP_EMU_REGISTER(read_unwritten)
SGLP_EMU_REGISTER(write_past_end)

// ---- checks ----

static int failures = 0;

// The largest |C − A·Bᵀ| over C's m × n entries (row-major), A m × 16 and B n × 16 as bf16 bits, the
// products summed in f64: the reference of the matrix-unit twins.
static double worst_vs_abt(const std::vector<unsigned short>& a, const std::vector<unsigned short>& b,
                           const std::vector<float>& c, int m, int n) {
    double worst = 0;
    for (int i = 0; i < m; ++i)
        for (int j = 0; j < n; ++j) {
            double want = 0;
            for (int k = 0; k < 16; ++k) want += (double)bf16_bits_to_f32_(a[i * 16 + k]) * bf16_bits_to_f32_(b[j * 16 + k]);
            worst = std::max(worst, std::abs(want - c[i * n + j]));
        }
    return worst;
}

// `n` bf16 values near +1 (`sign` 0x3f00) or −1 (0xbf00), from rand(): operands of the matrix-unit twins.
static std::vector<unsigned short> bf16_near_one(size_t n, unsigned short sign) {
    std::vector<unsigned short> v(n);
    for (auto& x : v) x = (unsigned short)(sign + rand() % 0x100 - 0x80);
    return v;
}

// `body` in a forked child (a kernel fault or a once-read mode setting stays there); the child's wait
// status. The child writes no core file (the guard-page check dies of SIGSEGV).
template <class F>
static int in_child(F body) {
    fflush(stdout);
    const pid_t pid = fork();
    if (pid == 0) {
        const struct rlimit no_core = {0, 0};
        setrlimit(RLIMIT_CORE, &no_core);
        _exit(body());
    }
    int status = 0;
    waitpid(pid, &status, 0);
    return status;
}

static void check(bool ok, const char* what) {
    printf("%s  %s\n", ok ? "ok  " : "FAIL", what);
    if (!ok) ++failures;
}

// Launch `name` with 1 block of `threads`, the schedule set by the environment variables first.
static bool run(const char* name, unsigned threads, std::vector<void*> params, const char* order,
                const char* copies, std::string* error = nullptr, unsigned shared = 0) {
    setenv("SGLP_EMU_ORDER", order, 1);
    setenv("SGLP_EMU_CP_ASYNC", copies, 1);
    std::string e;
    const bool ok = emu::launch(*emu::find_kernel(name), {1, 1, 1}, {threads, 1, 1}, shared, params.data(), e);
    if (error) *error = e;
    return ok;
}

int main() {
    // The eager/lazy choice is read once per process: the cp.async checks that need eager copies run in
    // a child process.
    std::vector<float> out(64);
    float* o = out.data();

    {  // a missing barrier between warps shows as an order-dependent result
        int with = 1, without = 0;
        run("cross_warp_read", 64, {&with, &o}, "forward", "lazy");
        bool right = true;
        for (int i = 0; i < 64; ++i) right &= out[i] == (float)((i + 32) % 64) + 1.0f;
        run("cross_warp_read", 64, {&without, &o}, "forward", "lazy");
        const float forward0 = out[0];  // warp 0 runs first: reads warp 1's slot before it is written
        run("cross_warp_read", 64, {&without, &o}, "reverse", "lazy");
        const float reverse0 = out[0];
        check(right, "__syncthreads orders shared-memory writes before other warps' reads");
        check(forward0 != 33.0f && reverse0 == 33.0f,
              "a missing __syncthreads gives a schedule-dependent result (forward vs reverse)");
    }
    {  // shared memory starts as NaN bytes in every block, whatever the previous block left
        int write = 1, read_only = 0;
        run("read_unwritten", 32, {&write, &o}, "forward", "lazy");
        const bool written = out[0] == 2.0f;
        run("read_unwritten", 32, {&read_only, &o}, "forward", "lazy");
        check(written && std::isnan(out[0]) && std::isnan(out[31]),
              "shared memory the block has not written reads as NaN (not the previous block's values)");
    }
    {  // cp.async: lazy copies land at the wait
        std::vector<float> in(128);
        for (int i = 0; i < 128; ++i) in[i] = (float)i + 0.5f;
        const float* ip = in.data();
        int wait = 1, no_wait = 0;
        run("async_copy_read", 32, {&ip, &wait, &o}, "forward", "lazy");
        bool right = true;
        for (int i = 0; i < 32; ++i) right &= out[i] == in[4 * i];
        check(right, "cp.async then cp.async.wait_group: the data is there");
        run("async_copy_read", 32, {&ip, &no_wait, &o}, "forward", "lazy");
        bool stale = true;
        for (int i = 0; i < 32; ++i) stale &= out[i] != in[4 * i];
        check(stale, "a read before cp.async.wait_group sees stale data (lazy copies)");
    }
    {  // a warp-collective operation after lanes exited, and a warp sum
        std::string e;
        const bool launched = run("shuffle_after_exit", 32, {&o}, "forward", "lazy", &e);
        check(!launched && e.find("exited") != std::string::npos,
              "a full-mask shuffle after lanes of the warp exited is an error");
        run("warp_sum", 64, {&o}, "forward", "lazy");
        bool right = true;
        for (int i = 0; i < 64; ++i) right &= out[i] == 496.0f;
        check(right, "__shfl_xor_sync butterfly sums a warp");
    }
    {  // the mma.m16n8k16 twin with mma.cuh's fragment loads gives A·B
        srand(7);
        const std::vector<unsigned short> a = bf16_near_one(256, 0x3f00), bt = bf16_near_one(128, 0xbf00);
        std::vector<float> c(128);
        const unsigned short *ap = a.data(), *bp = bt.data();
        float* cp = c.data();
        run("one_mma", 32, {&ap, &bp, &cp}, "forward", "lazy");
        check(worst_vs_abt(a, bt, c, 16, 8) < 1e-5,
              "mma.m16n8k16 (bf16) with mma.cuh's fragment layout computes A·B");
    }
    {  // the wgmma.m64n128k16 twin: descriptors, swizzle, accumulator layout; lazy results land at the wait
        const std::vector<unsigned short> a = bf16_near_one(64 * 16, 0x3f00), b = bf16_near_one(128 * 16, 0xbf00);
        std::vector<float> d(64 * 128);
        const unsigned short *ap = a.data(), *bp = b.data();
        float* dp = d.data();
        int wait = 1, no_wait = 0;
        run("one_wgmma", 128, {&ap, &bp, &wait, &dp}, "forward", "lazy", nullptr, 24576);
        check(worst_vs_abt(a, b, d, 64, 128) < 1e-5,
              "wgmma.m64n128k16 (bf16) from 128-byte-swizzled shared memory computes A·Bᵀ");
        run("one_wgmma", 128, {&ap, &bp, &no_wait, &dp}, "forward", "lazy", nullptr, 24576);
        bool stale = true;
        for (float v : d) stale &= v == 0.0f;
        check(stale, "accumulators read before wgmma.wait_group hold the old values (lazy products)");
        // Over 48 KiB of dynamic shared memory needs the kernel's attribute raised first, as on a GPU. In
        // a child: the driver reads its stream mode once, and the lazy-streams check below sets it.
        const int status = in_child([&] {
            void* f = nullptr;
            cuModuleGetFunction(&f, nullptr, "one_wgmma");
            void* params[] = {&ap, &bp, &wait, &dp};
            const CUresult refused = cuLaunchKernel(f, 1, 1, 1, 128, 1, 1, 65536, nullptr, params, nullptr);
            cuFuncSetAttribute(f, 8, 65536);
            const CUresult allowed = cuLaunchKernel(f, 1, 1, 1, 128, 1, 1, 65536, nullptr, params, nullptr);
            return refused != 0 && allowed == 0 ? 0 : 1;
        });
        check(WIFEXITED(status) && WEXITSTATUS(status) == 0,
              "a launch with 64 KiB of dynamic shared memory fails until the kernel's limit is raised");
    }
    {  // TMA: a 128-byte-swizzled box, zeros past the tensor, landing at the mbarrier wait (lazy copies)
        const unsigned long long rows = 100, cols = 72;  // the box at (40, 30) runs past both edges
        std::vector<unsigned short> x(rows * cols);
        for (size_t i = 0; i < x.size(); ++i) x[i] = (unsigned short)(i * 7 + 1);
        alignas(64) unsigned char map[128];
        const unsigned long long dims[2] = {cols, rows}, strides[1] = {cols * 2};
        const unsigned box[2] = {64, 128}, elem_strides[2] = {1, 1};
        const int encoded = cuTensorMapEncodeTiled(map, 1, 2, x.data(), dims, strides, box, elem_strides, 0, 3, 3, 0);
        std::vector<unsigned short> out(128 * 64);
        const void* mp = map;
        unsigned short* op = out.data();
        int c0 = 40, c1 = 30, wait = 1, no_wait = 0, acquire = 1, no_acquire = 0;
        run("one_tma", 64, {&mp, &c0, &c1, &wait, &acquire, &op}, "forward", "lazy", nullptr, 16384 + 64);
        bool right = encoded == 0;
        for (int r = 0; r < 128; ++r)
            for (int e = 0; e < 64; ++e) {
                const unsigned long long gx = c0 + e, gy = c1 + r;
                const unsigned short want = gx < cols && gy < rows ? x[gy * cols + gx] : 0;
                right &= out[r * 64 + e] == want;
            }
        check(right, "a TMA box lands 128-byte swizzled, zeros past the tensor's edges, at the mbarrier wait");
        run("one_tma", 64, {&mp, &c0, &c1, &no_wait, &acquire, &op}, "forward", "lazy", nullptr, 16384 + 64);
        // Thread 0 reads its rows (0 and 64) before any thread has waited: shared memory's NaN fill. (The
        // lanes after it run once thread 0's wait has landed the box.)
        bool stale = true;
        for (int e = 0; e < 64; ++e) stale &= out[e] == 0xffff && out[64 * 64 + e] == 0xffff;
        check(stale, "a read of a TMA stage before its mbarrier wait sees stale data (lazy copies)");
        const int status = in_child([&] {
            run("one_tma", 64, {&mp, &c0, &c1, &wait, &no_acquire, &op}, "forward", "lazy", nullptr, 16384 + 64);
            return 0;
        });
        check(WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT,
              "a TMA copy through a map its thread has not acquired (fence.proxy.tensormap) stops the kernel");
    }
    {  // in a child (the eager mode is read once; a fault kills the process)
        std::vector<float> in(512);
        for (int i = 0; i < 512; ++i) in[i] = (float)i;
        const float* ip = in.data();
        int status = in_child([&] {
            int with = 1;
            run("refill_while_read", 64, {&ip, &with, &o}, "forward", "eager");
            for (int i = 0; i < 64; ++i)
                if (out[i] != in[4 * ((i + 32) % 64)]) return 1;
            return 0;
        });
        check(WIFEXITED(status) && WEXITSTATUS(status) == 0,
              "a refill after the barrier leaves other warps' reads intact (eager copies)");
        status = in_child([&] {
            int without = 0;
            run("refill_while_read", 64, {&ip, &without, &o}, "forward", "eager");
            for (int i = 0; i < 64; ++i)
                if (out[i] != in[4 * ((i + 32) % 64)]) return 0;  // some read saw the refill: caught
            return 1;
        });
        check(WIFEXITED(status) && WEXITSTATUS(status) == 0,
              "a refill without the barrier overwrites what another warp still reads (eager copies)");
        status = in_child([&] {
            unsigned long long p = 0;
            if (cuMemAlloc_v2(&p, 100 * sizeof(float)) != 0) return 2;
            float* buf = (float*)p;
            int n = 100 + 64;  // past the 256-byte rounding, onto the guard page
            run("write_past_end", 1, {&buf, &n}, "forward", "lazy");
            return 0;
        });
        check(WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV,
              "a kernel writing past the end of an allocation faults (guard page)");
        status = in_child([&] {
            run("misaligned_vector_load", 1, {&ip, &o}, "forward", "lazy");
            return 0;
        });
        check(!(WIFEXITED(status) && WEXITSTATUS(status) == 0),
              "a misaligned 16-byte vector load stops the kernel (UBSan alignment)");
        // wgmma on cp.async data: right with the writers' fence.proxy.async, a fault without it.
        const std::vector<unsigned short> a = bf16_near_one(64 * 16, 0x3f00), b = bf16_near_one(128 * 16, 0xbf00);
        std::vector<float> d(64 * 128);
        const unsigned short *ap = a.data(), *bp = b.data();
        float* dp = d.data();
        for (int fence = 1; fence >= 0; --fence) {
            status = in_child([&] {
                run("wgmma_after_cp_async", 128, {&ap, &bp, &fence, &dp}, "forward", "lazy", nullptr, 24576);
                return worst_vs_abt(a, b, d, 64, 128) < 1e-5 ? 0 : 1;
            });
            if (fence)
                check(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                      "wgmma reads cp.async data after the writers' fence.proxy.async");
            else
                check(WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT,
                      "wgmma on cp.async data with no fence.proxy.async stops the kernel");
        }
    }
    {  // lazy streams: a copy from page-locked memory reads it when it runs, not when it is enqueued
        auto refill_before_sync = [](const char* mode) {
            setenv("SGLP_EMU_STREAMS", mode, 1);
            void *host = nullptr, *stream = nullptr;
            unsigned long long dev = 0;
            float back = 0;
            if (cuMemHostAlloc(&host, 4, 0) || cuMemAlloc_v2(&dev, 4) || cuStreamCreate(&stream, 0)) return 2;
            *(float*)host = 1.0f;
            cuMemcpyHtoDAsync_v2(dev, host, 4, stream);
            *(float*)host = 2.0f;  // the refill a missing wait on the copy allows
            cuStreamSynchronize(stream);
            cuMemcpyDtoHAsync_v2(&back, dev, 4, stream);  // pageable: returns once done
            return back == 2.0f ? 1 : 0;                  // 1: the device got the refilled bytes
        };
        auto exit_code = [&](const char* mode) {
            const int status = in_child([&] { return refill_before_sync(mode); });
            return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
        };
        check(exit_code("lazy") == 1 && exit_code("eager") == 0,
              "lazy streams: refilling page-locked memory before its copy has run changes what is copied");
    }
    printf("%s\n", failures ? "gpu emulator self-test: FAILED" : "gpu emulator self-test: ALL OK");
    return failures ? 1 : 0;
}
