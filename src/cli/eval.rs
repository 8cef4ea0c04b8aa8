//! `sglp-engine eval`: perplexity = exp(mean next-token cross-entropy) of a checkpoint on a tokens file.

use super::common::{emit, positive, TextCut, TokenArgs};
use crate::error::Result;
use crate::pruning::calibration::perplexity;
use crate::runtime::Model;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Hugging Face checkpoint directory.
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub tokens: TokenArgs,
    #[command(flatten)]
    pub cut: TextCut,
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
    let input = a.tokens.required(&a.cut, "eval")?;
    let t0 = Instant::now();
    let model = Model::load(&a.model)?;
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
        emit(
            Some(out),
            &(serde_json::to_string_pretty(&j).expect("serialises") + "\n"),
        )?;
    }
    Ok(())
}
