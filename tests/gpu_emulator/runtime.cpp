// runtime.cpp — runs a kernel's grid on the host, block after block, each CUDA thread a fiber
// on one OS thread. Fibers switch only at barriers: __syncthreads releases when every thread of the block
// that has not exited reaches it, a warp-collective operation when every lane of the warp does. Warps
// run one after another, each as far as it can, lanes one after another, in the order SGLP_EMU_ORDER
// names (forward, the default; reverse; or shuffle:SEED): a kernel whose result depends on it has a race.
#include "runtime.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <vector>

namespace emu {

namespace {

// AT_MBAR: waiting for an mbarrier phase (a failed try_wait), retried once the other warps have run.
enum State { RUNNABLE, AT_BLOCK, AT_WARP, AT_MBAR, DONE };

struct Copy {
    void* dst;
    const void* src;
    int bytes;
};

// One wgmma.mma_async of a thread: its accumulators and the operands' descriptors.
struct Mma {
    int dt;
    float* d;
    unsigned long long desc_a, desc_b;
};

// A thread's asynchronous operations of one kind (cp.async, wgmma) in commit groups: each runs at its
// issue when eager (SGLP_EMU_CP_ASYNC=eager), else at the wait that leaves at most `pending` groups
// outstanding, oldest group first.
template <class Op>
struct AsyncGroups {
    std::vector<Op> open;
    std::vector<std::vector<Op>> groups;
    void clear() {
        open.clear();
        groups.clear();
    }
    template <class Run>
    void issue(const Op& op, bool eager, Run run) {
        if (eager)
            run(op);
        else
            open.push_back(op);
    }
    void commit() {
        groups.push_back(std::move(open));
        open.clear();
    }
    template <class Run>
    void wait(int pending, Run run) {
        while ((int)groups.size() > pending) {
            for (const Op& op : groups.front()) run(op);
            groups.erase(groups.begin());
        }
    }
};

constexpr size_t STACK_BYTES = 256 * 1024;
constexpr int SLOT_BYTES = 64;  // the largest warp-collective operand (EmuMmaOperands is 24 bytes)

// Fiber switches. On x86-64 a hand-written switch of the callee-saved registers (glibc's swapcontext
// makes a system call per switch, which took 70% of the emulator's time); elsewhere ucontext.
#if defined(__x86_64__)
struct Context {
    void* sp = nullptr;
};
extern "C" void sglp_emu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl sglp_emu_switch
    .type sglp_emu_switch, @function
sglp_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size sglp_emu_switch, .-sglp_emu_switch
)");
inline void switch_to(Context* from, Context* to) { sglp_emu_switch(&from->sp, to->sp); }
// A stack whose first switch "returns" into `entry` as if it had been called (rsp ≡ 8 mod 16), with
// zeroed callee-saved registers and the current MXCSR and x87 control word.
inline void start_context(Context* c, char* stack, size_t bytes, void (*entry)()) {
    uintptr_t top = ((uintptr_t)(stack + bytes) & ~(uintptr_t)15) - 16;
    uint64_t* sp = (uint64_t*)top;
    *sp = (uint64_t)(uintptr_t)entry;  // at a 16-byte boundary: after `ret`, rsp ≡ 8 mod 16
    for (int i = 0; i < 6; ++i) *--sp = 0;
    --sp;
    uint32_t mxcsr;
    uint16_t fcw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fcw));
    memcpy((char*)sp, &mxcsr, 4);
    memcpy((char*)sp + 4, &fcw, 2);
    c->sp = sp;
}
#else
}  // namespace
}  // namespace emu
#include <ucontext.h>
namespace emu {
namespace {
struct Context {
    ucontext_t uc;
};
inline void switch_to(Context* from, Context* to) { swapcontext(&from->uc, &to->uc); }
inline void start_context(Context* c, char* stack, size_t bytes, void (*entry)()) {
    getcontext(&c->uc);
    c->uc.uc_stack.ss_sp = stack;
    c->uc.uc_stack.ss_size = bytes;
    c->uc.uc_link = nullptr;
    makecontext(&c->uc, entry, 0);
}
#endif

}  // namespace

struct Thread {
    Context ctx;
    dim3 tid;
    int linear = 0;
    State state = RUNNABLE;
    unsigned warp_ops = 0;  // warp-collective operations done: the parity picks the slot buffer
    AsyncGroups<Copy> copies;
    AsyncGroups<Mma> mmas;
    char* stack = nullptr;
};

Thread* current = nullptr;
dim3 grid_dim, block_dim, block_idx;
void reset_mbarriers();
void reset_proxy_view(int threads);
void note_generic_write(const void* dst);

namespace {

// Never destroyed: the engine may exit (an interrupt) while another of its threads is in a launch, and
// exit's destructors must not free what that launch still uses.
Context scheduler;
std::vector<Thread>& threads = *new std::vector<Thread>();
std::vector<unsigned char>& slots = *new std::vector<unsigned char>();  // [2][warps][32][SLOT_BYTES]
int warps_in_block = 0;
const KernelEntry* running = nullptr;
const Call* running_call = nullptr;

std::map<std::string, KernelEntry>& registry() {
    static auto& r = *new std::map<std::string, KernelEntry>();  // never destroyed, as `threads`
    return r;
}

unsigned char* slot(unsigned parity, int warp, int lane) {
    return &slots[(((size_t)(parity & 1) * warps_in_block + warp) * 32 + lane) * SLOT_BYTES];
}

// Progress of the running block, for the mbarrier hang check: bumped when a thread reaches a barrier or
// its end, and when an mbarrier phase completes.
unsigned long long progress_count = 0, last_progress = ~0ull;
int stalled_rounds = 0;
unsigned long long progress() { return progress_count; }

// Pending cp.async groups of a thread that ends are dropped when run_block starts the next block.
void thread_main() {
    (*running_call)();
    ++progress_count;
    current->state = DONE;
    switch_to(&current->ctx, &scheduler);  // never resumed
}

void yield(State s) {
    current->state = s;
    switch_to(&current->ctx, &scheduler);
}

// One cp.async: `bytes` copied, the rest of the 16 zeroed; a write of the generic proxy, which wgmma does
// not see before the writer's fence.proxy.async.
void run_copy(const Copy& c) {
    memcpy(c.dst, c.src, (size_t)c.bytes);
    memset((char*)c.dst + c.bytes, 0, (size_t)(16 - c.bytes));
    note_generic_write(c.dst);
}

// Lanes in warp `w` of the running block (the last warp may be partial).
int lanes_in_warp(int w) { return std::min(32, (int)threads.size() - w * 32); }

std::vector<int> schedule_order(int n, unsigned long long launch_no) {
    std::vector<int> order((size_t)n);
    for (int i = 0; i < n; ++i) order[i] = i;
    const char* env = getenv("SGLP_EMU_ORDER");
    if (env && strcmp(env, "reverse") == 0) {
        std::reverse(order.begin(), order.end());
    } else if (env && strncmp(env, "shuffle", 7) == 0) {
        unsigned long long seed = env[7] == ':' ? strtoull(env + 8, nullptr, 10) : 1;
        std::mt19937_64 rng(seed * 1000003ull + launch_no);
        std::shuffle(order.begin(), order.end(), rng);
    }
    return order;
}

// One block. Each warp in turn runs as far as it can (through its warp-collective operations, up to a
// __syncthreads or its end) before the next starts, so warps drift apart as far as the barriers allow: a
// warp that reads shared memory another warp has not finished writing, or overwrites what another warp
// has yet to read, sees or leaves the wrong data. False on a deadlock.
bool run_block(const std::vector<int>& warp_order, const std::vector<int>& lane_order, std::string& error) {
    const int n = (int)threads.size();
    last_progress = ~0ull;
    stalled_rounds = 0;
    reset_mbarriers();
    reset_proxy_view(n);
    for (Thread& t : threads) {
        start_context(&t.ctx, t.stack, STACK_BYTES, thread_main);
        t.state = RUNNABLE;
        t.warp_ops = 0;
        t.copies.clear();
        t.mmas.clear();
    }
    for (;;) {
        for (int w : warp_order) {
            const int lanes = lanes_in_warp(w);
            for (;;) {
                for (int l : lane_order) {
                    if (l >= lanes) continue;
                    Thread& t = threads[w * 32 + l];
                    if (t.state != RUNNABLE) continue;
                    current = &t;
                    switch_to(&scheduler, &t.ctx);
                }
                current = nullptr;
                int at_warp = 0, exited = 0;
                for (int l = 0; l < lanes; ++l) {
                    at_warp += threads[w * 32 + l].state == AT_WARP;
                    exited += threads[w * 32 + l].state == DONE;
                }
                if (at_warp > 0 && exited > 0) {
                    error = "warp " + std::to_string(w) + ": a warp-collective operation (full mask) after " +
                            std::to_string(exited) + " lanes of the warp exited";
                    return false;
                }
                if (at_warp == 0) break;
                if (at_warp < lanes) {
                    error = "warp " + std::to_string(w) + ": " + std::to_string(at_warp) +
                            " lanes wait at a warp-collective operation, the others at __syncthreads";
                    return false;
                }
                for (int l = 0; l < lanes; ++l) threads[w * 32 + l].state = RUNNABLE;
            }
        }
        int done = 0, at_mbar = 0;
        for (const Thread& t : threads) {
            done += t.state == DONE;
            at_mbar += t.state == AT_MBAR;
        }
        if (done == n) return true;
        if (at_mbar > 0) {
            // Threads waiting for an mbarrier phase retry; those at __syncthreads go on waiting. A round in
            // which no phase completed and no thread got further is a hang on a GPU too.
            const unsigned long long seen = progress();
            if (seen == last_progress && stalled_rounds++ > 0) {
                error = std::to_string(at_mbar) + " threads wait for an mbarrier phase that nothing completes";
                return false;
            }
            if (seen != last_progress) stalled_rounds = 0;
            last_progress = seen;
            for (Thread& t : threads)
                if (t.state == AT_MBAR) t.state = RUNNABLE;
            continue;
        }
        // Every thread not done waits at __syncthreads now (the warps' loops above end no other way).
        for (Thread& t : threads)
            if (t.state == AT_BLOCK) t.state = RUNNABLE;
    }
}

}  // namespace

const dim3& thread_idx() { return current->tid; }

int lane() { return current->linear & 31; }

void sync_block() {
    ++progress_count;
    yield(AT_BLOCK);
}

void warp_gather(const void* in, void* all, int bytes) {
    const int w = current->linear >> 5, l = current->linear & 31;
    const unsigned parity = current->warp_ops++;
    memcpy(slot(parity, w, l), in, (size_t)bytes);
    yield(AT_WARP);
    const int lanes = lanes_in_warp(w);
    for (int i = 0; i < 32; ++i) {
        if (i < lanes)
            memcpy((char*)all + (size_t)i * bytes, slot(parity, w, i), (size_t)bytes);
        else
            memset((char*)all + (size_t)i * bytes, 0, (size_t)bytes);
    }
}

void warp_exchange(const void* in, void* out, int bytes, int (*from_lane)(int, int), int arg) {
    unsigned char all[32 * SLOT_BYTES];
    warp_gather(in, all, bytes);
    memcpy(out, all + (size_t)(from_lane(lane(), arg) & 31) * bytes, (size_t)bytes);
}

// SGLP_EMU_CP_ASYNC=eager copies at the cp.async itself (the earliest moment), otherwise at the wait that
// must see it (the latest): a missing wait shows in the lazy mode, a missing barrier before a stage is
// refilled in the eager one.
bool eager_copies() {
    static const bool eager = [] {
        const char* env = getenv("SGLP_EMU_CP_ASYNC");
        return env && strcmp(env, "eager") == 0;
    }();
    return eager;
}

// SGLP_EMU_WGMMA=eager runs a wgmma.mma_async at its instruction, =lazy at the wait_group that must see
// it; unset, as SGLP_EMU_CP_ASYNC says. The mixed schedules search hardest: lazy copies with eager
// products show a product issued before its operands landed, eager copies with lazy products a stage
// refilled while a product in flight still reads it.
bool eager_products() {
    static const bool eager = [] {
        const char* env = getenv("SGLP_EMU_WGMMA");
        return env ? strcmp(env, "eager") == 0 : eager_copies();
    }();
    return eager;
}

void cp_async(void* dst, const void* src, int bytes) {
    if (bytes < 0 || bytes > 16 || ((uintptr_t)dst | (uintptr_t)src) % 16 != 0) {
        // cp.async.cg moves 16 bytes between 16-byte-aligned addresses (a misaligned one faults on a GPU)
        fprintf(stderr, "gpu emulator: cp.async of %d bytes from %p to %p (16 bytes, both 16-aligned)\n", bytes,
                src, dst);
        abort();
    }
    current->copies.issue({dst, src, bytes}, eager_copies(), run_copy);
}

void cp_async_commit() { current->copies.commit(); }

void cp_async_wait(int pending) { current->copies.wait(pending, run_copy); }

// ---- dynamic shared memory: one window, reserved once, 256 KiB-aligned (so that offsets fit the 18 bits
// of a wgmma descriptor's address), the launch's bytes readable and a guard page after them.
namespace {
constexpr size_t SHARED_WINDOW = 256 * 1024;
unsigned char* window = nullptr;
size_t window_bytes = 0;  // this launch's dynamic shared memory

bool prepare_window(size_t bytes, std::string& error) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    if (!window) {
        void* p = mmap(nullptr, 2 * SHARED_WINDOW + page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            error = "gpu emulator: cannot reserve the shared-memory window";
            return false;
        }
        window = (unsigned char*)(((uintptr_t)p + SHARED_WINDOW - 1) & ~(uintptr_t)(SHARED_WINDOW - 1));
    }
    const size_t readable = (bytes + page - 1) / page * page;
    mprotect(window, SHARED_WINDOW, PROT_NONE);
    if (readable && mprotect(window, readable, PROT_READ | PROT_WRITE) != 0) {
        error = "gpu emulator: cannot map dynamic shared memory";
        return false;
    }
    window_bytes = bytes;
    return true;
}

// A misuse of Hopper's asynchronous units (wgmma, mbarriers, TMA) that a GPU would not survive either:
// named, and the process stops, as a fault inside a launch does.
[[noreturn]] void async_fault(const std::string& what) {
    fprintf(stderr, "gpu emulator: kernel %s, block (%u,%u,%u), thread %u: %s\n",
            running ? running->name : "?", block_idx.x, block_idx.y, block_idx.z, current ? current->tid.x : 0,
            what.c_str());
    abort();
}

// Where 128-byte swizzling puts the byte at unswizzled shared offset `off` (wgmma's descriptors read it
// so, TMA's SWIZZLE_128B writes it so): the 16-byte chunk index (bits 4–6) XORed with the row in the
// 1024-byte atom (bits 7–9).
size_t swizzled_128(size_t off) { return off ^ (((off >> 7) & 7) << 4); }

// ---- what the async proxy (wgmma) sees of dynamic shared memory. A 16-byte chunk that a cp.async (the
// generic proxy) wrote is unseen by wgmma until the writing thread has run fence.proxy.async after the
// write landed (then a barrier passes it on); a wgmma issued on such a chunk is a fault here, where on a
// GPU it may read stale bytes. Plain stores are not tracked (the emulator cannot see them); TMA writes
// through the async proxy itself and needs no fence. Likewise a tensor map in global memory (written by a
// host copy) is seen by a thread's TMA copies only after that thread's
// fence.proxy.tensormap::generic.acquire on it; a copy through any other map is a fault here, where on a
// GPU it may use a stale copy of the map.
std::vector<int> unfenced_writer;                 // per chunk of the window: the writer, or −1
std::vector<std::vector<unsigned>> unfenced_of;  // per thread: chunks it wrote and has not fenced
std::vector<std::vector<const void*>> acquired_maps_of;  // per thread: the tensor maps it acquired

// The shared offset of the 16-bit element (row, k) of a K-major operand, as the PTX ISA's canonical layout
// with 128-byte swizzling places it: 8-row groups `stride` (SBO) bytes apart, rows 128 bytes apart in a
// group, then swizzled_128. Only that mode is emulated (the engine's kernels use no other).
size_t operand_offset(unsigned long long desc, int row, int k) {
    const unsigned mode = (unsigned)(desc >> 62), base_offset = (unsigned)(desc >> 49) & 7;
    if (mode != 1 || base_offset != 0)
        async_fault("descriptor with swizzle mode " + std::to_string(mode) + ", base offset " +
                    std::to_string(base_offset) + " (only 128-byte swizzling from 1024-byte atoms is emulated)");
    const size_t start = (size_t)(desc & 0x3fff) << 4, stride = (size_t)((desc >> 32) & 0x3fff) << 4;
    const size_t off = swizzled_128(start + (size_t)(row >> 3) * stride + (size_t)(row & 7) * 128 + (size_t)k * 2);
    if (off + 2 > window_bytes)
        async_fault("operand element (" + std::to_string(row) + ", " + std::to_string(k) + ") at shared offset " +
                    std::to_string(off) + ", outside the " + std::to_string(window_bytes) +
                    " bytes of dynamic shared memory");
    return off;
}

// The 16-bit element (row, k) of a K-major operand (operand_offset).
unsigned short operand(unsigned long long desc, int row, int k) {
    unsigned short v;
    memcpy(&v, window + operand_offset(desc, row, k), 2);
    return v;
}

// At a warpgroup's wgmma issue: every chunk of its operands (A 64 rows, B 128 rows, 16 values = 2
// chunks a row) must be visible to the async proxy.
void check_operands_fenced(unsigned long long desc_a, unsigned long long desc_b) {
    for (int side = 0; side < 2; ++side)
        for (int row = 0; row < (side ? 128 : 64); ++row)
            for (int k = 0; k < 16; k += 8) {
                const size_t off = operand_offset(side ? desc_b : desc_a, row, k);
                const int writer = unfenced_writer[off / 16];
                if (writer >= 0)
                    async_fault("wgmma reads shared offset " + std::to_string(off) + " (" + (side ? "B" : "A") +
                                " row " + std::to_string(row) + "), which thread " + std::to_string(writer) +
                                "'s cp.async wrote with no fence.proxy.async by that thread since");
            }
}

// This thread's share of D += A·Bᵀ, m64n128k16: warp w of the warpgroup holds rows 16w..16w+15; lane
// (g, t) holds, for each 8-column block j, d[4j + h] at row 16w + g + 8·(h / 2), column 8j + 2t + h % 2.
// Products are exact and summed in f64, as the mma.sync twin does.
void run_mma(const Mma& m) {
    const int wl = current->linear & 127, w = wl >> 5, g = (wl & 31) >> 2, t = wl & 3;
    auto val = [&](unsigned short h) {
        return m.dt == 3 ? (double)bf16_bits_to_f32_(h) : (double)f16_bits_to_f32(h);
    };
    for (int j = 0; j < 16; ++j)
        for (int h = 0; h < 4; ++h) {
            const int row = 16 * w + g + 8 * (h >> 1), col = 8 * j + 2 * t + (h & 1);
            double s = m.d[4 * j + h];
            for (int k = 0; k < 16; ++k) s += val(operand(m.desc_a, row, k)) * val(operand(m.desc_b, col, k));
            m.d[4 * j + h] = (float)s;
        }
}
}  // namespace

