// runtime_linear.cu — the linear layer y = x Wᵀ + b (x [n, k], W [m, k] PyTorch layout, y [n, m]) and its
// backward dx += dy W, dW += dyᵀ x, db += Σ_rows dy, as f32 SIMT tiled GEMMs (the correct baseline; no
// tensor cores). One template computes C[M, N] (+)= Σ_r A(i, r) B(r, j) over 64 × 64 tiles of C, 16 of
// the reduction per step through shared memory, 256 threads with 4 × 4 outputs each (rows ty + 16x,
// columns tx + 16y: a warp's stores are 16 consecutive columns). Each operand is read with its
// contiguous index along the threads (coalesced) whichever of its two indices that is. Each output is
// one thread's sum in order over r: deterministic, no atomics, no split-K.
//
// The *_bf16 kernels compute the same three products on tensor cores (lin_mma, below): the weight held
// as bf16 (rounded once, at upload), activations and gradients rounded to bf16 as they are staged, f32
// accumulation. The host runs them for a weight held as bf16 (`Matmul::Bf16`, src/runtime/ops/cuda.rs).
// On Hopper, linear_wgmma (below) is the candidate for the same three products.
#include "wgmma.cuh"

#define LIN_BM 64
#define LIN_BN 64
#define LIN_BK 16
#define LIN_THREADS 256
static_assert(LIN_BM == LIN_BN, "lin_stage stages both operands' tiles with one shape");

// Stage rows [i0, i0 + 64) × reduction [r0, r0 + 16) of an operand into S[r][i] (zero outside): P(i, r) =
// P[i·ld + r] when R_CONTIG, else P[r·ld + i]; the threads walk the contiguous index (coalesced).
template <bool R_CONTIG>
__device__ __forceinline__ void lin_stage(float (*S)[LIN_BM + 1], const float* __restrict__ P, u64 ld,
                                          int rows, int R, int i0, int r0, int t) {
#pragma unroll
    for (int q = 0; q < (LIN_BM * LIN_BK) / LIN_THREADS; ++q) {
        int e = t + q * LIN_THREADS;
        int ii, rr;
        if (R_CONTIG) { rr = e % LIN_BK; ii = e / LIN_BK; } else { ii = e % LIN_BM; rr = e / LIN_BM; }
        int gi = i0 + ii, gr = r0 + rr;
        float v = 0.0f;
        if (gi < rows && gr < R) v = R_CONTIG ? P[(u64)gi * ld + gr] : P[(u64)gr * ld + gi];
        S[rr][ii] = v;
    }
}

