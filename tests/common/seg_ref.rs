//! A brute-force segmentation reference for `tests/segmentation.rs` and `tests/properties.rs`: every
//! split of the layers tried, each segment's loss computed plainly.

// Each test crate uses only some of them.
#![allow(dead_code)]

/// Σ‖x_t − mean‖² over the rows `a..=b`, plainly.
pub fn diameter(x: &[Vec<f64>], a: usize, b: usize) -> f64 {
    let p = x[0].len();
    let len = (b - a + 1) as f64;
    let mean: Vec<f64> = (0..p)
        .map(|c| x[a..=b].iter().map(|r| r[c]).sum::<f64>() / len)
        .collect();
    x[a..=b]
        .iter()
        .map(|r| {
            r.iter()
                .zip(&mean)
                .map(|(v, m)| (v - m) * (v - m))
                .sum::<f64>()
        })
        .sum()
}

/// Every way to cut L layers into k segments of at least `min_len`: the best loss and its segments
/// (the first found among equals), or `None` where there is no such cut.
pub fn brute_force(x: &[Vec<f64>], k: usize, min_len: usize) -> Option<(f64, Vec<(usize, usize)>)> {
    let l = x.len();
    let mut best: Option<(f64, Vec<(usize, usize)>)> = None;
    // Cut positions as a bitmask over the L−1 gaps.
    for mask in 0u32..(1 << (l - 1)) {
        if mask.count_ones() as usize != k - 1 {
            continue;
        }
        let mut segs = Vec::new();
        let mut s = 0;
        for g in 0..l - 1 {
            if mask & (1 << g) != 0 {
                segs.push((s, g));
                s = g + 1;
            }
        }
        segs.push((s, l - 1));
        if segs.iter().any(|&(a, b)| b + 1 - a < min_len) {
            continue;
        }
        let loss: f64 = segs.iter().map(|&(a, b)| diameter(x, a, b)).sum();
        if best.as_ref().is_none_or(|(bl, _)| loss < *bl) {
            best = Some((loss, segs));
        }
    }
    best
}
