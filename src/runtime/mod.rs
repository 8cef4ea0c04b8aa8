//! A minimal runtime for LLaMA-family checkpoints: forward passes that capture every decoder layer's hidden
//! states, and forward + backward passes that reduce the gradient to one norm per decoder layer
//! (GradNorm importance), on the CPU, with no Python.
//!
//! - [`ops`]: the [`ops::Device`] trait and its implementations ([`ops::cpu`]: free functions over slices).
//! - [`device`]: `--device` for the runtime.
//! - [`tape`]: a model as a list of ops over buffers; forward in order, backward in reverse, gradient norms
//!   reduced during the backward.
//! - [`model`]: the LLaMA / Mistral / Qwen2 decoder built on the tape; [`config`], [`weights`]: the
//!   checkpoint's `config.json` and memory-mapped safetensors.

pub mod cnn;
pub mod config;
pub mod device;
pub mod model;
pub mod ops;
pub mod prunable;
pub mod tape;
pub mod text;
pub mod weights;

pub use config::{ModelConfig, RopeScaling};
pub use model::{Model, TensorNames};
pub use prunable::{CalibrationData, PrunableModel, UnitGrads};
pub use text::{TextSpec, TokenInput};

/// Where a pass hands the hidden states it computes: `Some(callback)`, called as `(i, h)` with the
/// row-major `rows × width` state i on the host, or `None` when nobody reads them — then a device that
/// keeps them elsewhere (a GPU) copies nothing out.
pub type OnHidden<'a> = Option<&'a mut dyn FnMut(usize, &[f32])>;

use crate::error::{Error, Result};
use crate::io::{ActivationSource, Batch, DType, LayerMeta, TokenMode};
use std::path::Path;

/// Calibration tokens: `sequences × len` ids, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Tokens {
    pub data: Vec<i64>,
    pub sequences: usize,
    pub len: usize,
}

impl Tokens {
    /// Read a 2-D `.npy` of int32 or int64 ids, `[sequences, tokens]`.
    pub fn load_npy(path: &Path) -> Result<Tokens> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_npy_bytes(&bytes, path)
    }

    /// [`Self::load_npy`] of the file's bytes; `path` names it in errors.
    pub fn from_npy_bytes(bytes: &[u8], path: &Path) -> Result<Tokens> {
        crate::io::npy::check_npy_bytes(bytes, path)?;
        let npy = npyz::NpyFile::new(bytes)
            .map_err(|e| Error::format(path, format!("not a .npy file: {e}")))?;
        let shape = npy.shape().to_vec();
        if shape.len() != 2 {
            return Err(Error::format(
                path,
                format!("token array has shape {shape:?}, expected [sequences, tokens]"),
            ));
        }
        if npy.order() != npyz::Order::C {
            return Err(Error::format(
                path,
                "Fortran-ordered arrays are not supported",
            ));
        }
        let descr = match npy.dtype() {
            npyz::DType::Plain(ts) => ts.to_string(),
            other => other.descr(),
        };
        let data: Vec<i64> = match descr.as_str() {
            "<i8" => npy.into_vec::<i64>(),
            "<i4" => npy
                .into_vec::<i32>()
                .map(|v| v.into_iter().map(i64::from).collect()),
            other => {
                return Err(Error::format(
                    path,
                    format!(
                        "token dtype '{other}' is not supported (int32 or int64, little-endian)"
                    ),
                ))
            }
        }
        .map_err(|e| Error::format(path, format!("cannot read the token array: {e}")))?;
        // npyz reads as many ids as the shape declares; a wrapped shape product (npyz does not check it)
        // could declare fewer than the shape's own numbers say.
        if Some(data.len() as u64) != shape[0].checked_mul(shape[1]) {
            return Err(Error::format(
                path,
                format!("token array shape {shape:?} does not match its data"),
            ));
        }
        if data.is_empty() {
            return Err(Error::format(
                path,
                format!("token array has shape {shape:?}: no tokens"),
            ));
        }
        Ok(Tokens {
            data,
            sequences: shape[0] as usize,
            len: shape[1] as usize,
        })
    }

    /// Every id must be in `0..vocab`; the error names the first bad (sequence, token).
    pub fn check_vocab(&self, vocab: usize, path: &Path) -> Result<()> {
        if let Some(i) = self
            .data
            .iter()
            .position(|&t| t < 0 || t as u64 >= vocab as u64)
        {
            return Err(Error::format(
                path,
                format!(
                    "token id {} at (sequence {}, token {}) is outside the vocabulary (0..{vocab})",
                    self.data[i],
                    i / self.len.max(1),
                    i % self.len.max(1)
                ),
            ));
        }
        Ok(())
    }

    /// Sequences `first_seq .. first_seq + n_seqs` (clamped to the end).
    pub fn batch(&self, first_seq: usize, n_seqs: usize) -> Tokens {
        let end = (first_seq + n_seqs).min(self.sequences);
        let start = first_seq.min(end);
        Tokens {
            data: self.data[start * self.len..end * self.len].to_vec(),
            sequences: end - start,
            len: self.len,
        }
    }
}

