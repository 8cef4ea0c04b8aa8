//! All-pairs CKA (centered kernel alignment) between the layers of a calibration set.
//!
//! [`CkaAccumulator`] streams: it takes chunks of rows of all layers ([`crate::io::Batch`]), re-batches them
//! into estimator batches (which may straddle chunks and shards), hands each batch to a [`Backend`] and
//! keeps the f64 state:
//!
//! * unbiased (minibatch) estimator: Σ_batches HSIC₁(l, m) — an L×L matrix, whatever the number of batches;
//! * biased estimator, feature route: ZᵀZ and the column sums over all samples (D×D, D = Σ widths);
//! * biased estimator, Gram route: the samples themselves (the biased HSIC needs every sample's kernel
//!   against every other; use the unbiased estimator, or the feature route, to stream).
//!
//! CKA(l, m) = HSIC(l, m) / √(HSIC(l, l)·HSIC(m, m)), with the minibatch CKA taking means over batches
//! before the ratio (Nguyen, Raghu & Kornblith 2021).

mod backend;
pub mod cpu;
pub mod cuda;
pub mod device;
mod feature;

pub use backend::{Backend, Estimator, HsicSum, Kernel, Precision, Route};

use crate::error::{Error, Result};
use crate::io::{ActivationSource, Batch, BatchRef, LayerMeta};

/// What to compute.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CkaSpec {
    pub estimator: Estimator,
    pub kernel: Kernel,
    /// Samples per batch for the unbiased estimator (ignored by the biased one, which uses all samples).
    pub batch_size: usize,
    pub route: Route,
}

impl Default for CkaSpec {
    fn default() -> Self {
        CkaSpec {
            estimator: Estimator::Unbiased,
            kernel: Kernel::Linear,
            batch_size: 256,
            route: Route::Auto,
        }
    }
}

/// The result, serialised as the `sglp-cka/1` JSON format. NaN entries serialise as `null`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct CkaResult {
    pub format: String,
    pub layers: Vec<String>,
    pub estimator: Estimator,
    pub kernel: Kernel,
    /// Samples per batch (the unbiased estimator), or all samples (biased).
    pub batch_size: usize,
    pub n_samples: usize,
    pub n_batches: usize,
    /// The route actually used ("gram" or "feature").
    pub route: Route,
    pub backend: String,
    pub cka: Vec<Vec<Option<f64>>>,
    pub hsic: Vec<Vec<Option<f64>>>,
    pub warnings: Vec<String>,
}

pub const CKA_FORMAT: &str = "sglp-cka/1";

impl CkaResult {
    /// The CKA matrix with `null` (NaN) entries as NaN.
    pub fn cka_matrix(&self) -> Vec<Vec<f64>> {
        self.cka
            .iter()
            .map(|r| r.iter().map(|v| v.unwrap_or(f64::NAN)).collect())
            .collect()
    }

    /// CSV: a header row of layer names, then one row per layer (`layer,cka...`).
    pub fn to_csv(&self) -> String {
        let mut s = String::from("layer");
        for l in &self.layers {
            s.push(',');
            s.push_str(l);
        }
        s.push('\n');
        for (name, row) in self.layers.iter().zip(&self.cka) {
            s.push_str(name);
            for v in row {
                s.push(',');
                match v {
                    Some(x) => s.push_str(&format!("{x}")),
                    None => s.push_str("nan"),
                }
            }
            s.push('\n');
        }
        s
    }
}

/// Streaming all-pairs CKA over a calibration set.
///
/// ```
/// use sglp_engine::io::{Batch, DType, LayerMeta};
/// use sglp_engine::similarity::{cpu::CpuBackend, CkaAccumulator, CkaSpec};
///
/// // Two layers, the second a scaled copy of the first: CKA 1.
/// let layers = vec![
///     LayerMeta { name: "a".into(), cols: 3, dtype: DType::F32, shape: vec![8, 3] },
///     LayerMeta { name: "b".into(), cols: 3, dtype: DType::F32, shape: vec![8, 3] },
/// ];
/// let x: Vec<f32> = (0..24).map(|i| ((i * 7919) % 13) as f32 - 6.0).collect();
/// let y: Vec<f32> = x.iter().map(|v| 2.0 * v).collect();
/// let spec = CkaSpec { batch_size: 8, ..CkaSpec::default() };
/// let mut acc = CkaAccumulator::new(&layers, spec, None).unwrap();
/// let mut cpu = CpuBackend::new(1);
/// acc.push(&Batch::from_f32(8, &[(3, &x), (3, &y)]).as_ref(), &mut cpu).unwrap();
/// let res = acc.finish(&mut cpu).unwrap();
/// assert!((res.cka[0][1].unwrap() - 1.0).abs() < 1e-9);
/// ```
pub struct CkaAccumulator {
    layers: Vec<LayerMeta>,
    spec: CkaSpec,
    route: Route,
    /// Rows waiting to complete a batch (unbiased) or every row (biased, Gram route).
    pending: Batch,
    /// Σ_batches HSIC (unbiased) — L×L, partly kept by the backend (on the device for CUDA).
    hsic_sum: Option<HsicSum>,
    n_batches: usize,
    n_samples: usize,
    /// Feature route state.
    feature: Option<feature::FeatureState>,
    /// Per layer: the bytes of the first sample that entered an estimate, and whether any later one
    /// differs from it (see [`Self::note_variation`]).
    first_row: Vec<Option<Vec<u8>>>,
    varies: Vec<bool>,
    warnings: Vec<String>,
}

