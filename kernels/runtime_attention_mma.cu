// runtime_attention_mma.cu — the attention forward of runtime_attention.cu (same layouts, causal GQA with
// an optional window, out and the per-row log-sum-exp lse) on tensor cores, FlashAttention-2 style, for
// head dimensions 64 and 128 with `Matmul::Bf16` (src/runtime/ops/cuda.rs picks it), and its backward
// (below).
//
// Block = 64 query rows of one (sequence, head), 4 warps of 16 rows. Each warp keeps its Q rows as bf16
// mma A fragments in registers and walks the key blocks of 64 its rows may see (causal; from the
// window's first key): K staged in shared memory as bf16 rows (the B operand of S = Q Kᵀ), V staged
// transposed (Vt[d][key], the B operand of O += P V); S in f32, scaled, masked, folded into the running
// row max / sum (online softmax, the running sum kept per thread and reduced over the quad at the end);
// P rounded to bf16 and reused straight from the S accumulators as the A fragments of P V (the m16n8
// C layout of two adjacent key tiles is the m16n8k16 A layout). Cost per (sequence, head): about
// 4·T²/2·HD FLOPs on tensor cores; K and V read once per block of 64 queries.
// Precision: Q, K, V and P rounded to bf16, f32 accumulation and softmax. Index arithmetic emulated in
// src/runtime/ops/emulate_runtime_kernels.py (`attention_forward_mma`).
#include "mma.cuh"

#define FA_Q 64    // query rows per block (4 warps × 16)
#define FA_K 64    // keys per step
#define FA_PAD 8   // halves of padding per shared row

__device__ __forceinline__ int fa_first_key(int i, int window) {
    return window > 0 ? max(0, i + 1 - window) : 0;
}

// Rows r0 + (g, g + 8) × HD of a [rows, ld] f32 matrix as bf16 A fragments (zero past `limit`).
template <int HD>
__device__ __forceinline__ void fa_load_a(const float* __restrict__ base, u64 ld, int r_lo, int limit, int t,
                                          u32 (*a)[4]) {
#pragma unroll
    for (int ks = 0; ks < HD / 16; ++ks)
#pragma unroll
        for (int reg = 0; reg < 4; ++reg) {
            const int row = r_lo + ((reg & 1) << 3), d = ks * 16 + 2 * t + ((reg >> 1) << 3);
            float x = 0.0f, y = 0.0f;
            if (row < limit) {
                x = base[(u64)row * ld + d];
                y = base[(u64)row * ld + d + 1];
            }
            a[ks][reg] = pack_bf16x2(x, y);
        }
}

// Stage rows j0 .. j0 + STEP of a [tokens, ld] f32 matrix (HD values from `base`) into S[row][d] as
// bf16 pairs along d (zero past the end): pair p ↦ row p / (HD/2), dims 2 (p % (HD/2)) + (0, 1).
template <int HD, int STEP>
__device__ __forceinline__ void fa_stage_rows(u16 (*S)[HD + FA_PAD], const float* __restrict__ base, u64 ld,
                                              int j0, int tokens, int tid) {
#pragma unroll 4
    for (int p = tid; p < STEP * HD / 2; p += 128) {
        const int r = p / (HD / 2), d = 2 * (p % (HD / 2)), j = j0 + r;
        float x = 0.0f, y = 0.0f;
        if (j < tokens) {
            x = base[(u64)j * ld + d];
            y = base[(u64)j * ld + d + 1];
        }
        *(u32*)&S[r][d] = pack_bf16x2(x, y);
    }
}

// The first ND values of the same rows transposed, St[d][row], as bf16 pairs along the row: pair p ↦
// dim p % ND, rows 2 (p / ND) + (0, 1).
template <int ND, int STEP>
__device__ __forceinline__ void fa_stage_cols(u16 (*St)[STEP + FA_PAD], const float* __restrict__ base,
                                              u64 ld, int j0, int tokens, int tid) {
#pragma unroll 4
    for (int p = tid; p < STEP * ND / 2; p += 128) {
        const int d = p % ND, r = 2 * (p / ND), j = j0 + r;
        float x = 0.0f, y = 0.0f;
        if (j < tokens) x = base[(u64)j * ld + d];
        if (j + 1 < tokens) y = base[(u64)(j + 1) * ld + d];
        *(u32*)&St[d][r] = pack_bf16x2(x, y);
    }
}

