//! Choosing which layers of each segment to remove, once each segment's count is known.
//!
//! * [`Selection::Gradnorm`]: remove the layers with the lowest per-layer gradient norm (one backward pass
//!   over the calibration batches scores every layer at once).
//! * [`Selection::Subset`]: as in the SGLP paper, score whole candidate subsets: for each segment, every
//!   combination of `r` of its layers is removed in turn (the other segments intact) and the network's
//!   global gradient norm is measured; the subset leaving the largest gradient norm is removed (SGLP reads
//!   GradNorm as a trainability score of the pruned network: higher is better). When a segment has more
//!   than `max_candidates` combinations, a greedy search replaces the enumeration: layers are removed one
//!   at a time, each time the one whose removal (with those already chosen) leaves the largest global
//!   gradient norm — Σ_{j<r} (len − j) evaluations instead of C(len, r).

use crate::error::Result;

/// How layers are chosen inside a segment.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Selection {
    /// Lowest per-layer gradient norm first.
    #[default]
    Gradnorm,
    /// Best subset by the global gradient norm of the pruned network (greedy beyond --max-candidates).
    Subset,
}

/// How one segment's subset was found (for the report).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SubsetSearch {
    /// Segment index.
    pub segment: usize,
    /// "exhaustive" or "greedy".
    pub method: String,
    /// Candidate subsets scored (network evaluations).
    pub evaluated: usize,
    /// The global gradient norm with the chosen subset removed.
    pub score: f64,
}

/// Within each segment (inclusive `[start, end]` layer indices), the `counts[i]` layers with the lowest
/// `gradnorm`; ties go to the later layer (deeper layers are the usual candidates). Sorted result.
pub fn lowest_gradnorm(
    segments: &[(usize, usize)],
    counts: &[usize],
    gradnorm: &[f64],
) -> Vec<usize> {
    let mut removed = Vec::new();
    for (&(start, end), &r) in segments.iter().zip(counts) {
        let mut layers: Vec<usize> = (start..=end).collect();
        layers.sort_by(|&a, &b| gradnorm[a].total_cmp(&gradnorm[b]).then(b.cmp(&a)));
        removed.extend_from_slice(&layers[..r]);
    }
    removed.sort_unstable();
    removed
}

/// Number of r-subsets of n items, saturating.
pub fn binomial(n: usize, r: usize) -> usize {
    if r > n {
        return 0;
    }
    let r = r.min(n - r);
    let mut c: u128 = 1;
    for i in 0..r {
        c = c * (n - i) as u128 / (i + 1) as u128;
        if c > usize::MAX as u128 {
            return usize::MAX;
        }
    }
    c as usize
}

/// Every r-subset of `items`, in lexicographic order.
fn combinations(items: &[usize], r: usize) -> Vec<Vec<usize>> {
    let n = items.len();
    let mut out = Vec::new();
    let mut idx: Vec<usize> = (0..r).collect();
    if r > n {
        return out;
    }
    loop {
        out.push(idx.iter().map(|&i| items[i]).collect());
        // Advance the rightmost index that can still move.
        let Some(p) = (0..r).rev().find(|&p| idx[p] < n - r + p) else {
            return out;
        };
        idx[p] += 1;
        for q in p + 1..r {
            idx[q] = idx[q - 1] + 1;
        }
    }
}

/// SGLP's subset search. `score(removed)` evaluates the network with exactly the layers `removed` taken
/// out (sorted) and returns its global gradient norm; the largest score wins, ties to the earlier subset.
/// Returns the removed layers (sorted) and one [`SubsetSearch`] per segment with a non-zero count.
pub fn best_subsets(
    segments: &[(usize, usize)],
    counts: &[usize],
    max_candidates: usize,
    score: &mut dyn FnMut(&[usize]) -> Result<f64>,
) -> Result<(Vec<usize>, Vec<SubsetSearch>)> {
    let mut removed = Vec::new();
    let mut searches = Vec::new();
    for (seg, (&(start, end), &r)) in segments.iter().zip(counts).enumerate() {
        if r == 0 {
            continue;
        }
        let layers: Vec<usize> = (start..=end).collect();
        let (chosen, search) = if binomial(layers.len(), r) <= max_candidates {
            exhaustive(seg, &layers, r, score)?
        } else {
            greedy(seg, &layers, r, score)?
        };
        removed.extend(chosen);
        searches.push(search);
    }
    removed.sort_unstable();
    Ok((removed, searches))
}