impl CkaAccumulator {
    /// `n_samples_hint`: total samples when known (helps the biased estimator pick its route).
    pub fn new(layers: &[LayerMeta], spec: CkaSpec, n_samples_hint: Option<usize>) -> Result<Self> {
        if layers.is_empty() {
            return Err(Error::invalid("no layers to compare"));
        }
        if spec.estimator == Estimator::Unbiased && spec.batch_size < 4 {
            return Err(Error::invalid(format!(
                "the unbiased estimator needs batches of at least 4 samples (got --cka-batch {})",
                spec.batch_size
            )));
        }
        if let Kernel::Rbf { threshold } = spec.kernel {
            if !(threshold.is_finite() && threshold > 0.0) {
                return Err(Error::invalid(format!(
                    "--rbf-threshold must be positive (got {threshold})"
                )));
            }
        }
        let route = choose_route(layers, &spec, n_samples_hint)?;
        check_memory(layers, &spec, route, n_samples_hint, available_memory())?;
        let l = layers.len();
        let feature = (route == Route::Feature).then(|| feature::FeatureState::new(layers));
        Ok(CkaAccumulator {
            layers: layers.to_vec(),
            spec,
            route,
            pending: Batch::empty(layers),
            hsic_sum: Some(HsicSum::named(
                layers.iter().map(|m| m.name.clone()).collect(),
            )),
            n_batches: 0,
            n_samples: 0,
            feature,
            first_row: vec![None; l],
            varies: vec![false; l],
            warnings: Vec::new(),
        })
    }

    /// The route this accumulator uses.
    pub fn route(&self) -> Route {
        self.route
    }

    /// Whether [`CkaAccumulator::push_device`] reads GPU memory in place (the unbiased estimator on the
    /// Gram route), rather than copying it to the host first.
    pub fn reads_device_in_place(&self) -> bool {
        self.spec.estimator == Estimator::Unbiased && self.route == Route::Gram
    }

    /// Add rows of every layer (any number of rows; batches are formed internally).
    pub fn push(&mut self, chunk: &BatchRef<'_>, backend: &mut dyn Backend) -> Result<()> {
        if chunk.layers.len() != self.layers.len() {
            return Err(Error::invalid(format!(
                "chunk has {} layers, expected {}",
                chunk.layers.len(),
                self.layers.len()
            )));
        }
        for (s, m) in chunk.layers.iter().zip(&self.layers) {
            if s.cols != m.cols
                || s.dtype != m.dtype
                || s.bytes.len() != chunk.rows * s.cols * s.dtype.size()
            {
                return Err(Error::invalid(format!(
                    "layer '{}': chunk does not match the layer's width {} and dtype {}",
                    m.name,
                    m.cols,
                    m.dtype.name()
                )));
            }
        }
        self.n_samples += chunk.rows;
        if self.spec.estimator == Estimator::Biased {
            // Every sample enters the biased estimate (the unbiased one notes its batches as they form).
            self.note_variation(chunk);
        }
        match (self.spec.estimator, self.route) {
            (Estimator::Biased, Route::Gram) => {
                self.pending.extend_from(chunk);
                Ok(())
            }
            (Estimator::Biased, _) => {
                let st = self.feature.as_mut().expect("feature state");
                st.add_biased(chunk, backend)
            }
            (Estimator::Unbiased, _) => self.push_unbiased(chunk, backend),
        }
    }

