//! The device memory plan of one batch shape, made up front from the free device memory.
//!
//! Buffers (n samples per batch, P = n(n+1)/2):
//! * two upload slots (pinned host + device) of `stage_bytes` each: consecutive layers' raw rows;
//! * the Gram scratch: `gram_layers` n×n f32 matrices (the layers of one upload chunk), plus per-row
//!   f64 sums / offsets and the f32 diagonal;
//! * the centred, packed Grams G: `g_rows` rows of P f32;
//! * the L×L f64 result.
//!
//! When the packed Grams of all L layers fit, one pass computes them and one product gives all pairs.
//! Otherwise layers go in blocks of `layer_block`: G holds two blocks, and every pair of blocks is
//! visited (block a's Grams kept while each later block b is computed again: Σ recomputation is the price
//! of fitting). If even one layer's batch does not fit, the plan fails naming the largest batch that does.

use crate::error::{Error, Result};

/// Upload chunks aim at this many bytes (large enough to amortise a copy, small enough to overlap).
const STAGE_TARGET: usize = 64 << 20;
/// At most this many layers' Grams in the scratch at once.
const MAX_GRAM_LAYERS: usize = 32;
/// Gram scratch slots kept for split-K planes (see [`gram_splits`]) when a batch is small enough for a
/// launch to run short of tiles (n ≤ [`SPLIT_K_MAX_N`]), even with fewer layers than this.
const SPLIT_K_SLOTS: usize = 16;
/// Above this batch size one layer has ≥ 136 tensor-core tiles: launches fill a GPU without split-K.
const SPLIT_K_MAX_N: usize = 2048;
/// Split-K aims at this many blocks per SM in a Gram launch.
const SPLIT_K_BLOCKS_PER_SM: usize = 2;
/// Each split sums at least this many features (the reduction's pass over the planes stays small next
/// to the products).
const SPLIT_K_MIN_DEPTH: usize = 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    pub n: usize,
    /// Bytes of one upload slot (≥ the largest layer's batch).
    pub stage_bytes: usize,
    /// Gram scratch capacity in layers (the most layers one upload chunk holds).
    pub gram_layers: usize,
    /// Rows of G resident on the device.
    pub g_rows: usize,
    /// Layers per block: the number of layers when all packed Grams fit (one block).
    pub layer_block: usize,
    /// Split-K planes of the pair products ([`pair_splits`]).
    pub pair_splits: usize,
    /// Device bytes the plan allocates.
    pub device_bytes: usize,
}

impl MemoryPlan {
    pub fn blocks(&self, layers: usize) -> usize {
        layers.div_ceil(self.layer_block)
    }

    /// The buffers to allocate for `layers` layers.
    pub fn buffers(&self, layers: usize) -> Buffers {
        Buffers::new(
            self.n,
            layers,
            self.stage_bytes,
            self.gram_layers,
            self.g_rows,
            self.pair_splits,
        )
    }
}

/// The most split-K planes of the pair products (each L×L f64, summed in order afterwards for
/// reproducible bits): up to 256, within 4 MiB and a sixteenth of the budget.
pub fn pair_splits(layers: usize, budget: usize) -> usize {
    ((4usize << 20).min(budget / 16) / (layers * layers * 8).max(1)).clamp(1, 256)
}

/// Split-K factor of a Gram launch of `blocks` tiles over layers at most `max_cols` wide, on a GPU of
/// `sms` multiprocessors, with room for `planes` copies of the launch's Grams in the scratch: 1 when the
/// tiles fill the GPU, else enough splits for about 2 blocks per SM, each at least 1,024 features deep.
/// A few wide layers of a small batch (ResNet-like: 2 layers of 16,384 features, b = 500, give 72 FMA
/// tiles) otherwise leave most SMs idle.
pub fn gram_splits(sms: usize, blocks: usize, max_cols: usize, planes: usize) -> usize {
    let target = SPLIT_K_BLOCKS_PER_SM * sms;
    if blocks == 0 || blocks >= target {
        return 1;
    }
    target
        .div_ceil(blocks)
        .min(max_cols / SPLIT_K_MIN_DEPTH)
        .min(planes)
        .max(1)
}

