//! `sglp-engine segment`: Fisher's optimal segmentation of the layers from a CKA JSON.

use super::common::{segment_and_write, SegmentOpts};
use crate::error::{Error, Result};
use crate::similarity::{CkaResult, CKA_FORMAT};
use std::path::{Path, PathBuf};

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

pub fn run(a: SegmentArgs) -> Result<()> {
    let res = read_cka(&a.cka)?;
    segment_and_write(&res.layers, &res.cka_matrix(), &a.opts, a.out.as_deref())
        .map_err(|e| match e {
            Error::InvalidInput(m) => Error::format(&a.cka, m),
            e => e,
        })
        .map(|_| ())
}
