//! Vectorisable f32 kernels for the row-wise ops: an exponential as a branch-free polynomial (so the
//! compiler turns a loop of it into SIMD code, where `f32::exp` is a scalar libm call per element), and
//! the loops built on it (softmax pieces, SiLU, the logistic sigmoid, tanh-approximated GELU), plus
//! ReLU. Each public kernel is compiled twice, for the baseline target and with AVX2 + FMA, and picks
//! the second at run time when the CPU has it.

/// Defines `$name` with body `$body`, plus an AVX2 + FMA copy chosen at run time where the CPU has both.
macro_rules! simd_kernel {
    ($(#[$m:meta])* pub fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

const MAGIC: f32 = 12_582_912.0; // 1.5 · 2²³: adding it rounds to an integer held in the low mantissa bits

/// e^x, within 2 ulp of the correctly rounded value over the whole f32 range (subnormal results and
/// overflow to +∞ included; NaN in, NaN out). Cephes' `expf` reduction and polynomial, with the 2ⁿ scale
/// applied in two halves so that n = −150…128 needs no special case.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Below −104 the result rounds to 0, above 89 to +∞; NaN passes through `clamp`.
    let xc = x.clamp(-104.0, 89.0);
    let t = xc * LOG2E + MAGIC;
    let nf = t - MAGIC;
    let ni = t.to_bits().wrapping_sub(MAGIC.to_bits()) as i32;
    let r = (xc - nf * LN2_HI) - nf * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = (p * (r * r) + r) + 1.0;
    let h = ni >> 1;
    let s1 = f32::from_bits(((h + 127) as u32) << 23);
    let s2 = f32::from_bits(((ni - h + 127) as u32) << 23);
    y * s1 * s2
}

const LANES: usize = 8;

simd_kernel! {
    /// The largest element (NaNs ignored, as `f32::max` does); −∞ for an empty slice.
    pub fn max(xs: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let chunks = xs.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for j in 0..LANES {
                acc[j] = if c[j] > acc[j] { c[j] } else { acc[j] };
            }
        }
        let mut m = f32::NEG_INFINITY;
        for &v in acc.iter().chain(tail) {
            m = if v > m { v } else { m };
        }
        m
    }
}

simd_kernel! {
    /// Σ e^(x − shift), summed in f64.
    pub fn sum_exp(xs: &[f32], shift: f32) -> f64 {
        let mut acc = [0f64; LANES];
        let chunks = xs.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for j in 0..LANES {
                acc[j] += exp(c[j] - shift) as f64;
            }
        }
        let mut s: f64 = acc.iter().sum();
        for &v in tail {
            s += exp(v - shift) as f64;
        }
        s
    }
}

simd_kernel! {
    /// `xs ← e^(xs − shift)`; returns the sum of the new values, in f64.
    pub fn exp_in_place_sum(xs: &mut [f32], shift: f32) -> f64 {
        let mut acc = [0f64; LANES];
        let mut chunks = xs.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for j in 0..LANES {
                c[j] = exp(c[j] - shift);
                acc[j] += c[j] as f64;
            }
        }
        let mut s: f64 = acc.iter().sum();
        for v in chunks.into_remainder() {
            *v = exp(*v - shift);
            s += *v as f64;
        }
        s
    }
}

simd_kernel! {
    /// `xs ← scale · e^(xs − shift)`.
    pub fn exp_in_place_scaled(xs: &mut [f32], shift: f32, scale: f32) {
        for v in xs.iter_mut() {
            *v = scale * exp(*v - shift);
        }
    }
}

simd_kernel! {
    /// `xs ← scale · xs`.
    pub fn scale(xs: &mut [f32], scale: f32) {
        for v in xs.iter_mut() {
            *v *= scale;
        }
    }
}

/// σ(x) = 1 / (1 + e^−x), the logistic function of one value.
#[inline(always)]
fn logistic(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

simd_kernel! {
    /// `y = σ(x)`.
    pub fn sigmoid(x: &[f32], y: &mut [f32]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = logistic(v);
        }
    }
}

simd_kernel! {
    /// `dx += dy σ(x) (1 − σ(x))`.
    pub fn sigmoid_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        for ((d, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
            let s = logistic(v);
            *d += g * s * (1.0 - s);
        }
    }
}

simd_kernel! {
    /// `y = max(x, 0)` (NaN stays NaN, as in PyTorch).
    pub fn relu(x: &[f32], y: &mut [f32]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = if v < 0.0 { 0.0 } else { v };
        }
    }
}

simd_kernel! {
    /// `dx += dy` where x > 0 (the slope at 0 is 0, as in PyTorch).
    pub fn relu_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        for ((d, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
            *d += if v > 0.0 { g } else { 0.0 };
        }
    }
}

simd_kernel! {
    /// `y = max(x, 0)²` (PyTorch's `relu(x).square()`).
    pub fn relu2(x: &[f32], y: &mut [f32]) {
        for (o, &v) in y.iter_mut().zip(x) {
            let r = if v < 0.0 { 0.0 } else { v };
            *o = r * r;
        }
    }
}