    /// Add rows already in GPU memory (e.g. PyTorch CUDA tensors), read there by the CUDA backend:
    /// whole minibatches go from device memory straight into the kernels ([`cuda::CudaBackend::submit_device`]);
    /// only the rows that complete or start a batch across chunks (fewer than a batch) are copied to the
    /// host and join it there. The unbiased estimator on the Gram route only; otherwise (and on the CPU
    /// backend) the chunk is copied to the host once and pushed as usual, with a warning.
    ///
    /// Non-finite values are found by the GPU as it centres each batch (the host path checks every value
    /// it reads instead): `finish` then fails with the layer and its first bad sample, as the readers do.
    /// A layer constant over a batch centres to exact zeros on the GPU (f64 column means), so with the
    /// linear kernel it still gets the zero-variance NaN row; with RBF (a zero median distance) its row is
    /// NaN too, but the warning says its HSIC with itself is not finite.
    ///
    /// # Safety
    /// As [`cuda::CudaBackend::submit_device`]: every layer's address holds `rows × cols` values of its
    /// dtype on the backend's device, written before the call.
    pub unsafe fn push_device(
        &mut self,
        chunk: &cuda::DeviceBatch,
        backend: &mut dyn Backend,
    ) -> Result<()> {
        if chunk.layers.len() != self.layers.len() {
            return Err(Error::invalid(format!(
                "chunk has {} layers, expected {}",
                chunk.layers.len(),
                self.layers.len()
            )));
        }
        for (s, m) in chunk.layers.iter().zip(&self.layers) {
            if s.cols != m.cols || s.dtype != m.dtype {
                return Err(Error::invalid(format!(
                    "layer '{}': chunk does not match the layer's width {} and dtype {}",
                    m.name,
                    m.cols,
                    m.dtype.name()
                )));
            }
        }
        let streamed = self.reads_device_in_place();
        let Some(gpu) = backend.as_cuda().filter(|_| streamed) else {
            let why = if streamed {
                "the backend is not CUDA"
            } else {
                "only the unbiased estimator on the Gram route reads GPU memory in place"
            };
            let note = format!("device activations copied to host memory ({why})");
            if !self.warnings.contains(&note) {
                self.warnings.push(note);
            }
            let host = backend
                .as_cuda()
                .map(|g| unsafe { g.download(chunk) })
                .transpose()?
                .ok_or_else(|| {
                    Error::invalid("device activations need the CUDA backend (device=\"cuda\")")
                })?;
            // Checked here as every host read is (the in-place path's GPU check is not on this way).
            let origin = std::path::Path::new("device activations");
            crate::io::check_finite(&host.as_ref(), &self.layers, self.n_samples, origin)?;
            return self.push(&host.as_ref(), backend);
        };
        let b = self.spec.batch_size;
        let rows = chunk.rows;
        // Rows of this chunk that complete a batch begun by earlier chunks, on the host.
        let mut start = 0;
        if self.pending.rows > 0 {
            start = (b - self.pending.rows).min(rows);
            // SAFETY: the caller's promise, for a row slice of it.
            let head = unsafe { gpu.download(&chunk.slice(0, start))? };
            self.n_samples += start;
            self.push_unbiased(&head.as_ref(), gpu)?;
        }
        // The host path's zero-variance test compares bytes, which device rows do not offer; the GPU's
        // exact zeros for a constant layer stand in for it (see above).
        self.varies.iter_mut().for_each(|v| *v = true);
        // Whole batches from device memory.
        let sum = self.hsic_sum.as_mut().expect("sum open until finish");
        while rows - start >= b {
            // SAFETY: the caller's promise, for a row slice of it.
            unsafe {
                gpu.submit_device(
                    sum,
                    &chunk.slice(start, start + b),
                    Estimator::Unbiased,
                    self.spec.kernel,
                )?
            };
            self.n_batches += 1;
            self.n_samples += b;
            start += b;
        }
        if start < rows {
            // SAFETY: as above.
            let tail = unsafe { gpu.download(&chunk.slice(start, rows))? };
            self.n_samples += rows - start;
            self.pending.extend_from(&tail.as_ref());
        }
        Ok(())
    }

    fn push_unbiased(&mut self, chunk: &BatchRef<'_>, backend: &mut dyn Backend) -> Result<()> {
        let b = self.spec.batch_size;
        let mut start = 0;
        // Complete a partly filled batch first.
        if self.pending.rows > 0 {
            let take = (b - self.pending.rows).min(chunk.rows);
            self.pending.extend_from(&chunk.slice(0, take));
            start = take;
            if self.pending.rows == b {
                let full = std::mem::replace(&mut self.pending, Batch::empty(&self.layers));
                self.add_unbiased_batch(&full.as_ref(), backend)?;
            }
        }
        // Whole batches straight from the chunk, without copying.
        while chunk.rows - start >= b {
            self.add_unbiased_batch(&chunk.slice(start, start + b), backend)?;
            start += b;
        }
        if start < chunk.rows {
            self.pending.extend_from(&chunk.slice(start, chunk.rows));
        }
        Ok(())
    }