// acc[nt] (16 rows × STEP columns) = A (16 × HD, fragments a) · Bᵀ, B = S[col][d] (STEP × HD).
template <int HD, int STEP>
__device__ __forceinline__ void fa_rows_times_rows(const u32 (*a)[4], const u16 (*S)[HD + FA_PAD], int g, int t,
                                                   float (*acc)[4]) {
#pragma unroll
    for (int nt = 0; nt < STEP / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nt][e] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < HD / 16; ++ks) {
            const u32 b0 = lds_u32(&S[nt * 8 + g][ks * 16 + 2 * t]);
            const u32 b1 = lds_u32(&S[nt * 8 + g][ks * 16 + 2 * t + 8]);
            mma_16816<DT_BF16>(acc[nt], a[ks], b0, b1);
        }
    }
}

// out[nd] (16 × ND) += X (16 × STEP, accumulators x rounded to bf16 A fragments: the m16n8 C layout of
// column tiles 2kk and 2kk + 1 is the m16n8k16 A layout of step kk) · T, T[r][d] given transposed, St[d][r].
template <int ND, int STEP>
__device__ __forceinline__ void fa_acc_times_cols(const float (*x)[4], const u16 (*St)[STEP + FA_PAD], int g,
                                                  int t, float (*out)[4]) {
#pragma unroll
    for (int kk = 0; kk < STEP / 16; ++kk) {
        u32 a[4];
        a[0] = pack_bf16x2(x[2 * kk][0], x[2 * kk][1]);
        a[1] = pack_bf16x2(x[2 * kk][2], x[2 * kk][3]);
        a[2] = pack_bf16x2(x[2 * kk + 1][0], x[2 * kk + 1][1]);
        a[3] = pack_bf16x2(x[2 * kk + 1][2], x[2 * kk + 1][3]);
#pragma unroll
        for (int nd = 0; nd < ND / 8; ++nd) {
            const u32 b0 = lds_u32(&St[nd * 8 + g][kk * 16 + 2 * t]);
            const u32 b1 = lds_u32(&St[nd * 8 + g][kk * 16 + 2 * t + 8]);
            mma_16816<DT_BF16>(out[nd], a, b0, b1);
        }
    }
}