simd_kernel! {
    /// `dx += 2 max(x, 0) dy`.
    pub fn relu2_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        for ((d, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
            *d += if v > 0.0 { 2.0 * v * g } else { 0.0 };
        }
    }
}

simd_kernel! {
    /// `y = x σ(x)`.
    pub fn silu(x: &[f32], y: &mut [f32]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = v * logistic(v);
        }
    }
}

simd_kernel! {
    /// `dx += dy σ(x) (1 + x (1 − σ(x)))`.
    pub fn silu_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        for ((d, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
            let s = logistic(v);
            *d += g * s * (1.0 + v * (1.0 - s));
        }
    }
}

/// √(2/π) and the cubic coefficient of the tanh-approximated GELU.
const GELU_K: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

simd_kernel! {
    /// `y = x/2 (1 + tanh(u))`, u = √(2/π) (x + 0.044715 x³), computed as `x σ(2u)` (the same value:
    /// (1 + tanh u)/2 = σ(2u)), which has no cancellation near 0.
    pub fn gelu_tanh(x: &[f32], y: &mut [f32]) {
        for (o, &v) in y.iter_mut().zip(x) {
            let u = GELU_K * (v + GELU_C * v * v * v);
            *o = v * logistic(2.0 * u);
        }
    }
}

simd_kernel! {
    /// `dx += dy (s + x s (1 − s) 2u')`, s = σ(2u), u' = √(2/π) (1 + 3 · 0.044715 x²).
    pub fn gelu_tanh_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        for ((d, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
            let u = GELU_K * (v + GELU_C * v * v * v);
            let s = logistic(2.0 * u);
            let du = GELU_K * (1.0 + 3.0 * GELU_C * v * v);
            *d += g * (s + v * s * (1.0 - s) * 2.0 * du);
        }
    }
}

/// `y = x Φ(x) = x/2 (1 + erf(x / √2))`, PyTorch's exact GELU (GPT-NeoX's MLP). A scalar `erf` (libm's,
/// in f64) per value: only the GPT-NeoX family uses it, and its MLP's products dominate anyway.
pub fn gelu(x: &[f32], y: &mut [f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        let v = v as f64;
        *o = (0.5 * v * (1.0 + libm::erf(v * std::f64::consts::FRAC_1_SQRT_2))) as f32;
    }
}

/// `dx += dy (Φ(x) + x φ(x))`, φ(x) = e^(−x²/2) / √(2π).
pub fn gelu_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;
    for ((d, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
        let v = v as f64;
        let cdf = 0.5 * (1.0 + libm::erf(v * std::f64::consts::FRAC_1_SQRT_2));
        let pdf = INV_SQRT_2PI * (-0.5 * v * v).exp();
        *d += (g as f64 * (cdf + v * pdf)) as f32;
    }
}

/// Gemma 2's soft-capping of one value, `c · tanh(x / c)`, and its slope `1 − tanh²(x / c)` (scalar
/// `tanh`: it runs once per logit or attention score, where the MLP's activations run on every
/// intermediate value). The logits' `softcap` below and the attention's scores share it.
#[inline(always)]
pub fn softcap_slope(x: f32, c: f32) -> (f32, f32) {
    let t = (x / c).tanh();
    (c * t, 1.0 - t * t)
}

/// `y = clamp(x, −c, c)`.
pub fn clamp(x: &[f32], y: &mut [f32], c: f32) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = v.clamp(-c, c);
    }
}

/// `dx += dy` where |x| ≤ c.
pub fn clamp_backward(x: &[f32], dy: &[f32], dx: &mut [f32], c: f32) {
    for ((d, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
        *d += if v.abs() <= c { g } else { 0.0 };
    }
}

/// `y = clamp(x, −c, c) + 1` (its backward is [`clamp_backward`]).
pub fn clamp_plus_one(x: &[f32], y: &mut [f32], c: f32) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = v.clamp(-c, c) + 1.0;
    }
}

/// `y = m σ(α m)`, `m = min(x, limit)` (GPT-OSS's expert gate; scalar: it runs on the experts'
/// intermediate values of one model family).
pub fn oss_gate(x: &[f32], y: &mut [f32], alpha: f32, limit: f32) {
    for (o, &v) in y.iter_mut().zip(x) {
        let m = v.min(limit);
        *o = m * logistic(alpha * m);
    }
}

/// `dx += dy σ(αx) (1 + αx (1 − σ(αx)))` where x ≤ limit (PyTorch's clamp passes the gradient at the
/// bound), else nothing.
pub fn oss_gate_backward(x: &[f32], dy: &[f32], dx: &mut [f32], alpha: f32, limit: f32) {
    for ((d, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
        if v <= limit {
            let s = logistic(alpha * v);
            *d += g * s * (1.0 + alpha * v * (1.0 - s));
        }
    }
}

/// `y = c · tanh(x / c)`.
pub fn softcap(x: &[f32], y: &mut [f32], c: f32) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = softcap_slope(v, c).0;
    }
}