/// Packed lower triangle length.
pub fn packed_len(n: usize) -> usize {
    n * (n + 1) / 2
}

/// Bytes of one layer's batch of n rows, rounded up to the 16-byte alignment the upload slots use.
pub fn layer_bytes(n: usize, cols: usize, elem: usize) -> usize {
    (n * cols * elem).div_ceil(16) * 16
}

/// Histogram bins of the RBF median's radix select (`RBF_BINS` in `kernels/rbf.cu`).
pub const RBF_BINS: usize = 2048;

/// Element counts of every device buffer of a plan: the one place their sizes are computed, for the
/// plan's byte count and for the allocations (`CudaBackend::workspace`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffers {
    /// Bytes of each of the two upload slots (device, and pinned host).
    pub stage_bytes: usize,
    /// f32: `gram_layers` n×n Grams.
    pub gram: usize,
    /// u32: per Gram slot, the largest column range and the f16 scale exponent (centre_columns.cu).
    pub col_scale: usize,
    /// f64: per Gram row, its sum.
    pub rowsum: usize,
    /// f64: per Gram row, its centring offset.
    pub offsets: usize,
    /// f32: per Gram row, its diagonal entry (RBF).
    pub diag: usize,
    /// u32: the RBF median select's state, 4 words for each of 2 selects per layer.
    pub select_state: usize,
    /// u32: the RBF median select's histograms, `RBF_BINS` for each of 2 selects per layer.
    pub select_hist: usize,
    /// f32: `g_rows` packed Grams of P = n(n+1)/2.
    pub g: usize,
    /// f64: the L×L result.
    pub out: usize,
    /// f64: [`pair_splits`] planes of L×L split-K partials of the pair products (hsic_pairs.cu).
    pub partials: usize,
    /// u64: the layer tables (3 words per layer) uploaded with each block, allocated per block; counted
    /// for every layer and once more for a chunk's worth.
    pub tables: usize,
}

impl Buffers {
    pub fn new(
        n: usize,
        layers: usize,
        stage: usize,
        gram_layers: usize,
        g_rows: usize,
        pair_splits: usize,
    ) -> Self {
        Buffers {
            stage_bytes: stage,
            gram: gram_layers * n * n,
            col_scale: gram_layers * 2,
            rowsum: gram_layers * n,
            offsets: gram_layers * n,
            diag: gram_layers * n,
            select_state: gram_layers * 2 * 4,
            select_hist: gram_layers * 2 * RBF_BINS,
            g: g_rows * packed_len(n),
            out: layers * layers,
            partials: pair_splits * layers * layers,
            tables: 3 * (gram_layers + layers),
        }
    }

    /// Device bytes of them all.
    pub fn device_bytes(&self) -> usize {
        2 * self.stage_bytes
            + (self.gram + self.diag + self.g) * 4
            + (self.rowsum + self.offsets + self.out + self.partials + self.tables) * 8
            + (self.select_state + self.select_hist + self.col_scale) * 4
    }
}

/// Device bytes for a given split (everything `MemoryPlan` allocates).
fn device_bytes(
    n: usize,
    layers: usize,
    stage: usize,
    gram_layers: usize,
    g_rows: usize,
    splits: usize,
) -> usize {
    Buffers::new(n, layers, stage, gram_layers, g_rows, splits).device_bytes()
}

/// Plan for batches of `n` rows of layers whose per-row byte widths are `row_bytes[l]` (cols × elem),
/// within `budget` device bytes.
pub fn plan(n: usize, row_bytes: &[usize], budget: usize) -> Result<MemoryPlan> {
    let l = row_bytes.len();
    if l == 0 || n == 0 {
        return Err(Error::invalid("nothing to plan: no layers or no samples"));
    }
    match plan_exact(n, row_bytes, budget) {
        Some(p) => Ok(p),
        None => {
            let fits = largest_batch_that_fits(row_bytes, budget);
            let widest = row_bytes.iter().copied().max().unwrap_or(0);
            Err(Error::cuda(match fits {
                Some(m) => format!(
                    "a batch of {n} samples does not fit in the GPU's free memory ({} MiB usable; the \
                     widest layer is {widest} bytes per sample): the largest batch size that fits is {m} \
                     (use --cka-batch {m}, or --device cpu)",
                    budget >> 20
                ),
                None => format!(
                    "even a batch of 4 samples does not fit in the GPU's free memory ({} MiB usable); \
                     use --device cpu",
                    budget >> 20
                ),
            }))
        }
    }
}