template <int HD>
__device__ __forceinline__ void attention_forward_mma(const float* __restrict__ q,
                                                      const float* __restrict__ k,
                                                      const float* __restrict__ v, float* __restrict__ out,
                                                      float* __restrict__ lse, int tokens, int heads,
                                                      int kv_heads, int window, float scale,
                                                      float softcap, float alibi_max_bias,
                                                      float alibi_factor) {
    __shared__ __align__(16) u16 Ks[FA_K][HD + FA_PAD];
    __shared__ __align__(16) u16 Vt[HD][FA_K + FA_PAD];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int q0 = blockIdx.x * FA_Q, h = blockIdx.y, s = blockIdx.z;
    const int kvh = h / (heads / kv_heads);
    const u64 qw = (u64)heads * HD, kw = (u64)kv_heads * HD;
    const float* qb = q + (u64)s * tokens * qw + (u64)h * HD;
    const float* kb = k + (u64)s * tokens * kw + (u64)kvh * HD;
    const float* vb = v + (u64)s * tokens * kw + (u64)kvh * HD;
    const int r_lo = q0 + warp * 16 + g, r_hi = r_lo + 8;  // this thread's two rows

    u32 qa[HD / 16][4];  // rows (g, g + 8) × dims ks·16 + (2t, 2t + 1, 2t + 8, 2t + 9)
    fa_load_a<HD>(qb, qw, r_lo, tokens, t, qa);
    float o[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[n][e] = 0.0f;
    const float NEG_INF = -__int_as_float(0x7f800000);
    const float bias_slope = alibi_slope(h, heads, alibi_max_bias, alibi_factor);
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};

    const int q_last = min(q0 + FA_Q, tokens) - 1;
    const int kb_first = fa_first_key(q0, window) / FA_K, kb_last = q_last / FA_K;
    for (int kbk = kb_first; kbk <= kb_last; ++kbk) {
        const int j0 = kbk * FA_K;
        __syncthreads();  // every warp is done with the previous block's K and V
        fa_stage_rows<HD, FA_K>(Ks, kb, kw, j0, tokens, tid);
        fa_stage_cols<HD, FA_K>(Vt, vb, kw, j0, tokens, tid);  // V transposed
        __syncthreads();

        // S = Q Kᵀ for this warp's 16 rows × 64 keys: sc[nt] over keys j0 + nt·8 + (2t, 2t + 1).
        float sc[FA_K / 8][4];
        fa_rows_times_rows<HD, FA_K>(qa, Ks, g, t, sc);
        // Scale and mask (causal, window, past the end); the running max of each row.
        float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int nt = 0; nt < FA_K / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = (e >> 1) ? r_hi : r_lo, j = j0 + nt * 8 + 2 * t + (e & 1);
                const bool ok = j <= row && j >= fa_first_key(row, window) && j < tokens;
                sc[nt][e] =
                    ok ? tanh_cap<true>(sc[nt][e] * scale + bias_slope * (float)(j - row), softcap) : NEG_INF;
                mx[e >> 1] = fmaxf(mx[e >> 1], sc[nt][e]);
            }
        float corr[2], mu[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            const float mn = fmaxf(m[r], mx[r]);
            mu[r] = mn == NEG_INF ? 0.0f : mn;  // a row with no key yet: every exp below is 0
            corr[r] = expf(m[r] - mu[r]);
            m[r] = mn;
            l[r] *= corr[r];
        }
#pragma unroll
        for (int n = 0; n < HD / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[n][e] *= corr[e >> 1];
        // P = exp(S − m) (f32 into the row sums), then O += P V (P rounded to bf16 as A fragments).
#pragma unroll
        for (int nt = 0; nt < FA_K / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                sc[nt][e] = expf(sc[nt][e] - mu[e >> 1]);
                l[e >> 1] += sc[nt][e];
            }
        fa_acc_times_cols<HD, FA_K>(sc, Vt, g, t, o);
    }
    // Row sums over the quad, then out = O / l and lse = m + log l.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
#pragma unroll
    for (int n = 0; n < HD / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int row = (e >> 1) ? r_hi : r_lo, d = n * 8 + 2 * t + (e & 1);
            if (row < tokens) out[((u64)s * tokens + row) * qw + (u64)h * HD + d] = o[n][e] / l[e >> 1];
        }
    if (t == 0) {
        if (r_lo < tokens) lse[((u64)s * heads + h) * tokens + r_lo] = m[0] + logf(l[0]);
        if (r_hi < tokens) lse[((u64)s * heads + h) * tokens + r_hi] = m[1] + logf(l[1]);
    }
}

// Grid (ceil(tokens / 64), heads, seqs), 128 threads; q/k/v/out/lse as attention_forward.
extern "C" __global__ void __launch_bounds__(128)
attention_forward_mma64(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                        float* __restrict__ out, float* __restrict__ lse, int tokens, int heads, int kv_heads,
                        int window, float scale, float softcap, float alibi_max_bias, float alibi_factor) {
    attention_forward_mma<64>(q, k, v, out, lse, tokens, heads, kv_heads, window, scale, softcap, alibi_max_bias,
                              alibi_factor);
}

extern "C" __global__ void __launch_bounds__(128)
attention_forward_mma128(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                         float* __restrict__ out, float* __restrict__ lse, int tokens, int heads, int kv_heads,
                         int window, float scale, float softcap, float alibi_max_bias, float alibi_factor) {
    attention_forward_mma<128>(q, k, v, out, lse, tokens, heads, kv_heads, window, scale, softcap, alibi_max_bias,
                               alibi_factor);
}

