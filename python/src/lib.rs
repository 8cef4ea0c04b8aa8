//! `sglp_engine._native`: the compiled half of the `sglp_engine` Python package, a thin layer over the
//! engine's library (the same `CkaAccumulator`, `segment_cka` and pruning decision as the CLI).
//!
//! Arrays come in as `(name, address, shape, dtype)` tuples that the Python half took from C-contiguous
//! NumPy arrays (`__array_interface__`), so they are read in place, never copied here. Results go back as
//! the engine's own JSON (`sglp-cka/1`, `sglp-segments/1`, `sglp-prune-report/2`), byte for byte what the
//! CLI writes; the Python half wraps them in classes. Engine errors become `ValueError` (bad input),
//! `OSError` (files) or `RuntimeError` (CUDA), with the CLI's one-line message.

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use sglp_engine::io::shards::matrix_shape;
use sglp_engine::io::{check_finite, BatchRef, DType, LayerMeta, LayerSlice, TokenMode};
use sglp_engine::pruning::allocate::Allocation;
use sglp_engine::pruning::pipeline::{plan_from_importance, Budget, Method, SglpOptions};
use sglp_engine::pruning::prune::k_rule;
use sglp_engine::pruning::select::Selection;
use sglp_engine::report::{write_report, PruneReport, StageTimes, REPORT_FORMAT};
use sglp_engine::segmentation::{segment_cka, KChoice};
use sglp_engine::similarity::cuda::{DeviceBatch, DeviceLayer, KeepCurrentContext};
use sglp_engine::similarity::device::{open_backend, DeviceChoice};
use sglp_engine::similarity::{Backend, CkaAccumulator, CkaResult, CkaSpec, Estimator, Kernel};
use sglp_engine::{Error, Result};
use std::mem::ManuallyDrop;
use std::path::{Path, PathBuf};

/// What the arrays are called in error messages, where the CLI names the input file.
const INPUT_NAME: &str = "acts";

/// The one error path: the engine's error, as the Python exception of its kind, same message.
fn py_err(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::Io { .. } | Error::Format { .. } => PyOSError::new_err(msg),
        Error::Cuda { .. } => PyRuntimeError::new_err(msg),
        _ => PyValueError::new_err(msg),
    }
}

/// Parse one of the engine's option enums by its CLI spelling; the error lists the valid values.
fn parse_enum<T: clap::ValueEnum>(option: &str, s: &str) -> Result<T> {
    T::from_str(s, false).map_err(|_| {
        let valid: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value().map(|p| format!("'{}'", p.get_name())))
            .collect();
        Error::invalid(format!(
            "{option} must be {} (got '{s}')",
            valid.join(" or ")
        ))
    })
}

fn parse_kernel(kernel: &str, rbf_threshold: f64) -> Result<Kernel> {
    match kernel {
        "linear" => Ok(Kernel::Linear),
        "rbf" => Ok(Kernel::Rbf {
            threshold: rbf_threshold,
        }),
        other => Err(Error::invalid(format!(
            "kernel must be 'linear' or 'rbf' (got '{other}')"
        ))),
    }
}

/// `k`: a number of segments, `auto` (the relative-gain rule) or `elbow`, as `--k` takes it.
fn k_choice(k: &str, k_max: usize, threshold: f64) -> Result<KChoice> {
    match k {
        "auto" => Ok(KChoice::Auto { k_max, threshold }),
        "elbow" => Ok(KChoice::Elbow { k_max }),
        s => s.parse().map(KChoice::Fixed).map_err(|_| {
            Error::invalid(format!("k must be a number, 'auto' or 'elbow' (got '{s}')"))
        }),
    }
}

fn parse_dtype(name: &str, dtype: &str) -> Result<DType> {
    match dtype {
        "f32" => Ok(DType::F32),
        "f64" => Ok(DType::F64),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => Err(Error::layer(
            INPUT_NAME,
            name,
            format!("unsupported dtype {other} (expected f32, f64, f16 or bf16)"),
        )),
    }
}

