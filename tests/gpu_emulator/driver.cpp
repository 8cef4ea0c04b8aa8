// driver.cpp — a fake libcuda.so: the part of the CUDA driver API that cudarc calls for sglp-engine,
// on the host. Device memory is host memory (a CUdeviceptr is the host address), every stream runs its
// work when it is enqueued (one legal order of CUDA's asynchronous semantics), events are complete when
// recorded, and cuLaunchKernel runs the kernel of the same name compiled for the host (runtime.cpp) with
// the launch's arguments. The CUBIN that NVRTC made is not read.
//
// It pretends to be one H100-like device (compute capability 9.0, 132 SMs) with SGLP_EMU_MEMORY_MB of
// memory (default 4096). Copies and memsets are checked against the allocation they touch; a launch that
// fails (a deadlock, a bad shape) returns CUDA_ERROR_LAUNCH_FAILED and prints why.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <memory>
#include <utility>
#include <vector>

#include "runtime.h"

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void* CUcontext;
typedef void* CUstream;
typedef void* CUevent;
typedef void* CUmodule;
typedef void* CUfunction;

enum : int {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_LAUNCH_FAILED = 719,
};

namespace {

// cudarc may call from several threads; the emulator runs one call at a time. Never destroyed (see
// runtime.cpp's `threads`).
std::recursive_mutex& mu = *new std::recursive_mutex();
int context_tag;
CUcontext current_ctx = nullptr;
size_t used = 0;  // device bytes (page-locked host blocks do not count)

size_t memory_budget() {
    const char* env = getenv("SGLP_EMU_MEMORY_MB");
    return (env ? strtoull(env, nullptr, 10) : 4096ull) << 20;
}

bool trace() { return getenv("SGLP_EMU_TRACE") != nullptr; }

// Each block ends at a page with no access rights (the electric-fence scheme): a kernel or a copy that
// runs past the end of a buffer faults at once, and runtime.cpp's fault handler names the kernel.
// Blocks start 256-byte aligned, as cuMemAlloc's do, so an overrun into the < 256 bytes of rounding
// before the guard page goes unseen.
struct Block {
    size_t bytes;      // as asked for
    bool page_locked;  // host memory from cuMemHostAlloc, else device memory
    void* map_base;    // the mapping holding it and its guard page
    size_t map_length;
};
// Device and page-locked host blocks, by address.
std::map<unsigned long long, Block>& blocks = *new std::map<unsigned long long, Block>();

// The block [p, p + bytes) lies in, if it lies in one.
const Block* block_holding(unsigned long long p, size_t bytes) {
    auto it = blocks.upper_bound(p);
    if (it == blocks.begin()) return nullptr;
    --it;
    return p + bytes <= it->first + it->second.bytes ? &it->second : nullptr;
}

CUresult check_range(const char* what, unsigned long long p, size_t bytes) {
    if (bytes == 0 || block_holding(p, bytes)) return CUDA_SUCCESS;
    fprintf(stderr, "gpu emulator: %s of %zu bytes at %#llx is outside every device allocation\n", what, bytes, p);
    return CUDA_ERROR_ILLEGAL_ADDRESS;
}

bool is_page_locked(const void* p, size_t bytes) {
    const Block* b = block_holding((unsigned long long)p, bytes);
    return b && b->page_locked;
}

CUresult allocate(void** out, size_t bytes, bool host) {
    if (!host && used + bytes > memory_budget()) return CUDA_ERROR_OUT_OF_MEMORY;
    const size_t page = (size_t)sysconf(_SC_PAGESIZE), rounded = (bytes + 255) & ~(size_t)255;
    const size_t length = (rounded + page - 1) / page * page + page;
    void* base = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    char* guard = (char*)base + length - page;
    mprotect(guard, page, PROT_NONE);
    char* p = guard - rounded;
    // Fresh device memory is not zeroed on a GPU: fill it with a NaN pattern so a read of unwritten memory shows.
    memset(p, 0xff, rounded);
    blocks[(unsigned long long)p] = {bytes, host, base, length};
    if (!host) used += bytes;
    *out = p;
    return CUDA_SUCCESS;
}

CUresult release(unsigned long long p) {
    auto it = blocks.find(p);
    if (it == blocks.end()) return CUDA_ERROR_INVALID_VALUE;
    const Block b = it->second;
    blocks.erase(it);
    if (!b.page_locked) used -= b.bytes;
    munmap(b.map_base, b.map_length);
    return CUDA_SUCCESS;
}

struct Module {};

// Streams. By default each operation runs when it is enqueued. With SGLP_EMU_STREAMS=lazy an operation
// runs only when something must see its effect — a synchronisation of its stream, of an event recorded
// after it, of the context, a free, a copy into pageable host memory — and a stream that waits on an event
// runs the recording stream up to it first: the latest order CUDA allows. A missing wait between streams,
// or host code that refills a page-locked buffer before the copy reading it has run, gives wrong data.
struct Stream {
    std::deque<std::pair<unsigned long long, std::function<void()>>> queue;
    unsigned long long next = 0;  // sequence number of the next operation enqueued
};
struct Event {
    Stream* stream = nullptr;  // where it was last recorded, and how far: operations before `upto`
    unsigned long long upto = 0;
};
std::set<Stream*>& streams = *new std::set<Stream*>();
Stream& null_stream = *new Stream();
CUresult sticky = CUDA_SUCCESS;  // a lazily run launch that failed: returned by the next synchronisation

bool lazy_streams() {
    static const bool lazy = [] {
        const char* env = getenv("SGLP_EMU_STREAMS");
        return env && strcmp(env, "lazy") == 0;
    }();
    return lazy;
}

Stream* stream_of(CUstream s) { return s ? (Stream*)s : &null_stream; }

// Run stream `s`'s operations enqueued before sequence number `upto`.
void drain(Stream* s, unsigned long long upto) {
    while (!s->queue.empty() && s->queue.front().first < upto) {
        auto op = std::move(s->queue.front().second);
        s->queue.pop_front();
        op();
    }
}
void drain_all() {
    drain(&null_stream, ~0ull);
    for (Stream* s : streams) drain(s, ~0ull);
}

void enqueue(CUstream stream, std::function<void()> op) {
    Stream* s = stream_of(stream);
    if (!lazy_streams()) {
        op();
        return;
    }
    if (s == &null_stream) {  // the legacy default stream waits for all others
        drain_all();
        op();
        return;
    }
    s->queue.emplace_back(s->next++, std::move(op));
}

}  // namespace