    /// Record which layers have two samples that differ. A layer whose samples are all identical has zero
    /// variance exactly, but its centred Grams are rounding residue, not zeros (a constant like 0.1 does
    /// not centre to exact zeros in floating point), and its CKA would be a ratio of rounding errors;
    /// `finish` gives such a layer exact zero HSICs instead, hence a NaN row and the zero-variance warning.
    fn note_variation(&mut self, batch: &BatchRef<'_>) {
        for (li, s) in batch.layers.iter().enumerate() {
            let w = s.cols * s.dtype.size();
            if self.varies[li] || batch.rows == 0 || w == 0 {
                continue;
            }
            let first = self.first_row[li].get_or_insert_with(|| s.bytes[..w].to_vec());
            self.varies[li] = s.bytes.chunks_exact(w).any(|r| r != first.as_slice());
        }
    }

    fn add_unbiased_batch(
        &mut self,
        batch: &BatchRef<'_>,
        backend: &mut dyn Backend,
    ) -> Result<()> {
        self.note_variation(batch);
        let sum = self.hsic_sum.as_mut().expect("sum open until finish");
        match self.route {
            Route::Feature => {
                let h = self
                    .feature
                    .as_mut()
                    .expect("feature state")
                    .unbiased_batch_hsic(batch, backend)?;
                sum.add_host(&h);
            }
            _ => backend.submit(sum, batch, Estimator::Unbiased, self.spec.kernel)?,
        }
        self.n_batches += 1;
        Ok(())
    }

    /// Finish: the mean HSIC over batches and the CKA matrix.
    pub fn finish(mut self, backend: &mut dyn Backend) -> Result<CkaResult> {
        let l = self.layers.len();
        let (hsic, batch_size) = match self.spec.estimator {
            Estimator::Unbiased => {
                if self.pending.rows > 0 {
                    let r = self.pending.rows;
                    if r >= 4 {
                        // A short final batch is still an unbiased estimate; keep it.
                        let last = std::mem::replace(&mut self.pending, Batch::empty(&self.layers));
                        self.add_unbiased_batch(&last.as_ref(), backend)?;
                        self.warnings.push(format!(
                            "the last batch has {r} samples instead of {}",
                            self.spec.batch_size
                        ));
                    } else {
                        self.warnings.push(format!(
                            "dropped the last {r} sample(s): the unbiased estimator needs at least 4 per batch"
                        ));
                        self.n_samples -= r;
                    }
                }
                if self.n_batches == 0 {
                    return Err(Error::invalid(format!(
                        "the unbiased estimator needs at least 4 samples (got {})",
                        self.n_samples
                    )));
                }
                let nb = self.n_batches as f64;
                let total =
                    backend.finish_sum(self.hsic_sum.take().expect("sum open until finish"))?;
                (
                    total.iter().map(|v| v / nb).collect::<Vec<_>>(),
                    self.spec.batch_size,
                )
            }
            Estimator::Biased => {
                let n = self.n_samples;
                if n < 2 {
                    return Err(Error::invalid(format!(
                        "the biased estimator needs at least 2 samples (got {n})"
                    )));
                }
                self.n_batches = 1;
                let h = match self.route {
                    Route::Gram => backend.batch_hsic(
                        &self.pending.as_ref(),
                        Estimator::Biased,
                        self.spec.kernel,
                    )?,
                    _ => self.feature.as_ref().expect("feature state").biased_hsic(),
                };
                (h, n)
            }
        };
        let mut hsic = hsic;
        for i in (0..l).filter(|&i| !self.varies[i]) {
            for j in 0..l {
                hsic[i * l + j] = 0.0;
                hsic[j * l + i] = 0.0;
            }
        }
        let mut warnings = std::mem::take(&mut self.warnings);
        let cka = cka_from_hsic(&hsic, l);
        for (i, meta) in self.layers.iter().enumerate() {
            let d = hsic[i * l + i];
            if d == 0.0 {
                warnings.push(format!(
                    "layer '{}' has zero variance: its CKA row is NaN",
                    meta.name
                ));
            } else if d < 0.0 {
                warnings.push(format!(
                    "layer '{}': HSIC with itself is negative ({d:.3e}); its CKA row is NaN",
                    meta.name
                ));
            } else if !d.is_finite() {
                warnings.push(format!(
                    "layer '{}': HSIC with itself is not finite",
                    meta.name
                ));
            }
        }
        // 16-bit layers on the GPU's Gram route reach the tensor cores as f16 of the centred values
        // (~2.4e-4 relative each): over a few samples per batch those roundings do not average out
        // (README, GPU precision; tests/cuda_backend.rs, sixteen_bit_and_mixed_dtypes).
        if backend.as_cuda().is_some()
            && self.route == Route::Gram
            && batch_size < 32
            && self.layers.iter().any(|m| m.dtype.is_16bit())
        {
            warnings.push(format!(
                "16-bit layers on the GPU go through f16 tensor cores: with {batch_size} samples per batch \
                 their CKA is within ~1e-3 of the float64 CPU, not ~1e-5 (128 or more samples per batch, or \
                 --device cpu, for that)"
            ));
        }
        let negatives = (0..l)
            .flat_map(|i| (0..i).map(move |j| (i, j)))
            .filter(|&(i, j)| cka[i * l + j] < 0.0)
            .count();
        if negatives > 0 {
            warnings.push(format!(
                "{negatives} layer pair(s) have a negative CKA estimate (kept as computed, not clamped)"
            ));
        }
        let to_rows = |v: &[f64]| -> Vec<Vec<Option<f64>>> {
            v.chunks(l)
                .map(|r| r.iter().map(|&x| x.is_finite().then_some(x)).collect())
                .collect()
        };
        Ok(CkaResult {
            format: CKA_FORMAT.to_string(),
            layers: self.layers.iter().map(|m| m.name.clone()).collect(),
            estimator: self.spec.estimator,
            kernel: self.spec.kernel,
            batch_size,
            n_samples: self.n_samples,
            n_batches: self.n_batches,
            route: self.route,
            backend: backend.name(),
            cka: to_rows(&cka),
            hsic: to_rows(&hsic),
            warnings,
        })
    }
}

