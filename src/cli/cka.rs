//! `sglp-engine cka` and `sglp-engine run`.

use super::segment::{segment_and_write, SegmentOpts};
use crate::error::{Error, Result};
use crate::io::output::write_atomic;
use crate::io::{ActivationSet, ActivationSource, ReadOptions, TokenMode};
use crate::runtime::{CaptureSource, Model};
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

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CkaFormat {
    Json,
    Csv,
}

#[derive(clap::Args, Debug)]
pub struct CkaArgs {
    #[command(flatten)]
    pub input: InputArgs,
    #[command(flatten)]
    pub est: EstimatorArgs,
    /// Output file (default: stdout).
    #[arg(long, short = 'o')]
    pub out: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = CkaFormat::Json)]
    pub format: CkaFormat,
}

pub fn run_cka(a: CkaArgs) -> Result<()> {
    let res = a.input.with_source(|src| a.est.compute(src))?;
    let text = match a.format {
        CkaFormat::Json => {
            serde_json::to_string_pretty(&res).expect("CKA result serialises") + "\n"
        }
        CkaFormat::Csv => res.to_csv(),
    };
    emit(a.out.as_deref(), &text)
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

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub input: InputArgs,
    #[command(flatten)]
    pub est: EstimatorArgs,
    #[command(flatten)]
    pub seg: SegmentOpts,
    /// Directory for `cka.json` and `segments.json` (created if missing).
    #[arg(long, default_value = "sglp-out")]
    pub out_dir: PathBuf,
}

pub fn run_pipeline(a: RunArgs) -> Result<()> {
    let res = a.input.with_source(|src| a.est.compute(src))?;
    std::fs::create_dir_all(&a.out_dir).map_err(|e| Error::io(&a.out_dir, e))?;
    let cka_path = a.out_dir.join("cka.json");
    write_atomic(
        &cka_path,
        (serde_json::to_string_pretty(&res).expect("serialises") + "\n").as_bytes(),
    )?;
    let seg = segment_and_write(
        &res.layers,
        &res.cka_matrix(),
        &a.seg,
        Some(&a.out_dir.join("segments.json")),
    )?;
    println!(
        "{} layers, {} samples in {} batch(es), {:?} CKA on {}",
        res.layers.len(),
        res.n_samples,
        res.n_batches,
        res.estimator,
        res.backend
    );
    let curve: Vec<String> = seg.loss_curve.iter().map(|v| format!("{v:.4}")).collect();
    println!("segmentation loss L(k), k = 1..: {}", curve.join(" "));
    println!("k = {} segments (loss {:.6}):", seg.k, seg.loss);
    for (s, names) in seg.segments.iter().zip(&seg.segment_layers) {
        println!("  [{:>3}, {:>3}]  {}", s[0], s[1], names.join(" "));
    }
    println!(
        "wrote {} and {}",
        cka_path.display(),
        a.out_dir.join("segments.json").display()
    );
    Ok(())
}
