//! Fisher's optimal segmentation of the ordered layers into contiguous segments of similar layers.
//!
//! Each layer l is a feature vector x_l (from the CKA matrix: [`Features`]). A segment [i, j] costs its
//! diameter D(i, j) = Σ_{t=i..j} ‖x_t − mean(x_i..x_j)‖². For every k the exact dynamic programme
//! F_k(j) = min_i F_{k−1}(i−1) + D(i, j) gives the minimal total loss L(k); the split points come from the
//! argmins, backtracked (the published SGLP code backtracks greedily and can miss the optimum).
//!
//! ```
//! use sglp_engine::segmentation::fisher_segments;
//! // The REFERENCES example: the optimum splits after two layers (loss 75).
//! let x: Vec<Vec<f64>> = [0., 0., 10., 10., 10., 20.].iter().map(|&v| vec![v]).collect();
//! let s = fisher_segments(&x, 2, 1).unwrap();
//! assert_eq!(s.segments, vec![(0, 1), (2, 5)]);
//! assert!((s.loss - 75.0).abs() < 1e-9);
//! ```

use crate::error::{Error, Result};

/// How each layer becomes a feature vector.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Features {
    /// x_l = Σ_m CKA[m][l], one number per layer (SGLP as published).
    // This doc is also `--features colsum`'s help text: `[m][l]` stays as written, not as a link.
    #[allow(rustdoc::broken_intra_doc_links)]
    #[value(name = "colsum")]
    ColSum,
    /// x_l = row l of the CKA matrix.
    Rows,
}

/// The per-layer feature vectors (L × p) of a square CKA matrix.
pub fn feature_matrix(cka: &[Vec<f64>], features: Features) -> Vec<Vec<f64>> {
    let l = cka.len();
    match features {
        Features::ColSum => (0..l)
            .map(|c| vec![cka.iter().map(|r| r[c]).sum()])
            .collect(),
        Features::Rows => cka.to_vec(),
    }
}

/// A segmentation: inclusive `[start, end]` layer indices, in order, and its total loss.
#[derive(Clone, Debug, PartialEq)]
pub struct Segmentation {
    pub segments: Vec<(usize, usize)>,
    pub loss: f64,
}

/// Diameters D(i, j) of every segment, from prefix sums: D = Σ‖x_t‖² − ‖Σx_t‖²/len.
struct Diameters {
    l: usize,
    d: Vec<f64>,
}

impl Diameters {
    fn new(x: &[Vec<f64>]) -> Self {
        let l = x.len();
        let p = x.first().map_or(0, |v| v.len());
        let mut d = vec![0.0; l * l];
        for i in 0..l {
            let mut sum = vec![0.0; p];
            let mut sq = 0.0;
            for j in i..l {
                for (s, v) in sum.iter_mut().zip(&x[j]) {
                    *s += v;
                }
                sq += x[j].iter().map(|v| v * v).sum::<f64>();
                let len = (j - i + 1) as f64;
                let v = sq - sum.iter().map(|s| s * s).sum::<f64>() / len;
                // Rounding can leave a tiny negative for a constant segment.
                d[i * l + j] = v.max(0.0);
            }
        }
        Diameters { l, d }
    }
    fn get(&self, i: usize, j: usize) -> f64 {
        self.d[i * self.l + j]
    }
}

/// The DP tables for k = 1..=k_max: `loss[k-1][j]` is the best loss of layers 0..=j in k segments,
/// `start[k-1][j]` where the last of those segments starts.
struct FisherTable {
    loss: Vec<Vec<f64>>,
    start: Vec<Vec<usize>>,
}

fn fisher_table(x: &[Vec<f64>], k_max: usize, min_len: usize) -> FisherTable {
    let l = x.len();
    let dia = Diameters::new(x);
    let mut loss = vec![vec![f64::INFINITY; l]; k_max];
    let mut start = vec![vec![0usize; l]; k_max];
    for j in 0..l {
        if j + 1 >= min_len {
            loss[0][j] = dia.get(0, j);
        }
    }
    for k in 1..k_max {
        let (prev, cur) = loss.split_at_mut(k);
        let (prev, cur) = (&prev[k - 1], &mut cur[0]);
        for j in 0..l {
            // Last segment [i, j]; the first k segments cover 0..i-1.
            let mut best = (f64::INFINITY, 0);
            for i in 1..=j {
                if j + 1 - i < min_len || !prev[i - 1].is_finite() {
                    continue;
                }
                let v = prev[i - 1] + dia.get(i, j);
                if v < best.0 {
                    best = (v, i);
                }
            }
            cur[j] = best.0;
            start[k][j] = best.1;
        }
    }
    FisherTable { loss, start }
}