/// `dx += dy (1 − tanh²(x / c))`.
pub fn softcap_backward(x: &[f32], dy: &[f32], dx: &mut [f32], c: f32) {
    for ((d, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
        *d += g * softcap_slope(v, c).1;
    }
}

/// `y = s · x` (the out-of-place [`scale`]).
pub fn mul_scalar(x: &[f32], y: &mut [f32], s: f32) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = s * v;
    }
}

/// `dx += s · dy`.
pub fn mul_scalar_backward(dy: &[f32], dx: &mut [f32], s: f32) {
    for (d, &g) in dx.iter_mut().zip(dy) {
        *d += s * g;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp_everywhere() {
        let mut worst = 0;
        let mut x = -110.0f32;
        while x < 90.0 {
            let want = (x as f64).exp() as f32;
            let got = exp(x);
            if want.is_infinite() {
                assert!(got.is_infinite() || got > 3.0e38, "{x}: {got}");
            } else if want.is_normal() {
                worst = worst.max(ulps(got, want));
            } else {
                assert!(
                    (got - want).abs() <= 2.0 * f32::from_bits(1),
                    "{x}: {got} vs {want}"
                );
            }
            x += 0.000_731;
        }
        assert!(worst <= 2, "max error {worst} ulp");
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn kernels_match_scalar_code() {
        let xs: Vec<f32> = (0..1003)
            .map(|i| ((i * 37 % 211) as f32 - 100.0) * 0.1)
            .collect();
        let m = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(max(&xs), m);
        let want: f64 = xs.iter().map(|&v| ((v - m) as f64).exp()).sum();
        assert!((sum_exp(&xs, m) - want).abs() < 1e-6 * want);
        let mut e = xs.clone();
        let s = exp_in_place_sum(&mut e, m);
        assert!((s - want).abs() < 1e-6 * want);
        for (&a, &b) in e.iter().zip(&xs) {
            assert!((a as f64 - ((b - m) as f64).exp()).abs() < 1e-6);
        }
        let mut y = vec![0f32; xs.len()];
        silu(&xs, &mut y);
        for (&a, &v) in y.iter().zip(&xs) {
            let r = v as f64 / (1.0 + (-v as f64).exp());
            assert!((a as f64 - r).abs() < 1e-6 * (1.0 + r.abs()));
        }
        sigmoid(&xs, &mut y);
        for (&a, &v) in y.iter().zip(&xs) {
            let r = 1.0 / (1.0 + (-v as f64).exp());
            assert!((a as f64 - r).abs() < 1e-6 * r, "sigmoid({v}): {a} vs {r}");
        }
        relu(&xs, &mut y);
        for (&a, &v) in y.iter().zip(&xs) {
            assert_eq!(a, v.max(0.0), "relu({v})");
        }
        let dy: Vec<f32> = (0..xs.len()).map(|i| 1.0 + i as f32 * 1e-3).collect();
        let mut dx = vec![0.5f32; xs.len()];
        relu_backward(&xs, &dy, &mut dx);
        for ((&d, &v), &g) in dx.iter().zip(&xs).zip(&dy) {
            let want = if v > 0.0 { 0.5 + g } else { 0.5 };
            assert_eq!(d, want, "relu_backward({v})");
        }
        let mut z = [1f32; 3];
        relu_backward(&[0.0, -0.0, f32::NAN], &[2.0; 3], &mut z);
        assert_eq!(z, [1.0; 3], "ReLU's slope at 0 (and at NaN) is 0");
        relu(&[f32::NAN], &mut z[..1]);
        assert!(z[0].is_nan(), "relu(NaN) is NaN");
        // PyTorch's formula in f64: x/2 (1 + tanh(√(2/π) (x + 0.044715 x³))).
        gelu_tanh(&xs, &mut y);
        for (&a, &v) in y.iter().zip(&xs) {
            let v = v as f64;
            let u = (2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v);
            let r = 0.5 * v * (1.0 + u.tanh());
            assert!(
                (a as f64 - r).abs() < 1e-6 * (1.0 + r.abs()),
                "gelu({v}): {a} vs {r}"
            );
        }
    }

    /// The exact GELU against PyTorch's values (`torch.nn.functional.gelu`, float64).
    #[test]
    fn gelu_matches_pytorch() {
        let xs = [-3.0f32, -1.0, -0.25, 0.0, 0.5, 2.0];
        let want = [
            -0.004049694094890,
            -0.158655253931457,
            -0.100323418579269,
            0.0,
            0.345731230637007,
            1.954499736103642,
        ];
        let mut y = [0f32; 6];
        gelu(&xs, &mut y);
        for ((&a, &w), &v) in y.iter().zip(&want).zip(&xs) {
            assert!((a as f64 - w).abs() < 1e-7, "gelu({v}): {a} vs {w}");
        }
    }
}