// ------------------------------------------------------------------ backward on tensor cores
// The backward of attention_forward_mma (bf16 mode, head dims 64 / 128), as two deterministic kernels
// like the SIMT ones (runtime_attention.cu), over steps of 32 keys or queries (shared memory):
//
// attention_backward_dq_mma: block = 64 query rows of one (sequence, head), warp = 16 rows. Pass 1 over
//   the keys: delta_i = Σ_j P_ij dP_ij (P = exp(scale·S − lse), S = Q Kᵀ, dP = dO Vᵀ, both on tensor
//   cores from bf16 operands), written for the second kernel; pass 2: dS = P ∘ (dP − delta) and
//   dq += scale · dS K (dS as bf16 A fragments straight from the accumulators, K staged transposed).
// attention_backward_dkv_mma: block = 64 key rows of one (sequence, kv head), warp = 16 keys, over the
//   query heads of the group and the query rows that see its keys, in that order (no atomics): with keys
//   as rows, Sᵀ = K Qᵀ, Pᵀ = exp(scale·Sᵀ − lse), dPᵀ = V dOᵀ, dSᵀ = Pᵀ ∘ (dPᵀ − delta),
//   dv += Pᵀ dO, dk += scale · dSᵀ Q (Pᵀ and dSᵀ reused as A fragments; Q and dO staged as rows and
//   transposed); each block writes 64 of the HD dims of dk and dv (FB_DIMS).
// With Gemma 2's soft-capping (softcap > 0) the scores are capped before the exp and dS is multiplied by
// the cap's slope (tanh_cap_slope<true> in common.cuh), as in the SIMT kernels.
// Index arithmetic emulated in src/runtime/ops/emulate_runtime_kernels.py (`attention_backward_mma`).

#define FB_STEP 32  // keys (dq kernel) or queries (dkv kernel) per step
#define FB_DIMS 64  // dims of dk, dv per dkv block (HD = 128: two blocks per key block, each recomputing
                    // Sᵀ and dPᵀ, so that the two accumulators fit in registers)

template <int HD>
__device__ __forceinline__ void attention_backward_dq_mma(const float* __restrict__ q, const float* __restrict__ k,
                                                          const float* __restrict__ v,
                                                          const float* __restrict__ lse,
                                                          const float* __restrict__ dout, float* __restrict__ dq,
                                                          float* __restrict__ delta, int tokens, int heads,
                                                          int kv_heads, int window, float scale, float softcap,
                                                          float alibi_max_bias, float alibi_factor) {
    __shared__ __align__(16) u16 Ks[FB_STEP][HD + FA_PAD];
    __shared__ __align__(16) u16 Vs[FB_STEP][HD + FA_PAD];
    __shared__ __align__(16) u16 Kt[HD][FB_STEP + FA_PAD];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int q0 = blockIdx.x * FA_Q, h = blockIdx.y, s = blockIdx.z;
    const int kvh = h / (heads / kv_heads);
    const u64 qw = (u64)heads * HD, kw = (u64)kv_heads * HD;
    const u64 qoff = (u64)s * tokens * qw + (u64)h * HD;
    const float* kb = k + (u64)s * tokens * kw + (u64)kvh * HD;
    const float* vb = v + (u64)s * tokens * kw + (u64)kvh * HD;
    const int r_lo = q0 + warp * 16 + g, rows[2] = {r_lo, r_lo + 8};
    const u64 lrow = ((u64)s * heads + h) * tokens;
    const float bias_slope = alibi_slope(h, heads, alibi_max_bias, alibi_factor);
    float L[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) L[r] = rows[r] < tokens ? lse[lrow + rows[r]] : 0.0f;
    const int q_last = min(q0 + FA_Q, tokens) - 1;
    const int kb_first = fa_first_key(q0, window) / FB_STEP, kb_last = q_last / FB_STEP;
    u32 qa[HD / 16][4], da[HD / 16][4];
    fa_load_a<HD>(q + qoff, qw, r_lo, tokens, t, qa);
    fa_load_a<HD>(dout + qoff, qw, r_lo, tokens, t, da);

    double dsum[2] = {0.0, 0.0};
    float D[2] = {0.0f, 0.0f};
    float acc[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[n][e] = 0.0f;
    for (int pass = 0; pass < 2; ++pass) {
        for (int kbk = kb_first; kbk <= kb_last; ++kbk) {
            const int j0 = kbk * FB_STEP;
            __syncthreads();
            fa_stage_rows<HD, FB_STEP>(Ks, kb, kw, j0, tokens, tid);
            fa_stage_rows<HD, FB_STEP>(Vs, vb, kw, j0, tokens, tid);
            if (pass == 1) fa_stage_cols<HD, FB_STEP>(Kt, kb, kw, j0, tokens, tid);
            __syncthreads();
            float sc[FB_STEP / 8][4], dp[FB_STEP / 8][4];
            fa_rows_times_rows<HD, FB_STEP>(qa, Ks, g, t, sc);
            fa_rows_times_rows<HD, FB_STEP>(da, Vs, g, t, dp);
#pragma unroll
            for (int nt = 0; nt < FB_STEP / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int r = e >> 1, row = rows[r], j = j0 + nt * 8 + 2 * t + (e & 1);
                    const bool ok = j <= row && j >= fa_first_key(row, window) && j < tokens && row < tokens;
                    float slope;
                    const float s =
                        tanh_cap_slope<true>(sc[nt][e] * scale + bias_slope * (float)(j - row), softcap, &slope);
                    const float p = ok ? expf(s - L[r]) : 0.0f;
                    if (pass == 0) dsum[r] += (double)p * (double)dp[nt][e];
                    else sc[nt][e] = p * (dp[nt][e] - D[r]) * slope;  // dS
                }
            if (pass == 1) fa_acc_times_cols<HD, FB_STEP>(sc, Kt, g, t, acc);
        }
        if (pass == 0) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                dsum[r] += __shfl_xor_sync(0xffffffffu, dsum[r], 1);
                dsum[r] += __shfl_xor_sync(0xffffffffu, dsum[r], 2);
                D[r] = (float)dsum[r];
                if (t == 0 && rows[r] < tokens) delta[lrow + rows[r]] = D[r];
            }
        }
    }
