//! `sglp-engine capture`: every decoder layer's output hidden states on calibration tokens, written as the
//! safetensors input of `cka` (tensors `model.layers.{i}` `[sequences, tokens, hidden]` f32, metadata
//! `layers` = the names in order, comma-separated).

use super::common::{load_decoder, positive, CnnArgs, TextCut, TokenArgs};
use crate::error::Result;
use crate::io::safetensors::StreamedSafetensors;
use crate::runtime::cnn::CnnModel;
use crate::runtime::{CalibrationData, PrunableModel};
use crate::similarity::device::DeviceChoice;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct CaptureArgs {
    /// Hugging Face checkpoint directory (config.json + safetensors) of a llama, mistral or qwen2 model;
    /// with --arch, a CNN's `state_dict` (safetensors): its blocks' outputs `[images, C, H, W]`.
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
    /// Output .safetensors file.
    #[arg(long)]
    pub out: PathBuf,
    /// Sequences (images with --arch) per forward pass.
    #[arg(long, default_value_t = crate::pruning::pipeline::DEFAULT_FORWARD_BATCH)]
    pub batch: usize,
}

pub fn run(a: CaptureArgs) -> Result<()> {
    let batch_size = positive(a.batch, "--batch")?;
    if let Some(arch) = &a.cnn.arch {
        super::common::cnn_on_cpu(a.device)?;
        return run_cnn(&a, arch, batch_size);
    }
    let input = a.tokens.required(&a.cut, "capture")?;
    let model = load_decoder(&a.model, a.device)?;
    let tokens = model.load_token_input(&input)?;
    let names = model.layer_names();
    let out = StreamedSafetensors::create(
        &a.out,
        &names,
        &[tokens.sequences, tokens.len, model.hidden_size()],
    )?;
    write_unit_outputs(&model, &tokens, batch_size, out)
}

/// `capture --arch`: every block's output of a CNN on images, `[images, C, H, W]` per block.
fn run_cnn(a: &CaptureArgs, arch: &str, batch_size: usize) -> Result<()> {
    a.tokens.refuse("capture --arch")?;
    let model = CnnModel::load(&a.model, arch)?;
    let images = a.cnn.image_files("capture")?.load(&model)?;
    let shapes: Vec<Vec<usize>> = model.hidden_shapes(images.h, images.w)?[1..]
        .iter()
        .map(|&(c, h, w)| vec![images.n, c, h, w])
        .collect();
    let out = StreamedSafetensors::create_shapes(&a.out, &model.unit_names(), &shapes)?;
    write_unit_outputs(&model, &images, batch_size, out)
}

/// Run `model` on `data`, `batch_size` items per forward, writing every unit's output (hidden states
/// 1..=U) at its items' rows of tensor u of `out`; then rename `out` into place.
fn write_unit_outputs<M: PrunableModel>(
    model: &M,
    data: &M::Data,
    batch_size: usize,
    mut out: StreamedSafetensors,
) -> Result<()> {
    let n_batches = data.items().div_ceil(batch_size);
    let bar = crate::progress::bar(n_batches as u64, "capture batches");
    for b in 0..n_batches {
        let first = b * batch_size;
        let batch = data.batch(first, batch_size);
        let mut result = Ok(());
        model.loss(
            &batch,
            &[],
            Some(&mut |i, hs| {
                if i >= 1 && result.is_ok() {
                    result = out.write_rows(i - 1, first, hs);
                }
            }),
        )?;
        result?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    out.finish()
}
