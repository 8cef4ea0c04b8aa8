// runtime_attention_mma.cu — the attention forward of runtime_attention.cu (same layouts, causal GQA with
// an optional window, out and the per-row log-sum-exp lse) on tensor cores, FlashAttention-2 style, for
// head dimensions 64 and 128 with `Matmul::Bf16` (src/runtime/ops/cuda.rs picks it; the backward stays
// the SIMT kernels, which recompute P from f32 scores and this lse).
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

template <int HD>
__device__ __forceinline__ void attention_forward_mma(const float* __restrict__ q,
                                                      const float* __restrict__ k,
                                                      const float* __restrict__ v, float* __restrict__ out,
                                                      float* __restrict__ lse, int tokens, int heads,
                                                      int kv_heads, int window, float scale) {
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

    // Q fragments: qa[ks] holds rows (g, g + 8) × dims ks·16 + (2t, 2t + 1, 2t + 8, 2t + 9).
    u32 qa[HD / 16][4];
#pragma unroll
    for (int ks = 0; ks < HD / 16; ++ks) {
#pragma unroll
        for (int reg = 0; reg < 4; ++reg) {
            const int row = (reg & 1) ? r_hi : r_lo, d = ks * 16 + 2 * t + ((reg >> 1) << 3);
            float a = 0.0f, b = 0.0f;
            if (row < tokens) {
                a = qb[(u64)row * qw + d];
                b = qb[(u64)row * qw + d + 1];
            }
            qa[ks][reg] = pack_bf16x2(a, b);
        }
    }
    float o[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[n][e] = 0.0f;
    const float NEG_INF = -__int_as_float(0x7f800000);
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};

    const int q_last = min(q0 + FA_Q, tokens) - 1;
    const int kb_first = fa_first_key(q0, window) / FA_K, kb_last = q_last / FA_K;
    for (int kbk = kb_first; kbk <= kb_last; ++kbk) {
        const int j0 = kbk * FA_K;
        __syncthreads();  // every warp is done with the previous block's K and V
        // K rows as bf16 pairs along d: pair p ↦ key p / (HD/2), dims 2 (p % (HD/2)) + (0, 1).
#pragma unroll 4
        for (int p = tid; p < FA_K * HD / 2; p += 128) {
            const int key = p / (HD / 2), d = 2 * (p % (HD / 2)), j = j0 + key;
            float a = 0.0f, b = 0.0f;
            if (j < tokens) {
                a = kb[(u64)j * kw + d];
                b = kb[(u64)j * kw + d + 1];
            }
            *(u32*)&Ks[key][d] = pack_bf16x2(a, b);
        }
        // V transposed, pairs along the key: pair p ↦ dim p % HD, keys 2 (p / HD) + (0, 1).
#pragma unroll 4
        for (int p = tid; p < FA_K * HD / 2; p += 128) {
            const int d = p % HD, key = 2 * (p / HD), j = j0 + key;
            float a = 0.0f, b = 0.0f;
            if (j < tokens) a = vb[(u64)j * kw + d];
            if (j + 1 < tokens) b = vb[(u64)(j + 1) * kw + d];
            *(u32*)&Vt[d][key] = pack_bf16x2(a, b);
        }
        __syncthreads();

        // S = Q Kᵀ for this warp's 16 rows × 64 keys: sc[nt] over keys j0 + nt·8 + (2t, 2t + 1).
        float sc[FA_K / 8][4];
#pragma unroll
        for (int nt = 0; nt < FA_K / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) sc[nt][e] = 0.0f;
#pragma unroll
            for (int ks = 0; ks < HD / 16; ++ks) {
                const u32 b0 = lds_u32(&Ks[nt * 8 + g][ks * 16 + 2 * t]);
                const u32 b1 = lds_u32(&Ks[nt * 8 + g][ks * 16 + 2 * t + 8]);
                mma_16816<DT_BF16>(sc[nt], qa[ks], b0, b1);
            }
        }
        // Scale and mask (causal, window, past the end); the running max of each row.
        float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int nt = 0; nt < FA_K / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = (e >> 1) ? r_hi : r_lo, j = j0 + nt * 8 + 2 * t + (e & 1);
                const bool ok = j <= row && j >= fa_first_key(row, window) && j < tokens;
                sc[nt][e] = ok ? sc[nt][e] * scale : NEG_INF;
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
        // P = exp(S − m) (f32 into the row sums), as bf16 A fragments of P V: key tile pair (2kk, 2kk+1).
        u32 pa[FA_K / 16][4];
#pragma unroll
        for (int nt = 0; nt < FA_K / 8; ++nt) {
            float p[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                p[e] = expf(sc[nt][e] - mu[e >> 1]);
                l[e >> 1] += p[e];
            }
            pa[nt >> 1][(nt & 1) * 2] = pack_bf16x2(p[0], p[1]);
            pa[nt >> 1][(nt & 1) * 2 + 1] = pack_bf16x2(p[2], p[3]);
        }
        // O += P V: o[nd] over dims nd·8 + (2t, 2t + 1).
#pragma unroll
        for (int kk = 0; kk < FA_K / 16; ++kk)
#pragma unroll
            for (int nd = 0; nd < HD / 8; ++nd) {
                const u32 b0 = lds_u32(&Vt[nd * 8 + g][kk * 16 + 2 * t]);
                const u32 b1 = lds_u32(&Vt[nd * 8 + g][kk * 16 + 2 * t + 8]);
                mma_16816<DT_BF16>(o[nd], pa[kk], b0, b1);
            }
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
                        int window, float scale) {
    attention_forward_mma<64>(q, k, v, out, lse, tokens, heads, kv_heads, window, scale);
}

extern "C" __global__ void __launch_bounds__(128)
attention_forward_mma128(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                         float* __restrict__ out, float* __restrict__ lse, int tokens, int heads, int kv_heads,
                         int window, float scale) {
    attention_forward_mma<128>(q, k, v, out, lse, tokens, heads, kv_heads, window, scale);
}
