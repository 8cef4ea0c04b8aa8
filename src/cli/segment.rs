//! `sglp-engine segment`: Fisher's optimal segmentation of the layers from a similarity matrix.

use super::common::{segment_and_write, SegmentOpts};
use crate::error::{Error, Result};
use crate::io::matrix::read_similarity_matrix;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct SegmentArgs {
    /// A square layer-similarity matrix: the CKA JSON of `sglp-engine cka`, a JSON object with `cka`
    /// (and optionally `layers`), an L×L `.npy` (float32/float64), or CSV (header row and first column of
    /// layer names optional).
    #[arg(long)]
    pub cka: PathBuf,
    #[command(flatten)]
    pub opts: SegmentOpts,
    /// Output file (default: stdout).
    #[arg(long, short = 'o')]
    pub out: Option<PathBuf>,
}

pub fn run(a: SegmentArgs) -> Result<()> {
    let (layers, cka) = read_similarity_matrix(&a.cka)?;
    segment_and_write(&layers, &cka, &a.opts, a.out.as_deref())
        .map_err(|e| match e {
            Error::InvalidInput(m) => Error::format(&a.cka, m),
            e => e,
        })
        .map(|_| ())
}