void reset_proxy_view(int threads) {
    unfenced_writer.assign(SHARED_WINDOW / 16, -1);
    unfenced_of.assign((size_t)threads, {});
    acquired_maps_of.assign((size_t)threads, {});
}

void note_generic_write(const void* dst) {
    const unsigned char* p = (const unsigned char*)dst;
    if (!window || p < window || p >= window + SHARED_WINDOW) return;  // static shared or global memory
    const unsigned chunk = (unsigned)((p - window) / 16);
    unfenced_writer[chunk] = current->linear;
    unfenced_of[(size_t)current->linear].push_back(chunk);
}

// ---- mbarriers and TMA copies. A barrier is known by its shared offset; its phase completes when its
// pending arrivals reach zero and every byte announced with expect_tx has landed. TMA copies land at the
// first wait on their barrier (lazy; a read of the stage before that wait sees stale data) or at once
// (SGLP_EMU_CP_ASYNC=eager).
namespace {
struct TmaCopy {
    unsigned dst;  // shared offset
    const unsigned char* map;
    int c0, c1;
};
struct Mbarrier {
    unsigned count = 0, pending = 0, phase = 0;
    long long tx = 0;
    std::vector<TmaCopy> copies;
};
std::map<unsigned, Mbarrier>& mbarriers() {
    static auto& m = *new std::map<unsigned, Mbarrier>();
    return m;
}

Mbarrier& barrier_at(unsigned off, const char* what) {
    auto it = mbarriers().find(off);
    if (it == mbarriers().end())
        async_fault(std::string(what) + " on shared offset " + std::to_string(off) + ", not an initialised mbarrier");
    return it->second;
}

void complete_if_done(Mbarrier& b) {
    if (b.pending == 0 && b.tx == 0) {
        b.phase ^= 1;
        b.pending = b.count;
        ++progress_count;
    }
}

// One box of the map into shared memory at `c.dst`, 128-byte swizzled as TMA's SWIZZLE_128B writes it
// (16-byte chunk index XOR the row within the 1024-byte atom); zeros outside the tensor.
void run_tma(Mbarrier& b, const TmaCopy& c) {
    EmuTensorMap m;
    memcpy(&m, c.map, sizeof m);
    if (m.magic != EmuTensorMap::MAGIC) async_fault("cp.async.bulk.tensor through memory that holds no tensor map");
    const size_t row_bytes = (size_t)m.box[0] * m.elem_bytes;
    if (m.swizzle != 3 || row_bytes != 128) async_fault("only 128-byte swizzled boxes of 128-byte rows are emulated");
    if (c.dst % 128 != 0) async_fault("TMA destination not 128-byte aligned");
    const size_t bytes = row_bytes * m.box[1];
    if (c.dst + bytes > window_bytes) async_fault("TMA box past the end of dynamic shared memory");
    for (unsigned r = 0; r < m.box[1]; ++r)
        for (unsigned e = 0; e < m.box[0]; ++e) {
            const long long x = (long long)c.c0 + e, y = (long long)c.c1 + r;
            unsigned char v[8] = {0};
            if (x >= 0 && y >= 0 && (unsigned long long)x < m.dims[0] && (unsigned long long)y < m.dims[1])
                memcpy(v, (const unsigned char*)m.address + (size_t)y * m.stride + (size_t)x * m.elem_bytes, m.elem_bytes);
            memcpy(window + swizzled_128(c.dst + r * row_bytes + e * m.elem_bytes), v, m.elem_bytes);
        }
    b.tx -= (long long)bytes;
    complete_if_done(b);
}
}  // namespace