#pragma unroll
    for (int n = 0; n < HD / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int row = rows[e >> 1], d = n * 8 + 2 * t + (e & 1);
            if (row < tokens) dq[qoff + (u64)row * qw + d] += scale * acc[n][e];
        }
}

template <int HD>
__device__ __forceinline__ void attention_backward_dkv_mma(const float* __restrict__ q, const float* __restrict__ k,
                                                           const float* __restrict__ v,
                                                           const float* __restrict__ lse,
                                                           const float* __restrict__ dout,
                                                           const float* __restrict__ delta, float* __restrict__ dk,
                                                           float* __restrict__ dv, int tokens, int heads,
                                                           int kv_heads, int window, float scale, float softcap,
                                                           float alibi_max_bias, float alibi_factor) {
    __shared__ __align__(16) u16 Qs[FB_STEP][HD + FA_PAD];
    __shared__ __align__(16) u16 Ds[FB_STEP][HD + FA_PAD];
    __shared__ __align__(16) u16 Qt[FB_DIMS][FB_STEP + FA_PAD];
    __shared__ __align__(16) u16 Dt[FB_DIMS][FB_STEP + FA_PAD];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    // blockIdx.x = key block · (HD / FB_DIMS) + the slice of FB_DIMS dims of dk, dv this block writes.
    const int d0 = (blockIdx.x % (HD / FB_DIMS)) * FB_DIMS;
    const int k0 = (blockIdx.x / (HD / FB_DIMS)) * FA_Q, gk = blockIdx.y, s = blockIdx.z;
    const int grp = heads / kv_heads;
    const u64 qw = (u64)heads * HD, kw = (u64)kv_heads * HD;
    const u64 koff = (u64)s * tokens * kw + (u64)gk * HD;
    const int c_lo = k0 + warp * 16 + g, cols[2] = {c_lo, c_lo + 8};  // this thread's two keys
    u32 ka[HD / 16][4], va[HD / 16][4];
    fa_load_a<HD>(k + koff, kw, c_lo, tokens, t, ka);
    fa_load_a<HD>(v + koff, kw, c_lo, tokens, t, va);
    float dka[FB_DIMS / 8][4], dva[FB_DIMS / 8][4];
#pragma unroll
    for (int n = 0; n < FB_DIMS / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) dka[n][e] = dva[n][e] = 0.0f;
    // Queries that see the block's keys: from its first key to (window) its last key + w − 1.
    const int k_last = min(k0 + FA_Q, tokens) - 1;
    const int i_last = window > 0 ? min(tokens - 1, k_last + window - 1) : tokens - 1;
    for (int h = gk * grp; h < (gk + 1) * grp; ++h) {
        const float* qb = q + (u64)s * tokens * qw + (u64)h * HD;
        const float* db = dout + (u64)s * tokens * qw + (u64)h * HD;
        const u64 lrow = ((u64)s * heads + h) * tokens;
        const float bias_slope = alibi_slope(h, heads, alibi_max_bias, alibi_factor);
        for (int ib = k0 / FB_STEP; ib <= i_last / FB_STEP; ++ib) {
            const int i0 = ib * FB_STEP;
            __syncthreads();
            fa_stage_rows<HD, FB_STEP>(Qs, qb, qw, i0, tokens, tid);
            fa_stage_rows<HD, FB_STEP>(Ds, db, qw, i0, tokens, tid);
            fa_stage_cols<FB_DIMS, FB_STEP>(Qt, qb + d0, qw, i0, tokens, tid);
            fa_stage_cols<FB_DIMS, FB_STEP>(Dt, db + d0, qw, i0, tokens, tid);
            __syncthreads();
            float sc[FB_STEP / 8][4], dp[FB_STEP / 8][4];
            fa_rows_times_rows<HD, FB_STEP>(ka, Qs, g, t, sc);  // Sᵀ: keys × queries
            fa_rows_times_rows<HD, FB_STEP>(va, Ds, g, t, dp);  // dPᵀ
#pragma unroll
            for (int nt = 0; nt < FB_STEP / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int j = cols[e >> 1], i = i0 + nt * 8 + 2 * t + (e & 1);
                    const bool ok = j <= i && j >= fa_first_key(i, window) && i < tokens && j < tokens;
                    float slope;
                    const float s =
                        tanh_cap_slope<true>(sc[nt][e] * scale + bias_slope * (float)(j - i), softcap, &slope);
                    const float p = ok ? expf(s - lse[lrow + i]) : 0.0f;
                    sc[nt][e] = p;                                                      // Pᵀ
                    dp[nt][e] = ok ? p * (dp[nt][e] - delta[lrow + i]) * slope : 0.0f;  // dSᵀ
                }
            fa_acc_times_cols<FB_DIMS, FB_STEP>(sc, Dt, g, t, dva);
            fa_acc_times_cols<FB_DIMS, FB_STEP>(dp, Qt, g, t, dka);
        }
    }
#pragma unroll
    for (int n = 0; n < FB_DIMS / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int j = cols[e >> 1], d = d0 + n * 8 + 2 * t + (e & 1);
            if (j < tokens) {
                dk[koff + (u64)j * kw + d] += scale * dka[n][e];
                dv[koff + (u64)j * kw + d] += dva[n][e];
            }
        }
}