fn backtrack(t: &FisherTable, k: usize, l: usize) -> Vec<(usize, usize)> {
    let mut segs = Vec::with_capacity(k);
    let mut end = l - 1;
    for kk in (0..k).rev() {
        let s = if kk == 0 { 0 } else { t.start[kk][end] };
        segs.push((s, end));
        if kk > 0 {
            end = s - 1;
        }
    }
    segs.reverse();
    segs
}

/// Largest |feature| [`fisher_segments`] takes: squares and their sums over any number of layers stay
/// far inside f64's range.
pub const MAX_FEATURE: f64 = 1e100;

fn check_input(x: &[Vec<f64>], k: usize, min_len: usize) -> Result<()> {
    let l = x.len();
    if l == 0 {
        return Err(Error::invalid("no layers to segment"));
    }
    if min_len == 0 {
        return Err(Error::invalid("--min-len must be at least 1"));
    }
    if k == 0 || k * min_len > l {
        return Err(Error::invalid(format!(
            "cannot split {l} layers into {k} segments of at least {min_len} layer(s)"
        )));
    }
    let p = x[0].len();
    if x.iter().any(|v| v.len() != p) {
        return Err(Error::invalid("layer feature vectors differ in length"));
    }
    if x.iter().flatten().any(|v| !v.is_finite()) {
        return Err(Error::invalid("layer features are not all finite"));
    }
    // The diameters are sums of squares: features beyond ~1e100 overflow them to infinity, and the DP
    // has no finite loss to choose from. Similarity matrices hold values of order one.
    let max = x.iter().flatten().fold(0.0f64, |m, v| m.max(v.abs()));
    if max > MAX_FEATURE {
        return Err(Error::invalid(format!(
            "layer features up to {max:e} are too large to segment (at most {MAX_FEATURE:e}; a \
             similarity matrix holds values of order one)"
        )));
    }
    Ok(())
}

/// The optimal segmentation of the layers (rows of `x`) into exactly `k` contiguous segments of at least
/// `min_len` layers each.
pub fn fisher_segments(x: &[Vec<f64>], k: usize, min_len: usize) -> Result<Segmentation> {
    check_input(x, k, min_len)?;
    let t = fisher_table(x, k, min_len);
    let l = x.len();
    Ok(Segmentation {
        segments: backtrack(&t, k, l),
        loss: t.loss[k - 1][l - 1],
    })
}

/// L(1), …, L(k_max): the optimal loss for each number of segments (k_max capped at L/min_len).
pub fn loss_curve(x: &[Vec<f64>], k_max: usize, min_len: usize) -> Result<Vec<f64>> {
    check_input(x, 1, min_len)?;
    let k_max = k_max.min(x.len() / min_len).max(1);
    let t = fisher_table(x, k_max, min_len);
    Ok(t.loss.iter().map(|row| row[x.len() - 1]).collect())
}

/// The `--k auto` rule: with r_k = (L(k) − L(k+1))/L(k), k* is the largest k+1 with r_k > threshold, or 1.
/// `curve[k-1]` = L(k). A loss that is zero up to rounding (≤ 1e-12·L(1)) leaves nothing to gain
/// (r_k = 0): otherwise splitting a perfectly fitted segment would "gain" 100% of a rounding error.
pub fn choose_k(curve: &[f64], threshold: f64) -> usize {
    let floor = curve.first().map_or(0.0, |l1| 1e-12 * l1.abs());
    let mut best = 1;
    for k in 1..curve.len() {
        let (a, b) = (curve[k - 1], curve[k]);
        let r = if a > floor { (a - b) / a } else { 0.0 };
        if r > threshold {
            best = k + 1;
        }
    }
    best
}

/// The `--k elbow` rule (the "kneedle" of the loss curve): with k and L(k) scaled to [0, 1] over
/// k = 1..k_max, the k furthest below the chord from (1, L(1)) to (k_max, L(k_max)); 1 when the curve has
/// no knee (a straight or concave curve, or fewer than three points). Unlike the relative-gain rule it does
/// not run to k_max when noise inside segments keeps every extra split a few percent better.
pub fn elbow_k(curve: &[f64]) -> usize {
    let n = curve.len();
    if n < 3 {
        return 1;
    }
    let (first, last) = (curve[0], curve[n - 1]);
    let span = first - last;
    if span.is_nan() || span <= 1e-12 * first.abs().max(1e-300) {
        return 1;
    }
    let mut best = (0.0, 1);
    for (i, &v) in curve.iter().enumerate() {
        let x = i as f64 / (n - 1) as f64;
        let y = (v - last) / span;
        let d = 1.0 - x - y;
        if d > best.0 + 1e-12 {
            best = (d, i + 1);
        }
    }
    best.1
}