#define API extern "C" __attribute__((visibility("default"))) CUresult
#define LOCK std::lock_guard<std::recursive_mutex> lock(mu)

API cuInit(unsigned) { return CUDA_SUCCESS; }
API cuDriverGetVersion(int* v) {
    *v = 12080;
    return CUDA_SUCCESS;
}
API cuDeviceGetCount(int* n) {
    *n = 1;
    return CUDA_SUCCESS;
}
API cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *d = 0;
    return CUDA_SUCCESS;
}
API cuDeviceGetName(char* name, int len, CUdevice) {
    snprintf(name, (size_t)len, "sglp-engine GPU emulator (host)");
    return CUDA_SUCCESS;
}
API cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
    *bytes = memory_budget();
    return CUDA_SUCCESS;
}
API cuDeviceGetAttribute(int* v, int attribute, CUdevice) {
    switch (attribute) {
        case 1: *v = 1024; break;                      // max threads per block
        case 2: case 3: *v = 1024; break;              // max block dim x, y
        case 4: *v = 64; break;                        // max block dim z
        case 5: *v = 2147483647; break;                // max grid dim x
        case 6: case 7: *v = 65535; break;             // max grid dim y, z
        case 8: *v = 49152; break;                     // shared memory per block
        case 10: *v = 32; break;                       // warp size
        case 16: *v = 132; break;                      // multiprocessors
        case 19: case 41: *v = 1; break;               // can map host memory, unified addressing
        case 75: *v = 9; break;                        // compute capability
        case 76: *v = 0; break;
        case 97: *v = 232448; break;                   // shared memory per block, opt-in
        case 115: *v = 0; break;                       // memory pools: no (cuMemAlloc, not cuMemAllocAsync)
        default: *v = 0;
    }
    return CUDA_SUCCESS;
}
API cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice) {
    *c = &context_tag;
    return CUDA_SUCCESS;
}
API cuDevicePrimaryCtxRelease_v2(CUdevice) { return CUDA_SUCCESS; }
API cuDevicePrimaryCtxRelease(CUdevice) { return CUDA_SUCCESS; }
API cuCtxSetCurrent(CUcontext c) {
    current_ctx = c;
    return CUDA_SUCCESS;
}
API cuCtxGetCurrent(CUcontext* c) {
    *c = current_ctx;
    return CUDA_SUCCESS;
}
API cuCtxPushCurrent_v2(CUcontext c) {
    current_ctx = c;
    return CUDA_SUCCESS;
}
API cuCtxPopCurrent_v2(CUcontext* c) {
    if (c) *c = current_ctx;
    return CUDA_SUCCESS;
}
API cuCtxGetDevice(CUdevice* d) {
    *d = 0;
    return CUDA_SUCCESS;
}
API cuCtxSynchronize() {
    LOCK;
    drain_all();
    return std::exchange(sticky, CUDA_SUCCESS);
}

