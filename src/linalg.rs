//! Thin, checked wrappers over the `gemm` crate (the CPU GEMM): explicit shapes and strides, slices
//! bounds-checked once up front so the unsafe call is sound.

pub use gemm::Parallelism;

/// A strided matrix view description: `rows × cols`, element (i, j) at `i*rs + j*cs`.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl Layout {
    /// Row-major, contiguous.
    pub fn row_major(rows: usize, cols: usize) -> Self {
        Layout {
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of this view (no data moves).
    pub fn t(self) -> Self {
        Layout {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
    /// Smallest slice length that holds every element.
    fn span(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
        }
    }
}

/// Scalars the GEMM handles.
pub trait Scalar:
    Copy + 'static + Send + Sync + std::ops::Add<Output = Self> + std::ops::Mul<Output = Self>
{
    const ZERO: Self;
    const ONE: Self;
}
impl Scalar for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}
impl Scalar for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}

/// C = A·B (or C += A·B when `accumulate`), shapes `m×k · k×n → m×n` taken from the layouts.
///
/// Panics if the shapes disagree or a slice is too short for its layout (programming errors).
pub fn matmul<T: Scalar>(
    c: &mut [T],
    lc: Layout,
    a: &[T],
    la: Layout,
    b: &[T],
    lb: Layout,
    accumulate: bool,
    par: Parallelism,
) {
    assert_eq!(la.cols, lb.rows, "inner dimensions differ");
    assert_eq!(
        (lc.rows, lc.cols),
        (la.rows, lb.cols),
        "output shape differs"
    );
    assert!(
        c.len() >= lc.span() && a.len() >= la.span() && b.len() >= lb.span(),
        "slice shorter than its layout"
    );
    if lc.rows == 0 || lc.cols == 0 {
        return;
    }
    if la.cols == 0 {
        if !accumulate {
            for i in 0..lc.rows {
                for j in 0..lc.cols {
                    c[i * lc.rs + j * lc.cs] = T::ZERO;
                }
            }
        }
        return;
    }
    // SAFETY: every index the GEMM touches lies within the spans checked above; `c` does not alias `a`/`b`
    // (it is a unique borrow).
    unsafe {
        gemm::gemm(
            lc.rows,
            lc.cols,
            la.cols,
            c.as_mut_ptr(),
            lc.cs as isize,
            lc.rs as isize,
            accumulate,
            a.as_ptr(),
            la.cs as isize,
            la.rs as isize,
            b.as_ptr(),
            lb.cs as isize,
            lb.rs as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            par,
        );
    }
}

/// The Gram matrix K = X·Xᵀ of a row-major `n × d` matrix into `k` (`n × n`, row-major, full symmetric).
///
/// Computes only the blocks on and below the diagonal (half the multiply-adds) and mirrors them.
pub fn gram_xxt(x: &[f64], n: usize, d: usize, k: &mut [f64], par: Parallelism) {
    assert!(x.len() >= n * d && k.len() >= n * n);
    const NB: usize = 128;
    let lx = Layout::row_major(n, d);
    let mut r0 = 0;
    while r0 < n {
        let r1 = (r0 + NB).min(n);
        // Rows r0..r1 of K, columns 0..r1: X[r0..r1] · X[0..r1]ᵀ.
        let lc = Layout {
            rows: r1 - r0,
            cols: r1,
            rs: n,
            cs: 1,
        };
        let la = Layout {
            rows: r1 - r0,
            ..lx
        };
        let lb = Layout { rows: r1, ..lx }.t();
        matmul(&mut k[r0 * n..], lc, &x[r0 * d..], la, x, lb, false, par);
        r0 = r1;
    }
    for i in 0..n {
        for j in i + 1..n {
            k[i * n + j] = k[j * n + i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_matches_naive_with_transposed_views() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..n * k).map(|i| (i as f64 * 0.91).cos()).collect(); // stored n×k, used as k×n
        let mut c = vec![0.0; m * n];
        matmul(
            &mut c,
            Layout::row_major(m, n),
            &a,
            Layout::row_major(m, k),
            &b,
            Layout::row_major(n, k).t(),
            false,
            Parallelism::None,
        );
        for i in 0..m {
            for j in 0..n {
                let r: f64 = (0..k).map(|t| a[i * k + t] * b[j * k + t]).sum();
                assert!((c[i * n + j] - r).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn gram_is_symmetric_and_exact() {
        let (n, d) = (300, 9);
        let x: Vec<f64> = (0..n * d)
            .map(|i| ((i * 7919) % 101) as f64 / 50.0 - 1.0)
            .collect();
        let mut k = vec![0.0; n * n];
        gram_xxt(&x, n, d, &mut k, Parallelism::None);
        for i in (0..n).step_by(17) {
            for j in (0..n).step_by(13) {
                let r: f64 = (0..d).map(|t| x[i * d + t] * x[j * d + t]).sum();
                assert!((k[i * n + j] - r).abs() < 1e-12, "{i},{j}");
            }
        }
    }
}