// A(i, r) = A[i·lda + r] when A_R (r contiguous), else A[r·lda + i]; B(r, j) = B[j·ldb + r] when B_R,
// else B[r·ldb + j]. ACC: C += result, else C = result (+ bias[j] when bias is not null).
template <bool A_R, bool B_R, bool ACC>
__device__ __forceinline__ void lin_gemm(const float* __restrict__ A, u64 lda, const float* __restrict__ B,
                                         u64 ldb, float* __restrict__ C, u64 ldc,
                                         const float* __restrict__ bias, int M, int N, int R) {
    __shared__ float As[LIN_BK][LIN_BM + 1];
    __shared__ float Bs[LIN_BK][LIN_BN + 1];
    int t = threadIdx.x, tx = t % 16, ty = t / 16;
    int i0 = blockIdx.y * LIN_BM, j0 = blockIdx.x * LIN_BN;
    float acc[4][4];
#pragma unroll
    for (int x = 0; x < 4; ++x)
#pragma unroll
        for (int y = 0; y < 4; ++y) acc[x][y] = 0.0f;
    for (int r0 = 0; r0 < R; r0 += LIN_BK) {
        lin_stage<A_R>(As, A, lda, M, R, i0, r0, t);
        lin_stage<B_R>(Bs, B, ldb, N, R, j0, r0, t);
        __syncthreads();
#pragma unroll
        for (int r = 0; r < LIN_BK; ++r) {
            float a[4], b[4];
#pragma unroll
            for (int x = 0; x < 4; ++x) a[x] = As[r][ty + 16 * x];
#pragma unroll
            for (int y = 0; y < 4; ++y) b[y] = Bs[r][tx + 16 * y];
#pragma unroll
            for (int x = 0; x < 4; ++x)
#pragma unroll
                for (int y = 0; y < 4; ++y) acc[x][y] = fmaf(a[x], b[y], acc[x][y]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int x = 0; x < 4; ++x) {
        int gi = i0 + ty + 16 * x;
        if (gi >= M) continue;
#pragma unroll
        for (int y = 0; y < 4; ++y) {
            int gj = j0 + tx + 16 * y;
            if (gj >= N) continue;
            float* c = C + (u64)gi * ldc + gj;
            if (ACC) *c += acc[x][y];
            else *c = bias ? acc[x][y] + bias[gj] : acc[x][y];
        }
    }
}

// y = x Wᵀ (+ b): C = y [n, m], A(i, r) = x[i, r], B(r, j) = W[j, r]. Grid (ceil(m/64), ceil(n/64)).
extern "C" __global__ void __launch_bounds__(LIN_THREADS)
linear_forward(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
               float* __restrict__ y, int n, int k, int m) {
    lin_gemm<true, true, false>(x, k, w, k, y, m, b, n, m, k);
}

// dx += dy W: C = dx [n, k], A(i, r) = dy[i, r], B(r, j) = W[r, j]. Grid (ceil(k/64), ceil(n/64)).
extern "C" __global__ void __launch_bounds__(LIN_THREADS)
linear_backward_input(const float* __restrict__ dy, const float* __restrict__ w, float* __restrict__ dx,
                      int n, int k, int m) {
    lin_gemm<true, false, true>(dy, m, w, k, dx, k, nullptr, n, k, m);
}

// dW += dyᵀ x: C = dW [m, k], A(i, r) = dy[r, i], B(r, j) = x[r, j]. Grid (ceil(k/64), ceil(m/64)).
extern "C" __global__ void __launch_bounds__(LIN_THREADS)
linear_backward_weight(const float* __restrict__ dy, const float* __restrict__ x, float* __restrict__ dw,
                       int n, int k, int m) {
    lin_gemm<false, false, true>(dy, m, x, k, dw, k, nullptr, m, k, n);
}

// db[j] += Σ_rows dy[r, j] in f64 (as the CPU), one thread per column, rows in order.
extern "C" __global__ void linear_backward_bias(const float* __restrict__ dy, float* __restrict__ db, int n,
                                                int m) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= m) return;
    double s = 0.0;
    for (int r = 0; r < n; ++r) s += (double)dy[(u64)r * m + j];
    db[j] += (float)s;
}

// ------------------------------------------------------------------ tensor cores: bf16 × bf16 → f32
// lin_mma<A_R, B_R, ACC>: the product of lin_gemm (same operand conventions) over 128 × 128 tiles of C,
// 32 of the reduction per step, with the Gram's warp layout and mma step (mma.cuh). Each thread stages 8
// pairs (r, r + 1) of each operand: loaded from global memory as f32 one step ahead (in registers, while
// the tensor cores work on the current step), rounded to a bf16 pair and stored as one 32-bit word.
// An r-contiguous operand (A_R / B_R) is read 32 consecutive floats of a row per 16 threads; the other
// layout 32 consecutive rows (i) of one r per warp: both coalesced. Each output is one thread's
// accumulator in a fixed order: deterministic, no atomics. Cost: 2·M·N·R FLOPs; each f32 operand value is
// read once per 128-wide tile of the other side (from L2 after the first).

// An operand value as f32: activations and gradients are f32, weights f32 or bf16 bits (exact in f32,
// so rounding them again to bf16 in lin_store_pairs gives back the same bits).
__device__ __forceinline__ float lin_value(float v) { return v; }
__device__ __forceinline__ float lin_value(u16 v) { return bf16_bits_to_f32(v); }

// The 16 values of one operand's step, as f32: pair q of this thread at tile row p / 16 (r-contiguous)
// or p % 128 (else), p = tid + 256 q; zero outside [0, rows) × [0, R).
template <bool R_CONTIG, typename T>
__device__ __forceinline__ void lin_load_pairs(const T* __restrict__ P, u64 ld, int rows, int R, int i0,
                                               int r0, int tid, float2* v) {
#pragma unroll
    for (int q = 0; q < 8; ++q) {
        const int p = tid + 256 * q;
        const int ii = R_CONTIG ? p >> 4 : p & 127, rr = R_CONTIG ? 2 * (p & 15) : 2 * (p >> 7);
        const int gi = i0 + ii, gr = r0 + rr;
        float a = 0.0f, b = 0.0f;
        if (gi < rows) {
            if (R_CONTIG) {
                if (gr < R) a = lin_value(P[(u64)gi * ld + gr]);
                if (gr + 1 < R) b = lin_value(P[(u64)gi * ld + gr + 1]);
            } else {
                if (gr < R) a = lin_value(P[(u64)gr * ld + gi]);
                if (gr + 1 < R) b = lin_value(P[(u64)(gr + 1) * ld + gi]);
            }
        }
        v[q] = make_float2(a, b);
    }
}