API cuStreamCreate(CUstream* s, unsigned) {
    LOCK;
    Stream* st = new Stream();
    streams.insert(st);
    *s = st;
    return CUDA_SUCCESS;
}
API cuStreamCreateWithPriority(CUstream* s, unsigned, int) { return cuStreamCreate(s, 0); }
API cuStreamDestroy_v2(CUstream s) {
    LOCK;
    drain(stream_of(s), ~0ull);  // its pending work still runs, as CUDA's does
    streams.erase((Stream*)s);
    delete (Stream*)s;
    return CUDA_SUCCESS;
}
API cuStreamSynchronize(CUstream s) {
    LOCK;
    drain(stream_of(s), ~0ull);
    return std::exchange(sticky, CUDA_SUCCESS);
}
API cuStreamQuery(CUstream s) { return cuStreamSynchronize(s); }
API cuStreamWaitEvent(CUstream s, CUevent e, unsigned) {
    LOCK;
    const Event ev = *(Event*)e;  // the record this wait refers to, as of now
    if (ev.stream) enqueue(s, [ev] { drain(ev.stream, ev.upto); });
    return CUDA_SUCCESS;
}

API cuEventCreate(CUevent* e, unsigned) {
    *e = new Event();
    return CUDA_SUCCESS;
}
API cuEventDestroy_v2(CUevent e) {
    delete (Event*)e;
    return CUDA_SUCCESS;
}
API cuEventRecord(CUevent e, CUstream s) {
    LOCK;
    Stream* st = stream_of(s);
    if (lazy_streams() && st == &null_stream) drain_all();
    *(Event*)e = {st, st->next};
    return CUDA_SUCCESS;
}
API cuEventRecordWithFlags(CUevent e, CUstream s, unsigned) { return cuEventRecord(e, s); }
API cuEventSynchronize(CUevent e) {
    LOCK;
    const Event& ev = *(Event*)e;
    if (ev.stream) drain(ev.stream, ev.upto);
    return std::exchange(sticky, CUDA_SUCCESS);
}
// A query runs the work before the event (a lazily run GPU finishes what the host asks about).
API cuEventQuery(CUevent e) { return cuEventSynchronize(e); }
API cuEventElapsedTime(float* ms, CUevent, CUevent) {
    *ms = 0.001f;
    return CUDA_SUCCESS;
}
API cuEventElapsedTime_v2(float* ms, CUevent a, CUevent b) { return cuEventElapsedTime(ms, a, b); }

API cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    LOCK;
    *total = memory_budget();
    *free_bytes = *total - used;
    return CUDA_SUCCESS;
}
API cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    LOCK;
    return allocate((void**)p, bytes, false);
}
API cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream) { return cuMemAlloc_v2(p, bytes); }
API cuMemFree_v2(CUdeviceptr p) {
    LOCK;
    drain_all();  // cuMemFree waits for the work that may use the memory
    return release(p);
}
API cuMemFreeAsync(CUdeviceptr p, CUstream s) {
    LOCK;
    enqueue(s, [p] { release(p); });
    return CUDA_SUCCESS;
}
API cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    LOCK;
    return allocate(p, bytes, true);
}
API cuMemAllocHost_v2(void** p, size_t bytes) { return cuMemHostAlloc(p, bytes, 0); }
API cuMemFreeHost(void* p) {
    LOCK;
    drain_all();
    return release((unsigned long long)p);
}
API cuMemHostRegister_v2(void*, size_t, unsigned) { return CUDA_SUCCESS; }
API cuMemHostUnregister(void*) { return CUDA_SUCCESS; }