/// The result of one forward + backward.
#[derive(Clone, Debug, PartialEq)]
pub struct GradNorms {
    pub loss: f64,
    /// ‖∂loss/∂θ_l‖ over all parameters of decoder layer l (0 for skipped layers).
    pub per_layer: Vec<f64>,
    pub embed_tokens: f64,
    pub norm: f64,
    /// `None` when lm_head is tied to embed_tokens (its gradient is then inside `embed_tokens`).
    pub lm_head: Option<f64>,
}

/// An [`ActivationSource`] running a model batch by batch: its layers are the units' outputs (f32; a
/// decoder's `model.layers.{i}`, a CNN's blocks), samples are rows (`TokenMode::Samples`: tokens of a
/// sequence, images) or items (`Features`: a sequence's tokens side by side).
pub struct CaptureSource<'a, M: PrunableModel = Model> {
    model: &'a M,
    data: M::Data,
    /// The model's path, for error messages.
    path: std::path::PathBuf,
    batch_seqs: usize,
    mode: TokenMode,
    layers: Vec<LayerMeta>,
    next_seq: usize,
    /// The current model batch, handed out `max_rows` at a time.
    pending: Option<Batch>,
    pending_row: usize,
    samples_done: usize,
}

impl<'a> CaptureSource<'a, Model> {
    pub fn new(model: &'a Model, tokens: &Tokens, batch_seqs: usize, mode: TokenMode) -> Self {
        Self::for_model(model, tokens, &model.dir, batch_seqs, mode)
            .expect("a decoder's widths are known")
    }
}

impl<'a, M: PrunableModel> CaptureSource<'a, M> {
    /// Capture `model` (read from `path`) on `data`, `batch_seqs` items per forward.
    pub fn for_model(
        model: &'a M,
        data: &M::Data,
        path: &Path,
        batch_seqs: usize,
        mode: TokenMode,
    ) -> Result<Self> {
        let widths = model.hidden_widths(data)?;
        let (items, t) = (data.items(), data.rows_per_item());
        let layers = model
            .unit_names()
            .into_iter()
            .zip(&widths[1..])
            .map(|(name, &w)| LayerMeta {
                name,
                cols: match mode {
                    TokenMode::Samples => w,
                    TokenMode::Features => t * w,
                },
                dtype: DType::F32,
                shape: if t > 1 {
                    vec![items, t, w]
                } else {
                    vec![items, w]
                },
            })
            .collect();
        Ok(CaptureSource {
            model,
            data: data.clone(),
            path: path.to_path_buf(),
            batch_seqs: batch_seqs.max(1),
            mode,
            layers,
            next_seq: 0,
            pending: None,
            pending_row: 0,
            samples_done: 0,
        })
    }

