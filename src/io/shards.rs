//! A calibration set spread over one or more files (shards), streamed chunk by chunk.
//! (Skeleton: the io helper fills this in.)

use super::{ActivationSource, Batch, LayerMeta};
use crate::error::{Error, Result};
use std::path::PathBuf;

/// How a 3-D tensor `[sequences, tokens, hidden]` becomes a matrix.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenMode {
    /// Every token is a sample: `[sequences*tokens, hidden]`.
    #[default]
    Samples,
    /// Tokens are flattened into features: `[sequences, tokens*hidden]`.
    Features,
}

#[derive(Clone, Debug, Default)]
pub struct ReadOptions {
    pub tokens: TokenMode,
    /// Keep only the layers whose name matches.
    pub layers: Option<regex::Regex>,
}

/// The shards of one calibration set: validated headers, data read lazily chunk by chunk.
pub struct ActivationSet {
    layers: Vec<LayerMeta>,
    paths: Vec<PathBuf>,
}

impl ActivationSet {
    /// Open every input (a `.safetensors` file or a directory of `.npy` files), read and cross-check
    /// their headers; no activation data is read yet.
    pub fn open(inputs: &[PathBuf], _opts: &ReadOptions) -> Result<Self> {
        let _ = inputs;
        Err(Error::invalid("activation readers are not written yet"))
    }

    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }
}

impl ActivationSource for ActivationSet {
    fn layers(&self) -> &[LayerMeta] {
        &self.layers
    }
    fn n_samples_hint(&self) -> Option<usize> {
        None
    }
    fn next_chunk(&mut self, _max_rows: usize) -> Result<Option<Batch>> {
        Ok(None)
    }
}
