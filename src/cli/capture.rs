//! `sglp-engine capture`: every decoder layer's output hidden states on calibration tokens, written as the
//! safetensors input of `cka` (tensors `model.layers.{i}` `[sequences, tokens, hidden]` f32, metadata
//! `layers` = the names in order, comma-separated).

use crate::error::{Error, Result};
use crate::runtime::{Model, Tokens};
use std::collections::HashMap;
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
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
}

pub fn run(a: CaptureArgs) -> Result<()> {
    if a.batch_size == 0 {
        return Err(Error::invalid("--batch-size must be at least 1"));
    }
    let model = Model::load(&a.model)?;
    let tokens = Tokens::load_npy(&a.tokens)?;
    tokens.check_vocab(model.vocab_size(), &a.tokens)?;
    let (nl, h) = (model.num_layers(), model.hidden_size());
    let per_seq = tokens.len * h;
    let mut layers: Vec<Vec<f32>> = (0..nl)
        .map(|_| Vec::with_capacity(tokens.sequences * per_seq))
        .collect();
    let n_batches = tokens.sequences.div_ceil(a.batch_size);
    let bar = crate::progress::bar(n_batches as u64, "capture batches");
    for b in 0..n_batches {
        let batch = tokens.batch(b * a.batch_size, a.batch_size);
        model.forward(&batch, &[], &mut |i, hs| {
            if i >= 1 {
                layers[i - 1].extend_from_slice(hs);
            }
        })?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let names = model.layer_names();
    let shape = vec![tokens.sequences, tokens.len, h];
    let views = names
        .iter()
        .zip(&layers)
        .map(|(n, data)| {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                shape.clone(),
                bytemuck::cast_slice(data),
            )
            .map_err(|e| Error::layer(&a.out, n, format!("cannot build the tensor: {e}")))?;
            Ok((n.clone(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("layers".to_string(), names.join(","))]);
    let bytes = safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::format(&a.out, format!("cannot serialise: {e}")))?;
    crate::io::output::write_atomic(&a.out, &bytes)
}
