//! What several subcommands share: the input, estimator and segmentation arguments, and writing a
//! result to a file or stdout.

use super::notes;
use crate::error::{Error, Result};
use crate::io::output::write_atomic;
use crate::io::{ActivationSet, ActivationSource, ReadOptions, TokenMode};
use crate::pruning::pipeline::DEFAULT_FORWARD_BATCH;
use crate::runtime::ops::Matmul;
use crate::runtime::{CaptureSource, Model, TextSpec, TokenInput};
use crate::segmentation::{segment_cka, Features, KChoice, SegmentResult};
use crate::similarity::device::{open_backend, DeviceChoice};
use crate::similarity::{
    compute_cka, Backend, CkaResult, CkaSpec, Estimator, Kernel, Precision, Route,
};
use std::path::{Path, PathBuf};

/// Calibration tokens of a checkpoint: a `.npy` array of ids, or text tokenised with the checkpoint's own
/// `tokenizer.json` (how text is cut: [`TextCut`]).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TokenArgs {
    /// Calibration tokens: `.npy` [sequences, tokens], int32 or int64.
    #[arg(long, conflicts_with = "text")]
    pub tokens: Option<PathBuf>,
    /// Calibration text instead of tokens: plain UTF-8 text (one document) or JSON lines (`.jsonl`, one
    /// document per line), tokenised with the checkpoint's own tokenizer.json and cut into --seq-len
    /// sequences.
    #[arg(long)]
    pub text: Option<PathBuf>,
}

/// A CNN instead of a decoder: `--model` is then a PyTorch `state_dict` saved as safetensors, and the
/// calibration data are images.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CnnArgs {
    /// CNN architecture of --model (a `state_dict` in safetensors): cifar-resnet{20,32,44,56,110},
    /// resnet{18,34,50,101,152} (torchvision), vgg{11,13,16,19}[_bn] (torchvision or CIFAR classifier).
    #[arg(long)]
    pub arch: Option<String>,
    /// With --arch: calibration images, float32 `.npy` [N, C, H, W], already normalised.
    #[arg(long, requires = "arch")]
    pub images: Option<PathBuf>,
    /// With --arch: their class labels, int64 (or int32) `.npy` [N].
    #[arg(long, requires = "arch")]
    pub labels: Option<PathBuf>,
}

impl CnnArgs {
    /// The calibration images and labels of `command` with --arch (both required).
    pub fn image_files(&self, command: &str) -> Result<crate::pruning::cnn::ImageFiles> {
        match (&self.images, &self.labels) {
            (Some(i), Some(l)) => Ok(crate::pruning::cnn::ImageFiles {
                images: i.clone(),
                labels: l.clone(),
            }),
            _ => Err(Error::invalid(format!(
                "{command} --arch needs --images X.npy and --labels Y.npy"
            ))),
        }
    }
}

/// Held-out images for a CNN (`prune --arch`): top-1 accuracy before and after.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct EvalImageArgs {
    /// With --arch: held-out images (float32 `.npy` [N, C, H, W]) for the accuracy before and after.
    #[arg(long, requires_all = ["arch", "eval_labels"])]
    pub eval_images: Option<PathBuf>,
    /// With --arch: their labels (`.npy` [N]).
    #[arg(long, requires = "eval_images")]
    pub eval_labels: Option<PathBuf>,
}

impl EvalImageArgs {
    pub fn files(&self) -> Option<crate::pruning::cnn::ImageFiles> {
        Some(crate::pruning::cnn::ImageFiles {
            images: self.eval_images.clone()?,
            labels: self.eval_labels.clone()?,
        })
    }
}

/// Held-out tokens (`prune`, `compare`): `--eval-tokens FILE.npy` or `--eval-text FILE`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct EvalTokenArgs {
    /// Held-out tokens (`.npy` [sequences, tokens]) for the perplexity before and after.
    #[arg(long, conflicts_with = "eval_text")]
    pub eval_tokens: Option<PathBuf>,
    /// Held-out text instead (as --text).
    #[arg(long)]
    pub eval_text: Option<PathBuf>,
}

