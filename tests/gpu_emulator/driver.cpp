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
#include <map>
#include <mutex>
#include <set>
#include <string>
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
// Device and page-locked host blocks: address → bytes.
std::map<unsigned long long, size_t>& allocations = *new std::map<unsigned long long, size_t>();
std::set<unsigned long long>& page_locked = *new std::set<unsigned long long>();
size_t used = 0;  // device bytes (page-locked host blocks do not count)

size_t memory_budget() {
    const char* env = getenv("SGLP_EMU_MEMORY_MB");
    return (env ? strtoull(env, nullptr, 10) : 4096ull) << 20;
}

bool trace() { return getenv("SGLP_EMU_TRACE") != nullptr; }

// The allocation [p, p + bytes) lies in, if it lies in one.
bool in_allocation(unsigned long long p, size_t bytes) {
    auto it = allocations.upper_bound(p);
    if (it == allocations.begin()) return false;
    --it;
    return p + bytes <= it->first + it->second;
}

CUresult check_range(const char* what, unsigned long long p, size_t bytes) {
    if (bytes == 0 || in_allocation(p, bytes)) return CUDA_SUCCESS;
    fprintf(stderr, "gpu emulator: %s of %zu bytes at %#llx is outside every device allocation\n", what, bytes, p);
    return CUDA_ERROR_ILLEGAL_ADDRESS;
}

// Each block ends at a page with no access rights (the electric-fence scheme): a kernel or a copy that
// runs past the end of a buffer faults at once, and runtime.cpp's fault handler names the kernel.
// Blocks start 256-byte aligned, as cuMemAlloc's do, so an overrun into the < 256 bytes of rounding
// before the guard page goes unseen.
struct Mapping {
    void* base;
    size_t length;
};
std::map<unsigned long long, Mapping>& mappings = *new std::map<unsigned long long, Mapping>();

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
    allocations[(unsigned long long)p] = bytes;
    mappings[(unsigned long long)p] = {base, length};
    if (host)
        page_locked.insert((unsigned long long)p);
    else
        used += bytes;
    *out = p;
    return CUDA_SUCCESS;
}

CUresult release(unsigned long long p) {
    auto it = allocations.find(p);
    if (it == allocations.end()) return CUDA_ERROR_INVALID_VALUE;
    if (!page_locked.erase(p)) used -= it->second;
    allocations.erase(it);
    const Mapping m = mappings[p];
    mappings.erase(p);
    munmap(m.base, m.length);
    return CUDA_SUCCESS;
}

struct Module {};

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
API cuCtxSynchronize() { return CUDA_SUCCESS; }

API cuStreamCreate(CUstream* s, unsigned) {
    *s = new int(0);
    return CUDA_SUCCESS;
}
API cuStreamCreateWithPriority(CUstream* s, unsigned, int) { return cuStreamCreate(s, 0); }
API cuStreamDestroy_v2(CUstream s) {
    delete (int*)s;
    return CUDA_SUCCESS;
}
API cuStreamSynchronize(CUstream) { return CUDA_SUCCESS; }
API cuStreamQuery(CUstream) { return CUDA_SUCCESS; }
API cuStreamWaitEvent(CUstream, CUevent, unsigned) { return CUDA_SUCCESS; }

API cuEventCreate(CUevent* e, unsigned) {
    *e = new int(0);
    return CUDA_SUCCESS;
}
API cuEventDestroy_v2(CUevent e) {
    delete (int*)e;
    return CUDA_SUCCESS;
}
API cuEventRecord(CUevent, CUstream) { return CUDA_SUCCESS; }
API cuEventRecordWithFlags(CUevent, CUstream, unsigned) { return CUDA_SUCCESS; }
API cuEventSynchronize(CUevent) { return CUDA_SUCCESS; }
API cuEventQuery(CUevent) { return CUDA_SUCCESS; }
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
    return release(p);
}
API cuMemFreeAsync(CUdeviceptr p, CUstream) { return cuMemFree_v2(p); }
API cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    LOCK;
    return allocate(p, bytes, true);
}
API cuMemAllocHost_v2(void** p, size_t bytes) { return cuMemHostAlloc(p, bytes, 0); }
API cuMemFreeHost(void* p) {
    LOCK;
    return release((unsigned long long)p);
}
API cuMemHostRegister_v2(void*, size_t, unsigned) { return CUDA_SUCCESS; }
API cuMemHostUnregister(void*) { return CUDA_SUCCESS; }

API cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t bytes, CUstream) {
    LOCK;
    if (CUresult r = check_range("copy to the device", dst, bytes)) return r;
    memcpy((void*)dst, src, bytes);
    return CUDA_SUCCESS;
}
API cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t bytes) { return cuMemcpyHtoDAsync_v2(dst, src, bytes, nullptr); }
API cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t bytes, CUstream) {
    LOCK;
    if (CUresult r = check_range("copy from the device", src, bytes)) return r;
    memcpy(dst, (const void*)src, bytes);
    return CUDA_SUCCESS;
}
API cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t bytes) { return cuMemcpyDtoHAsync_v2(dst, src, bytes, nullptr); }
API cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream) {
    LOCK;
    if (CUresult r = check_range("device copy (destination)", dst, bytes)) return r;
    if (CUresult r = check_range("device copy (source)", src, bytes)) return r;
    memmove((void*)dst, (const void*)src, bytes);
    return CUDA_SUCCESS;
}
API cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes) { return cuMemcpyDtoDAsync_v2(dst, src, bytes, nullptr); }
API cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream) {
    LOCK;
    if (CUresult r = check_range("memset", dst, n)) return r;
    memset((void*)dst, v, n);
    return CUDA_SUCCESS;
}
API cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) { return cuMemsetD8Async(dst, v, n, nullptr); }
API cuMemsetD32Async(CUdeviceptr dst, unsigned v, size_t n, CUstream) {
    LOCK;
    if (CUresult r = check_range("memset", dst, n * 4)) return r;
    for (size_t i = 0; i < n; ++i) memcpy((char*)dst + 4 * i, &v, 4);
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
API cuFuncSetAttribute(CUfunction, int, int) { return CUDA_SUCCESS; }
API cuFuncSetCacheConfig(CUfunction, int) { return CUDA_SUCCESS; }

API cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   unsigned shared_bytes, CUstream, void** params, void** extra) {
    LOCK;
    const emu::KernelEntry* k = (const emu::KernelEntry*)f;
    if (extra || (k->params > 0 && !params)) return CUDA_ERROR_INVALID_VALUE;
    if (shared_bytes > 232448) return CUDA_ERROR_INVALID_VALUE;
    if (trace()) fprintf(stderr, "gpu emulator: %s grid %ux%ux%u block %ux%ux%u\n", k->name, gx, gy, gz, bx, by, bz);
    std::string error;
    if (!emu::launch(*k, {gx, gy, gz}, {bx, by, bz}, params, error)) {
        fprintf(stderr, "gpu emulator: launch failed: %s\n", error.c_str());
        return CUDA_ERROR_LAUNCH_FAILED;
    }
    return CUDA_SUCCESS;
}
API cuLaunchHostFunc(CUstream, void (*fn)(void*), void* data) {
    fn(data);
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
