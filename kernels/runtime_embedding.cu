// runtime_embedding.cu — token embedding: forward gathers rows of the table, backward scatters the
// rows' gradients back with atomicAdd (a token repeated in the batch adds into the same row, so the sum
// order, hence the last bits, may differ from run to run). One block per row of the output; ids are i64.

typedef unsigned long long u64;

// out[r] = scale · table[ids[r]]; table [vocab, dim], out [rows, dim] (scale √hidden for Gemma, else 1)
extern "C" __global__ void embedding_forward(const long long* __restrict__ ids,
                                             const float* __restrict__ table, int dim, float scale,
                                             float* __restrict__ out, int rows) {
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* src = table + (u64)ids[r] * dim;
    float* dst = out + (u64)r * dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) dst[c] = src[c] * scale;
}

// dtable[ids[r]] += scale · dout[r], but for rows whose id is `skip` (nn.Embedding's padding_idx; -1:
// none)
extern "C" __global__ void embedding_backward(const long long* __restrict__ ids,
                                              const float* __restrict__ dout, int dim, float scale,
                                              float* __restrict__ dtable, int rows, int skip) {
    int r = blockIdx.x;
    if (r >= rows || ids[r] == (long long)skip) return;
    float* dst = dtable + (u64)ids[r] * dim;
    const float* src = dout + (u64)r * dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) atomicAdd(dst + c, src[c] * scale);
}
