// runtime.h — kernel launches on the host: the registry of emulated kernels (filled by each kernel file's
// registration unit, see build.sh) and the grid runner of runtime.cpp.
#pragma once
#include <cstddef>
#include <functional>
#include <string>
#include <tuple>
#include <utility>

#include "cuda_host.h"

namespace emu {

// Kernel `fn` bound to copies of the arguments cuLaunchKernel's `params` point at (so that a launch can
// run after the call returns: the driver's lazy streams).
using Call = std::function<void()>;
using Binder = Call (*)(void* fn, void** params);

template <class... A, size_t... I>
Call bind_with(void (*fn)(A...), void** params, std::index_sequence<I...>) {
    return [fn, args = std::tuple<A...>(*static_cast<A*>(params[I])...)] { std::apply(fn, args); };
}
template <class... A>
Call bind(void* fn, void** params) {
    auto f = reinterpret_cast<void (*)(A...)>(fn);
    return bind_with(f, params, std::index_sequence_for<A...>{});
}
template <class... A>
Binder binder_for(void (*)(A...)) {
    return &bind<A...>;
}

struct KernelEntry {
    const char* name;
    void* fn;
    Binder binder;
    int params;
    // The kernel file's shared-memory section (cuda_host.h), filled with NaN bytes before each block.
    unsigned char* shared_begin;
    unsigned char* shared_end;
};
void register_kernel(KernelEntry e);
const KernelEntry* find_kernel(const char* name);

template <class... A>
struct Registrar {
    Registrar(const char* name, void (*fn)(A...), unsigned char* shared_begin, unsigned char* shared_end) {
        register_kernel(
            {name, reinterpret_cast<void*>(fn), binder_for(fn), (int)sizeof...(A), shared_begin, shared_end});
    }
};

// What the driver's cuTensorMapEncodeTiled (driver.cpp) writes into a CUtensorMap's 128 opaque bytes, and
// the TMA twin (runtime.cpp) reads: a 2-D tensor of `elem_bytes` elements, rows `stride` bytes apart.
struct EmuTensorMap {
    static constexpr unsigned long long MAGIC = 0x50414d54504c4753ull;  // "SGLPTMAP"
    unsigned long long magic;
    unsigned long long address;
    unsigned long long dims[2], stride;
    unsigned box[2], elem_bytes, swizzle;
};
static_assert(sizeof(EmuTensorMap) <= 128, "fits a CUtensorMap");

// A launch shape CUDA would refuse, described; empty if it is valid.
std::string bad_shape(dim3 grid, dim3 block);
// Runs the grid of `call` (kernel `k` with its arguments bound), block after block, with `shared_bytes`
// of dynamic shared memory; false with `error` set on a deadlock (a barrier some threads of the block
// never reach), a bad launch shape or a faulty asynchronous matrix product.
bool launch(const KernelEntry& k, dim3 grid, dim3 block, unsigned shared_bytes, const Call& call,
            std::string& error);
// The same, binding the arguments `params` points at now.
bool launch(const KernelEntry& k, dim3 grid, dim3 block, unsigned shared_bytes, void** params,
            std::string& error);

}  // namespace emu

// The linker's bounds of this file's shared-memory section (weak: a file without shared arrays has none).
#define SGLP_EMU_CAT2(a, b) a##b
#define SGLP_EMU_CAT(a, b) SGLP_EMU_CAT2(a, b)
extern "C" __attribute__((weak)) unsigned char SGLP_EMU_CAT(__start_, SGLP_EMU_SECTION_ID)[];
extern "C" __attribute__((weak)) unsigned char SGLP_EMU_CAT(__stop_, SGLP_EMU_SECTION_ID)[];

#define SGLP_EMU_REGISTER(name)                                                     \
    static emu::Registrar sglp_emu_reg_##name(#name, &name,                         \
                                              SGLP_EMU_CAT(__start_, SGLP_EMU_SECTION_ID), \
                                              SGLP_EMU_CAT(__stop_, SGLP_EMU_SECTION_ID));