void reset_mbarriers() { mbarriers().clear(); }

void fence_tensormap_acquire(const void* map) { acquired_maps_of[(size_t)current->linear].push_back(map); }

void mbar_init(unsigned off, unsigned count) {
    if (off % 8 != 0) async_fault("mbarrier not 8-byte aligned");
    mbarriers()[off] = Mbarrier{count, count, 0, 0, {}};
}

void mbar_arrive_expect_tx(unsigned off, unsigned bytes) {
    Mbarrier& b = barrier_at(off, "mbarrier.arrive.expect_tx");
    b.tx += bytes;
    if (b.pending == 0) async_fault("an arrival on an mbarrier phase that has all its arrivals");
    --b.pending;
    complete_if_done(b);
}

void tma_load_2d(unsigned dst, const void* map, int c0, int c1, unsigned bar) {
    Mbarrier& b = barrier_at(bar, "cp.async.bulk.tensor");
    const std::vector<const void*>& acquired = acquired_maps_of[(size_t)current->linear];
    if (std::find(acquired.begin(), acquired.end(), map) == acquired.end())
        async_fault("cp.async.bulk.tensor through a tensor map this thread has not acquired "
                    "(fence.proxy.tensormap::generic.acquire) since its block started");
    const TmaCopy c{dst, (const unsigned char*)map, c0, c1};
    if (eager_copies())
        run_tma(b, c);
    else
        b.copies.push_back(c);
}

