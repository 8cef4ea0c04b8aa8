//! Choosing which layers of each segment to remove.
//!
//! Every rule works under per-segment caps (from [`super::allocate`]): a fixed count per segment, or for
//! the adaptive allocation any number up to `len − 1`, so that no segment is emptied.
//!
//! * [`Selection::Gradnorm`]: remove the layers with the lowest per-layer gradient norm (one backward pass
//!   over the calibration batches scores every layer at once).
//! * [`Selection::Loss`]: greedy, one layer at a time: among the candidates of every segment that may
//!   still lose a layer (the `shortlist` of lowest block influence per segment, or all), remove the one
//!   whose removal, with those already removed, gives the lowest calibration loss. Iterative, so each
//!   step sees the network as it now is.
//! * [`Selection::Subset`]: as in the SGLP paper, score whole candidate subsets: for each segment, every
//!   combination of `r` of its layers is removed in turn (the other segments intact) and the network's
//!   global gradient norm is measured; the subset leaving the *smallest* gradient norm is removed (the
//!   network stays closest to a trained minimum; the largest picks the most damaging subsets — removing
//!   the first layer of a trained model sends the gradients up). When a segment has more than
//!   `max_candidates` combinations, a greedy search replaces the enumeration: layers are removed one at a
//!   time, each time the one whose removal (with those already chosen) leaves the smallest global
//!   gradient norm — Σ_{j<r} (len − j) evaluations instead of C(len, r).

use crate::error::{Error, Result};

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
    /// Iterative: each step removes the candidate whose removal gives the lowest calibration loss.
    Loss,
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
    /// Every candidate subset scored, with its global gradient norm, in the order evaluated.
    pub candidates: Vec<(Vec<usize>, f64)>,
}

/// One step of [`greedy_removal`]: the layer removed, its score and every candidate's score.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GreedyStep {
    pub removed: usize,
    pub score: f64,
    pub candidates: Vec<(usize, f64)>,
}

/// Greedy removal under per-segment caps: `budget` steps; at each step the candidates are the layers of
/// every segment (inclusive `[start, end]`) that may still lose one (fewer than `caps[s]` removed there);
/// with `shortlist` > 0, only the `shortlist` candidates of lowest `proxy` in each segment. Each candidate
/// is scored by `score(removed so far ∪ {candidate}, candidate)` and the lowest score is removed (ties to
/// the later layer). Returns the removed layers (sorted) and the steps.
pub fn greedy_removal(
    segments: &[(usize, usize)],
    caps: &[usize],
    budget: usize,
    proxy: Option<&[f64]>,
    shortlist: usize,
    score: &mut dyn FnMut(&[usize], usize) -> Result<f64>,
) -> Result<(Vec<usize>, Vec<GreedyStep>)> {
    let capacity: usize = caps.iter().sum();
    if budget > capacity {
        return Err(Error::invalid(format!(
            "cannot remove {budget} layers: the segments' caps allow {capacity}"
        )));
    }
    let mut removed: Vec<usize> = Vec::with_capacity(budget);
    let mut taken = vec![0usize; segments.len()];
    let mut steps = Vec::with_capacity(budget);
    for _ in 0..budget {
        let mut candidates = Vec::new();
        for (s, &(start, end)) in segments.iter().enumerate() {
            if taken[s] >= caps[s] {
                continue;
            }
            let mut layers: Vec<usize> = (start..=end).filter(|l| !removed.contains(l)).collect();
            if let (Some(p), true) = (proxy, shortlist > 0) {
                layers.sort_by(|&a, &b| p[a].total_cmp(&p[b]).then(b.cmp(&a)));
                layers.truncate(shortlist);
            }
            candidates.extend(layers.into_iter().map(|l| (s, l)));
        }
        let mut scored = Vec::with_capacity(candidates.len());
        let mut best: Option<(f64, usize, usize)> = None;
        for (s, l) in candidates {
            let mut set = removed.clone();
            set.push(l);
            set.sort_unstable();
            let v = score(&set, l)?;
            scored.push((l, v));
            if best.is_none_or(|(b, bl, _)| v < b || (v == b && l > bl)) {
                best = Some((v, l, s));
            }
        }
        let (v, l, s) = best.expect("the caps leave a candidate");
        removed.push(l);
        taken[s] += 1;
        scored.sort_by_key(|&(l, _)| l);
        steps.push(GreedyStep {
            removed: l,
            score: v,
            candidates: scored,
        });
    }
    removed.sort_unstable();
    Ok((removed, steps))
}