template <bool R_CONTIG>
__device__ __forceinline__ void lin_store_pairs(u16 (*S)[MK + MPAD], const float2* v, int tid) {
#pragma unroll
    for (int q = 0; q < 8; ++q) {
        const int p = tid + 256 * q;
        const int ii = R_CONTIG ? p >> 4 : p & 127, rr = R_CONTIG ? 2 * (p & 15) : 2 * (p >> 7);
        *(u32*)&S[ii][rr] = pack_bf16x2(v[q].x, v[q].y);
    }
}

template <bool A_R, bool B_R, bool ACC, typename TB>
__device__ __forceinline__ void lin_mma(const float* __restrict__ A, u64 lda, const TB* __restrict__ B,
                                        u64 ldb, float* __restrict__ C, u64 ldc,
                                        const float* __restrict__ bias, int M, int N, int R) {
    __shared__ __align__(16) u16 As[MM][MK + MPAD];
    __shared__ __align__(16) u16 Bs[MM][MK + MPAD];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp & 3, wn = warp >> 2, g = lane >> 2, t = lane & 3;
    const int i0 = blockIdx.y * MM, j0 = blockIdx.x * MM;
    float acc[2][8][4];
    zero_acc(acc);
    float2 va[8], vb[8];
    lin_load_pairs<A_R>(A, lda, M, R, i0, 0, tid, va);
    lin_load_pairs<B_R>(B, ldb, N, R, j0, 0, tid, vb);
    for (int r0 = 0; r0 < R; r0 += MK) {
        lin_store_pairs<A_R>(As, va, tid);
        lin_store_pairs<B_R>(Bs, vb, tid);
        __syncthreads();
        if (r0 + MK < R) {  // the next step's loads are in flight during this step's mma
            lin_load_pairs<A_R>(A, lda, M, R, i0, r0 + MK, tid, va);
            lin_load_pairs<B_R>(B, ldb, N, R, j0, r0 + MK, tid, vb);
        }
        mma_warp_step<DT_BF16>(As, Bs, acc, wm, wn, g, t);
        __syncthreads();
    }
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int h = 0; h < 4; ++h) {
                const int gi = i0 + mma_acc_row(wm, mt, g, h), gj = j0 + mma_acc_col(wn, nt, t, h);
                if (gi >= M || gj >= N) continue;
                float* c = C + (u64)gi * ldc + gj;
                if (ACC) *c += acc[mt][nt][h];
                else *c = bias ? acc[mt][nt][h] + bias[gj] : acc[mt][nt][h];
            }
}

// As linear_forward, on tensor cores, the weight held as bf16 bits. Grid (ceil(m/128), ceil(n/128)).
extern "C" __global__ void __launch_bounds__(256)
linear_forward_bf16(const float* __restrict__ x, const u16* __restrict__ w, const float* __restrict__ b,
                    float* __restrict__ y, int n, int k, int m) {
    lin_mma<true, true, false>(x, k, w, k, y, m, b, n, m, k);
}

// As linear_backward_input, on tensor cores, the weight held as bf16 bits. Grid (ceil(k/128),
// ceil(n/128)).
extern "C" __global__ void __launch_bounds__(256)
linear_backward_input_bf16(const float* __restrict__ dy, const u16* __restrict__ w, float* __restrict__ dx,
                           int n, int k, int m) {
    lin_mma<true, false, true>(dy, m, w, k, dx, k, nullptr, n, k, m);
}

// As linear_backward_weight, on tensor cores. Grid (ceil(k/128), ceil(m/128)).
extern "C" __global__ void __launch_bounds__(256)
linear_backward_weight_bf16(const float* __restrict__ dy, const float* __restrict__ x,
                            float* __restrict__ dw, int n, int k, int m) {
    lin_mma<false, false, true>(dy, m, x, k, dw, k, nullptr, m, k, n);
}

