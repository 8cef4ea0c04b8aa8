//! `sglp-engine segment`: Fisher's optimal segmentation of the layers from a CKA JSON.

use super::cka::emit;
use crate::error::{Error, Result};
use crate::segmentation::{segment_cka, Features, KChoice, SegmentResult};
use crate::similarity::{CkaResult, CKA_FORMAT};
use std::path::{Path, PathBuf};

/// Segmentation options shared by `segment`, `run` and `prune`.
#[derive(clap::Args, Debug, Clone)]
pub struct SegmentOpts {
    /// Per-layer feature: `colsum` (x_l = Σ_m CKA[m][l], as SGLP) or `rows` (each layer's CKA row).
    #[arg(long, value_enum, default_value_t = Features::ColSum)]
    pub features: Features,
    /// Number of segments, or `auto` (the relative-gain rule over k = 1..k-max).
    #[arg(long, default_value = "auto")]
    pub k: String,
    /// Largest k tried by `--k auto` (and the length of the loss curve).
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
            s => s
                .parse()
                .map(KChoice::Fixed)
                .map_err(|_| Error::invalid(format!("--k must be a number or 'auto' (got '{s}')"))),
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct SegmentArgs {
    /// A CKA JSON written by `sglp-engine cka`.
    #[arg(long)]
    pub cka: PathBuf,
    #[command(flatten)]
    pub opts: SegmentOpts,
    /// Output file (default: stdout).
    #[arg(long, short = 'o')]
    pub out: Option<PathBuf>,
}

/// Read and check a `sglp-cka/1` file.
pub fn read_cka(path: &Path) -> Result<CkaResult> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let res: CkaResult = serde_json::from_str(&text)
        .map_err(|e| Error::format(path, format!("not a CKA JSON file: {e}")))?;
    if res.format != CKA_FORMAT {
        return Err(Error::format(
            path,
            format!("format '{}' is not {CKA_FORMAT}", res.format),
        ));
    }
    let l = res.layers.len();
    if res.cka.len() != l || res.cka.iter().any(|r| r.len() != l) {
        return Err(Error::format(
            path,
            format!("the CKA matrix is not square {l}×{l}"),
        ));
    }
    Ok(res)
}

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

pub fn run(a: SegmentArgs) -> Result<()> {
    let res = read_cka(&a.cka)?;
    segment_and_write(&res.layers, &res.cka_matrix(), &a.opts, a.out.as_deref())
        .map_err(|e| match e {
            Error::InvalidInput(m) => Error::format(&a.cka, m),
            e => e,
        })
        .map(|_| ())
}