/// A value moved into `Python::allow_threads`. The closure runs synchronously on the calling thread
/// (only the GIL is released), so the `!Send` backend inside never changes threads.
struct SameThread<T>(T);
// SAFETY: `allow_threads` runs the closure on the current thread before returning.
unsafe impl<T> Send for SameThread<T> {}
impl<T> SameThread<T> {
    /// Taking the whole wrapper (a method call) keeps edition-2021 closures from capturing its field.
    fn get(self) -> T {
        self.0
    }
}

/// One layer of a chunk as the Python half hands it over: `(name, address, shape, dtype)`.
type ArrayIn = (String, usize, Vec<usize>, String);

/// One layer of a chunk, checked: its meta and where its bytes are.
struct View {
    meta: LayerMeta,
    rows: usize,
    addr: usize,
}

impl View {
    fn bytes(&self) -> usize {
        self.rows * self.meta.cols * self.meta.dtype.size()
    }
}

/// Shapes to matrices as the CLI reads files (3-D follows `tokens`); every layer must have the same rows.
fn views(arrays: Vec<ArrayIn>, tokens: TokenMode) -> Result<Vec<View>> {
    let mut out: Vec<View> = Vec::with_capacity(arrays.len());
    for (name, addr, shape, dtype) in arrays {
        let dtype = parse_dtype(&name, &dtype)?;
        let (rows, cols) =
            matrix_shape(&shape, tokens).map_err(|msg| Error::layer(INPUT_NAME, &name, msg))?;
        if let Some(first) = out.first() {
            if first.rows != rows {
                // The message of `io::shards` for a file whose layers disagree.
                return Err(Error::layer(
                    INPUT_NAME,
                    &name,
                    format!(
                        "{rows} samples, but layer '{}' has {} (layers of one input must have the same sample count)",
                        first.meta.name, first.rows
                    ),
                ));
            }
        }
        out.push(View {
            meta: LayerMeta {
                name,
                cols,
                dtype,
                shape,
            },
            rows,
            addr,
        });
    }
    Ok(out)
}

/// The streaming all-pairs CKA: Python's `CkaAccumulator` wraps this.
#[pyclass(unsendable, module = "sglp_engine._native")]
struct Accumulator {
    spec: CkaSpec,
    tokens: TokenMode,
    n_samples_hint: Option<usize>,
    /// Dropped by hand (`Drop`), with the caller's CUDA context restored afterwards.
    backend: ManuallyDrop<Box<dyn Backend>>,
    /// Why `device="auto"` fell back to the CPU, if it did.
    note: Option<String>,
    /// Made from the first chunk's layers.
    state: Option<CkaAccumulator>,
    layers: Vec<LayerMeta>,
    /// Samples pushed so far (the first sample of the next chunk, for error messages).
    seen: usize,
}

#[pymethods]
impl Accumulator {
    #[new]
    #[pyo3(signature = (estimator, batch_size, kernel, rbf_threshold, route, device, threads, tokens, n_samples_hint=None))]
    fn new(
        estimator: &str,
        batch_size: usize,
        kernel: &str,
        rbf_threshold: f64,
        route: &str,
        device: &str,
        threads: usize,
        tokens: &str,
        n_samples_hint: Option<usize>,
    ) -> PyResult<Self> {
        // Every call into a backend restores the caller's current CUDA context (PyTorch's device).
        let _keep = KeepCurrentContext::new();
        let make = || -> Result<Self> {
            let spec = CkaSpec {
                estimator: parse_enum::<Estimator>("estimator", estimator)?,
                kernel: parse_kernel(kernel, rbf_threshold)?,
                batch_size,
                route: parse_enum("route", route)?,
            };
            let tokens = parse_enum::<TokenMode>("tokens", tokens)?;
            let device: DeviceChoice = device.parse().map_err(Error::invalid)?;
            let (backend, note) = open_backend(device, threads)?;
            Ok(Accumulator {
                spec,
                tokens,
                n_samples_hint,
                backend: ManuallyDrop::new(backend),
                note,
                state: None,
                layers: Vec::new(),
                seen: 0,
            })
        };
        make().map_err(py_err)
    }

