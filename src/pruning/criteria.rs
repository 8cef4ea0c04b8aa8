//! Other layer-removal criteria, for `compare`: each turns statistics of the unpruned network into a set
//! of decoder layers to remove, with the same budget as SGLP.
//!
//! Hidden states are indexed as the runtime reports them: `h_0` is the embedding output (input of decoder
//! layer 0) and `h_{l+1}` the output of decoder layer `l`, so layer `l` maps `h_l` to `h_{l+1}`.

use crate::error::{Error, Result};

/// Streaming statistics of the hidden states `h_0 … h_L` for ShortGPT and Gromov et al. (every span n at
/// once, so that one pass serves a sweep over budgets).
///
/// Feed one batch at a time: [`HiddenStats::begin_batch`], then [`HiddenStats::observe`] for i = 0..=L in
/// order (what the runtime's `on_hidden` callback sees), then [`HiddenStats::end_batch`].
pub struct HiddenStats {
    num_layers: usize,
    hidden: usize,
    seqs: usize,
    tokens: usize,
    /// The previous hidden state, `[seqs*tokens, hidden]`, for the block-influence cosines.
    prev: Vec<f32>,
    /// Last-token rows of every `h_i` of the current batch: `(L+1) × seqs × hidden`.
    last: Vec<f32>,
    /// Σ over tokens of cos(h_l, h_{l+1}), per layer, and the token count.
    cos_sum: Vec<f64>,
    cos_count: usize,
    /// Σ over sequences of the angular distance between h_a and h_b at the last token, `[a * (L+1) + b]`
    /// for a < b.
    ang_sum: Vec<f64>,
    ang_count: usize,
    next_i: usize,
}

impl HiddenStats {
    pub fn new(num_layers: usize) -> Self {
        HiddenStats {
            num_layers,
            hidden: 0,
            seqs: 0,
            tokens: 0,
            prev: Vec::new(),
            last: Vec::new(),
            cos_sum: vec![0.0; num_layers],
            cos_count: 0,
            ang_sum: vec![0.0; (num_layers + 1) * (num_layers + 1)],
            ang_count: 0,
            next_i: 0,
        }
    }

    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// Start a batch of `seqs` sequences of `tokens` tokens, hidden size `hidden`.
    pub fn begin_batch(&mut self, seqs: usize, tokens: usize, hidden: usize) {
        self.seqs = seqs;
        self.tokens = tokens;
        self.hidden = hidden;
        self.prev.clear();
        self.last.clear();
        self.last.resize((self.num_layers + 1) * seqs * hidden, 0.0);
        self.next_i = 0;
    }

    /// `h_i` of the current batch, `[seqs*tokens, hidden]` row-major.
    pub fn observe(&mut self, i: usize, h: &[f32]) -> Result<()> {
        let (s, t, d) = (self.seqs, self.tokens, self.hidden);
        if i != self.next_i || i > self.num_layers || h.len() != s * t * d {
            return Err(Error::invalid(format!(
                "hidden state {i} out of order or of the wrong size ({} values, expected {})",
                h.len(),
                s * t * d
            )));
        }
        if i > 0 {
            let sum: f64 = h
                .chunks_exact(d)
                .zip(self.prev.chunks_exact(d))
                .map(|(a, b)| cosine(a, b))
                .sum();
            self.cos_sum[i - 1] += sum;
        }
        for q in 0..s {
            let row = &h[(q * t + t - 1) * d..(q * t + t) * d];
            let at = (i * s + q) * d;
            self.last[at..at + d].copy_from_slice(row);
        }
        self.prev.clear();
        self.prev.extend_from_slice(h);
        self.next_i += 1;
        Ok(())
    }

