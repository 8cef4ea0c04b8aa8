//! `sglp-engine eval`: perplexity = exp(mean next-token cross-entropy) of a checkpoint on a tokens file.

use super::common::{emit_json, load_decoder, positive, CnnArgs, TextCut, TokenArgs};
use crate::error::Result;
use crate::pruning::calibration::perplexity;
use crate::runtime::cnn::CnnModel;
use crate::similarity::device::DeviceChoice;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Hugging Face checkpoint directory; with --arch, a CNN's `state_dict` (safetensors).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub tokens: TokenArgs,
    #[command(flatten)]
    pub cnn: CnnArgs,
    #[command(flatten)]
    pub cut: TextCut,
    /// Where the model runs: `auto`, `cpu`, `cuda` or `cuda:N` (a CNN, --arch, runs on the CPU).
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = crate::pruning::pipeline::DEFAULT_FORWARD_BATCH)]
    pub batch: usize,
    /// Also write the result as JSON here.
    #[arg(long, short = 'o')]
    pub out: Option<PathBuf>,
}

#[derive(serde::Serialize)]
struct EvalJson<'a> {
    format: &'a str,
    model: String,
    tokens: String,
    sequences: usize,
    tokens_per_sequence: usize,
    predicted_tokens: usize,
    loss: f64,
    perplexity: f64,
    seconds: f64,
}

pub fn run(a: EvalArgs) -> Result<()> {
    let batch_size = positive(a.batch, "--batch")?;
    if let Some(arch) = &a.cnn.arch {
        super::common::cnn_on_cpu(a.device)?;
        return run_cnn(&a, arch, batch_size);
    }
    let input = a.tokens.required(&a.cut, "eval")?;
    let t0 = Instant::now();
    let model = load_decoder(&a.model, a.device)?;
    let tokens = model.load_token_input(&input)?;
    let p = perplexity(&model, &tokens, batch_size, &[])?;
    let seconds = t0.elapsed().as_secs_f64();
    println!(
        "perplexity {:.6} (mean cross-entropy {:.6} over {} predicted tokens, {} × {}) in {:.2}s",
        p.perplexity, p.loss, p.predicted_tokens, tokens.sequences, tokens.len, seconds
    );
    if let Some(out) = &a.out {
        let j = EvalJson {
            format: "sglp-eval/1",
            model: a.model.display().to_string(),
            tokens: input.path().display().to_string(),
            sequences: tokens.sequences,
            tokens_per_sequence: tokens.len,
            predicted_tokens: p.predicted_tokens,
            loss: p.loss,
            perplexity: p.perplexity,
            seconds,
        };
        emit_json(Some(out), &j)?;
    }
    Ok(())
}

/// `eval --arch`: top-1 accuracy and mean cross-entropy of a CNN on labelled images.
fn run_cnn(a: &EvalArgs, arch: &str, batch_size: usize) -> Result<()> {
    a.tokens.refuse("eval --arch")?;
    let files = a.cnn.image_files("eval")?;
    let t0 = Instant::now();
    let model = CnnModel::load(&a.model, arch)?;
    let images = files.load(&model)?;
    let (acc, loss) = crate::pruning::cnn::accuracy(&model, &images, batch_size, &[])?;
    let seconds = t0.elapsed().as_secs_f64();
    println!(
        "top-1 accuracy {:.4} (mean cross-entropy {loss:.6} over {} images) in {seconds:.2}s",
        acc, images.n
    );
    if let Some(out) = &a.out {
        let j = serde_json::json!({
            "format": "sglp-eval/1",
            "model": a.model.display().to_string(),
            "arch": arch,
            "images": files.images.display().to_string(),
            "labels": files.labels.display().to_string(),
            "n_images": images.n,
            "accuracy": acc,
            "loss": loss,
            "seconds": seconds,
        });
        emit_json(Some(out), &j)?;
    }
    Ok(())
}