fn plan_exact(n: usize, row_bytes: &[usize], budget: usize) -> Option<MemoryPlan> {
    let l = row_bytes.len();
    let per_layer: Vec<usize> = row_bytes.iter().map(|&w| layer_bytes(n, w, 1)).collect();
    let widest = per_layer.iter().copied().max()?;
    let total_in: usize = per_layer.iter().sum();
    let p4 = packed_len(n) * 4;
    let splits = pair_splits(l, budget);
    // The least that must fit: one layer staged twice, one Gram, two G rows.
    let stage_min = widest;
    if device_bytes(n, l, stage_min, 1, 2.min(l).max(1), splits) > budget {
        return None;
    }
    let stage = widest.max(STAGE_TARGET.min(total_in));
    let stage = if device_bytes(n, l, stage, 1, 2.min(l).max(1), splits) <= budget {
        stage
    } else {
        stage_min
    };
    // Gram scratch: as many layers as a chunk can hold, capped, within a quarter of what is left.
    let base = device_bytes(n, l, stage, 0, 0, splits);
    let per_gram = device_bytes(n, l, stage, 1, 0, splits) - base;
    let left = budget - base;
    let split_room = if n <= SPLIT_K_MAX_N { SPLIT_K_SLOTS } else { 1 };
    let want_gram = l.min(MAX_GRAM_LAYERS).max(split_room);
    let gram_layers = (left / 4 / per_gram).clamp(1, want_gram);
    let after_gram = budget - device_bytes(n, l, stage, gram_layers, 0, splits);
    let (g_rows, layer_block) = if l * p4 <= after_gram {
        (l, l)
    } else {
        let rows = (after_gram / p4).max(2);
        let block = (rows / 2).max(1);
        // Two blocks' rows (a and b), but a single layer needs only its own.
        ((2 * block).min(l), block)
    };
    let bytes = device_bytes(n, l, stage, gram_layers, g_rows, splits);
    (bytes <= budget).then_some(MemoryPlan {
        n,
        stage_bytes: stage,
        gram_layers,
        g_rows,
        layer_block,
        pair_splits: splits,
        device_bytes: bytes,
    })
}