    /// Why `device="auto"` is on the CPU (None when it is where it was asked to be).
    #[getter]
    fn note(&self) -> Option<String> {
        self.note.clone()
    }

    #[getter]
    fn backend(&self) -> String {
        self.backend.name()
    }

    /// Layer names fixed by the first update (empty before it).
    #[getter]
    fn layers(&self) -> Vec<String> {
        self.layers.iter().map(|m| m.name.clone()).collect()
    }

    /// Push one chunk: the same rows of every layer. The caller keeps the arrays alive and unchanged
    /// for the duration of the call (the Python half holds them).
    fn update(&mut self, py: Python<'_>, arrays: Vec<ArrayIn>) -> PyResult<()> {
        let _keep = KeepCurrentContext::new();
        self.push_views(py, arrays, |this, views, rows| {
            let batch = BatchRef {
                rows,
                layers: views
                    .iter()
                    .map(|v| LayerSlice {
                        dtype: v.meta.dtype,
                        cols: v.meta.cols,
                        bytes: if v.bytes() == 0 {
                            &[]
                        } else {
                            // SAFETY: the Python half passes the address of a live, C-contiguous array
                            // of exactly `rows × cols` elements of `dtype` (checked there), and keeps a
                            // reference to it until this call returns.
                            unsafe { std::slice::from_raw_parts(v.addr as *const u8, v.bytes()) }
                        },
                    })
                    .collect(),
            };
            check_finite(&batch, &this.layers, this.seen, Path::new(INPUT_NAME))?;
            let acc = this.state.as_mut().expect("started by push_views");
            acc.push(&batch, this.backend.as_mut())
        })
    }

    /// The CUDA device the accumulator computes on (None on the CPU): CUDA tensors on it are read in
    /// place by `update_device`.
    #[getter]
    fn cuda_device(&mut self) -> Option<usize> {
        self.backend.as_cuda().map(|g| g.ordinal())
    }

    /// Push one chunk whose arrays are in GPU memory (CUDA tensors on `cuda_device`): `(name, device
    /// address, shape, dtype)` per layer. The Python half has checked that they are C-contiguous and
    /// has synchronised the stream that wrote them, and holds them until this call returns.
    fn update_device(&mut self, py: Python<'_>, arrays: Vec<ArrayIn>) -> PyResult<()> {
        let _keep = KeepCurrentContext::new();
        self.push_views(py, arrays, |this, views, rows| {
            let batch = DeviceBatch {
                rows,
                layers: views
                    .iter()
                    .map(|v| DeviceLayer {
                        ptr: v.addr as u64,
                        cols: v.meta.cols,
                        dtype: v.meta.dtype,
                    })
                    .collect(),
            };
            let acc = this.state.as_mut().expect("started by push_views");
            // SAFETY: the Python half passes the data pointers of live, C-contiguous CUDA tensors on
            // this backend's device with exactly these shapes and dtypes, written (stream synchronised)
            // before the call, and keeps them alive until it returns.
            unsafe { acc.push_device(&batch, this.backend.as_mut()) }
        })
    }

    /// The result as `sglp-cka/1` JSON (the CLI's bytes). The accumulator cannot be used afterwards.
    fn finish(&mut self, py: Python<'_>) -> PyResult<String> {
        let _keep = KeepCurrentContext::new();
        let Some(acc) = self.state.take() else {
            return Err(py_err(Error::invalid(
                "no activations: update() was never called (or finish() already was)",
            )));
        };
        let backend = SameThread(&mut **self.backend);
        let res = py
            .allow_threads(move || acc.finish(backend.get()))
            .map_err(py_err)?;
        self.layers.clear();
        Ok(serde_json::to_string_pretty(&res).expect("CKA result serialises") + "\n")
    }
}

