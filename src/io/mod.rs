//! Activations in: the types every reader produces and every similarity backend consumes.
//!
//! A calibration set is a sequence of *chunks*. A chunk ([`Batch`]) holds the same `rows` samples for every
//! layer, each layer as a row-major `rows × cols` matrix in the dtype it has on disk (converted later, in
//! registers or per batch, never as a whole-file f64 copy). Readers ([`ActivationSource`]) hand out chunks;
//! the CKA accumulator re-batches them into estimator batches, which may straddle chunks and shards.

pub mod host_bytes;
pub mod matrix;
pub mod npy;
pub mod output;
pub mod safetensors;
pub mod shards;
pub mod torch;

pub use host_bytes::{HostBytes, PageLocked};
pub use shards::{ActivationSet, ReadOptions, TokenMode};

use crate::error::{Error, Result};
use half::{bf16, f16};
use std::path::PathBuf;

/// Element type of an activation tensor as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F64,
    F16,
    BF16,
}

impl DType {
    /// f16 or bf16: the layers a GPU's Gram takes on tensor cores (as f16 of the centred values).
    pub fn is_16bit(self) -> bool {
        matches!(self, DType::F16 | DType::BF16)
    }

    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
            DType::F16 | DType::BF16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

/// One layer as the readers see it: its name, its per-sample feature count, and its stored dtype.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LayerMeta {
    pub name: String,
    /// Features per sample (the product of every axis but the sample axis, after `--token-mode`).
    pub cols: usize,
    pub dtype: DType,
    /// The tensor's shape as stored (before flattening), for `info`.
    pub shape: Vec<usize>,
}

/// One tensor as a reader found it in a file header: what it holds and where its bytes start.
#[derive(Clone, Debug)]
pub(crate) struct StoredTensor {
    pub name: String,
    pub dtype: DType,
    /// Shape as stored.
    pub shape: Vec<usize>,
    /// The file holding the data (the shard itself for safetensors, the layer's file for npy).
    pub file: PathBuf,
    /// Byte offset of element 0 in `file`; the elements are contiguous, row-major, little-endian.
    pub offset: u64,
    /// The file's size when its header was read; checked again when it is mapped.
    pub file_len: u64,
}

/// One layer's rows in a chunk: `rows × cols` elements of `dtype`, row-major, little-endian bytes (on the
/// heap, or in page-locked memory a GPU backend copies from without staging: [`HostBytes`]).
#[derive(Clone, Debug)]
pub struct LayerBlock {
    pub dtype: DType,
    pub cols: usize,
    pub data: HostBytes,
}

/// The same `rows` samples for every layer.
#[derive(Clone, Debug)]
pub struct Batch {
    pub rows: usize,
    pub layers: Vec<LayerBlock>,
}

/// A borrowed view of a batch: what backends take, so a batch can be a slice of a larger chunk.
#[derive(Clone, Copy, Debug)]
pub struct LayerSlice<'a> {
    pub dtype: DType,
    pub cols: usize,
    pub bytes: &'a [u8],
}

#[derive(Clone, Debug)]
pub struct BatchRef<'a> {
    pub rows: usize,
    pub layers: Vec<LayerSlice<'a>>,
}

impl Batch {
    /// An empty batch (0 rows) with one block per layer of `layers`.
    pub fn empty(layers: &[LayerMeta]) -> Self {
        Batch {
            rows: 0,
            layers: layers
                .iter()
                .map(|l| LayerBlock {
                    dtype: l.dtype,
                    cols: l.cols,
                    data: HostBytes::new(),
                })
                .collect(),
        }
    }

    /// Build a batch from f32 matrices (one per layer, each `rows × cols` row-major).
    pub fn from_f32(rows: usize, layers: &[(usize, &[f32])]) -> Self {
        let layers = layers
            .iter()
            .map(|&(cols, v)| {
                assert_eq!(v.len(), rows * cols, "layer matrix is not rows × cols");
                LayerBlock {
                    dtype: DType::F32,
                    cols,
                    data: bytemuck::cast_slice(v).to_vec().into(),
                }
            })
            .collect();
        Batch { rows, layers }
    }

    /// Rows `[start, end)` of every layer, borrowed.
    pub fn slice(&self, start: usize, end: usize) -> BatchRef<'_> {
        self.as_ref().slice(start, end)
    }

    pub fn as_ref(&self) -> BatchRef<'_> {
        BatchRef {
            rows: self.rows,
            layers: self
                .layers
                .iter()
                .map(|b| LayerSlice {
                    dtype: b.dtype,
                    cols: b.cols,
                    bytes: &b.data,
                })
                .collect(),
        }
    }

    /// Append the rows of `other` (same layers, same dtypes).
    pub fn extend_from(&mut self, other: &BatchRef<'_>) {
        assert_eq!(self.layers.len(), other.layers.len());
        for (dst, src) in self.layers.iter_mut().zip(&other.layers) {
            assert_eq!(dst.cols, src.cols);
            assert_eq!(dst.dtype, src.dtype);
            dst.data.extend_from_slice(src.bytes);
        }
        self.rows += other.rows;
    }
}

