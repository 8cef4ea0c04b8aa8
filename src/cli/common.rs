//! What several subcommands share: the input, estimator and segmentation arguments, and writing a
//! result to a file or stdout.

use crate::error::{Error, Result};
use crate::io::output::write_atomic;
use crate::io::{ActivationSet, ActivationSource, ReadOptions, TokenMode};
use crate::runtime::{CaptureSource, Model};
use crate::segmentation::{segment_cka, Features, KChoice, SegmentResult};
use crate::similarity::device::{open_backend, DeviceChoice};
use crate::similarity::{compute_cka, CkaResult, CkaSpec, Estimator, Kernel, Route};
use std::path::{Path, PathBuf};

/// Where the activations come from, and which layers to keep.
#[derive(clap::Args, Debug, Clone)]
pub struct InputArgs {
    /// Activation file: a `.safetensors` file or a directory of `.npy` files. Repeat for consecutive
    /// shards of one calibration set.
    #[arg(long = "input", short = 'i', conflicts_with = "model")]
    pub inputs: Vec<PathBuf>,
    /// A Hugging Face LLaMA/Mistral/Qwen2 checkpoint directory: capture its decoder layers' outputs on
    /// `--tokens FILE`, batch by batch, without writing them.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// With `--input`: how 3-D tensors [sequences, tokens, hidden] become matrices, `samples` (every
    /// token is a sample; default) or `features` (tokens flattened into features). With `--model`: the
    /// calibration tokens (`.npy`, [sequences, tokens], int32/int64).
    #[arg(long)]
    pub tokens: Option<String>,
    /// With `--model`: `samples` or `features`, as `--tokens` does for files.
    #[arg(long, value_enum)]
    pub token_mode: Option<TokenMode>,
    /// With `--model`: sequences per forward pass.
    #[arg(long, default_value_t = crate::pruning::pipeline::DEFAULT_FORWARD_BATCH)]
    pub capture_batch: usize,
    /// Keep only the layers whose name matches this regular expression (files only).
    #[arg(long)]
    pub layers: Option<String>,
}

impl InputArgs {
    /// How 3-D tensors become matrices.
    pub fn token_mode(&self) -> Result<TokenMode> {
        if self.model.is_some() {
            return Ok(self.token_mode.unwrap_or_default());
        }
        match (self.tokens.as_deref(), self.token_mode) {
            (None, m) => Ok(m.unwrap_or_default()),
            (Some("samples"), _) => Ok(TokenMode::Samples),
            (Some("features"), _) => Ok(TokenMode::Features),
            (Some(other), _) => Err(Error::invalid(format!(
                "--tokens is 'samples' or 'features' for activation files (got '{other}'; a tokens file needs --model)"
            ))),
        }
    }

    pub fn open(&self) -> Result<ActivationSet> {
        if self.inputs.is_empty() {
            return Err(Error::invalid(
                "no activations given: pass --input FILE (repeat for shards)",
            ));
        }
        let layers = match &self.layers {
            Some(r) => {
                Some(regex::Regex::new(r).map_err(|e| Error::invalid(format!("--layers: {e}")))?)
            }
            None => None,
        };
        ActivationSet::open(
            &self.inputs,
            &ReadOptions {
                tokens: self.token_mode()?,
                layers,
            },
        )
    }

    /// Run `f` on the chosen source: activation files, or a model captured on tokens.
    pub fn with_source<T>(
        &self,
        f: impl FnOnce(&mut dyn ActivationSource) -> Result<T>,
    ) -> Result<T> {
        let Some(dir) = &self.model else {
            return f(&mut self.open()?);
        };
        if self.layers.is_some() {
            return Err(Error::invalid(
                "--layers applies to activation files, not to --model",
            ));
        }
        let tokens_path = self.tokens.as_deref().map(PathBuf::from).ok_or_else(|| {
            Error::invalid("--model needs --tokens FILE (.npy calibration tokens)")
        })?;
        let model = Model::load(dir)?;
        let tokens = model.load_tokens(&tokens_path)?;
        let mut capture =
            CaptureSource::new(&model, &tokens, self.capture_batch, self.token_mode()?);
        f(&mut capture)
    }
}