/// How `--text` (and `--eval-text`) becomes sequences.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TextCut {
    /// With --text: the string field of each JSON-lines record (default `text`; makes the file JSON
    /// lines whatever its extension).
    #[arg(long)]
    pub text_field: Option<String>,
    /// With --text: tokens per sequence (default 128).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// With --text: at most this many sequences (default: all the text gives).
    #[arg(long)]
    pub max_sequences: Option<usize>,
}

/// Tokens per sequence when `--seq-len` is not given.
pub const DEFAULT_SEQ_LEN: usize = 128;

impl TextCut {
    fn spec(&self, path: &Path) -> TokenInput {
        TokenInput::Text(TextSpec {
            path: path.to_path_buf(),
            field: self.text_field.clone(),
            seq_len: self.seq_len.unwrap_or(DEFAULT_SEQ_LEN),
            max_sequences: self.max_sequences,
        })
    }

    fn given(&self) -> Option<&'static str> {
        if self.text_field.is_some() {
            Some("--text-field")
        } else if self.seq_len.is_some() {
            Some("--seq-len")
        } else if self.max_sequences.is_some() {
            Some("--max-sequences")
        } else {
            None
        }
    }

    /// Refuse the text flags when no text is read.
    pub fn check_used(&self, text_given: bool) -> Result<()> {
        match self.given() {
            Some(flag) if !text_given => Err(Error::invalid(format!(
                "{flag} applies to --text / --eval-text, which are not given"
            ))),
            _ => Ok(()),
        }
    }
}

impl TokenArgs {
    /// The calibration tokens, if any were given.
    pub fn input(&self, cut: &TextCut) -> Option<TokenInput> {
        match (&self.tokens, &self.text) {
            (Some(p), _) => Some(TokenInput::Npy(p.clone())),
            (None, Some(t)) => Some(cut.spec(t)),
            (None, None) => None,
        }
    }

    /// Refuses tokens or text where `what` (`eval --arch`, …) takes images.
    pub fn refuse(&self, what: &str) -> Result<()> {
        if self.tokens.is_some() || self.text.is_some() {
            return Err(Error::invalid(format!(
                "{what} takes --images/--labels, not tokens or text"
            )));
        }
        Ok(())
    }

    /// The calibration tokens, which `who` needs.
    pub fn required(&self, cut: &TextCut, who: &str) -> Result<TokenInput> {
        cut.check_used(self.text.is_some())?;
        self.input(cut).ok_or_else(|| {
            Error::invalid(format!(
                "{who} needs calibration tokens: --tokens FILE.npy or --text FILE"
            ))
        })
    }
}

impl EvalTokenArgs {
    pub fn input(&self, cut: &TextCut) -> Option<TokenInput> {
        match (&self.eval_tokens, &self.eval_text) {
            (Some(p), _) => Some(TokenInput::Npy(p.clone())),
            (None, Some(t)) => Some(cut.spec(t)),
            (None, None) => None,
        }
    }
}

/// Where the activations come from, and which layers to keep.
#[derive(clap::Args, Debug, Clone)]
pub struct InputArgs {
    /// Activation file: a `.safetensors` file or a directory of `.npy` files. Repeat for consecutive
    /// shards of one calibration set.
    #[arg(long = "input", short = 'i', conflicts_with = "model")]
    pub inputs: Vec<PathBuf>,
    /// A Hugging Face LLaMA/Mistral/Qwen2 checkpoint directory: capture its decoder layers' outputs on
    /// --tokens or --text, batch by batch, without writing them. With --arch: a CNN's `state_dict`
    /// (safetensors), its blocks' outputs on --images captured the same way.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub tokens: TokenArgs,
    #[command(flatten)]
    pub cnn: CnnArgs,
    #[command(flatten)]
    pub cut: TextCut,
    /// How 3-D hidden states [sequences, tokens, hidden] become matrices: `samples` (every token is a
    /// sample) or `features` (tokens flattened into features).
    #[arg(long, value_enum, default_value_t = TokenMode::Samples)]
    pub token_mode: TokenMode,
    /// With --model: sequences (images with --arch) per forward pass (default 4).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Keep only the layers whose name matches this regular expression (activation files only).
    #[arg(long)]
    pub layers: Option<regex::Regex>,
}