impl<'a> BatchRef<'a> {
    /// Rows `[start, end)` of every layer.
    pub fn slice(&self, start: usize, end: usize) -> BatchRef<'a> {
        assert!(
            start <= end && end <= self.rows,
            "rows {start}..{end} of a batch of {}",
            self.rows
        );
        BatchRef {
            rows: end - start,
            layers: self
                .layers
                .iter()
                .map(|s| {
                    let w = s.cols * s.dtype.size();
                    LayerSlice {
                        dtype: s.dtype,
                        cols: s.cols,
                        bytes: &s.bytes[start * w..end * w],
                    }
                })
                .collect(),
        }
    }
}

impl LayerSlice<'_> {
    /// Convert row `r` into `out` (length `cols`).
    pub fn row_into<T: FromStored>(&self, r: usize, out: &mut [T]) {
        let w = self.cols * self.dtype.size();
        convert_into(self.dtype, &self.bytes[r * w..(r + 1) * w], out);
    }

    /// Convert the whole slice (rows × cols) into `out`.
    pub fn to_vec_into<T: FromStored>(&self, out: &mut [T]) {
        convert_into(self.dtype, self.bytes, out);
    }

    /// Index (row) of the first row holding a NaN or Inf, if any.
    pub fn first_non_finite_row(&self) -> Option<usize> {
        if self.cols == 0 {
            return None;
        }
        // Row by row, without an early exit inside a row, so that the test (exponent bits all ones)
        // vectorises: this runs over every value read.
        let w = self.cols * self.dtype.size();
        let bad_row = |row: &[u8]| -> bool {
            match self.dtype {
                DType::F32 => row.chunks_exact(4).fold(false, |acc, c| {
                    let bits = u32::from_le_bytes(c.try_into().unwrap());
                    acc | (bits & 0x7f80_0000 == 0x7f80_0000)
                }),
                DType::F64 => row.chunks_exact(8).fold(false, |acc, c| {
                    let bits = u64::from_le_bytes(c.try_into().unwrap());
                    acc | (bits & 0x7ff0_0000_0000_0000 == 0x7ff0_0000_0000_0000)
                }),
                DType::F16 => row.chunks_exact(2).fold(false, |acc, c| {
                    acc | (u16::from_le_bytes([c[0], c[1]]) & 0x7c00 == 0x7c00)
                }),
                DType::BF16 => row.chunks_exact(2).fold(false, |acc, c| {
                    acc | (u16::from_le_bytes([c[0], c[1]]) & 0x7f80 == 0x7f80)
                }),
            }
        };
        self.bytes.chunks_exact(w).position(bad_row)
    }
}

/// Conversion target for stored elements (f32 or f64).
pub trait FromStored: Copy + Send + Sync + 'static {
    fn from_f32(x: f32) -> Self;
    fn from_f64(x: f64) -> Self;
}
impl FromStored for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}
impl FromStored for f64 {
    fn from_f32(x: f32) -> Self {
        x as f64
    }
    fn from_f64(x: f64) -> Self {
        x
    }
}

/// Convert little-endian stored elements into `out` (`out.len()` elements).
pub fn convert_into<T: FromStored>(dtype: DType, bytes: &[u8], out: &mut [T]) {
    assert_eq!(
        bytes.len(),
        out.len() * dtype.size(),
        "byte length does not match element count"
    );
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = T::from_f32(f32::from_le_bytes(c.try_into().unwrap()));
            }
        }
        DType::F64 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                *o = T::from_f64(f64::from_le_bytes(c.try_into().unwrap()));
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = T::from_f32(f16::from_le_bytes([c[0], c[1]]).to_f32());
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = T::from_f32(bf16::from_le_bytes([c[0], c[1]]).to_f32());
            }
        }
    }
}

/// One layer of a [`DeviceBatch`]: the device address of its `rows × cols` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceLayer {
    pub ptr: u64,
    pub cols: usize,
    pub dtype: DType,
}

/// A batch whose layers are already in GPU memory, row-major and contiguous (a description: addresses,
/// widths and dtypes; the CUDA backend reads it, `similarity::cuda::CudaBackend::submit_device`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceBatch {
    pub rows: usize,
    pub layers: Vec<DeviceLayer>,
}

