//! The CPU GEMM: one thin, checked wrapper over the `gemm` crate (explicit shapes and strides, slices
//! bounds-checked once up front so the unsafe call is sound), and the Gram matrix built on it.

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

/// A strided read-only matrix view: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// `data` seen through `layout`.
    pub fn new(data: &'a [T], layout: Layout) -> Self {
        MatRef {
            data,
            rows: layout.rows,
            cols: layout.cols,
            rs: layout.rs,
            cs: layout.cs,
        }
    }
    /// A row-major `rows × cols` matrix.
    pub fn rm(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self::new(data, Layout::row_major(rows, cols))
    }
    /// The transpose (no copy: strides swap).
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
    fn layout(&self) -> Layout {
        Layout {
            rows: self.rows,
            cols: self.cols,
            rs: self.rs,
            cs: self.cs,
        }
    }
}

/// `c = α·a·b`, or `c += α·a·b` when `accumulate`: the crate's one GEMM (the CPU similarity backend, the
/// runtime's ops and the example generator all call it). `a` is `m×k`, `b` is `k×n`, `c` is `m×n`
/// row-major with row stride `c_rs`.
///
/// Panics if the shapes disagree or a slice is too short for its view (programming errors).
pub fn matmul<T: Scalar>(
    c: &mut [T],
    c_rs: usize,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    alpha: T,
    accumulate: bool,
    par: Parallelism,
) {
    assert_eq!(a.cols, b.rows, "inner dimensions differ");
    let lc = Layout {
        rows: a.rows,
        cols: b.cols,
        rs: c_rs,
        cs: 1,
    };
    assert!(
        c.len() >= lc.span()
            && a.data.len() >= a.layout().span()
            && b.data.len() >= b.layout().span(),
        "slice shorter than its layout"
    );
    if lc.rows == 0 || lc.cols == 0 {
        return;
    }
    if a.cols == 0 {
        if !accumulate {
            for i in 0..lc.rows {
                c[i * lc.rs..i * lc.rs + lc.cols].fill(T::ZERO);
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
            a.cols,
            c.as_mut_ptr(),
            lc.cs as isize,
            lc.rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::ONE,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

/// Row stride for a copy of a `rows × cols` matrix that will go into a Gram: `cols` plus 16 elements.
/// A stride that is a multiple of a large power of two (LLM widths: 1024, 4096 floats = 4 KiB, 16 KiB)
/// sends the rows that the GEMM packs together into the same L1 sets; the padding halved the
/// single-thread Gram time of a 512 × 1024 f32 batch here (86 → 192 GFLOP/s, AVX-512) and helps at
/// d = 768 too (187 → 212).
pub fn gram_stride(cols: usize) -> usize {
    cols + 16
}

/// The Gram matrix K = X·Xᵀ of `x` (`n × d`, any strides) into `k` (`n × n`, row-major, full symmetric).
pub fn gram_xxt<T: Scalar>(x: MatRef<'_, T>, k: &mut [T], par: Parallelism) {
    let n = x.rows;
    gram_lower(x, k, par);
    for i in 0..n {
        for j in i + 1..n {
            k[i * n + j] = k[j * n + i];
        }
    }
}

/// The lower triangle (diagonal included) of K = X·Xᵀ into `k` (`n × n`, row-major); entries above the
/// diagonal are left unspecified. `x` is `n × d` with any strides (a row stride from [`gram_stride`] is
/// fastest).
///
/// Recursive halving: K₁₁ and K₂₂ recursively, the off-diagonal block K₂₁ = X₂X₁ᵀ as one GEMM, down to
/// diagonal blocks of at most [`GRAM_LEAF`] rows computed whole. So the GEMMs are large (half of K is
/// one n/2 × n/2 product) and the multiply-adds beyond the triangle are n·leaf/2, against the n²/2 of
/// the triangle (12% at n = 512).
pub fn gram_lower<T: Scalar>(x: MatRef<'_, T>, k: &mut [T], par: Parallelism) {
    let n = x.rows;
    assert!(k.len() >= n * n);
    gram_lower_rec(x, k, 0..n, par);
}

/// Diagonal blocks of the recursive Gram are computed whole once they have at most this many rows (64
/// beat 32, 128 and 256 on 4 of 5 workload shapes here, single-threaded, padded rows).
pub const GRAM_LEAF: usize = 64;

/// Rows `r` of `m`.
fn row_block<'a, T>(m: MatRef<'a, T>, r: &std::ops::Range<usize>) -> MatRef<'a, T> {
    MatRef {
        data: &m.data[r.start * m.rs..],
        rows: r.len(),
        ..m
    }
}

fn gram_lower_rec<T: Scalar>(
    x: MatRef<'_, T>,
    k: &mut [T],
    rows: std::ops::Range<usize>,
    par: Parallelism,
) {
    let n = x.rows;
    if rows.len() <= GRAM_LEAF {
        let xr = row_block(x, &rows);
        let c = &mut k[rows.start * n + rows.start..];
        matmul(c, n, xr, xr.t(), T::ONE, false, par);
        return;
    }
    // Split at a multiple of the leaf size, so the leaves are full.
    let mid = rows.start + (rows.len() / 2).div_ceil(GRAM_LEAF) * GRAM_LEAF;
    let (top, bottom) = (rows.start..mid, mid..rows.end);
    gram_lower_rec(x, k, top.clone(), par);
    matmul(
        &mut k[mid * n + rows.start..],
        n,
        row_block(x, &bottom),
        row_block(x, &top).t(),
        T::ONE,
        false,
        par,
    );
    gram_lower_rec(x, k, bottom, par);
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
            n,
            MatRef::rm(&a, m, k),
            MatRef::rm(&b, n, k).t(),
            1.0,
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
        let (n, d) = (301, 9);
        let x: Vec<f64> = (0..n * d)
            .map(|i| ((i * 7919) % 101) as f64 / 50.0 - 1.0)
            .collect();
        let mut k = vec![0.0; n * n];
        gram_xxt(MatRef::rm(&x, n, d), &mut k, Parallelism::None);
        for i in (0..n).step_by(17) {
            for j in (0..n).step_by(13) {
                let r: f64 = (0..d).map(|t| x[i * d + t] * x[j * d + t]).sum();
                assert!((k[i * n + j] - r).abs() < 1e-12, "{i},{j}");
            }
        }
    }
}
