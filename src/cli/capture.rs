//! `sglp-engine capture`: every decoder layer's output hidden states on calibration tokens, written as the
//! safetensors input of `cka` (tensors `model.layers.{i}` `[sequences, tokens, hidden]` f32, metadata
//! `layers` = the names in order, comma-separated).

use crate::error::{Error, Result};
use crate::io::safetensors::StreamedSafetensors;
use crate::runtime::Model;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct CaptureArgs {
    /// Hugging Face checkpoint directory (config.json + safetensors) of a llama, mistral or qwen2 model.
    #[arg(long)]
    pub model: PathBuf,
    /// Calibration tokens: .npy [sequences, tokens], int32 or int64.
    #[arg(long)]
    pub tokens: PathBuf,
    /// Output .safetensors file.
    #[arg(long)]
    pub out: PathBuf,
    /// Sequences per forward pass.
    /// Sequences per forward (+ backward) pass.
    #[arg(long, default_value_t = crate::pruning::pipeline::DEFAULT_FORWARD_BATCH)]
    pub batch_size: usize,
}

pub fn run(a: CaptureArgs) -> Result<()> {
    if a.batch_size == 0 {
        return Err(Error::invalid("--batch-size must be at least 1"));
    }
    let model = Model::load(&a.model)?;
    let tokens = model.load_tokens(&a.tokens)?;
    let names = model.layer_names();
    let mut out = StreamedSafetensors::create(
        &a.out,
        &names,
        &[tokens.sequences, tokens.len, model.hidden_size()],
    )?;
    let n_batches = tokens.sequences.div_ceil(a.batch_size);
    let bar = crate::progress::bar(n_batches as u64, "capture batches");
    for b in 0..n_batches {
        let first = b * a.batch_size;
        let batch = tokens.batch(first, a.batch_size);
        let mut result = Ok(());
        model.forward(&batch, &[], &mut |i, hs| {
            if i >= 1 && result.is_ok() {
                result = out.write_rows(i - 1, first, hs);
            }
        })?;
        result?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    out.finish()
}
