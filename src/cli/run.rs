//! `sglp-engine run`: `cka` then `segment`, writing `cka.json` and `segments.json` into `--out-dir`.

use super::common::{emit_json, segment_and_write, EstimatorArgs, InputArgs, SegmentOpts};
use crate::error::{Error, Result};
use std::path::PathBuf;

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
    let res = a
        .input
        .with_source(a.est.device, |src| a.est.compute(src))?;
    std::fs::create_dir_all(&a.out_dir).map_err(|e| Error::io(&a.out_dir, e))?;
    let cka_path = a.out_dir.join("cka.json");
    emit_json(Some(&cka_path), &res)?;
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