/// The `sglp-segments/1` JSON output.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SegmentResult {
    pub format: String,
    pub k: usize,
    pub segments: Vec<[usize; 2]>,
    pub segment_layers: Vec<Vec<String>>,
    pub loss_curve: Vec<f64>,
    pub loss: f64,
    pub features: Features,
    /// What the user should know about the choice of k (e.g. `--k auto` stopped at `--k-max`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

pub const SEGMENTS_FORMAT: &str = "sglp-segments/1";

/// How many segments: a fixed k or the automatic rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KChoice {
    Fixed(usize),
    /// The relative-gain rule ([`choose_k`]).
    Auto {
        k_max: usize,
        threshold: f64,
    },
    /// The knee of the loss curve ([`elbow_k`]).
    Elbow {
        k_max: usize,
    },
}

impl KChoice {
    /// The largest k the rule may choose (`None` for a fixed k).
    pub fn k_max(&self) -> Option<usize> {
        match *self {
            KChoice::Fixed(_) => None,
            KChoice::Auto { k_max, .. } | KChoice::Elbow { k_max } => Some(k_max),
        }
    }

    /// The same rule with k_max capped at `cap`.
    pub fn capped(self, cap: usize) -> KChoice {
        match self {
            KChoice::Auto { k_max, threshold } => KChoice::Auto {
                k_max: k_max.min(cap),
                threshold,
            },
            KChoice::Elbow { k_max } => KChoice::Elbow {
                k_max: k_max.min(cap),
            },
            k => k,
        }
    }
}

/// Segment the layers of a CKA matrix: features, loss curve, k, optimal segments.
pub fn segment_cka(
    layers: &[String],
    cka: &[Vec<f64>],
    features: Features,
    k: KChoice,
    min_len: usize,
) -> Result<SegmentResult> {
    let l = layers.len();
    if cka.len() != l || cka.iter().any(|r| r.len() != l) {
        return Err(Error::invalid(format!("the CKA matrix is not {l}×{l}")));
    }
    if let Some((i, j)) = (0..l)
        .flat_map(|i| (0..l).map(move |j| (i, j)))
        .find(|&(i, j)| !cka[i][j].is_finite())
    {
        return Err(Error::invalid(format!(
            "the CKA matrix is not finite at ['{}']['{}'] (a zero-variance layer? drop it with --layers)",
            layers[i], layers[j]
        )));
    }
    let x = feature_matrix(cka, features);
    let mut warnings = Vec::new();
    let (k, curve) = match k {
        KChoice::Fixed(k) => (k, loss_curve(&x, k.max(8), min_len)?),
        KChoice::Auto { k_max, threshold } => {
            if k_max == 0 {
                return Err(Error::invalid("--k-max must be at least 1"));
            }
            // With k = L every layer is its own segment and the loss is exactly zero, so the last split
            // always "gains" 100% and the rule would always return L: stop one short of it.
            let k_max = k_max.min(l.saturating_sub(1)).max(1);
            let curve = loss_curve(&x, k_max, min_len)?;
            let k = choose_k(&curve, threshold);
            if k > 1 && k == curve.len() {
                warnings.push(format!(
                    "--k auto stopped at k = {k}, the largest k it tried (the last split still gained \
                     more than {threshold}): raise --k-max, or try --k elbow"
                ));
            }
            (k, curve)
        }
        KChoice::Elbow { k_max } => {
            if k_max == 0 {
                return Err(Error::invalid("--k-max must be at least 1"));
            }
            let curve = loss_curve(&x, k_max, min_len)?;
            (elbow_k(&curve), curve)
        }
    };
    let seg = fisher_segments(&x, k, min_len)?;
    Ok(SegmentResult {
        format: SEGMENTS_FORMAT.to_string(),
        k,
        segments: seg.segments.iter().map(|&(a, b)| [a, b]).collect(),
        segment_layers: seg
            .segments
            .iter()
            .map(|&(a, b)| layers[a..=b].to_vec())
            .collect(),
        loss_curve: curve,
        loss: seg.loss,
        features,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Features whose squares overflow f64 left the DP without a finite loss, and the backtracking
    /// stepped before layer 0 (a panic on a CSV of 1e200s given to `segment`): refused with an error.
    #[test]
    fn features_too_large_to_square_are_refused() {
        let x: Vec<Vec<f64>> = [1e200, -1e200, 1e200].iter().map(|&v| vec![v]).collect();
        let e = fisher_segments(&x, 2, 1).unwrap_err().to_string();
        assert!(e.contains("too large"), "{e}");
        let x: Vec<Vec<f64>> = [1e90, -3e89, 2e90].iter().map(|&v| vec![v]).collect();
        assert_eq!(fisher_segments(&x, 2, 1).unwrap().segments.len(), 2);
    }
}