// Grid (ceil(tokens / 64), heads, seqs), 128 threads; writes delta ([seqs, heads, tokens]) for the dkv
// kernel, which runs after it: grid (ceil(tokens / 64) · HD / 64, kv_heads, seqs), 128 threads.
#define FA_BACKWARD(HD)                                                                                          \
    extern "C" __global__ void __launch_bounds__(128) attention_backward_dq_mma##HD(                             \
        const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,                   \
        const float* __restrict__ lse, const float* __restrict__ dout, float* __restrict__ dq,                   \
        float* __restrict__ delta, int tokens, int heads, int kv_heads, int window, float scale,                 \
        float softcap, float alibi_max_bias, float alibi_factor) {                                               \
        attention_backward_dq_mma<HD>(q, k, v, lse, dout, dq, delta, tokens, heads, kv_heads, window, scale,     \
                                      softcap, alibi_max_bias, alibi_factor);                                    \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(128) attention_backward_dkv_mma##HD(                            \
        const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,                   \
        const float* __restrict__ lse, const float* __restrict__ dout, const float* __restrict__ delta,          \
        float* __restrict__ dk, float* __restrict__ dv, int tokens, int heads, int kv_heads, int window,         \
        float scale, float softcap, float alibi_max_bias, float alibi_factor) {                                  \
        attention_backward_dkv_mma<HD>(q, k, v, lse, dout, delta, dk, dv, tokens, heads, kv_heads, window,       \
                                       scale, softcap, alibi_max_bias, alibi_factor);                            \
    }
FA_BACKWARD(64)
FA_BACKWARD(128)