    /// Run the model on the next batch of items; its layers as one chunk.
    fn run_batch(&mut self) -> Result<Option<Batch>> {
        if self.next_seq >= self.data.items() {
            return Ok(None);
        }
        let batch = self.data.batch(self.next_seq, self.batch_seqs);
        self.next_seq += batch.items();
        let n_layers = self.model.num_units();
        let mut outs: Vec<Vec<f32>> = vec![Vec::new(); n_layers];
        self.model.loss(
            &batch,
            &[],
            Some(&mut |i, h| {
                if i >= 1 {
                    outs[i - 1] = h.to_vec();
                }
            }),
        )?;
        let rows = match self.mode {
            TokenMode::Samples => batch.items() * batch.rows_per_item(),
            TokenMode::Features => batch.items(),
        };
        let layers: Vec<(usize, &[f32])> = outs
            .iter()
            .zip(&self.layers)
            .map(|(o, m)| (m.cols, &o[..]))
            .collect();
        Ok(Some(Batch::from_f32(rows, &layers)))
    }
}

impl<M: PrunableModel> ActivationSource for CaptureSource<'_, M> {
    fn layers(&self) -> &[LayerMeta] {
        &self.layers
    }

    fn n_samples_hint(&self) -> Option<usize> {
        Some(match self.mode {
            TokenMode::Samples => self.data.items() * self.data.rows_per_item(),
            TokenMode::Features => self.data.items(),
        })
    }

    fn next_chunk(&mut self, max_rows: usize) -> Result<Option<Batch>> {
        if self.layers.is_empty() {
            return Ok(None);
        }
        if self
            .pending
            .as_ref()
            .is_none_or(|p| self.pending_row >= p.rows)
        {
            self.pending = self.run_batch()?;
            self.pending_row = 0;
        }
        let Some(p) = &self.pending else {
            return Ok(None);
        };
        let end = (self.pending_row + max_rows.max(1)).min(p.rows);
        let slice = p.slice(self.pending_row, end);
        crate::io::check_finite(&slice, &self.layers, self.samples_done, &self.path)?;
        let mut out = Batch::empty(&self.layers);
        out.extend_from(&slice);
        self.samples_done += end - self.pending_row;
        self.pending_row = end;
        Ok(Some(out))
    }

    /// Tokens as samples, nothing read yet, the model on GPU `ordinal`: each batch's layer outputs go to
    /// `sink` from the GPU's memory ([`PrunableModel::pass_to_device`]). Non-finite values are then
    /// found by the CUDA CKA as it centres them (named by layer and sample, as here).
    fn device_chunks(
        &mut self,
        ordinal: usize,
        sink: &mut dyn FnMut(&crate::io::DeviceBatch) -> Result<()>,
    ) -> Result<bool> {
        if self.mode != TokenMode::Samples || self.next_seq > 0 || self.layers.is_empty() {
            return Ok(false);
        }
        while self.next_seq < self.data.items() {
            let batch = self.data.batch(self.next_seq, self.batch_seqs);
            let Some(_) = self.model.pass_to_device(&batch, false, ordinal, sink)? else {
                if self.next_seq == 0 {
                    return Ok(false); // not on that GPU: read on the host
                }
                return Err(Error::invalid("the model left the GPU during a capture"));
            };
            self.next_seq += batch.items();
            self.samples_done += batch.items() * batch.rows_per_item();
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A capture on the CPU has no device chunks to give: the CKA reads it on the host.
    #[test]
    fn a_capture_on_the_cpu_gives_no_device_chunks() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_llama3_rope");
        let model = Model::load(&dir).unwrap();
        let tokens = Tokens::load_npy(&dir.join("tokens.npy")).unwrap();
        let mut src = CaptureSource::new(&model, &tokens, 2, TokenMode::Samples);
        let mut called = false;
        let took = src
            .device_chunks(0, &mut |_| {
                called = true;
                Ok(())
            })
            .unwrap();
        assert!(!took && !called);
        // Still read from the start on the host.
        let first = src.next_chunk(1000).unwrap().unwrap();
        assert_eq!(first.rows, 2 * tokens.len);
    }

    #[test]
    fn tokens_batch_and_vocab_check() {
        let t = Tokens {
            data: (0..12).collect(),
            sequences: 3,
            len: 4,
        };
        let b = t.batch(1, 5);
        assert_eq!(b.sequences, 2);
        assert_eq!(b.data[0], 4);
        assert!(t.check_vocab(12, Path::new("t.npy")).is_ok());
        let e = t
            .check_vocab(10, Path::new("t.npy"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("sequence 2, token 2"), "{e}");
    }
}