impl DeviceBatch {
    /// Rows `[start, end)` of every layer (addresses offset, nothing copied).
    pub fn slice(&self, start: usize, end: usize) -> DeviceBatch {
        assert!(
            start <= end && end <= self.rows,
            "rows {start}..{end} of {}",
            self.rows
        );
        DeviceBatch {
            rows: end - start,
            layers: self
                .layers
                .iter()
                .map(|l| DeviceLayer {
                    ptr: l.ptr + (start * l.cols * l.dtype.size()) as u64,
                    ..*l
                })
                .collect(),
        }
    }
}

/// Anything that yields the activations of a calibration set, chunk by chunk, in sample order.
///
/// Implemented by [`ActivationSet`] (files) and by the runtime's capture (a model run on tokens).
pub trait ActivationSource {
    /// The layers every chunk holds, in order.
    fn layers(&self) -> &[LayerMeta];
    /// Total samples, when known up front (readers know it from headers).
    fn n_samples_hint(&self) -> Option<usize>;
    /// The next chunk of at most `max_rows` rows (at least one), or `None` at the end. Chunks are checked:
    /// a NaN or Inf is an error naming the layer and the first bad sample.
    fn next_chunk(&mut self, max_rows: usize) -> Result<Option<Batch>>;
    /// [`ActivationSource::next_chunk`] into `out`, reusing its buffers (a reader that can copies into
    /// them, so a stream of chunks allocates nothing once they have grown); `false` at the end.
    fn next_chunk_into(&mut self, max_rows: usize, out: &mut Batch) -> Result<bool> {
        match self.next_chunk(max_rows)? {
            Some(b) => {
                *out = b;
                Ok(true)
            }
            None => Ok(false),
        }
    }
    /// This source, if it may be read on another thread while the caller computes (files may; a model
    /// capture computes itself and is not worth it).
    fn as_send(&mut self) -> Option<&mut (dyn ActivationSource + Send)> {
        None
    }
    /// A source that computes its activations on GPU `ordinal` (a model capture running there) hands
    /// every remaining chunk to `sink` where it lives, in order, and returns `true`; `false` (the
    /// default, and before reading anything) when it cannot, and the caller reads chunks as usual.
    fn device_chunks(
        &mut self,
        _ordinal: usize,
        _sink: &mut dyn FnMut(&DeviceBatch) -> Result<()>,
    ) -> Result<bool> {
        Ok(false)
    }
}

/// Check every layer of `batch` for NaN/Inf; `first_sample` is the global index of the batch's row 0.
/// The layers are scanned in parallel (this runs over every value read, on the reader thread, which
/// alone would be the bound of a fast backend); the error names the first bad layer in order, and its
/// first bad sample.
pub fn check_finite(
    batch: &BatchRef<'_>,
    layers: &[LayerMeta],
    first_sample: usize,
    path: &std::path::Path,
) -> Result<()> {
    use rayon::prelude::*;
    let bad = batch
        .layers
        .par_iter()
        .map(LayerSlice::first_non_finite_row)
        .enumerate()
        .find_first(|(_, r)| r.is_some());
    if let Some((l, Some(r))) = bad {
        return Err(Error::layer(
            path,
            &layers[l].name,
            format!(
                "NaN or Inf in activations (first bad sample: {})",
                first_sample + r
            ),
        ));
    }
    Ok(())
}

/// Natural ordering of names: digit runs compare as numbers, so `layer2` < `layer10`.
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, _) => return Ordering::Less,
            (_, None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let na = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let nb = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (da, db) = (&a[..na], &b[..nb]);
                // Compare as numbers without overflow: strip leading zeros, then length, then digits.
                let ta = &da[da.iter().take_while(|&&c| c == b'0').count()..];
                let tb = &db[db.iter().take_while(|&&c| c == b'0').count()..];
                let ord = ta.len().cmp(&tb.len()).then(ta.cmp(tb)).then(na.cmp(&nb));
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[na..];
                b = &b[nb..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_puts_numbers_in_numeric_order() {
        let mut v = vec!["layer10", "layer2", "layer1", "conv1", "layer02b"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, ["conv1", "layer1", "layer2", "layer02b", "layer10"]);
    }

    #[test]
    fn conversion_and_nan_detection() {
        let vals = [1.5f32, -2.0, f32::NAN, 4.0];
        let b = Batch::from_f32(2, &[(2, &vals)]);
        let s = b.as_ref();
        assert_eq!(s.layers[0].first_non_finite_row(), Some(1));
        let mut out = [0f64; 2];
        s.layers[0].row_into(0, &mut out);
        assert_eq!(out, [1.5, -2.0]);
    }
}