impl Drop for Accumulator {
    fn drop(&mut self) {
        let _keep = KeepCurrentContext::new();
        // SAFETY: dropped once, here; never used afterwards.
        unsafe { ManuallyDrop::drop(&mut self.backend) };
    }
}

impl Accumulator {
    /// The shared part of `update` and `update_device`: check the arrays' shapes and layers, then run
    /// `push` (host or device memory) with the GIL released, and count the rows pushed.
    fn push_views(
        &mut self,
        py: Python<'_>,
        arrays: Vec<ArrayIn>,
        push: impl FnOnce(&mut Self, &[View], usize) -> Result<()>,
    ) -> PyResult<()> {
        let views = views(arrays, self.tokens).map_err(py_err)?;
        self.start_or_check(&views).map_err(py_err)?;
        let call = SameThread((&mut *self, push));
        py.allow_threads(move || {
            let (this, push) = call.get();
            let rows = views.first().map_or(0, |v| v.rows);
            push(&mut *this, &views, rows)?;
            this.seen += rows;
            Ok(())
        })
        .map_err(py_err)
    }

    /// The first chunk fixes the layers; later chunks must name the same ones in the same order (their
    /// widths and dtypes are checked by the accumulator).
    fn start_or_check(&mut self, views: &[View]) -> Result<()> {
        if self.state.is_none() {
            if !self.layers.is_empty() || self.seen > 0 {
                return Err(Error::invalid(
                    "finish() was already called on this accumulator",
                ));
            }
            let layers: Vec<LayerMeta> = views.iter().map(|v| v.meta.clone()).collect();
            self.state = Some(CkaAccumulator::new(
                &layers,
                self.spec,
                self.n_samples_hint,
            )?);
            self.layers = layers;
            return Ok(());
        }
        let names = |m: &mut dyn Iterator<Item = &str>| m.collect::<Vec<_>>().join(", ");
        let have = names(&mut views.iter().map(|v| v.meta.name.as_str()));
        let want = names(&mut self.layers.iter().map(|m| m.name.as_str()));
        if have != want {
            return Err(Error::invalid(format!(
                "{INPUT_NAME}: layers [{have}] do not match the first update's [{want}]"
            )));
        }
        Ok(())
    }
}

/// Fisher's optimal segmentation of a square similarity matrix → `sglp-segments/1` JSON.
#[pyfunction]
#[pyo3(signature = (layers, matrix, k, k_max, threshold, features, min_len))]
fn segment(
    py: Python<'_>,
    layers: Vec<String>,
    matrix: Vec<Vec<f64>>,
    k: String,
    k_max: usize,
    threshold: f64,
    features: &str,
    min_len: usize,
) -> PyResult<String> {
    let run = || -> Result<String> {
        let features = parse_enum("features", features)?;
        let k = k_choice(&k, k_max, threshold)?;
        let seg = py.allow_threads(|| segment_cka(&layers, &matrix, features, k, min_len))?;
        Ok(serde_json::to_string_pretty(&seg).expect("segments serialise") + "\n")
    };
    run().map_err(py_err)
}

