//! The compute interface of the similarity stage: one trait, a CPU implementation ([`super::cpu`]) and a
//! CUDA implementation ([`super::cuda`]). The accumulator ([`super::CkaAccumulator`]) owns the streaming,
//! re-batching and the f64 state; a backend only turns one batch into numbers.

use crate::error::Result;
use crate::io::{Batch, BatchRef, LayerMeta};

/// Which HSIC estimator.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Estimator {
    /// HSIC₀ = tr(KHLH)/(n−1)² over all n samples (Kornblith et al. 2019).
    Biased,
    /// HSIC₁ of Song et al. (2012) on minibatches, averaged (Nguyen, Raghu & Kornblith 2021).
    Unbiased,
}

/// Which kernel builds the Gram matrices.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase", tag = "type")]
pub enum Kernel {
    /// K = X Xᵀ.
    Linear,
    /// K_ij = exp(−d²_ij / (2 t² m)), m the median of all squared distances of the batch (diagonal
    /// included), t = `threshold`: Kornblith et al.'s reference `gram_rbf`.
    Rbf { threshold: f64 },
}

/// How a linear-kernel HSIC is computed. Both routes give the same numbers; they differ in cost.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    /// Pick the cheaper one from the shapes.
    Auto,
    /// n×n Gram matrices per batch, centred, all pairs as one product of the stacked Grams.
    Gram,
    /// D×D feature products (D = Σ widths): cheaper when the widths are small next to the batch.
    Feature,
}

/// The arithmetic of the CPU Gram route's Grams (linear kernel). Everything after the Grams (centring, the
/// pair products, the sums over batches) is f64 in both.
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
pub enum Precision {
    /// Each batch's column means subtracted in f64 first, then the Gram as an f32 GEMM, converted to f64
    /// for the centring: twice the speed; CKA within 1e-6 of the f64 reference (README, "Performance").
    F32,
    /// f64 throughout (the reference).
    #[default]
    F64,
}

/// A compute backend for the similarity stage.
pub trait Backend {
    /// Human-readable name of the device, e.g. `cpu (2 threads)` or `cuda:0 NVIDIA H100`.
    fn name(&self) -> String;

    /// Gram route: the HSIC of every pair of layers on one batch of `batch.rows` samples.
    ///
    /// Returns the row-major L×L matrix (symmetric), already divided by the estimator's normaliser:
    /// (n−1)² for [`Estimator::Biased`] (double-centred Grams), n(n−3) for [`Estimator::Unbiased`]
    /// (U-centred Grams with zero diagonal), n = `batch.rows`.
    fn batch_hsic(
        &mut self,
        batch: &BatchRef<'_>,
        estimator: Estimator,
        kernel: Kernel,
    ) -> Result<Vec<f64>>;

    /// Gram route, streamed: add the HSIC matrix of one batch (what [`Backend::batch_hsic`] returns) into
    /// `sum`. A backend with its own memory keeps the sum there (the CUDA backend: on the device, so that
    /// a stream of batches needs neither a download nor a host synchronisation per batch) and may return
    /// before the work is done; `batch` may be reused as soon as this returns. The default adds on the host.
    fn submit(
        &mut self,
        sum: &mut HsicSum,
        batch: &BatchRef<'_>,
        estimator: Estimator,
        kernel: Kernel,
    ) -> Result<()> {
        let h = self.batch_hsic(batch, estimator, kernel)?;
        sum.add_host(&h);
        sum.add_rows(batch.rows);
        Ok(())
    }

    /// Wait for every batch submitted into `sum` and return the L×L total (row-major, symmetric),
    /// releasing what the backend held for it.
    fn finish_sum(&mut self, sum: HsicSum) -> Result<Vec<f64>> {
        Ok(sum.into_host())
    }

    /// Feature route: add ZᵀZ of the batch into `cross` (D×D row-major, f64), Z = the batch's layers side
    /// by side (`rows × D`). Only the blocks on and below the diagonal (layer m ≤ layer l) need be filled;
    /// the caller reads no others.
    fn accumulate_cross(&mut self, batch: &BatchRef<'_>, cross: &mut [f64]) -> Result<()>;

    /// This backend as the CUDA backend, if it is one (the accumulator's device-input path needs it).
    fn as_cuda(&mut self) -> Option<&mut super::cuda::CudaBackend> {
        None
    }

    /// An empty chunk buffer for a reader to fill (`rows` rows of every layer of `layers` fit it) in memory
    /// this backend copies from without staging it first: page-locked memory on the CUDA backend, which
    /// then uploads each batch from where the reader wrote it. `None` (the default, and where such memory
    /// is not to be had) means an ordinary heap buffer does as well.
    fn page_locked_batch(&mut self, layers: &[LayerMeta], rows: usize) -> Option<Batch> {
        let _ = (layers, rows);
        None
    }

    /// Ask for the Grams' arithmetic. Returns whether the backend honours it; the default keeps its own
    /// (the CUDA backend's f32 tiles reduced into f64).
    fn set_precision(&mut self, precision: Precision) -> bool {
        let _ = precision;
        false
    }
}

/// A running sum of per-batch L×L HSIC matrices ([`Backend::submit`], [`Backend::finish_sum`]): the part
/// added on the host, and a handle to the part a backend keeps in its own memory.
#[derive(Debug)]
pub struct HsicSum {
    layers: usize,
    /// Layer names, for a backend's messages (a non-finite value found on the device).
    names: Option<Vec<String>>,
    /// Samples submitted so far (the global index of the next batch's first sample).
    rows: usize,
    host: Vec<f64>,
    /// The backend's slot holding the rest (the CUDA backend's device buffers), if any.
    pub(crate) device_slot: Option<usize>,
}

impl HsicSum {
    /// An empty sum over `layers` layers.
    pub fn new(layers: usize) -> Self {
        HsicSum {
            layers,
            names: None,
            rows: 0,
            host: vec![0.0; layers * layers],
            device_slot: None,
        }
    }

    /// The same, with the layers' names for messages.
    pub fn named(names: Vec<String>) -> Self {
        HsicSum {
            names: Some(names.clone()),
            ..HsicSum::new(names.len())
        }
    }

    /// The layers' names, when given.
    pub fn names(&self) -> Option<&[String]> {
        self.names.as_deref()
    }

    /// Samples submitted so far.
    pub fn rows_submitted(&self) -> usize {
        self.rows
    }

    /// Count `n` more submitted samples.
    pub fn add_rows(&mut self, n: usize) {
        self.rows += n;
    }

    /// The number of layers.
    pub fn layers(&self) -> usize {
        self.layers
    }

    /// Add one L×L matrix computed on the host.
    pub fn add_host(&mut self, h: &[f64]) {
        debug_assert_eq!(h.len(), self.host.len());
        for (s, v) in self.host.iter_mut().zip(h) {
            *s += v;
        }
    }

    /// The host part, for a backend's [`Backend::finish_sum`] to add its own part into.
    pub(crate) fn into_host(self) -> Vec<f64> {
        self.host
    }
}

/// The smallest batch each estimator is defined on (the unbiased HSIC₁ divides by n(n−3)).
pub fn check_batch_rows(estimator: Estimator, n: usize) -> crate::error::Result<()> {
    let min_n = match estimator {
        Estimator::Biased => 2,
        Estimator::Unbiased => 4,
    };
    if n < min_n {
        return Err(crate::error::Error::invalid(format!(
            "a batch of {n} samples is too small for the {estimator:?} estimator (at least {min_n})"
        )));
    }
    Ok(())
}