/// The estimator and where it runs.
#[derive(clap::Args, Debug, Clone)]
pub struct EstimatorArgs {
    /// `unbiased`: minibatch HSIC₁ (Song et al. 2012) averaged over batches; `biased`: HSIC₀ over all
    /// samples (Kornblith et al. 2019).
    #[arg(long, value_enum, default_value_t = Estimator::Unbiased)]
    pub estimator: Estimator,
    /// Samples per batch for the unbiased estimator (at least 4).
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Kernel: `linear` or `rbf`.
    #[arg(long, default_value = "linear", value_parser = ["linear", "rbf"])]
    pub kernel: String,
    /// RBF bandwidth t: K = exp(−d²/(2 t² median(d²))).
    #[arg(long, default_value_t = 1.0)]
    pub rbf_threshold: f64,
    /// Linear kernel formulation: n×n Grams or D×D feature products (`auto` picks the cheaper).
    #[arg(long, value_enum, default_value_t = Route::Auto)]
    pub route: Route,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// CPU threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

impl EstimatorArgs {
    pub fn spec(&self) -> CkaSpec {
        CkaSpec {
            estimator: self.estimator,
            kernel: match self.kernel.as_str() {
                "rbf" => Kernel::Rbf {
                    threshold: self.rbf_threshold,
                },
                _ => Kernel::Linear,
            },
            batch_size: self.batch_size,
            route: self.route,
        }
    }

    /// Run the CKA over `source` on the chosen device; notes and warnings go to stderr.
    pub fn compute(&self, source: &mut dyn ActivationSource) -> Result<CkaResult> {
        let (mut backend, note) = open_backend(self.device, self.threads)?;
        if let Some(n) = note {
            eprintln!("{n}");
        }
        let res = compute_cka(source, &self.spec(), backend.as_mut())?;
        for w in &res.warnings {
            eprintln!("warning: {w}");
        }
        Ok(res)
    }
}

/// Segmentation options of `segment` and `run` (`prune` and `compare` take the method's, `SglpArgs`).
#[derive(clap::Args, Debug, Clone)]
pub struct SegmentOpts {
    /// Per-layer feature: `colsum` (x_l = Σ_m CKA[m][l], as SGLP) or `rows` (each layer's CKA row).
    #[arg(long, value_enum, default_value_t = Features::ColSum)]
    pub features: Features,
    /// Number of segments, `auto` (the relative-gain rule over k = 1..k-max) or `elbow` (the knee of the
    /// segmentation loss curve).
    #[arg(long, default_value = "auto")]
    pub k: String,
    /// Largest k tried by `--k auto|elbow` (and the length of the loss curve).
    #[arg(long, default_value_t = 8)]
    pub k_max: usize,
    /// `--k auto`: the largest k+1 whose relative loss gain r_k = (L(k) − L(k+1))/L(k) exceeds this.
    #[arg(long, default_value_t = 0.05)]
    pub threshold: f64,
    /// Minimum layers per segment.
    #[arg(long, default_value_t = 1)]
    pub min_len: usize,
}

impl SegmentOpts {
    pub fn k_choice(&self) -> Result<KChoice> {
        match self.k.as_str() {
            "auto" => Ok(KChoice::Auto {
                k_max: self.k_max,
                threshold: self.threshold,
            }),
            "elbow" => Ok(KChoice::Elbow { k_max: self.k_max }),
            s => s.parse().map(KChoice::Fixed).map_err(|_| {
                Error::invalid(format!(
                    "--k must be a number, 'auto' or 'elbow' (got '{s}')"
                ))
            }),
        }
    }
}

/// Segment the layers and write the `sglp-segments/1` JSON to `out` (or stdout).
pub fn segment_and_write(
    layers: &[String],
    cka: &[Vec<f64>],
    opts: &SegmentOpts,
    out: Option<&Path>,
) -> Result<SegmentResult> {
    let seg = segment_cka(layers, cka, opts.features, opts.k_choice()?, opts.min_len)?;
    emit(
        out,
        &(serde_json::to_string_pretty(&seg).expect("serialises") + "\n"),
    )?;
    Ok(seg)
}

/// Write `text` atomically to `out`, or to stdout.
pub(crate) fn emit(out: Option<&Path>, text: &str) -> Result<()> {
    match out {
        Some(p) => write_atomic(p, text.as_bytes()),
        None => {
            use std::io::Write;
            let mut o = std::io::stdout().lock();
            o.write_all(text.as_bytes())
                .map_err(|e| Error::io("<stdout>", e))
        }
    }
}