bool mbar_try_wait(unsigned off, unsigned parity) {
    Mbarrier& b = barrier_at(off, "mbarrier.try_wait");
    std::vector<TmaCopy> copies;
    copies.swap(b.copies);
    for (const TmaCopy& c : copies) run_tma(b, c);
    if (b.phase != parity) return true;
    yield(AT_MBAR);  // let the other warps run (their arrivals or copies may complete it), then retry
    return false;
}

unsigned char* dynamic_shared() {
    if (window_bytes == 0) {
        fprintf(stderr, "gpu emulator: kernel %s uses dynamic shared memory, launched with none\n",
                running ? running->name : "?");
        abort();
    }
    return window;
}

unsigned shared_offset(const void* p) {
    const unsigned char* b = (const unsigned char*)p;
    if (!window || b < window || b >= window + SHARED_WINDOW) {
        fprintf(stderr, "gpu emulator: smem_addr of %p, outside dynamic shared memory (the only shared memory "
                        "with window addresses here)\n", p);
        abort();
    }
    return (unsigned)(b - window);
}

void wgmma_issue(int dt, float* d, unsigned long long desc_a, unsigned long long desc_b) {
    if (block_dim.x % 128 != 0)
        async_fault("a block of " + std::to_string(block_dim.x) + " threads has partial warpgroups");
    if ((current->linear & 127) == 0) check_operands_fenced(desc_a, desc_b);  // one check a warpgroup
    current->mmas.issue({dt, d, desc_a, desc_b}, eager_products(), run_mma);
}