/// The layers of lowest `values` under the segments' caps (ties to the later layer): with caps equal to
/// each segment's count, the `counts[i]` lowest of each segment. Sorted result.
pub fn lowest_under_caps(
    segments: &[(usize, usize)],
    caps: &[usize],
    budget: usize,
    values: &[f64],
) -> Result<Vec<usize>> {
    let mut by_value = |_: &[usize], l: usize| Ok(values[l]);
    Ok(greedy_removal(segments, caps, budget, None, 0, &mut by_value)?.0)
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
/// out (sorted) and returns its global gradient norm; the smallest score wins, ties to the earlier subset.
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
    let mut scored = Vec::with_capacity(evaluated);
    for cand in candidates {
        let s = score(&cand)?;
        if best.as_ref().is_none_or(|(b, _)| s < *b) {
            best = Some((s, cand.clone()));
        }
        scored.push((cand, s));
    }
    let (s, chosen) = best.expect("at least one combination");
    Ok((
        chosen,
        SubsetSearch {
            segment: seg,
            method: "exhaustive".into(),
            evaluated,
            score: s,
            candidates: scored,
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
    let mut scored = Vec::new();
    let mut last = f64::NAN;
    for _ in 0..r {
        let mut best: Option<(f64, usize)> = None;
        for &l in layers.iter().filter(|l| !chosen.contains(l)) {
            let mut cand = chosen.clone();
            cand.push(l);
            cand.sort_unstable();
            let s = score(&cand)?;
            if best.is_none_or(|(b, _)| s < b) {
                best = Some((s, l));
            }
            scored.push((cand, s));
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
            evaluated: scored.len(),
            score: last,
            candidates: scored,
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
        let segs = [(0, 3), (4, 5), (6, 9)];
        let r = lowest_under_caps(&segs, &[2, 0, 1], 3, &g).unwrap();
        assert_eq!(r, vec![1, 3, 7]);
        // Adaptive caps (len − 1): the three lowest overall, no segment emptied.
        let r = lowest_under_caps(&segs, &[3, 1, 3], 3, &g).unwrap();
        assert_eq!(r, vec![1, 3, 4]);
        assert!(lowest_under_caps(&segs, &[1, 0, 1], 3, &g).is_err());
    }

    #[test]
    fn greedy_removal_sees_interactions_and_honours_caps_and_shortlist() {
        // Loss of a removed set: each layer costs its own value, but removing 2 after 1 is free.
        let own = [5.0, 1.0, 1.5, 0.5, 3.0, 2.0];
        let mut loss = |set: &[usize], _: usize| -> Result<f64> {
            let mut v: f64 = set.iter().map(|&l| own[l]).sum();
            if set.contains(&1) && set.contains(&2) {
                v -= 1.5;
            }
            Ok(v)
        };
        let segs = [(0, 2), (3, 5)];
        let (r, steps) = greedy_removal(&segs, &[2, 2], 3, None, 0, &mut loss).unwrap();
        // Step 1: 3 (0.5); step 2: 1 (1.5); step 3: 2 is free with 1 (1.5 + 1.5 − 1.5 ... = 1.5).
        assert_eq!(r, vec![1, 2, 3]);
        assert_eq!(steps[0].removed, 3);
        assert_eq!(steps[0].candidates.len(), 6);
        // Cap 1 on the second segment: after 3, it offers nothing more.
        let (r, steps) = greedy_removal(&segs, &[2, 1], 3, None, 0, &mut loss).unwrap();
        assert_eq!(r, vec![1, 2, 3]);
        assert!(steps[1].candidates.iter().all(|&(l, _)| l <= 2));
        // Shortlist of 1 by a proxy that prefers 0 and 5: only those are scored.
        let proxy = [0.0, 1.0, 1.0, 1.0, 1.0, 0.0];
        let (r, steps) = greedy_removal(&segs, &[2, 2], 1, Some(&proxy), 1, &mut loss).unwrap();
        assert_eq!(steps[0].candidates, vec![(0, 5.0), (5, 2.0)]);
        assert_eq!(r, vec![5]);
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

    /// A score (lower is better) with a known optimum that is not additive: removing both 1 and 2
    /// together is best, while alone each is worse than removing 3.
    fn toy_score(removed: &[usize]) -> f64 {
        let has = |l| removed.contains(&l);
        let mut s = 10.0;
        if has(3) {
            s -= 1.0;
        }
        if has(1) && has(2) {
            s -= 5.0;
        }
        s + removed.iter().filter(|&&l| l == 0).count() as f64
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
        assert_eq!(s[0].score, 5.0);
        assert_eq!(s[0].candidates.len(), 6);
        assert!(s[0].candidates.contains(&(vec![1, 2], 5.0)));
    }

    #[test]
    fn greedy_fallback_beyond_the_cap() {
        let mut f = |r: &[usize]| Ok(toy_score(r));
        // C(4,2) = 6 > 5 → greedy: first step picks 3 (9 beats 10), then the best partner of 3.
        let (removed, s) = best_subsets(&[(0, 3)], &[2], 5, &mut f).unwrap();
        assert_eq!(s[0].method, "greedy");
        assert_eq!(s[0].evaluated, 4 + 3);
        assert_eq!(removed.len(), 2);
        assert!(removed.contains(&3));
    }
}