impl InputArgs {
    /// Activation files: refuse the checkpoint-only flags.
    fn check_files_only(&self) -> Result<()> {
        let model_flag = if self.tokens.tokens.is_some() {
            Some("--tokens")
        } else if self.cnn.arch.is_some() {
            Some("--arch")
        } else if self.tokens.text.is_some() {
            Some("--text")
        } else if self.batch.is_some() {
            Some("--batch")
        } else {
            self.cut.given()
        };
        match model_flag {
            Some(f) => Err(Error::invalid(format!(
                "{f} applies to --model (a checkpoint), not to activation files"
            ))),
            None => Ok(()),
        }
    }

    pub fn open(&self) -> Result<ActivationSet> {
        if self.inputs.is_empty() {
            return Err(Error::invalid(
                "no activations given: pass --input FILE (repeat for shards) or --model DIR --tokens FILE",
            ));
        }
        self.check_files_only()?;
        ActivationSet::open(
            &self.inputs,
            &ReadOptions {
                tokens: self.token_mode,
                layers: self.layers.clone(),
            },
        )
    }

    /// Run `f` on the chosen source: activation files, or a model captured on tokens (a decoder's passes on
    /// `device`).
    pub fn with_source<T>(
        &self,
        device: DeviceChoice,
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
        let batch = positive(self.batch.unwrap_or(DEFAULT_FORWARD_BATCH), "--batch")?;
        if let Some(arch) = &self.cnn.arch {
            self.tokens.refuse("--arch")?;
            let model = crate::runtime::cnn::CnnModel::load(dir, arch)?;
            let images = self.cnn.image_files("--model")?.load(&model)?;
            let mut capture =
                CaptureSource::for_model(&model, &images, dir, batch, self.token_mode)?;
            return f(&mut capture);
        }
        let input = self.tokens.required(&self.cut, "--model")?;
        let model = load_decoder(dir, device)?;
        let tokens = model.load_token_input(&input)?;
        let mut capture = CaptureSource::new(&model, &tokens, batch, self.token_mode);
        f(&mut capture)
    }
}

/// `--matmul` (global, like `-q`/`-v`): set once by [`super::run`], read where a runtime device opens.
static MATMUL_F32: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn set_matmul(m: Matmul) {
    MATMUL_F32.store(m == Matmul::F32, std::sync::atomic::Ordering::Relaxed);
}

fn matmul() -> Matmul {
    if MATMUL_F32.load(std::sync::atomic::Ordering::Relaxed) {
        Matmul::F32
    } else {
        Matmul::Bf16
    }
}

/// A decoder checkpoint whose passes run on `device` (`--device`, matrix products as `--matmul` says);
/// a fallback from `auto` to the CPU is noted once per machine.
pub fn load_decoder(dir: &std::path::Path, device: DeviceChoice) -> Result<Model> {
    let mut model = Model::load(dir)?;
    warn_unused_tensors(&model, dir);
    if device != DeviceChoice::Cpu {
        let (runner, note) = crate::runtime::device::open_runtime(device, matmul())?;
        if let Some(n) = note {
            notes::device_note(&n);
        }
        model.set_device(runner);
    }
    Ok(model)
}

/// A warning when the checkpoint holds tensors the decoder does not read ([`Model::unused_tensors`]): the
/// results would silently ignore part of the model.
pub fn warn_unused_tensors(model: &Model, dir: &std::path::Path) {
    let unused = model.unused_tensors();
    if let Some(first) = unused.first() {
        notes::warn(&format!(
            "{}: {} tensor(s) of the checkpoint are not read by the {} decoder (first: '{first}'), so \
             every result ignores them; does config.json's model_type describe these weights?",
            dir.display(),
            unused.len(),
            model.config.model_type
        ));
    }
}

/// `--device cuda[:N]` with `--arch`: refused (the CNN runtime runs on the CPU; `auto` means the CPU).
pub fn cnn_on_cpu(device: DeviceChoice) -> Result<()> {
    match device {
        DeviceChoice::Cuda(_) => Err(Error::invalid(format!(
            "--device {device}: the CNN runtime (--arch) runs on the CPU only; use --device cpu or auto"
        ))),
        _ => Ok(()),
    }
}