void fence_proxy_async() {
    for (unsigned chunk : unfenced_of[(size_t)current->linear])
        if (unfenced_writer[chunk] == current->linear) unfenced_writer[chunk] = -1;
    unfenced_of[(size_t)current->linear].clear();
}

void wgmma_commit() { current->mmas.commit(); }

void wgmma_wait(int pending) { current->mmas.wait(pending, run_mma); }

void register_kernel(KernelEntry e) { registry()[e.name] = e; }

const KernelEntry* find_kernel(const char* name) {
    auto it = registry().find(name);
    return it == registry().end() ? nullptr : &it->second;
}

namespace {
// A fault inside a launch (an access past a buffer's guard page, a wild pointer): name the kernel, block
// and thread, then die as the fault would have. Outside a launch the previous handler (Rust's stack
// overflow report) runs.
struct sigaction previous_segv, previous_bus;

void on_fault(int sig, siginfo_t* info, void* ctx) {
    if (running && current) {
        char msg[320];
        int len = snprintf(msg, sizeof msg,
                           "gpu emulator: %s in kernel %s, block (%u,%u,%u), thread (%u,%u,%u), address %p: "
                           "outside every device allocation\n",
                           sig == SIGSEGV ? "SIGSEGV" : "SIGBUS", running->name, block_idx.x, block_idx.y,
                           block_idx.z, current->tid.x, current->tid.y, current->tid.z, info->si_addr);
        if (len > 0) (void)!write(2, msg, (size_t)len);
    }
    const struct sigaction& prev = sig == SIGSEGV ? previous_segv : previous_bus;
    if (!(running && current) && (prev.sa_flags & SA_SIGINFO) && prev.sa_sigaction) {
        prev.sa_sigaction(sig, info, ctx);
        return;
    }
    if (!(running && current) && !(prev.sa_flags & SA_SIGINFO) && prev.sa_handler != SIG_DFL &&
        prev.sa_handler != SIG_IGN) {
        prev.sa_handler(sig);
        return;
    }
    signal(sig, SIG_DFL);
    raise(sig);
}

void install_fault_handler() {
    static bool done = false;
    if (done) return;
    done = true;
    struct sigaction sa = {};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &previous_segv);
    sigaction(SIGBUS, &sa, &previous_bus);
}
}  // namespace