// From page-locked memory the copy reads the host bytes when it runs; from pageable memory CUDA stages
// them before the call returns, so a lazy stream takes them now.
API cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t bytes, CUstream s) {
    LOCK;
    if (CUresult r = check_range("copy to the device", dst, bytes)) return r;
    if (!lazy_streams() || is_page_locked(src, bytes)) {
        enqueue(s, [=] { memcpy((void*)dst, src, bytes); });
    } else {
        auto staged = std::make_shared<std::vector<unsigned char>>((const unsigned char*)src,
                                                                   (const unsigned char*)src + bytes);
        enqueue(s, [=] { memcpy((void*)dst, staged->data(), bytes); });
    }
    return CUDA_SUCCESS;
}
// The synchronous forms are the asynchronous ones on the legacy default stream, which waits for all others.
API cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t bytes) { return cuMemcpyHtoDAsync_v2(dst, src, bytes, nullptr); }
API cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t bytes, CUstream s) {
    LOCK;
    if (CUresult r = check_range("copy from the device", src, bytes)) return r;
    enqueue(s, [=] { memcpy(dst, (const void*)src, bytes); });
    if (!is_page_locked(dst, bytes)) drain(stream_of(s), ~0ull);
    return CUDA_SUCCESS;
}
API cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t bytes) { return cuMemcpyDtoHAsync_v2(dst, src, bytes, nullptr); }
API cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream s) {
    LOCK;
    if (CUresult r = check_range("device copy (destination)", dst, bytes)) return r;
    if (CUresult r = check_range("device copy (source)", src, bytes)) return r;
    enqueue(s, [=] { memmove((void*)dst, (const void*)src, bytes); });
    return CUDA_SUCCESS;
}
API cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes) { return cuMemcpyDtoDAsync_v2(dst, src, bytes, nullptr); }
API cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream s) {
    LOCK;
    if (CUresult r = check_range("memset", dst, n)) return r;
    enqueue(s, [=] { memset((void*)dst, v, n); });
    return CUDA_SUCCESS;
}
API cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) { return cuMemsetD8Async(dst, v, n, nullptr); }
API cuMemsetD32Async(CUdeviceptr dst, unsigned v, size_t n, CUstream s) {
    LOCK;
    if (CUresult r = check_range("memset", dst, n * 4)) return r;
    enqueue(s, [=] {
        for (size_t i = 0; i < n; ++i) memcpy((char*)dst + 4 * i, &v, 4);
    });
    return CUDA_SUCCESS;
}
API cuMemsetD32_v2(CUdeviceptr dst, unsigned v, size_t n) { return cuMemsetD32Async(dst, v, n, nullptr); }
API cuPointerGetAttribute(void* data, int, CUdeviceptr) {
    memset(data, 0, sizeof(void*));
    return CUDA_SUCCESS;
}

// A module's kernels are found by name among those compiled for the host; the image (a CUBIN, or PTX) is
// only checked to be one.
API cuModuleLoadData(CUmodule* m, const void* image) {
    const unsigned char* b = (const unsigned char*)image;
    const bool elf = b[0] == 0x7f && b[1] == 'E' && b[2] == 'L' && b[3] == 'F';
    if (!elf && !strstr((const char*)image, ".entry")) {
        fprintf(stderr, "gpu emulator: a module image that is neither a CUBIN nor PTX with an .entry\n");
        return CUDA_ERROR_INVALID_IMAGE;
    }
    *m = new Module();
    return CUDA_SUCCESS;
}
API cuModuleLoadDataEx(CUmodule* m, const void* image, unsigned, void*, void**) { return cuModuleLoadData(m, image); }
API cuModuleUnload(CUmodule m) {
    delete (Module*)m;
    return CUDA_SUCCESS;
}
API cuModuleGetFunction(CUfunction* f, CUmodule, const char* name) {
    const emu::KernelEntry* k = emu::find_kernel(name);
    if (!k) {
        fprintf(stderr, "gpu emulator: no kernel %s compiled for the host\n", name);
        return CUDA_ERROR_NOT_FOUND;
    }
    *f = (void*)k;
    return CUDA_SUCCESS;
}
API cuFuncGetAttribute(int* v, int attribute, CUfunction) {
    *v = attribute == 0 ? 1024 : 0;  // CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK
    return CUDA_SUCCESS;
}
// CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES (8) per kernel: a launch with more than 48 KiB of dynamic
// shared memory fails unless it was raised this far, as on a GPU.
std::map<const void*, int>& dynamic_shared_limits() {
    static auto& m = *new std::map<const void*, int>();
    return m;
}
API cuFuncSetAttribute(CUfunction f, int attribute, int value) {
    LOCK;
    if (attribute == 8) {
        if (value < 0 || value > 232448) return CUDA_ERROR_INVALID_VALUE;
        dynamic_shared_limits()[f] = value;
    }
    return CUDA_SUCCESS;
}
API cuFuncSetCacheConfig(CUfunction, int) { return CUDA_SUCCESS; }