    /// Close the batch: fold its last-token angular distances in.
    pub fn end_batch(&mut self) -> Result<()> {
        if self.next_i != self.num_layers + 1 {
            return Err(Error::invalid(format!(
                "saw {} hidden states in the batch, expected {}",
                self.next_i,
                self.num_layers + 1
            )));
        }
        let (s, d, n) = (self.seqs, self.hidden, self.num_layers + 1);
        for a in 0..n {
            for b in a + 1..n {
                for q in 0..s {
                    let ha = &self.last[(a * s + q) * d..(a * s + q + 1) * d];
                    let hb = &self.last[(b * s + q) * d..(b * s + q + 1) * d];
                    self.ang_sum[a * n + b] += angular_distance(cosine(ha, hb));
                }
            }
        }
        self.cos_count += s * self.tokens;
        self.ang_count += s;
        Ok(())
    }

    /// ShortGPT's block influence BI_l = 1 − mean over tokens of cos(h_l, h_{l+1}).
    pub fn block_influence(&self) -> Vec<f64> {
        let n = self.cos_count.max(1) as f64;
        self.cos_sum.iter().map(|c| 1.0 - c / n).collect()
    }

    /// Mean angular distance (1/π)·arccos(cos(h_l, h_{l+span})) at the last token, for l = 0..=L−span.
    /// Errors unless 1 ≤ span ≤ L.
    pub fn angular_distances(&self, span: usize) -> Result<Vec<f64>> {
        let l = self.num_layers;
        if span == 0 || span > l {
            return Err(Error::invalid(format!(
                "the angular criterion needs 1 ≤ n ≤ {l} layers (got {span})"
            )));
        }
        let c = self.ang_count.max(1) as f64;
        Ok((0..=l - span)
            .map(|a| self.ang_sum[a * (l + 1) + a + span] / c)
            .collect())
    }
}

/// cos(a, b) in f64. Two zero vectors count as identical (1); one zero vector as orthogonal (0).
fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    match (aa > 0.0, bb > 0.0) {
        (true, true) => (ab / (aa.sqrt() * bb.sqrt())).clamp(-1.0, 1.0),
        (false, false) => 1.0,
        _ => 0.0,
    }
}

/// (1/π)·arccos(cos), in [0, 1].
pub fn angular_distance(cos: f64) -> f64 {
    cos.clamp(-1.0, 1.0).acos() / std::f64::consts::PI
}

/// ShortGPT: the `budget` layers of lowest block influence (ties to the later layer). Sorted.
pub fn shortgpt(block_influence: &[f64], budget: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..block_influence.len()).collect();
    order.sort_by(|&a, &b| {
        block_influence[a]
            .total_cmp(&block_influence[b])
            .then(b.cmp(&a))
    });
    let mut r = order[..budget.min(order.len())].to_vec();
    r.sort_unstable();
    r
}

/// Gromov et al.: the `n` consecutive layers starting at the argmin of the angular distances (ties to the
/// later start). `distances[l]` is the distance between h_l and h_{l+n}.
pub fn angular(distances: &[f64], n: usize) -> Vec<usize> {
    let start = (0..distances.len())
        .min_by(|&a, &b| distances[a].total_cmp(&distances[b]).then(b.cmp(&a)))
        .unwrap_or(0);
    (start..start + n).collect()
}

/// MPruner's outcome: the layers removed, the clusters, and the threshold that was finally used.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MprunerResult {
    pub removed: Vec<usize>,
    /// Contiguous clusters as inclusive `[first, last]` layer indices.
    pub clusters: Vec<(usize, usize)>,
    /// The threshold (CKA·100) that produced the clusters.
    pub threshold: f64,
    /// Layers taken by lowest gradient norm outside any cluster, when even the loosest threshold left
    /// too few cluster members (only with NaN CKA entries).
    pub filled_by_gradnorm: usize,
}