std::string bad_shape(dim3 grid, dim3 block) {
    const unsigned long long n = (unsigned long long)block.x * block.y * block.z;
    if (n == 0 || n > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
        grid.z > 65535)
        return "invalid launch shape: grid " + std::to_string(grid.x) + "x" + std::to_string(grid.y) + "x" +
               std::to_string(grid.z) + ", block " + std::to_string(block.x) + "x" + std::to_string(block.y) +
               "x" + std::to_string(block.z);
    return "";
}

bool launch(const KernelEntry& k, dim3 grid, dim3 block, unsigned shared_bytes, void** params,
            std::string& error) {
    return launch(k, grid, block, shared_bytes, k.binder(k.fn, params), error);
}

bool launch(const KernelEntry& k, dim3 grid, dim3 block, unsigned shared_bytes, const Call& call,
            std::string& error) {
    static unsigned long long launches = 0;
    install_fault_handler();
    const unsigned long long n = (unsigned long long)block.x * block.y * block.z;
    error = bad_shape(grid, block);
    if (!error.empty()) return false;
    if (shared_bytes > SHARED_WINDOW) {
        error = "dynamic shared memory of " + std::to_string(shared_bytes) + " bytes";
        return false;
    }
    if (!prepare_window(shared_bytes, error)) return false;
    if (threads.size() != n) {
        for (Thread& t : threads) munmap(t.stack, STACK_BYTES);
        threads = std::vector<Thread>(n);
        for (Thread& t : threads) {
            void* s = mmap(nullptr, STACK_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (s == MAP_FAILED) {
                error = "gpu emulator: out of memory for fiber stacks";
                return false;
            }
            t.stack = (char*)s;
        }
    }
    for (unsigned long long i = 0; i < n; ++i) {
        Thread& t = threads[i];
        t.linear = (int)i;
        t.tid = {(unsigned)(i % block.x), (unsigned)(i / block.x % block.y), (unsigned)(i / (block.x * block.y))};
    }
    warps_in_block = (int)((n + 31) / 32);
    slots.assign((size_t)2 * warps_in_block * 32 * SLOT_BYTES, 0);
    grid_dim = grid;
    block_dim = block;
    running = &k;
    running_call = &call;
    const std::vector<int> warp_order = schedule_order(warps_in_block, launches), lane_order = schedule_order(32, ~launches);
    ++launches;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                block_idx = {x, y, z};
                if (k.shared_begin && k.shared_end > k.shared_begin)
                    memset(k.shared_begin, 0xff, (size_t)(k.shared_end - k.shared_begin));
                if (shared_bytes) memset(window, 0xff, shared_bytes);
                if (!run_block(warp_order, lane_order, error)) {
                    running = nullptr;
                    error = std::string(k.name) + " block (" + std::to_string(x) + "," + std::to_string(y) + "," +
                            std::to_string(z) + "): " + error;
                    return false;
                }
            }
    running = nullptr;
    return true;
}

}  // namespace emu
