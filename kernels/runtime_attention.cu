// runtime_attention.cu — causal grouped-query attention with an optional sliding window, flash-style:
// the forward never stores the probabilities, only each query row's log-sum-exp (lse, [seqs, heads,
// tokens]); the backward recomputes them from it. The CPU twin (attention_forward/backward in
// src/runtime/ops/cpu.rs) has the same conventions:
//   q/out [seqs·tokens, heads·hd], k/v [seqs·tokens, kv_heads·hd], query head h reads kv head
//   h / (heads / kv_heads); query i sees keys i − w < j ≤ i with a window w (window > 0), else j ≤ i;
//   S = scale · q kᵀ with scale = 1/sqrt(hd) (f32; Gemma: 1/sqrt(query_pre_attn_scalar)), soft-capped
//   to softcap · tanh(S / softcap) when softcap > 0 (Gemma 2), with ALiBi's slope_h · (j − i) added to S
//   first when alibi_factor ≠ 0 (alibi_slope in common.cuh), P = exp(S − lse).
// One warp per query row (forward, dq) or per key row (dk, dv): lane l holds dimensions l, l + 32, ...
// (head_dim ≤ ATT_MAXD). Each warp owns its output row, so there are no atomics and the result is
// deterministic. This is the correct baseline, not a tensor-core kernel: K/V rows come through L1/L2
// (the forward on tensor cores, bf16, head dims 64 / 128: runtime_attention_mma.cu).

#include "common.cuh"

#define ATT_MAXD 256
#define ATT_PER_LANE (ATT_MAXD / 32)

__device__ __forceinline__ float att_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// First key query i sees.
__device__ __forceinline__ int att_first_key(int i, int window) {
    return window > 0 ? max(0, i + 1 - window) : 0;
}