/// Contiguous clusters: start at a layer, extend while CKA(first, next)·100 ≥ threshold. NaN never joins.
pub fn mpruner_clusters(cka: &[Vec<f64>], threshold: f64) -> Vec<(usize, usize)> {
    let l = cka.len();
    let mut clusters = Vec::new();
    let mut first = 0;
    while first < l {
        let mut last = first;
        while last + 1 < l && cka[first][last + 1] * 100.0 >= threshold {
            last += 1;
        }
        clusters.push((first, last));
        first = last + 1;
    }
    clusters
}

/// MPruner with a fixed budget: cluster at `threshold`; the removable layers are the non-first members of
/// every cluster; remove the `budget` of them with the lowest gradient norm.
///
/// When the clusters hold fewer removable layers than the budget, the threshold is lowered one point at a
/// time (MPruner's knob: a lower threshold merges more layers) until they hold enough; this always
/// terminates once the threshold is below every finite adjacent CKA. If NaN entries still split the
/// clusters at a threshold of −100, the rest of the budget is taken from the remaining layers by lowest
/// gradient norm (`filled_by_gradnorm`). Errors when the budget is not below the number of layers.
pub fn mpruner(
    cka: &[Vec<f64>],
    gradnorm: &[f64],
    threshold: f64,
    budget: usize,
) -> Result<MprunerResult> {
    let l = cka.len();
    if budget >= l {
        return Err(Error::invalid(format!(
            "cannot remove {budget} of {l} layers"
        )));
    }
    let by_gradnorm = |cands: &mut Vec<usize>| {
        cands.sort_by(|&a, &b| gradnorm[a].total_cmp(&gradnorm[b]).then(b.cmp(&a)));
    };
    let mut t = threshold;
    loop {
        let clusters = mpruner_clusters(cka, t);
        let mut cands: Vec<usize> = clusters.iter().flat_map(|&(f, e)| f + 1..=e).collect();
        if cands.len() >= budget || t <= -100.0 {
            by_gradnorm(&mut cands);
            let mut removed: Vec<usize> = cands.into_iter().take(budget).collect();
            let filled = budget - removed.len();
            if filled > 0 {
                let mut rest: Vec<usize> = (0..l).filter(|i| !removed.contains(i)).collect();
                by_gradnorm(&mut rest);
                removed.extend(rest.into_iter().take(filled));
            }
            removed.sort_unstable();
            return Ok(MprunerResult {
                removed,
                clusters,
                threshold: t,
                filled_by_gradnorm: filled,
            });
        }
        t -= 1.0;
    }
}