/// The pruning decision from a CKA result and per-layer gradient norms: SGLP's segments and allocation
/// (`pruning::pipeline::segment_for_budget`, as `prune` does), then the layers of lowest gradient norm
/// under each segment's cap (`--selection gradnorm`). Returns the `sglp-prune-report/2` JSON (no model:
/// empty model fields, zero parameter counts).
#[pyfunction]
#[pyo3(signature = (cka_json, gradnorm, remove, allocation, k, k_max, threshold, features, min_len))]
fn plan(
    cka_json: &str,
    gradnorm: Vec<f64>,
    remove: usize,
    allocation: &str,
    k: String,
    k_max: usize,
    threshold: f64,
    features: &str,
    min_len: usize,
) -> PyResult<String> {
    let run = || -> Result<String> {
        let cka: CkaResult = serde_json::from_str(cka_json)
            .map_err(|e| Error::invalid(format!("not an sglp-cka/1 result: {e}")))?;
        let l = cka.layers.len();
        if gradnorm.len() != l {
            return Err(Error::invalid(format!(
                "gradnorm has {} values for {l} layers",
                gradnorm.len()
            )));
        }
        if let Some(i) = gradnorm.iter().position(|g| !g.is_finite()) {
            return Err(Error::invalid(format!(
                "gradnorm of layer '{}' is not finite",
                cka.layers[i]
            )));
        }
        let budget = Budget::Remove(remove).layers_to_remove(l)?;
        let opts = SglpOptions {
            features: parse_enum("features", features)?,
            k: k_choice(&k, k_max, threshold)?,
            min_len,
            allocation: parse_enum::<Allocation>("allocation", allocation)?,
            selection: Selection::Gradnorm,
            ..SglpOptions::preset(Method::SglpPaper)
        };
        let plan = plan_from_importance(&cka.layers, &cka.cka_matrix(), &gradnorm, budget, &opts)?;
        let report = PruneReport {
            format: REPORT_FORMAT.into(),
            model: String::new(),
            tokens: String::new(),
            calibration_sequences: 0,
            calibration_tokens_per_sequence: 0,
            layers: cka.layers.clone(),
            method: "sglp-paper".into(),
            features: opts.features,
            k: plan.segmentation.k,
            k_rule: k_rule(opts.k).into(),
            segments: plan.segments.clone(),
            loss_curve: (1..)
                .zip(plan.segmentation.loss_curve.iter().copied())
                .collect(),
            allocation: opts.allocation,
            removed_per_segment: plan.removed_per_segment.clone(),
            selection: opts.selection,
            subset_search: Vec::new(),
            greedy_steps: Vec::new(),
            gradnorm: Some(gradnorm.clone()),
            block_influence: None,
            single_removal_loss: None,
            calibration_loss: None,
            removed_layers: plan.removed_layers.clone(),
            kept: plan.kept.clone(),
            removed: plan.removed.clone(),
            params_before: 0,
            params_after: 0,
            eval_tokens: None,
            perplexity_before: None,
            perplexity_after: None,
            arch: None,
            accuracy_before: None,
            accuracy_after: None,
            timings: StageTimes::default(),
            warnings: plan.notes.clone(),
            cka,
        };
        Ok(serde_json::to_string_pretty(&report).expect("report serialises") + "\n")
    };
    run().map_err(py_err)
}

/// Write the pictures, `sglp-report.json` and the HTML page of a plan (its report JSON) into `out_dir`.
#[pyfunction]
fn write_plan_report(py: Python<'_>, report_json: &str, out_dir: PathBuf) -> PyResult<()> {
    let report: PruneReport = serde_json::from_str(report_json)
        .map_err(|e| py_err(Error::invalid(format!("not a plan report: {e}"))))?;
    py.allow_threads(|| write_report(&out_dir, &report))
        .map_err(py_err)
}

/// Write `text` to `path` atomically (temporary file, then rename), as the CLI writes its outputs.
#[pyfunction]
fn write_text(path: PathBuf, text: &str) -> PyResult<()> {
    sglp_engine::io::output::write_atomic(&path, text.as_bytes()).map_err(py_err)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Accumulator>()?;
    m.add_function(wrap_pyfunction!(segment, m)?)?;
    m.add_function(wrap_pyfunction!(plan, m)?)?;
    m.add_function(wrap_pyfunction!(write_plan_report, m)?)?;
    m.add_function(wrap_pyfunction!(write_text, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