/// The largest batch size (≥ 4) whose plan fits `budget`, by bisection (the need grows with n).
pub fn largest_batch_that_fits(row_bytes: &[usize], budget: usize) -> Option<usize> {
    plan_exact(4, row_bytes, budget)?;
    let (mut lo, mut hi) = (4usize, 8usize);
    while plan_exact(hi, row_bytes, budget).is_some() {
        lo = hi;
        hi *= 2;
        if hi > 1 << 24 {
            return Some(lo);
        }
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if plan_exact(mid, row_bytes, budget).is_some() {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(lo)
}

/// Consecutive layers `[start, end)` of one upload chunk, with each layer's byte offset in the slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub start: usize,
    pub end: usize,
    pub offsets: Vec<usize>,
    pub bytes: usize,
}

/// Split layers `[start, end)` into upload chunks of at most `stage` bytes and `max_layers` layers.
/// `sizes[l]` is layer l's batch bytes (16-byte multiples; each ≤ `stage`).
pub fn chunks(
    sizes: &[usize],
    start: usize,
    end: usize,
    stage: usize,
    max_layers: usize,
) -> Vec<Chunk> {
    let mut out = Vec::new();
    let mut cur = Chunk {
        start,
        end: start,
        offsets: Vec::new(),
        bytes: 0,
    };
    for (l, &size) in sizes.iter().enumerate().take(end).skip(start) {
        if cur.end > cur.start && (cur.bytes + size > stage || cur.end - cur.start == max_layers) {
            let next = Chunk {
                start: l,
                end: l,
                offsets: Vec::new(),
                bytes: 0,
            };
            out.push(std::mem::replace(&mut cur, next));
        }
        cur.offsets.push(cur.bytes);
        cur.bytes += size;
        cur.end = l + 1;
    }
    if cur.end > cur.start {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_fits_in_one_block_when_memory_is_plenty() {
        // ResNet-like: 28 layers, b = 500, 16 K f32 features.
        let rows = vec![16384 * 4; 28];
        let p = plan(500, &rows, 60 << 30).unwrap();
        assert_eq!(p.layer_block, 28);
        assert_eq!(p.g_rows, 28);
        assert!(p.stage_bytes >= 500 * 16384 * 4);
        assert!(p.device_bytes <= 60 << 30);
        assert_eq!(p.blocks(28), 1);
    }

    #[test]
    fn tight_memory_gives_layer_blocks_and_a_named_batch_limit() {
        let rows = vec![4096 * 2; 300];
        let n = 1024;
        let all = device_bytes(n, 300, 64 << 20, 32, 300, 1);
        let p = plan(n, &rows, all / 3).unwrap();
        assert!(p.layer_block < 300 && p.layer_block >= 1);
        assert_eq!(p.g_rows, 2 * p.layer_block);
        assert!(p.device_bytes <= all / 3);
        // Far too little memory for n = 1024: the error names a batch size that does fit.
        let small = 16 << 20;
        let err = plan(n, &rows, small).unwrap_err().to_string();
        let m = largest_batch_that_fits(&rows, small).unwrap();
        assert!(m < n && m >= 4, "{m}");
        assert!(err.contains(&format!("--cka-batch {m}")), "{err}");
        assert!(plan(m, &rows, small).is_ok());
        assert!(plan(m + 1, &rows, small).is_err());
    }

    #[test]
    fn buffer_sizes_add_up_to_the_plan() {
        let (n, l, stage, gl, g_rows) = (300, 17, 1 << 20, 5, 9);
        let nn = n * n;
        let by_hand = 2 * stage
            + gl * (nn * 4 + n * (8 + 8 + 4) + 2 * RBF_BINS * 4 + 2 * 4 * 4 + 2 * 4 + 3 * 8)
            + g_rows * packed_len(n) * 4
            + l * l * 8 * (1 + 7)
            + l * 3 * 8;
        assert_eq!(device_bytes(n, l, stage, gl, g_rows, 7), by_hand);
        let p = plan(n, &vec![4096; l], 1 << 30).unwrap();
        assert_eq!(p.buffers(l).device_bytes(), p.device_bytes);
    }

    #[test]
    fn split_k_only_where_tiles_run_short() {
        // Enough tiles: no split.
        assert_eq!(gram_splits(132, 288, 4096, 16), 1);
        assert_eq!(gram_splits(132, 264, 65536, 16), 1);
        // ResNet-like chunk: 72 FMA tiles of 16,384 features → ⌈264 / 72⌉ = 4 splits.
        assert_eq!(gram_splits(132, 72, 16384, 16), 4);
        // One tile of a 4,096-wide layer: depth allows 4; planes cap at 2.
        assert_eq!(gram_splits(132, 1, 4096, 16), 4);
        assert_eq!(gram_splits(132, 1, 4096, 2), 2);
        // Too shallow to split.
        assert_eq!(gram_splits(132, 1, 1000, 16), 1);
        assert_eq!(gram_splits(132, 0, 4096, 16), 1);
        // A small batch plans scratch room for the planes, a large one does not.
        let p = plan(500, &[16384 * 4; 2], 8 << 30).unwrap();
        assert_eq!(p.gram_layers, SPLIT_K_SLOTS);
        let p = plan(4096, &[4096 * 2; 2], 8 << 30).unwrap();
        assert_eq!(p.gram_layers, 2);
    }

    #[test]
    fn chunks_cover_the_layers_in_order_within_limits() {
        let sizes = vec![32, 48, 16, 64, 16, 16];
        let cs = chunks(&sizes, 1, 6, 64, 2);
        let covered: Vec<usize> = cs.iter().flat_map(|c| c.start..c.end).collect();
        assert_eq!(covered, vec![1, 2, 3, 4, 5]);
        for c in &cs {
            assert!(c.bytes <= 64 && c.end - c.start <= 2);
            let mut off = 0;
            for (k, l) in (c.start..c.end).enumerate() {
                assert_eq!(c.offsets[k], off);
                off += sizes[l];
            }
            assert_eq!(off, c.bytes);
        }
    }
}