/// CKA(l, m) = HSIC(l, m) / (√HSIC(l, l)·√HSIC(m, m)); NaN where a diagonal HSIC is not positive.
///
/// The square roots are taken before the product: HSIC scales as the fourth power of the activations, so
/// the product of two diagonals under- or overflows f64 for activations near the f32 subnormals (~1e-40)
/// or the bf16 maximum (~3e38), where each root alone is fine.
pub fn cka_from_hsic(hsic: &[f64], l: usize) -> Vec<f64> {
    let roots: Vec<f64> = (0..l).map(|i| hsic[i * l + i].sqrt()).collect();
    let mut out = vec![f64::NAN; l * l];
    for i in 0..l {
        for j in 0..l {
            if roots[i] > 0.0 && roots[j] > 0.0 {
                out[i * l + j] = hsic[i * l + j] / (roots[i] * roots[j]);
            }
        }
    }
    out
}

/// Choose the route from the shapes: the cheaper one by multiply-adds, per batch of b samples (the biased
/// Gram route takes all n samples as one batch).
fn choose_route(layers: &[LayerMeta], spec: &CkaSpec, n_hint: Option<usize>) -> Result<Route> {
    let linear = matches!(spec.kernel, Kernel::Linear);
    match spec.route {
        Route::Feature if !linear => {
            Err(Error::invalid("the feature route needs the linear kernel"))
        }
        Route::Gram | Route::Feature => Ok(spec.route),
        Route::Auto if !linear => Ok(Route::Gram),
        Route::Auto => {
            let l = layers.len() as f64;
            let d: f64 = layers.iter().map(|m| m.cols as f64).sum();
            let b = match spec.estimator {
                Estimator::Unbiased => spec.batch_size as f64,
                // Unknown n: the feature route streams, the Gram route keeps every sample.
                Estimator::Biased => n_hint.map(|n| n as f64).unwrap_or(f64::INFINITY),
            };
            // Gram: Σ_l b²·d_l/2 (symmetric Grams) + L²·b²/2 (pairs). Feature: b·D²/2.
            let gram = b * b * d / 2.0 + l * l * b * b / 2.0;
            let feat = b * d * d / 2.0;
            Ok(if feat <= gram {
                Route::Feature
            } else {
                Route::Gram
            })
        }
    }
}

