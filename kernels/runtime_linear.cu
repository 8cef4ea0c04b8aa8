// runtime_linear.cu — the linear layer y = x Wᵀ + b (x [n, k], W [m, k] PyTorch layout, y [n, m]) and its
// backward dx += dy W, dW += dyᵀ x, db += Σ_rows dy, as f32 SIMT tiled GEMMs (the correct baseline; no
// tensor cores). One template computes C[M, N] (+)= Σ_r A(i, r) B(r, j) over 64 × 64 tiles of C, 16 of
// the reduction per step through shared memory, 256 threads with 4 × 4 outputs each (rows ty + 16x,
// columns tx + 16y: a warp's stores are 16 consecutive columns). Each operand is read with its
// contiguous index along the threads (coalesced) whichever of its two indices that is. Each output is
// one thread's sum in order over r: deterministic, no atomics, no split-K.

typedef unsigned long long u64;

#define LIN_BM 64
#define LIN_BN 64
#define LIN_BK 16
#define LIN_THREADS 256

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
#pragma unroll
        for (int q = 0; q < (LIN_BM * LIN_BK) / LIN_THREADS; ++q) {
            int e = t + q * LIN_THREADS;
            int ii, rr;
            if (A_R) { rr = e % LIN_BK; ii = e / LIN_BK; } else { ii = e % LIN_BM; rr = e / LIN_BM; }
            int gi = i0 + ii, gr = r0 + rr;
            float a = 0.0f;
            if (gi < M && gr < R) a = A_R ? A[(u64)gi * lda + gr] : A[(u64)gr * lda + gi];
            As[rr][ii] = a;
        }
#pragma unroll
        for (int q = 0; q < (LIN_BN * LIN_BK) / LIN_THREADS; ++q) {
            int e = t + q * LIN_THREADS;
            int jj, rr;
            if (B_R) { rr = e % LIN_BK; jj = e / LIN_BK; } else { jj = e % LIN_BN; rr = e / LIN_BN; }
            int gj = j0 + jj, gr = r0 + rr;
            float b = 0.0f;
            if (gj < N && gr < R) b = B_R ? B[(u64)gj * ldb + gr] : B[(u64)gr * ldb + gj];
            Bs[rr][jj] = b;
        }
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