/// `value` if it is at least 1, else a one-line error naming `flag`.
pub fn positive(value: usize, flag: &str) -> Result<usize> {
    if value == 0 {
        return Err(Error::invalid(format!("{flag} must be at least 1")));
    }
    Ok(value)
}

/// The kernel of `--kernel`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelKind {
    Linear,
    Rbf,
}

/// `--k`: a number of segments or a rule that picks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KArg {
    Fixed(usize),
    Auto,
    Elbow,
}

impl std::str::FromStr for KArg {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(KArg::Auto),
            "elbow" => Ok(KArg::Elbow),
            _ => match s.parse::<usize>() {
                Ok(k) if k >= 1 => Ok(KArg::Fixed(k)),
                _ => Err(format!(
                    "'{s}' is not a number of segments (at least 1), 'auto' or 'elbow'"
                )),
            },
        }
    }
}

impl KArg {
    pub fn choice(self, k_max: usize, threshold: f64) -> KChoice {
        match self {
            KArg::Fixed(k) => KChoice::Fixed(k),
            KArg::Auto => KChoice::Auto { k_max, threshold },
            KArg::Elbow => KChoice::Elbow { k_max },
        }
    }
}

/// The estimator and where it runs.
#[derive(clap::Args, Debug, Clone)]
pub struct EstimatorArgs {
    /// `unbiased`: minibatch HSIC₁ (Song et al. 2012) averaged over batches; `biased`: HSIC₀ over all
    /// samples (Kornblith et al. 2019).
    #[arg(long, value_enum, default_value_t = Estimator::Unbiased)]
    pub estimator: Estimator,
    /// Samples per batch of the unbiased estimator (at least 4).
    #[arg(long, default_value_t = 256)]
    pub cka_batch: usize,
    /// Kernel: `linear` or `rbf`.
    #[arg(long, value_enum, default_value_t = KernelKind::Linear)]
    pub kernel: KernelKind,
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
    /// Arithmetic of the CPU's linear Grams: `f32` (column means subtracted in f64 first, the GEMM in
    /// f32, centring and sums in f64; CKA within 1e-6 of f64) or `f64`. The GPU computes its own way.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
}

impl EstimatorArgs {
    pub fn spec(&self) -> CkaSpec {
        CkaSpec {
            estimator: self.estimator,
            kernel: match self.kernel {
                KernelKind::Rbf => Kernel::Rbf {
                    threshold: self.rbf_threshold,
                },
                KernelKind::Linear => Kernel::Linear,
            },
            batch_size: self.cka_batch,
            route: self.route,
        }
    }

    /// Run the CKA over `source` on the chosen device; notes and warnings go to stderr.
    pub fn compute(&self, source: &mut dyn ActivationSource) -> Result<CkaResult> {
        let mut backend = self.backend()?;
        let res = compute_cka(source, &self.spec(), backend.as_mut())?;
        for w in &res.warnings {
            notes::warn(w);
        }
        Ok(res)
    }

    /// The compute backend of `--device`; a fallback from `auto` is noted once per machine.
    pub fn backend(&self) -> Result<Box<dyn Backend>> {
        let (mut backend, note) = open_backend(self.device, self.threads)?;
        backend.set_precision(self.precision);
        if let Some(n) = note {
            notes::device_note(&n);
        }
        Ok(backend)
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
    pub k: KArg,
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
    pub fn k_choice(&self) -> KChoice {
        self.k.choice(self.k_max, self.threshold)
    }
}

/// Segment the layers and write the `sglp-segments/1` JSON to `out` (or stdout).
pub fn segment_and_write(
    layers: &[String],
    cka: &[Vec<f64>],
    opts: &SegmentOpts,
    out: Option<&Path>,
) -> Result<SegmentResult> {
    let seg = segment_cka(layers, cka, opts.features, opts.k_choice(), opts.min_len)?;
    for w in &seg.warnings {
        notes::warn(w);
    }
    emit_json(out, &seg)?;
    Ok(seg)
}

/// Write `text` atomically to `out`, or to stdout.
/// `value` as pretty JSON and a newline, through [`emit`].
pub(crate) fn emit_json(out: Option<&Path>, value: &impl serde::Serialize) -> Result<()> {
    emit(
        out,
        &(serde_json::to_string_pretty(value).expect("serialises") + "\n"),
    )
}

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