// Tensor maps: the 128 opaque bytes hold an emu::EmuTensorMap (runtime.h; what the TMA twin reads). Only what
// the engine encodes is accepted: 2-D, 16-bit elements, no interleave, 128-byte swizzle of 128-byte box
// rows; the checks the driver makes (alignment, strides) are made here too.
API cuTensorMapEncodeTiled(void* map, int dtype, unsigned rank, void* address, const unsigned long long* dims,
                           const unsigned long long* strides, const unsigned* box, const unsigned* elem_strides,
                           int interleave, int swizzle, int /*l2*/, int oob_fill) {
    if (!map || (uintptr_t)map % 64 != 0 || rank != 2 || dtype != 1 /* UINT16 */ || interleave != 0 ||
        swizzle != 3 || oob_fill != 0 || (uintptr_t)address % 16 != 0 || strides[0] % 16 != 0 ||
        strides[0] < dims[0] * 2 || box[0] * 2 != 128 || box[1] == 0 || box[1] > 256 || elem_strides[0] != 1 ||
        elem_strides[1] != 1) {
        fprintf(stderr, "gpu emulator: cuTensorMapEncodeTiled: arguments it does not emulate or the driver refuses\n");
        return CUDA_ERROR_INVALID_VALUE;
    }
    const emu::EmuTensorMap m = {emu::EmuTensorMap::MAGIC, (unsigned long long)(uintptr_t)address, {dims[0], dims[1]},
                                 strides[0], {box[0], box[1]}, 2, 3};
    memset(map, 0, 128);
    memcpy(map, &m, sizeof m);
    return CUDA_SUCCESS;
}

API cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   unsigned shared_bytes, CUstream s, void** params, void** extra) {
    LOCK;
    const emu::KernelEntry* k = (const emu::KernelEntry*)f;
    if (extra || (k->params > 0 && !params)) return CUDA_ERROR_INVALID_VALUE;
    if (shared_bytes > 49152) {
        auto it = dynamic_shared_limits().find(f);
        const int limit = it == dynamic_shared_limits().end() ? 49152 : it->second;
        if ((int)shared_bytes > limit) {
            fprintf(stderr,
                    "gpu emulator: %s: %u bytes of dynamic shared memory, over its limit of %d (raise it with "
                    "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)\n",
                    k->name, shared_bytes, limit);
            return CUDA_ERROR_INVALID_VALUE;
        }
    }
    const dim3 grid{gx, gy, gz}, block{bx, by, bz};
    const std::string shape = emu::bad_shape(grid, block);
    if (!shape.empty()) {
        fprintf(stderr, "gpu emulator: %s: %s\n", k->name, shape.c_str());
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (trace()) fprintf(stderr, "gpu emulator: %s grid %ux%ux%u block %ux%ux%u\n", k->name, gx, gy, gz, bx, by, bz);
    // The arguments are copied now: `params` points at the caller's values, gone once this returns.
    enqueue(s, [k, grid, block, shared_bytes, call = k->binder(k->fn, params)] {
        std::string error;
        if (!emu::launch(*k, grid, block, shared_bytes, call, error)) {
            fprintf(stderr, "gpu emulator: launch failed: %s\n", error.c_str());
            sticky = CUDA_ERROR_LAUNCH_FAILED;
        }
    });
    return std::exchange(sticky, CUDA_SUCCESS);
}
API cuLaunchHostFunc(CUstream s, void (*fn)(void*), void* data) {
    LOCK;
    enqueue(s, [fn, data] { fn(data); });
    return CUDA_SUCCESS;
}

API cuGetErrorString(CUresult r, const char** s) {
    static auto& names = *new std::map<int, std::string>();
    LOCK;
    auto& n = names[r];
    if (n.empty()) n = "gpu emulator error " + std::to_string(r);
    *s = n.c_str();
    return CUDA_SUCCESS;
}
API cuGetErrorName(CUresult r, const char** s) { return cuGetErrorString(r, s); }

// NVRTC opens libcuda.so.1 and asks it for a private table; this driver has none.
API cuGetExportTable(const void** table, const void*) {
    *table = nullptr;
    return 801;  // CUDA_ERROR_NOT_SUPPORTED
}