fn exhaustive(
    seg: usize,
    layers: &[usize],
    r: usize,
    score: &mut dyn FnMut(&[usize]) -> Result<f64>,
) -> Result<(Vec<usize>, SubsetSearch)> {
    let mut best: Option<(f64, Vec<usize>)> = None;
    let candidates = combinations(layers, r);
    let evaluated = candidates.len();
    for cand in candidates {
        let s = score(&cand)?;
        if best.as_ref().is_none_or(|(b, _)| s > *b) {
            best = Some((s, cand));
        }
    }
    let (s, chosen) = best.expect("at least one combination");
    Ok((
        chosen,
        SubsetSearch {
            segment: seg,
            method: "exhaustive".into(),
            evaluated,
            score: s,
        },
    ))
}

fn greedy(
    seg: usize,
    layers: &[usize],
    r: usize,
    score: &mut dyn FnMut(&[usize]) -> Result<f64>,
) -> Result<(Vec<usize>, SubsetSearch)> {
    let mut chosen: Vec<usize> = Vec::with_capacity(r);
    let mut evaluated = 0;
    let mut last = f64::NAN;
    for _ in 0..r {
        let mut best: Option<(f64, usize)> = None;
        for &l in layers.iter().filter(|l| !chosen.contains(l)) {
            let mut cand = chosen.clone();
            cand.push(l);
            cand.sort_unstable();
            let s = score(&cand)?;
            evaluated += 1;
            if best.is_none_or(|(b, _)| s > b) {
                best = Some((s, l));
            }
        }
        let (s, l) = best.expect("segment has a layer left");
        chosen.push(l);
        last = s;
    }
    chosen.sort_unstable();
    Ok((
        chosen,
        SubsetSearch {
            segment: seg,
            method: "greedy".into(),
            evaluated,
            score: last,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_gradnorm_per_segment() {
        // Segments [0,3], [4,5], [6,9]; remove 2, 0, 1.
        let g = [5.0, 1.0, 3.0, 0.5, 0.1, 9.0, 4.0, 2.0, 7.0, 3.0];
        let r = lowest_gradnorm(&[(0, 3), (4, 5), (6, 9)], &[2, 0, 1], &g);
        assert_eq!(r, vec![1, 3, 7]);
    }

    #[test]
    fn binomials_and_combinations() {
        assert_eq!(binomial(5, 2), 10);
        assert_eq!(binomial(10, 0), 1);
        assert_eq!(binomial(64, 32), 1832624140942590534);
        let c = combinations(&[3, 4, 5, 6], 2);
        assert_eq!(c.len(), 6);
        assert_eq!(c[0], vec![3, 4]);
        assert_eq!(c[5], vec![5, 6]);
    }

    /// A score with a known optimum that is not additive: removing both 1 and 2 together is best, while
    /// alone each is worse than removing 3.
    fn toy_score(removed: &[usize]) -> f64 {
        let has = |l| removed.contains(&l);
        let mut s = 10.0;
        if has(3) {
            s += 1.0;
        }
        if has(1) && has(2) {
            s += 5.0;
        }
        s - removed.iter().filter(|&&l| l == 0).count() as f64
    }

    #[test]
    fn exhaustive_finds_the_joint_optimum() {
        let mut calls = Vec::new();
        let mut f = |r: &[usize]| {
            calls.push(r.to_vec());
            Ok(toy_score(r))
        };
        let (removed, s) = best_subsets(&[(0, 3), (4, 4)], &[2, 0], 100, &mut f).unwrap();
        assert_eq!(removed, vec![1, 2]);
        assert_eq!(s[0].method, "exhaustive");
        assert_eq!(s[0].evaluated, 6);
        assert_eq!(calls.len(), 6);
        assert_eq!(s[0].score, 15.0);
    }

    #[test]
    fn greedy_fallback_beyond_the_cap() {
        let mut f = |r: &[usize]| Ok(toy_score(r));
        // C(4,2) = 6 > 5 → greedy: first step picks 3 (11 beats 10), then the best partner of 3.
        let (removed, s) = best_subsets(&[(0, 3)], &[2], 5, &mut f).unwrap();
        assert_eq!(s[0].method, "greedy");
        assert_eq!(s[0].evaluated, 4 + 3);
        assert_eq!(removed.len(), 2);
        assert!(removed.contains(&3));
    }
}