/// `budget` distinct layers of `num_layers`, uniformly at random from `seed`. Sorted.
pub fn random(num_layers: usize, budget: usize, seed: u64) -> Vec<usize> {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut r = rand::seq::index::sample(&mut rng, num_layers, budget.min(num_layers)).into_vec();
    r.sort_unstable();
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Hidden states where layer 2 is the identity and layers 1..=2 together barely rotate h_1.
    fn feed(stats: &mut HiddenStats, hs: &[Vec<f32>], seqs: usize, tokens: usize, d: usize) {
        stats.begin_batch(seqs, tokens, d);
        for (i, h) in hs.iter().enumerate() {
            stats.observe(i, h).unwrap();
        }
        stats.end_batch().unwrap();
    }

    #[test]
    fn block_influence_and_angular_against_direct_formulas() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (seqs, tokens, d, l) = (3, 5, 8, 4);
        let mut hs: Vec<Vec<f32>> = Vec::new();
        let mut h: Vec<f32> = (0..seqs * tokens * d)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        hs.push(h.clone());
        for layer in 0..l {
            // Layer 2 is the identity; the others add noise of growing size.
            if layer != 2 {
                let scale = 0.3 * (layer + 1) as f32;
                for v in h.iter_mut() {
                    *v += scale * rng.random_range(-1.0f32..1.0);
                }
            }
            hs.push(h.clone());
        }
        let mut st = HiddenStats::new(l);
        feed(&mut st, &hs, seqs, tokens, d);
        let bi = st.block_influence();
        assert!(
            bi[2].abs() < 1e-12,
            "identity layer has BI 0, got {}",
            bi[2]
        );
        // Direct formula for layer 1.
        let mut c = 0.0;
        for r in 0..seqs * tokens {
            c += cosine(&hs[1][r * d..(r + 1) * d], &hs[2][r * d..(r + 1) * d]);
        }
        assert!((bi[1] - (1.0 - c / (seqs * tokens) as f64)).abs() < 1e-12);
        assert_eq!(shortgpt(&bi, 1), vec![2]);
        // Angular, span 2, start 1: h_1 vs h_3 at the last token of each sequence.
        let ad = st.angular_distances(2).unwrap();
        assert!(st.angular_distances(0).is_err() && st.angular_distances(l + 1).is_err());
        assert_eq!(ad.len(), l - 1);
        let mut a = 0.0;
        for q in 0..seqs {
            let r = q * tokens + tokens - 1;
            a += angular_distance(cosine(
                &hs[1][r * d..(r + 1) * d],
                &hs[3][r * d..(r + 1) * d],
            ));
        }
        assert!((ad[1] - a / seqs as f64).abs() < 1e-12);
        let chosen = angular(&ad, 2);
        assert_eq!(chosen.len(), 2);
        assert_eq!(chosen[1], chosen[0] + 1);
    }

    #[test]
    fn angular_picks_the_argmin_block() {
        assert_eq!(angular(&[0.3, 0.1, 0.2], 3), vec![1, 2, 3]);
        assert_eq!(angular_distance(1.0), 0.0);
        assert!((angular_distance(0.0) - 0.5).abs() < 1e-15);
    }

    fn block_cka(blocks: &[usize]) -> Vec<Vec<f64>> {
        // Layers in the same block have CKA 0.99, else 0.5.
        let ids: Vec<usize> = blocks
            .iter()
            .enumerate()
            .flat_map(|(b, &n)| std::iter::repeat_n(b, n))
            .collect();
        let l = ids.len();
        (0..l)
            .map(|i| {
                (0..l)
                    .map(|j| {
                        if i == j {
                            1.0
                        } else if ids[i] == ids[j] {
                            0.99
                        } else {
                            0.5
                        }
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn mpruner_clusters_and_removes_non_first_members() {
        let cka = block_cka(&[3, 1, 4]);
        assert_eq!(mpruner_clusters(&cka, 98.0), vec![(0, 2), (3, 3), (4, 7)]);
        let g = [1.0, 0.2, 0.9, 0.1, 5.0, 0.3, 0.4, 0.05];
        let r = mpruner(&cka, &g, 98.0, 3).unwrap();
        // Removable: 1, 2, 5, 6, 7 → lowest gradnorm 7 (0.05), 1 (0.2), 5 (0.3). Layer 3 (0.1) is a
        // singleton cluster's first member and is kept.
        assert_eq!(r.removed, vec![1, 5, 7]);
        assert_eq!(r.threshold, 98.0);
        assert_eq!(r.filled_by_gradnorm, 0);
    }

    #[test]
    fn mpruner_lowers_the_threshold_when_clusters_are_too_small() {
        let cka = block_cka(&[3, 1, 4]);
        let g = [1.0, 0.2, 0.9, 0.1, 5.0, 0.3, 0.4, 0.05];
        // 5 removable at 98; 6 needs merging the blocks: only once the threshold is ≤ 50.
        let r = mpruner(&cka, &g, 98.0, 6).unwrap();
        assert_eq!(r.threshold, 50.0);
        assert_eq!(r.removed.len(), 6);
        assert!(!r.removed.contains(&0));
        assert!(mpruner(&cka, &g, 98.0, 8).is_err());
    }

    #[test]
    fn random_is_seeded_and_distinct() {
        let a = random(12, 4, 1);
        assert_eq!(a, random(12, 4, 1));
        assert_eq!(a.len(), 4);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert_ne!(a, random(12, 4, 2));
    }
}