/// Bytes of estimator state the accumulator will hold (f64 state, and for the biased Gram route every
/// sample as stored), for `n` samples where the route depends on it.
pub fn state_bytes(
    layers: &[LayerMeta],
    spec: &CkaSpec,
    route: Route,
    n: Option<usize>,
) -> Option<u64> {
    let l = layers.len() as u64;
    let d: u64 = layers.iter().map(|m| m.cols as u64).sum();
    let stored_row: u64 = layers
        .iter()
        .map(|m| (m.cols * m.dtype.size()) as u64)
        .sum();
    let max_d = layers.iter().map(|m| m.cols as u64).max().unwrap_or(0);
    // The Gram route's per-batch buffers: stacked packed Grams L·b(b+1)/2, and per worker one f64 batch
    // (b × d) and one Gram (b × b); two workers counted. Chunks as stored: the one pending, and two
    // circulating between the reader and the computation (counted below).
    let gram = |b: u64| 8 * (l * b * (b + 1) / 2 + 2 * (b * max_d + b * b));
    Some(match (spec.estimator, route) {
        (_, Route::Feature) => 8 * d * d * 2,
        (Estimator::Unbiased, _) => {
            gram(spec.batch_size as u64) + 3 * stored_row * spec.batch_size as u64
        }
        (Estimator::Biased, _) => {
            let n = n? as u64;
            gram(n) + stored_row * n
        }
    })
}