// ------------------------------------------------------------------ Hopper: wgmma on bf16 copies
// linear_wgmma: C[M, N] (+)= A · Bᵀ (+ bias[j]) with A [M, R] and B [N, R] bf16, both K-major with row
// stride R (R % 8 == 0, buffers 16-byte aligned), on wgmma.cuh's 128 × 128 tiles (cp.async stages). The
// host forms A and B from the f32 activations and gradients and the bf16 weight with to_bf16_* (a bf16
// copy and/or a transposed one), so the linear layer's three products become:
//   forward  y   = x·Wᵀ    A = bf16(x)   [n, k]    B = W  [m, k]    R = k
//   input    dx += dy·W    A = bf16(dy)  [n, m]    B = Wᵀ [k, m]    R = m
//   weight   dw += dyᵀ·x   A = bf16(dy)ᵀ [m, n8]   B = bf16(x)ᵀ [k, n8]    R = n8 = n rounded up to 8
//                          (rows n .. n8 of the transposes are zeros)
// The numbers of the *_bf16 kernels (operands rounded once to bf16, f32 accumulation), another order of
// the sums; each output is one thread's accumulator: deterministic. N is even (k and m are multiples of
// 8 on this path), so a thread's two neighbouring columns go out as one float2. Cost: 2·M·N·R FLOPs, and
// per conversion pass 6 bytes an f32 element (4 a bf16 weight element). Grid (⌈N/128⌉, ⌈M/128⌉),
// WGMMA_SHARED bytes of dynamic shared memory. Never run on a GPU yet: SGLP_LINEAR_KERNEL=wgmma.
extern "C" __global__ void __launch_bounds__(256, 1)
linear_wgmma(const u16* __restrict__ a, const u16* __restrict__ b, const float* __restrict__ bias,
             float* __restrict__ c, int M, int N, int R, int accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(SGLP_HOST_EMULATION)
    const int tid = threadIdx.x, i0 = blockIdx.y * MM, j0 = blockIdx.x * MM;
    const WgmmaTile tile{wgmma_smem(), 0, R, i0, j0, (R + WK - 1) / WK, false};
    const CpAsyncStages st{a, (u64)R, M, b, (u64)R, N};
    float acc[64];
    wgmma_tile_product<DT_BF16>(st, tile, acc);
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
        for (int h = 0; h < 4; h += 2) {
            const int gi = i0 + wgmma_acc_row(tid, h), gj = j0 + wgmma_acc_col(tid, j, h);
            if (gi >= M || gj >= N) continue;
            float2* p = (float2*)(c + (u64)gi * N + gj);
            float2 v = make_float2(acc[4 * j + h], acc[4 * j + h + 1]);
            if (accumulate) {
                const float2 o = *p;
                v.x += o.x;
                v.y += o.y;
            } else if (bias) {
                v.x += bias[gj];
                v.y += bias[gj + 1];
            }
            *p = v;
        }
#else
    __trap();  // sm_90a only: the host launches it on no other device
#endif
}

// to_bf16_*: from x (rows × cols, row-major; f32, or bf16 bits), y = x as bf16 in the same layout (null:
// not wanted) and yt = xᵀ as bf16, cols rows of ldt values (ldt ≥ rows; zeros in columns rows .. ldt;
// null: not wanted). 32 × 32 tiles through shared memory, 256 threads (8 rows of 32): reads and both
// writes run along rows (coalesced). f32 rounds to nearest even, as the *_bf16 kernels' staging does.
// Grid (⌈cols/32⌉, ⌈max(rows, ldt)/32⌉).
#define TB 32
__device__ __forceinline__ u16 bf16_of(float v) { return f32_to_bf16_bits(v); }
__device__ __forceinline__ u16 bf16_of(u16 v) { return v; }

template <typename T>
__device__ __forceinline__ void to_bf16(const T* __restrict__ x, int rows, int cols, u16* __restrict__ y,
                                        u16* __restrict__ yt, int ldt) {
    __shared__ u16 tile[TB][TB + 2];  // rows 17 words apart: the transposed reads hit 32 banks
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
    const int c0 = blockIdx.x * TB, r0 = blockIdx.y * TB;
#pragma unroll
    for (int q = ty; q < TB; q += 8) {
        const int r = r0 + q, c = c0 + tx;
        const bool in = r < rows && c < cols;
        const u16 v = in ? bf16_of(x[(u64)r * cols + c]) : (u16)0;
        if (y && in) y[(u64)r * cols + c] = v;
        tile[q][tx] = v;
    }
    if (!yt) return;  // the same for the whole block
    __syncthreads();
#pragma unroll
    for (int q = ty; q < TB; q += 8) {
        const int c = c0 + q, r = r0 + tx;  // yt[c][r] = x[r][c]
        if (c < cols && r < ldt) yt[(u64)c * ldt + r] = tile[tx][q];
    }
}

extern "C" __global__ void __launch_bounds__(256)
to_bf16_f32(const float* __restrict__ x, int rows, int cols, u16* __restrict__ y, u16* __restrict__ yt, int ldt) {
    to_bf16(x, rows, cols, y, yt, ldt);
}

extern "C" __global__ void __launch_bounds__(256)
to_bf16_bf16(const u16* __restrict__ x, int rows, int cols, u16* __restrict__ y, u16* __restrict__ yt, int ldt) {
    to_bf16(x, rows, cols, y, yt, ldt);
}
