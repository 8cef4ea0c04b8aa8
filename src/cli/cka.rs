//! `sglp-engine cka`: all-pairs CKA of the layers of a calibration set.

use super::common::{emit, EstimatorArgs, InputArgs};
use crate::error::Result;
use std::path::PathBuf;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CkaFormat {
    Json,
    Csv,
}

#[derive(clap::Args, Debug)]
pub struct CkaArgs {
    #[command(flatten)]
    pub input: InputArgs,
    #[command(flatten)]
    pub est: EstimatorArgs,
    /// Output file (default: stdout).
    #[arg(long, short = 'o')]
    pub out: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = CkaFormat::Json)]
    pub format: CkaFormat,
}

pub fn run_cka(a: CkaArgs) -> Result<()> {
    let res = a
        .input
        .with_source(a.est.device, |src| a.est.compute(src))?;
    let text = match a.format {
        CkaFormat::Json => {
            serde_json::to_string_pretty(&res).expect("CKA result serialises") + "\n"
        }
        CkaFormat::Csv => res.to_csv(),
    };
    emit(a.out.as_deref(), &text)
}