/// Physical memory available now (Linux `MemAvailable`), if known.
pub(crate) fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Refuse up front, with the way out, a computation whose state would not fit in memory.
fn check_memory(
    layers: &[LayerMeta],
    spec: &CkaSpec,
    route: Route,
    n: Option<usize>,
    available: Option<u64>,
) -> Result<()> {
    let (Some(need), Some(avail)) = (state_bytes(layers, spec, route, n), available) else {
        return Ok(());
    };
    if need <= avail {
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let hint = match (spec.estimator, route) {
        (Estimator::Biased, Route::Gram) => {
            "the biased estimator on the Gram route holds every sample's kernel row; use --estimator \
             unbiased --cka-batch b (streams), or --route feature when the layers are narrow"
        }
        (_, Route::Feature) => "the feature route holds a D×D matrix (D = all layers' widths); use --route gram",
        _ => "use a smaller --cka-batch, or fewer layers with --layers",
    };
    Err(Error::invalid(format!(
        "the {:?} estimator ({:?} route) needs about {:.1} GiB of state but {:.1} GiB is available: {hint}",
        spec.estimator,
        route,
        gib(need),
        gib(avail)
    )))
}

/// Run the whole calibration set through an accumulator. Shows a progress bar over samples when the total
/// is known. A source that can be read on another thread ([`ActivationSource::as_send`]: files) is read
/// one chunk ahead of the computation.
pub fn compute_cka(
    source: &mut dyn ActivationSource,
    spec: &CkaSpec,
    backend: &mut dyn Backend,
) -> Result<CkaResult> {
    let layers = source.layers().to_vec();
    let hint = source.n_samples_hint();
    let mut acc = CkaAccumulator::new(&layers, *spec, hint)?;
    let chunk_rows = spec.batch_size.max(1);
    let pb = crate::progress::bar(hint.unwrap_or(0) as u64, "samples");
    if hint.is_none() {
        pb.set_length(0);
    }
    // Activations computed on the backend's GPU (a model capture there) are read in place.
    let in_place = acc.reads_device_in_place();
    if let Some(ordinal) = backend.as_cuda().filter(|_| in_place).map(|g| g.ordinal()) {
        let mut sink = |db: &crate::io::DeviceBatch| -> Result<()> {
            // SAFETY: the source hands over its layers on GPU `ordinal` (the backend's), written and
            // synchronised, valid for this call: push_device's contract.
            unsafe { acc.push_device(db, backend)? };
            pb.inc(db.rows as u64);
            Ok(())
        };
        if source.device_chunks(ordinal, &mut sink)? {
            pb.finish_and_clear();
            return acc.finish(backend);
        }
    }
    // A reader thread fills two chunk buffers in turn; on the Gram route a GPU backend hands out
    // page-locked ones, which it uploads from without a staging copy.
    let buffers = if source.as_send().is_some() && acc.reads_device_in_place() {
        [(); 2].map(|_| backend.page_locked_batch(&layers, chunk_rows))
    } else {
        [None, None]
    };
    let mut consume = |chunk: &Batch| -> Result<()> {
        acc.push(&chunk.as_ref(), backend)?;
        pb.inc(chunk.rows as u64);
        Ok(())
    };
    match source.as_send() {
        Some(src) => {
            let buffers = buffers.map(|b| b.unwrap_or_else(|| Batch::empty(&layers)));
            read_ahead(src, chunk_rows, buffers, &mut consume)?
        }
        None => {
            let (mut chunk, mut read) = (Batch::empty(&layers), 0);
            while source.next_chunk_into(to_boundary(chunk_rows, read), &mut chunk)? {
                read += chunk.rows;
                consume(&chunk)?;
            }
        }
    }
    pb.finish_and_clear();
    acc.finish(backend)
}

/// Rows to ask a reader for after `read` rows, in chunks of `rows` (the estimator's batch): up to the next
/// multiple of `rows`. A chunk cut short (a shard ended mid-batch) is thus followed by the few rows that
/// complete its batch, and the chunks after it again hold whole batches, which the accumulator takes
/// without copying (and a GPU backend uploads from the reader's page-locked buffers).
fn to_boundary(rows: usize, read: usize) -> usize {
    rows - read % rows
}

/// Read chunks of `rows` on a second thread while `consume` works on the previous one. The two buffers
/// circulate between the threads, so once they have grown to a chunk nothing is allocated per chunk. The
/// first error (reading or consuming) is returned; the reader stops as soon as its channels close.
fn read_ahead(
    src: &mut (dyn ActivationSource + Send),
    rows: usize,
    buffers: [Batch; 2],
    consume: &mut dyn FnMut(&Batch) -> Result<()>,
) -> Result<()> {
    use std::sync::mpsc::sync_channel;
    std::thread::scope(|scope| {
        let (full_tx, full_rx) = sync_channel::<Result<Batch>>(1);
        let (free_tx, free_rx) = sync_channel::<Batch>(2);
        for b in buffers {
            free_tx.send(b).expect("room for two");
        }
        scope.spawn(move || {
            let mut read = 0;
            while let Ok(mut buf) = free_rx.recv() {
                let next = match src.next_chunk_into(to_boundary(rows, read), &mut buf) {
                    Ok(true) => {
                        read += buf.rows;
                        Ok(buf)
                    }
                    Ok(false) => break,
                    Err(e) => Err(e),
                };
                let failed = next.is_err();
                if full_tx.send(next).is_err() || failed {
                    break;
                }
            }
        });
        // Ends when the reader is done and has dropped its sender.
        for next in full_rx.iter() {
            let chunk = next?;
            consume(&chunk)?;
            // The reader may have finished: then the buffer is simply dropped.
            let _ = free_tx.send(chunk);
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::DType;

    fn layers(l: usize, d: usize) -> Vec<LayerMeta> {
        (0..l)
            .map(|i| LayerMeta {
                name: format!("l{i}"),
                cols: d,
                dtype: DType::F32,
                shape: vec![0, d],
            })
            .collect()
    }

    /// Device input on a backend that is not CUDA is refused with the way out, before any address is
    /// read (the addresses here are not valid anywhere).
    #[test]
    fn device_input_needs_the_cuda_backend() {
        let metas = layers(2, 3);
        let mut acc = CkaAccumulator::new(&metas, CkaSpec::default(), None).unwrap();
        let batch = cuda::DeviceBatch {
            rows: 300,
            layers: (0..2)
                .map(|i| cuda::DeviceLayer {
                    ptr: 0xdead_0000 + i,
                    cols: 3,
                    dtype: DType::F32,
                })
                .collect(),
        };
        let mut cpu = cpu::CpuBackend::new(1);
        // SAFETY: refused before any address is dereferenced (the CPU backend has no device path).
        let err = unsafe { acc.push_device(&batch, &mut cpu) }
            .unwrap_err()
            .to_string();
        assert!(err.contains("need the CUDA backend"), "{err}");
        // A chunk of the wrong shape is refused first, naming the layer.
        let mut wrong = batch.clone();
        wrong.layers[1].cols = 4;
        let err = unsafe { acc.push_device(&wrong, &mut cpu) }
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("layer 'l1'") && err.contains("width 3"),
            "{err}"
        );
    }

    #[test]
    fn state_that_cannot_fit_is_refused_up_front_with_the_way_out() {
        let gib = 1u64 << 30;
        // Biased, Gram route, 200k samples of 32 layers: ~5 TiB of packed Grams.
        let spec = CkaSpec {
            estimator: Estimator::Biased,
            route: Route::Gram,
            ..CkaSpec::default()
        };
        let err = check_memory(
            &layers(32, 4096),
            &spec,
            Route::Gram,
            Some(200_000),
            Some(16 * gib),
        )
        .unwrap_err();
        assert!(err.to_string().contains("--estimator unbiased"), "{err}");
        // The unbiased minibatch state of the same layers fits easily.
        let spec = CkaSpec::default();
        assert!(check_memory(
            &layers(32, 4096),
            &spec,
            Route::Gram,
            Some(200_000),
            Some(16 * gib)
        )
        .is_ok());
        let need = state_bytes(&layers(32, 4096), &spec, Route::Gram, None).unwrap();
        assert!(need > 32 * 256 * 257 / 2 * 8 && need < gib, "{need}");
        // Unknown availability: no check.
        assert!(check_memory(&layers(32, 4096), &spec, Route::Feature, None, None).is_ok());
    }

    /// The CPU backend, handing out (heap-backed) page-locked chunk buffers as the CUDA backend does, and
    /// counting the batches it is given straight from them (the CUDA backend uploads those without
    /// staging) and the others.
    struct LockedCpu {
        cpu: cpu::CpuBackend,
        blocks: Vec<std::sync::Weak<crate::io::host_bytes::HeapLocked>>,
        direct: usize,
        staged: usize,
    }

    impl Backend for LockedCpu {
        fn name(&self) -> String {
            self.cpu.name()
        }
        fn page_locked_batch(&mut self, layers: &[LayerMeta], rows: usize) -> Option<Batch> {
            let mut batch = Batch::empty(layers);
            for (b, l) in batch.layers.iter_mut().zip(layers) {
                let mem = crate::io::host_bytes::HeapLocked::new(rows * l.cols * l.dtype.size());
                self.blocks.push(std::sync::Arc::downgrade(&mem));
                b.data = crate::io::HostBytes::page_locked(mem).unwrap();
            }
            Some(batch)
        }
        fn batch_hsic(
            &mut self,
            batch: &BatchRef<'_>,
            estimator: Estimator,
            kernel: Kernel,
        ) -> Result<Vec<f64>> {
            let held = |s: &crate::io::LayerSlice<'_>| cuda::block_holding(&self.blocks, s.bytes);
            if batch.layers.iter().all(|s| held(s).is_some()) {
                self.direct += 1;
            } else {
                self.staged += 1;
            }
            self.cpu.batch_hsic(batch, estimator, kernel)
        }
        fn accumulate_cross(&mut self, batch: &BatchRef<'_>, cross: &mut [f64]) -> Result<()> {
            self.cpu.accumulate_cross(batch, cross)
        }
    }

    /// Files read ahead on a backend with page-locked chunk buffers: the reader writes straight into
    /// them, whole batches reach the backend from there (no staging copy), batches that straddle chunks
    /// go the staged way, and the CKA is the plain CPU's, bit for bit.
    #[test]
    fn a_reader_fills_the_backends_page_locked_buffers_in_place() {
        use rand::{Rng, SeedableRng};
        use safetensors::tensor::{Dtype, TensorView};
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
        let widths = [5usize, 7, 3];
        let mut write = |name: &str, rows: usize| {
            let data: Vec<Vec<u8>> = widths
                .iter()
                .map(|&d| {
                    (0..rows * d)
                        .flat_map(|_| (rng.random::<f32>() * 4.0 - 1.0).to_le_bytes())
                        .collect()
                })
                .collect();
            let views: Vec<(String, TensorView<'_>)> = data
                .iter()
                .zip(widths)
                .enumerate()
                .map(|(i, (b, d))| {
                    let v = TensorView::new(Dtype::F32, vec![rows, d], b).unwrap();
                    (format!("layer{i}"), v)
                })
                .collect();
            let path = dir.path().join(name);
            safetensors::serialize_to_file(views, None, &path).unwrap();
            path
        };
        let spec = CkaSpec {
            batch_size: 10,
            route: Route::Gram,
            ..CkaSpec::default()
        };
        let opts = crate::io::ReadOptions {
            tokens: crate::io::TokenMode::Samples,
            layers: None,
        };
        // Shards of whole batches: every batch direct. A 45-row shard: its last 5 rows and the next
        // shard's first 5 form one staged batch; the reader then asks for 5 rows, so the chunks after
        // it hold whole batches again.
        for (rows, direct, staged) in [([40, 30], 7, 0), ([45, 35], 7, 1)] {
            let paths = [
                write("a.safetensors", rows[0]),
                write("b.safetensors", rows[1]),
            ];
            let mut locked = LockedCpu {
                cpu: cpu::CpuBackend::new(1),
                blocks: Vec::new(),
                direct: 0,
                staged: 0,
            };
            let mut set = crate::io::ActivationSet::open(&paths, &opts).unwrap();
            let got = compute_cka(&mut set, &spec, &mut locked).unwrap();
            assert_eq!((locked.direct, locked.staged), (direct, staged), "{rows:?}");
            let mut set = crate::io::ActivationSet::open(&paths, &opts).unwrap();
            let want = compute_cka(&mut set, &spec, &mut cpu::CpuBackend::new(1)).unwrap();
            assert_eq!(got.cka, want.cka);
            assert_eq!(got.n_batches, want.n_batches);
            assert!(got.cka[0][1].is_some_and(|c| c.abs() < 1.0));
        }
    }
}
