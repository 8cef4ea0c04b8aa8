//! `sglp-engine gradnorm`: per-decoder-layer gradient norms (GradNorm importance) of a checkpoint on
//! calibration tokens, with the engine's own runtime.

use super::common::{load_decoder, positive, CnnArgs, TextCut, TokenArgs};
use crate::error::Result;
use crate::runtime::cnn::CnnModel;
use crate::similarity::device::DeviceChoice;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct GradnormArgs {
    /// Hugging Face checkpoint directory (config.json + safetensors) of a llama, mistral or qwen2 model;
    /// with --arch, a CNN's `state_dict` (safetensors).
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
    /// Sequences (images with --arch) per forward + backward pass.
    #[arg(long, default_value_t = crate::pruning::pipeline::DEFAULT_FORWARD_BATCH)]
    pub batch: usize,
    /// Output JSON.
    #[arg(long)]
    pub out: PathBuf,
    /// Record the wall time of every batch's forward + backward in the JSON (`timing`) and on stderr.
    #[arg(long)]
    pub timing: bool,
}

pub fn run(a: GradnormArgs) -> Result<()> {
    let batch_size = positive(a.batch, "--batch")?;
    if a.cnn.arch.is_some() {
        super::common::cnn_on_cpu(a.device)?;
        return run_cnn(&a, batch_size);
    }
    let input = a.tokens.required(&a.cut, "gradnorm")?;
    let model = load_decoder(&a.model, a.device)?;
    let tokens = model.load_token_input(&input)?;
    // load_tokens guarantees at least one sequence, so at least one batch.
    let n_batches = tokens.sequences.div_ceil(batch_size);
    let nl = model.num_layers();
    let (mut per_layer, mut loss) = (vec![0f64; nl], 0f64);
    let (mut embed, mut norm, mut head) = (0f64, 0f64, 0f64);
    let mut seconds = Vec::with_capacity(n_batches);
    let bar = crate::progress::bar(n_batches as u64, "gradnorm batches");
    for b in 0..n_batches {
        let batch = tokens.batch(b * batch_size, batch_size);
        let t0 = Instant::now();
        let g = model.grad_norms(&batch, &[])?;
        let dt = t0.elapsed().as_secs_f64();
        if a.timing {
            bar.suspend(|| eprintln!("batch {b}: forward+backward {dt:.3} s"));
        }
        seconds.push(dt);
        for (s, v) in per_layer.iter_mut().zip(&g.per_layer) {
            *s += v;
        }
        loss += g.loss;
        embed += g.embed_tokens;
        norm += g.norm;
        head += g.lm_head.unwrap_or(0.0);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let nb = n_batches as f64;
    let mut extra = serde_json::json!({ "embed_tokens": embed / nb, "norm": norm / nb });
    // Tied embeddings: lm_head is embed_tokens, whose norm already holds both gradients; no lm_head key.
    if !model.config.tie_word_embeddings {
        extra["lm_head"] = (head / nb).into();
    }
    let mut out = serde_json::json!({
        "format": "sglp-gradnorm/1",
        "model": a.model.display().to_string(),
        "tokens": input.path().display().to_string(),
        "sequences": tokens.sequences,
        "tokens_per_sequence": tokens.len,
        "batch_size": batch_size,
        "batches": n_batches,
        "tie_word_embeddings": model.config.tie_word_embeddings,
        "layers": model.layer_names(),
        "gradnorm": per_layer.iter().map(|s| s / nb).collect::<Vec<_>>(),
        "loss": loss / nb,
        "extra": extra,
    });
    if a.timing {
        out["timing"] = serde_json::json!({ "forward_backward_s": seconds });
    }
    let text = serde_json::to_string_pretty(&out).expect("JSON of plain values");
    crate::io::output::write_atomic(&a.out, text.as_bytes())
}

/// `gradnorm --arch`: per-unit gradient norms of a CNN on images (the same JSON; `extra` holds the stem's
/// and the head's norms, `removable` which units may go).
fn run_cnn(a: &GradnormArgs, batch_size: usize) -> Result<()> {
    a.tokens.refuse("gradnorm --arch")?;
    let arch = a.cnn.arch.as_deref().expect("checked by the caller");
    let files = a.cnn.image_files("gradnorm")?;
    let model = CnnModel::load(&a.model, arch)?;
    let images = files.load(&model)?;
    let n_batches = images.n.div_ceil(batch_size);
    let nu = model.num_units();
    let (mut per_unit, mut loss, mut stem, mut head) = (vec![0f64; nu], 0f64, 0f64, 0f64);
    let mut seconds = Vec::with_capacity(n_batches);
    let bar = crate::progress::bar(n_batches as u64, "gradnorm batches");
    for b in 0..n_batches {
        let batch = images.batch(b * batch_size, batch_size);
        let t0 = Instant::now();
        let g = model.grad_norms(&batch, &[], &mut |_, _| {})?;
        seconds.push(t0.elapsed().as_secs_f64());
        for (s, v) in per_unit.iter_mut().zip(&g.per_unit) {
            *s += v;
        }
        loss += g.outcome.loss;
        stem += g.stem;
        head += g.head;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let nb = n_batches as f64;
    let mut out = serde_json::json!({
        "format": "sglp-gradnorm/1",
        "model": a.model.display().to_string(),
        "arch": arch,
        "images": files.images.display().to_string(),
        "labels": files.labels.display().to_string(),
        "sequences": images.n,
        "batch_size": batch_size,
        "batches": n_batches,
        "layers": model.unit_names(),
        "removable": model.units().iter().map(|u| u.removable).collect::<Vec<_>>(),
        "gradnorm": per_unit.iter().map(|s| s / nb).collect::<Vec<_>>(),
        "loss": loss / nb,
        "extra": { "stem": stem / nb, "head": head / nb },
    });
    if a.timing {
        out["timing"] = serde_json::json!({ "forward_backward_s": seconds });
    }
    let text = serde_json::to_string_pretty(&out).expect("JSON of plain values");
    crate::io::output::write_atomic(&a.out, text.as_bytes())
}