// out, lse. Warp w ↦ (s, h, i) with w = (s·heads + h)·tokens + i: the warps of a block share (s, h).
extern "C" __global__ void attention_forward(const float* __restrict__ q, const float* __restrict__ k,
                                             const float* __restrict__ v, float* __restrict__ out,
                                             float* __restrict__ lse, int seqs, int tokens, int heads,
                                             int kv_heads, int hd, int window, float scale,
                                             float softcap, float alibi_max_bias, float alibi_factor) {
    int warp = (int)((blockIdx.x * (u64)blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    if (warp >= seqs * heads * tokens) return;
    int i = warp % tokens, sh = warp / tokens, h = sh % heads, s = sh / heads;
    int g = h / (heads / kv_heads);
    u64 qw = (u64)heads * hd, kw = (u64)kv_heads * hd;
    const float* qi = q + ((u64)s * tokens + i) * qw + (u64)h * hd;
    const float* kb = k + (u64)s * tokens * kw + (u64)g * hd;
    const float* vb = v + (u64)s * tokens * kw + (u64)g * hd;
    float qr[ATT_PER_LANE], acc[ATT_PER_LANE];
#pragma unroll
    for (int c = 0; c < ATT_PER_LANE; ++c) {
        int d = lane + 32 * c;
        qr[c] = d < hd ? qi[d] : 0.0f;
        acc[c] = 0.0f;
    }
    const float slope = alibi_slope(h, heads, alibi_max_bias, alibi_factor);
    float m = -__int_as_float(0x7f800000), l = 0.0f;
    for (int j = att_first_key(i, window); j <= i; ++j) {
        const float* kj = kb + (u64)j * kw;
        const float* vj = vb + (u64)j * kw;
        float dot = 0.0f;
#pragma unroll
        for (int c = 0; c < ATT_PER_LANE; ++c) {
            int d = lane + 32 * c;
            if (d < hd) dot += qr[c] * kj[d];
        }
        float sc = tanh_cap<false>(att_warp_sum(dot) * scale + slope * (float)(j - i), softcap);
        float mn = fmaxf(m, sc);
        float corr = expf(m - mn);  // 0 on the first key (m = −inf)
        float e = expf(sc - mn);
        l = l * corr + e;
#pragma unroll
        for (int c = 0; c < ATT_PER_LANE; ++c) {
            int d = lane + 32 * c;
            if (d < hd) acc[c] = acc[c] * corr + e * vj[d];
        }
        m = mn;
    }
    float inv = 1.0f / l;
    float* oi = out + ((u64)s * tokens + i) * qw + (u64)h * hd;
#pragma unroll
    for (int c = 0; c < ATT_PER_LANE; ++c) {
        int d = lane + 32 * c;
        if (d < hd) oi[d] = acc[c] * inv;
    }
    if (lane == 0) lse[((u64)s * heads + h) * tokens + i] = m + logf(l);
}

// The two dot products of a (query, key) pair the backward needs, warp-summed: Σ_d ra[d]·ma[d] and
// Σ_d rb[d]·mb[d] over the head dims, `ra`/`rb` held per lane (dims lane + 32c), `ma`/`mb` read from memory.
__device__ __forceinline__ void att_dots(const float* ra, const float* __restrict__ ma, const float* rb,
                                         const float* __restrict__ mb, int lane, int hd, float* a_out,
                                         float* b_out) {
    float a = 0.0f, b = 0.0f;
#pragma unroll
    for (int c = 0; c < ATT_PER_LANE; ++c) {
        int d = lane + 32 * c;
        if (d < hd) {
            a += ra[c] * ma[d];
            b += rb[c] * mb[d];
        }
    }
    *a_out = att_warp_sum(a);
    *b_out = att_warp_sum(b);
}

// Per query row: delta_i = Σ_j P_ij dP_ij (dP = dO Vᵀ) into `delta`, then
// dq_i += scale Σ_j P_ij (dP_ij − delta_i) c'_ij k_j (c' the soft-cap's slope, 1 without). Same warp ↦
// (s, h, i) map as the forward.
extern "C" __global__ void attention_backward_dq(const float* __restrict__ q, const float* __restrict__ k,
                                                 const float* __restrict__ v, const float* __restrict__ lse,
                                                 const float* __restrict__ dout, float* __restrict__ dq,
                                                 float* __restrict__ delta, int seqs, int tokens, int heads,
                                                 int kv_heads, int hd, int window, float scale,
                                                 float softcap, float alibi_max_bias, float alibi_factor) {
    int warp = (int)((blockIdx.x * (u64)blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    if (warp >= seqs * heads * tokens) return;
    int i = warp % tokens, sh = warp / tokens, h = sh % heads, s = sh / heads;
    int g = h / (heads / kv_heads);
    u64 qw = (u64)heads * hd, kw = (u64)kv_heads * hd;
    u64 qoff = ((u64)s * tokens + i) * qw + (u64)h * hd;
    const float* kb = k + (u64)s * tokens * kw + (u64)g * hd;
    const float* vb = v + (u64)s * tokens * kw + (u64)g * hd;
    float qr[ATT_PER_LANE], dor[ATT_PER_LANE], acc[ATT_PER_LANE];
#pragma unroll
    for (int c = 0; c < ATT_PER_LANE; ++c) {
        int d = lane + 32 * c;
        qr[c] = d < hd ? q[qoff + d] : 0.0f;
        dor[c] = d < hd ? dout[qoff + d] : 0.0f;
        acc[c] = 0.0f;
    }
    u64 row = ((u64)s * heads + h) * tokens + i;
    float L = lse[row];
    int j0 = att_first_key(i, window);
    const float bias_slope = alibi_slope(h, heads, alibi_max_bias, alibi_factor);
    double dsum = 0.0;
    for (int j = j0; j <= i; ++j) {
        const float* kj = kb + (u64)j * kw;
        const float* vj = vb + (u64)j * kw;
        float a, dp;
        att_dots(qr, kj, dor, vj, lane, hd, &a, &dp);
        float p = expf(tanh_cap<false>(a * scale + bias_slope * (float)(j - i), softcap) - L);
        dsum += (double)p * (double)dp;
    }
    float D = (float)dsum;  // as stored for the dk/dv kernel, so both use the same value
    if (lane == 0) delta[row] = D;
    for (int j = j0; j <= i; ++j) {
        const float* kj = kb + (u64)j * kw;
        const float* vj = vb + (u64)j * kw;
        float a, dp;
        att_dots(qr, kj, dor, vj, lane, hd, &a, &dp);
        float slope;
        float p = expf(tanh_cap_slope<false>(a * scale + bias_slope * (float)(j - i), softcap, &slope) - L);
        float ds = (float)((double)p * ((double)dp - (double)D)) * slope;
#pragma unroll
        for (int c = 0; c < ATT_PER_LANE; ++c) {
            int d = lane + 32 * c;
            if (d < hd) acc[c] += ds * kj[d];
        }
    }
    float* dqi = dq + qoff;
#pragma unroll
    for (int c = 0; c < ATT_PER_LANE; ++c) {
        int d = lane + 32 * c;
        if (d < hd) dqi[d] += scale * acc[c];
    }
}

// Per key row j of kv head g, over the query heads of its group and the query rows that see j
// (j ≤ i < j + w, or j ≤ i): dv_j += Σ P_ij dO_i, dk_j += scale Σ P_ij (dP_ij − delta_i) c'_ij q_i.
// Warp w ↦ (s, g, j) with w = (s·kv_heads + g)·tokens + j. Runs after attention_backward_dq (delta).
extern "C" __global__ void attention_backward_dkv(const float* __restrict__ q, const float* __restrict__ k,
                                                  const float* __restrict__ v, const float* __restrict__ lse,
                                                  const float* __restrict__ dout,
                                                  const float* __restrict__ delta, float* __restrict__ dk,
                                                  float* __restrict__ dv, int seqs, int tokens, int heads,
                                                  int kv_heads, int hd, int window, float scale,
                                                  float softcap, float alibi_max_bias, float alibi_factor) {
    int warp = (int)((blockIdx.x * (u64)blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    if (warp >= seqs * kv_heads * tokens) return;
    int j = warp % tokens, sg = warp / tokens, g = sg % kv_heads, s = sg / kv_heads;
    int grp = heads / kv_heads;
    u64 qw = (u64)heads * hd, kw = (u64)kv_heads * hd;
    u64 koff = ((u64)s * tokens + j) * kw + (u64)g * hd;
    float kr[ATT_PER_LANE], vr[ATT_PER_LANE], dka[ATT_PER_LANE], dva[ATT_PER_LANE];
#pragma unroll
    for (int c = 0; c < ATT_PER_LANE; ++c) {
        int d = lane + 32 * c;
        kr[c] = d < hd ? k[koff + d] : 0.0f;
        vr[c] = d < hd ? v[koff + d] : 0.0f;
        dka[c] = 0.0f;
        dva[c] = 0.0f;
    }
    int i1 = window > 0 ? min(tokens, j + window) : tokens;  // queries j..i1-1 see key j
    for (int h = g * grp; h < (g + 1) * grp; ++h) {
        const float* qb = q + (u64)s * tokens * qw + (u64)h * hd;
        const float* db = dout + (u64)s * tokens * qw + (u64)h * hd;
        u64 row0 = ((u64)s * heads + h) * tokens;
        const float bias_slope = alibi_slope(h, heads, alibi_max_bias, alibi_factor);
        for (int i = j; i < i1; ++i) {
            const float* qi = qb + (u64)i * qw;
            const float* doi = db + (u64)i * qw;
            float a, dp;
            att_dots(kr, qi, vr, doi, lane, hd, &a, &dp);
            float slope;
            float p = expf(tanh_cap_slope<false>(a * scale + bias_slope * (float)(j - i), softcap, &slope) -
                           lse[row0 + i]);
            float ds = (float)((double)p * ((double)dp - (double)delta[row0 + i])) * slope;
#pragma unroll
            for (int c = 0; c < ATT_PER_LANE; ++c) {
                int d = lane + 32 * c;
                if (d < hd) {
                    dva[c] += p * doi[d];
                    dka[c] += ds * qi[d];
                }
            }
        }
    }
#pragma unroll
    for (int c = 0; c < ATT_PER_LANE; ++c) {
        int d = lane + 32 * c;
        if (d < hd) {
            dk[koff + d] += scale * dka[c];
            dv[koff + d] += dva[c];
        }
    }
}

// Attention sinks (GPT-OSS, Granite SWA): a learned logit sinks[h] per head joins each query row's
// softmax without a value. Applied to attention_forward's (or the mma kernel's) out and lse in place:
// out ×= σ(lse − sinks[h]), lse ← log(e^lse + e^sinks[h]); the backward kernels, reading that lse,
// recompute the probabilities the sink shares in, unchanged (its dP is 0). CPU twin:
// attention_sinks_forward in src/runtime/ops/cpu.rs. Warp w ↦ (s, h, i) as attention_forward's.
extern "C" __global__ void attention_sinks_forward(const float* __restrict__ sinks, float* __restrict__ out,
                                                   float* __restrict__ lse, int seqs, int tokens, int heads,
                                                   int head_dim) {
    u64 w = (blockIdx.x * (u64)blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (w >= (u64)seqs * heads * tokens) return;
    int i = (int)(w % tokens), h = (int)((w / tokens) % heads);
    u64 s = w / ((u64)tokens * heads);
    // Lane 0 reads the row's lse and writes it back last; the others get it by shuffle (a lane reading
    // lse[w] itself could see lane 0's write: lanes of a warp are not ordered without a barrier).
    float L = __shfl_sync(0xffffffffu, lane == 0 ? lse[w] : 0.0f, 0), sink = sinks[h];
    float x = sink - L;
    float keep = 1.0f / (1.0f + expf(x));
    float* o = out + ((s * tokens + i) * heads + h) * (u64)head_dim;
    for (int d = lane; d < head_dim; d += 32) o[d] *= keep;
    // log(e^L + e^s) = max + log(1 + e^(−|L − s|)).
    if (lane == 0) lse[w] = fmaxf(L, sink) + log1pf(expf(-fabsf(x)));
}

// dsinks[h] += −Σ_rows exp(sinks[h] − lse) (dout · out) over head h's seqs·tokens query rows, out and lse
// as attention_sinks_forward left them. One block per head (blockDim.x a multiple of 32), a warp per row,
// summed in f64 (as the CPU twin), so the result does not depend on the order.
extern "C" __global__ void attention_sinks_backward(const float* __restrict__ out, const float* __restrict__ dout,
                                                    const float* __restrict__ lse,
                                                    const float* __restrict__ sinks, float* __restrict__ dsinks,
                                                    int seqs, int tokens, int heads, int head_dim) {
    int h = blockIdx.x;
    if (h >= heads) return;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    double acc = 0.0;
    for (u64 r = warp; r < (u64)seqs * tokens; r += warps) {
        u64 s = r / tokens, i = r % tokens;
        u64 base = (r * heads + h) * (u64)head_dim;
        double dot = 0.0;
        for (int d = lane; d < head_dim; d += 32) dot += (double)out[base + d] * (double)dout[base + d];
        dot = warp_sum_f64(dot);
        double p = exp((double)sinks[h] - (double)lse[(s * heads + h) * tokens + i]);
        if (lane == 0) acc -= p * dot;
    }
    acc = block_sum_f64(acc);
    if (threadIdx.x == 0) dsinks[h] += (float)acc;
}
