//! Splitting the removal budget over the segments.
//!
//! Both rules give each segment a real-valued quota, take its floor, and hand the layers still missing
//! to the segments with the largest fractional remainders (Hamilton's largest-remainder method). A
//! segment never loses all its layers: its count is capped at `len − 1`, and layers a capped segment
//! cannot take go to the next segments in remainder order.

use crate::error::{Error, Result};

/// How the budget is split over the segments.
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
pub enum Allocation {
    /// Quota ∝ segment length (SGLP: every segment shrinks by about the same fraction).
    #[default]
    Proportional,
    /// Quota ∝ removable layers, `len − 1`: a one-layer segment (a lone, dissimilar layer) asks for
    /// nothing, so the budget goes to the segments with redundant layers.
    Removable,
    /// No quota: the selection decides, one removal at a time, which segment loses a layer; each segment
    /// may lose up to `len − 1`.
    Adaptive,
    /// No quota and no floor: a segment may lose every layer (the segments only shape the candidates);
    /// a lone layer unlike its neighbours — often the last — can go when the loss says so.
    Open,
}

/// The most layers each segment may lose: the exact count for a quota rule ([`allocate`]), `len − 1` for
/// [`Allocation::Adaptive`]. Errors as [`allocate`] when the budget cannot be met.
pub fn caps(seg_lens: &[usize], budget: usize, rule: Allocation) -> Result<Vec<usize>> {
    match rule {
        Allocation::Adaptive => {
            allocate(seg_lens, budget, Allocation::Removable)?;
            Ok(seg_lens.iter().map(|n| n - 1).collect())
        }
        Allocation::Open => {
            let total: usize = seg_lens.iter().sum();
            if budget >= total {
                return Err(Error::invalid(format!(
                    "cannot remove {budget} of {total} layers"
                )));
            }
            Ok(seg_lens.to_vec())
        }
        _ => allocate(seg_lens, budget, rule),
    }
}

/// Number of layers to remove from each segment. `seg_lens[i]` is the length of segment `i`.
///
/// Errors when the budget cannot be met without emptying a segment (budget > Σ (len − 1)).
pub fn allocate(seg_lens: &[usize], budget: usize, rule: Allocation) -> Result<Vec<usize>> {
    if seg_lens.is_empty() {
        return Err(Error::invalid("no segments to remove layers from"));
    }
    if let Some(i) = seg_lens.iter().position(|&n| n == 0) {
        return Err(Error::invalid(format!("segment {i} is empty")));
    }
    let capacity: usize = seg_lens.iter().map(|n| n - 1).sum();
    if budget > capacity {
        return Err(Error::invalid(format!(
            "cannot remove {budget} layers from {} segments of {} layers in all without emptying a \
             segment (at most {capacity})",
            seg_lens.len(),
            seg_lens.iter().sum::<usize>()
        )));
    }
    let weights: Vec<f64> = match rule {
        Allocation::Proportional => seg_lens.iter().map(|&n| n as f64).collect(),
        Allocation::Removable | Allocation::Adaptive | Allocation::Open => {
            seg_lens.iter().map(|&n| (n - 1) as f64).collect()
        }
    };
    let total: f64 = weights.iter().sum();
    if budget == 0 || total == 0.0 {
        return Ok(vec![0; seg_lens.len()]);
    }
    let quotas: Vec<f64> = weights.iter().map(|w| budget as f64 * w / total).collect();
    let mut counts: Vec<usize> = quotas
        .iter()
        .zip(seg_lens)
        .map(|(q, &n)| (q.floor() as usize).min(n - 1))
        .collect();
    // Hand out the rest one layer at a time: largest remainder first (a capped segment's overflow makes
    // its remainder count as large), ties to the longer segment, then the earlier one.
    let mut given: usize = counts.iter().sum();
    while given < budget {
        let best = (0..seg_lens.len())
            .filter(|&i| counts[i] < seg_lens[i] - 1)
            .max_by(|&a, &b| {
                let ra = quotas[a] - counts[a] as f64;
                let rb = quotas[b] - counts[b] as f64;
                ra.total_cmp(&rb)
                    .then(seg_lens[a].cmp(&seg_lens[b]))
                    .then(b.cmp(&a))
            })
            .expect("capacity was checked above");
        counts[best] += 1;
        given += 1;
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proportional_uses_largest_remainder() {
        // 12 layers in 3 segments of 6, 4, 2; budget 5: quotas 2.5, 1.67, 0.83 → floors 2, 1, 0,
        // remainders .5, .67, .83 → the two missing layers go to segments 2 then 1.
        let c = allocate(&[6, 4, 2], 5, Allocation::Proportional).unwrap();
        assert_eq!(c, vec![2, 2, 1]);
        assert_eq!(c.iter().sum::<usize>(), 5);
    }

    #[test]
    fn never_empties_a_segment() {
        // Quotas 3.2, 0.8 for lengths 8, 2 with budget 4 — fine; with 1-layer segments the cap bites.
        let c = allocate(&[1, 1, 10], 6, Allocation::Proportional).unwrap();
        assert_eq!(c, vec![0, 0, 6]);
        let c = allocate(&[2, 2, 2, 2], 4, Allocation::Proportional).unwrap();
        assert_eq!(c, vec![1, 1, 1, 1]);
        assert!(allocate(&[2, 2, 2, 2], 5, Allocation::Proportional).is_err());
        assert!(allocate(&[3], 3, Allocation::Proportional).is_err());
    }

    #[test]
    fn removable_rule_skips_singletons() {
        let c = allocate(&[1, 5, 3], 4, Allocation::Removable).unwrap();
        // weights 0, 4, 2 → quotas 0, 2.67, 1.33 → floors 0, 2, 1 → remainder to segment 1.
        assert_eq!(c, vec![0, 3, 1]);
    }

    #[test]
    fn sums_to_budget_on_random_cases() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..500 {
            let k = rng.random_range(1..8);
            let lens: Vec<usize> = (0..k).map(|_| rng.random_range(1..9)).collect();
            let cap: usize = lens.iter().map(|n| n - 1).sum();
            let budget = rng.random_range(0..=cap);
            for rule in [Allocation::Proportional, Allocation::Removable] {
                let c = allocate(&lens, budget, rule).unwrap();
                assert_eq!(c.iter().sum::<usize>(), budget);
                assert!(c.iter().zip(&lens).all(|(c, n)| c < n));
            }
        }
    }
}
