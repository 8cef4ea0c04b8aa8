// runtime_rope.cu — rotary position embedding (Hugging Face layout: y = x cos + rotate_half(x) sin,
// rotate_half(x) = [−x₂, x₁], cos/sin tables [tokens, head_dim] with each frequency at both values of its
// pair). Pairs (i, i + rot_dim / 2), or with `interleaved` (Cohere's rotate_every_two) (2i, 2i + 1); the
// first of a pair reads −(second), the second +(first). Partial rotary (Phi-3): only the first rot_dim
// values of a head rotate; the others pass through (table entries cos 1, sin 0; no partner).
// Forward and backward are one kernel: the backward is the inverse rotation (sign = −1) accumulated into
// dx (add = 1). x is [rows, heads * head_dim]; row r is position r % tokens. One thread per element.

typedef unsigned long long u64;

extern "C" __global__ void rope_apply(const float* __restrict__ x, const float* __restrict__ cos_t,
                                      const float* __restrict__ sin_t, float* __restrict__ y,
                                      int rows, int heads, int head_dim, int rot_dim, int interleaved,
                                      int tokens, float sign, int add) {
    u64 width = (u64)heads * head_dim;
    u64 total = (u64)rows * width;
    int half = rot_dim / 2;
    for (u64 e = blockIdx.x * (u64)blockDim.x + threadIdx.x; e < total; e += (u64)gridDim.x * blockDim.x) {
        u64 row = e / width;
        int i = (int)((e - row * width) % head_dim);
        u64 head0 = e - i;  // index of element 0 of this head
        int t = (int)(row % tokens);
        float rot = i >= rot_dim ? 0.0f
                    : interleaved ? ((i & 1) ? x[head0 + i - 1] : -x[head0 + i + 1])
                    : i < half ? -x[head0 + i + half] : x[head0 + i - half];
        float v = x[e] * cos_t[(u64)t * head_dim + i] + sign * rot * sin_t[(u64)t * head_dim + i];
        if (add) y[e] += v; else y[e] = v;
    }
}
