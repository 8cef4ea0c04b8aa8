//! A calibration set spread over one or more files (shards), streamed chunk by chunk.
//!
//! `open` reads and cross-checks only headers. `next_chunk` memory-maps one shard at a time (the reader
//! lets go of the previous shard's maps when the next one starts), hands out up to `max_rows` rows of
//! every layer as ranges of the maps, read in place ([`HostBytes::mapped`]; copied only into a GPU
//! backend's page-locked buffers), and checks them for NaN/Inf. A chunk keeps its shard's maps alive while
//! it lives, so memory is at most the pages of the shards of the chunks in flight (two with the read-ahead
//! thread; reclaimable, they are file-backed), however many shards there are.

use super::{check_finite, ActivationSource, Batch, HostBytes, LayerMeta, StoredTensor};
use crate::error::{Error, Result};
use memmap2::Mmap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// One shard as `info` shows it: its path, its sample count, and its (kept) layers.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ShardInfo {
    pub path: PathBuf,
    /// `"safetensors"` or `"npy-dir"`.
    pub format: &'static str,
    /// Samples (matrix rows, after `--token-mode`) in this shard.
    pub rows: usize,
    /// Per layer: name, features per sample, dtype, and the shape as stored in this shard.
    pub layers: Vec<LayerMeta>,
}

/// The shards of one calibration set: validated headers, data read lazily chunk by chunk.
pub struct ActivationSet {
    /// Layers of the whole set; `shape` is the first shard's with axis 0 summed over all shards.
    layers: Vec<LayerMeta>,
    paths: Vec<PathBuf>,
    shards: Vec<ShardInfo>,
    /// Per shard, per kept layer: where its data lies.
    tensors: Vec<Vec<StoredTensor>>,
    cursor: Cursor,
}

/// Where the stream stands: the shard being read, its maps, and the next row.
#[derive(Default)]
struct Cursor {
    shard: usize,
    /// Next row within `shard`.
    row: usize,
    /// Global index of that row (rows of earlier shards included).
    global: usize,
    /// The maps of `shard`, once its first chunk was asked for.
    mapped: Option<MappedShard>,
}

/// The memory maps of one shard, and per layer the index of the map that holds it. Shared: a chunk read
/// in place holds its map ([`HostBytes::mapped`]) for as long as it lives, past the next shard.
struct MappedShard {
    maps: Vec<Arc<Mmap>>,
    map_of_layer: Vec<usize>,
}

impl ActivationSet {
    /// Open every input (a `.safetensors` file or a directory of `.npy` files), read and cross-check
    /// their headers; no activation data is read yet.
    pub fn open(inputs: &[PathBuf], opts: &ReadOptions) -> Result<Self> {
        if inputs.is_empty() {
            return Err(Error::invalid("no input given"));
        }
        let mut shards = Vec::with_capacity(inputs.len());
        let mut tensors = Vec::with_capacity(inputs.len());
        for path in inputs {
            let (info, stored) = open_shard(path, opts)?;
            if let Some(first) = shards.first() {
                check_same_layers(first, &info)?;
            }
            shards.push(info);
            tensors.push(stored);
        }
        let layers = set_layers(&shards);
        if shards.iter().all(|s| s.rows == 0) {
            return Err(Error::invalid(format!(
                "{}: no samples in the input",
                inputs[0].display()
            )));
        }
        Ok(ActivationSet {
            layers,
            paths: inputs.to_vec(),
            shards,
            tensors,
            cursor: Cursor::default(),
        })
    }

    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Per shard: path, format, rows, and each kept layer's name, shape, features and dtype.
    pub fn describe(&self) -> &[ShardInfo] {
        &self.shards
    }

    /// Samples (matrix rows) in each shard, in input order.
    pub fn shard_rows(&self) -> Vec<usize> {
        self.shards.iter().map(|s| s.rows).collect()
    }

    /// Total samples over all shards.
    pub fn n_samples(&self) -> usize {
        self.shards.iter().map(|s| s.rows).sum()
    }

    /// Go back to the first sample (drops any mapped shard).
    pub fn rewind(&mut self) {
        self.cursor = Cursor::default();
    }

    /// Map the files of shard `s`, checking that they still have the sizes their headers were read with
    /// (touching a mapped page past the end of a file that shrank would kill the process).
    fn map_shard(&self, s: usize) -> Result<MappedShard> {
        let mut maps: Vec<Arc<Mmap>> = Vec::new();
        let mut files: Vec<&Path> = Vec::new();
        let mut map_of_layer = Vec::with_capacity(self.tensors[s].len());
        for t in &self.tensors[s] {
            let idx = match files.iter().position(|&f| f == t.file) {
                Some(i) => i,
                None => {
                    maps.push(Arc::new(map_file(&t.file, t.file_len)?));
                    files.push(&t.file);
                    maps.len() - 1
                }
            };
            map_of_layer.push(idx);
        }
        Ok(MappedShard { maps, map_of_layer })
    }
}

impl ActivationSource for ActivationSet {
    fn layers(&self) -> &[LayerMeta] {
        &self.layers
    }

    fn n_samples_hint(&self) -> Option<usize> {
        Some(self.n_samples())
    }

    fn next_chunk(&mut self, max_rows: usize) -> Result<Option<Batch>> {
        let mut out = Batch::empty(&self.layers);
        Ok(self.next_chunk_into(max_rows, &mut out)?.then_some(out))
    }

    fn next_chunk_into(&mut self, max_rows: usize, out: &mut Batch) -> Result<bool> {
        if max_rows == 0 {
            return Err(Error::invalid("chunk size must be at least 1 row"));
        }
        // Skip finished (or empty) shards, releasing their maps.
        while self.cursor.shard < self.shards.len()
            && self.cursor.row >= self.shards[self.cursor.shard].rows
        {
            self.cursor.shard += 1;
            self.cursor.row = 0;
            self.cursor.mapped = None;
        }
        let s = self.cursor.shard;
        if s == self.shards.len() {
            return Ok(false);
        }
        if self.cursor.mapped.is_none() {
            self.cursor.mapped = Some(self.map_shard(s)?);
        }
        let mapped = self.cursor.mapped.as_ref().expect("mapped just above");

        let start = self.cursor.row;
        let rows = max_rows.min(self.shards[s].rows - start);
        if out.layers.len() != self.layers.len() {
            *out = Batch::empty(&self.layers);
        }
        for (((block, t), meta), &m) in out
            .layers
            .iter_mut()
            .zip(&self.tensors[s])
            .zip(&self.layers)
            .zip(&mapped.map_of_layer)
        {
            let row_bytes = meta.cols * meta.dtype.size();
            let from = t.offset as usize + start * row_bytes;
            let range = from..from + rows * row_bytes;
            block.dtype = meta.dtype;
            block.cols = meta.cols;
            if block.data.locked().is_some() {
                // A GPU backend's page-locked buffer, which it uploads from without staging: copy into it
                // (its existing capacity: no allocation once it has grown to a chunk).
                block.data.clear();
                block.data.extend_from_slice(&mapped.maps[m][range]);
            } else {
                // Read in place: the rows are contiguous in the file (stored row-major, little-endian).
                block.data = HostBytes::mapped(mapped.maps[m].clone(), range);
            }
        }
        out.rows = rows;
        check_finite(
            &out.as_ref(),
            &self.layers,
            self.cursor.global,
            &self.shards[s].path,
        )?;
        self.cursor.row += rows;
        self.cursor.global += rows;
        Ok(true)
    }

    fn as_send(&mut self) -> Option<&mut (dyn ActivationSource + Send)> {
        Some(self)
    }
}

/// Read the headers of one input, keeping the layers `opts.layers` matches, and turn each into a matrix.
fn open_shard(path: &Path, opts: &ReadOptions) -> Result<(ShardInfo, Vec<StoredTensor>)> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    // The readers apply the `--layers` filter themselves, so filtered-out tensors are never checked.
    let (format, kept) = if meta.is_dir() {
        (
            "npy-dir",
            super::npy::read_dir_headers(path, opts.layers.as_ref())?,
        )
    } else if path
        .extension()
        .is_some_and(|x| x.eq_ignore_ascii_case("safetensors"))
    {
        (
            "safetensors",
            super::safetensors::read_header(path, opts.layers.as_ref())?,
        )
    } else {
        let head = file_head(path)?;
        // The legacy torch.save format goes to the torch reader too, which names it.
        if super::torch::is_torch_zip(&head) || super::torch::is_legacy_torch(&head) {
            (
                "torch",
                super::torch::activation_tensors(path, opts.layers.as_ref())?,
            )
        } else {
            return Err(Error::format(
                path,
                "not a .safetensors file, a torch.save file (.pt, .bin) or a directory of .npy files",
            ));
        }
    };

    if kept.is_empty() {
        let re = opts.layers.as_ref().map_or("", |r| r.as_str());
        return Err(Error::format(
            path,
            format!("no layer matches --layers '{re}'"),
        ));
    }

    let mut rows = None;
    let mut layers = Vec::with_capacity(kept.len());
    for t in &kept {
        let (r, cols) = matrix_shape(&t.shape, opts.tokens)
            .map_err(|msg| Error::layer(&t.file, &t.name, msg))?;
        match rows {
            None => rows = Some((r, &t.name)),
            Some((r0, first)) if r0 != r => {
                return Err(Error::layer(
                    &t.file,
                    &t.name,
                    format!("{r} samples, but layer '{first}' has {r0} (layers of one input must have the same sample count)"),
                ))
            }
            Some(_) => {}
        }
        layers.push(LayerMeta {
            name: t.name.clone(),
            cols,
            dtype: t.dtype,
            shape: t.shape.clone(),
        });
    }
    let info = ShardInfo {
        path: path.to_path_buf(),
        format,
        rows: rows.map_or(0, |(r, _)| r),
        layers,
    };
    Ok((info, kept))
}

/// The first bytes of the file at `path` (fewer when it is shorter): enough to tell its format.
fn file_head(path: &Path) -> Result<Vec<u8>> {
    let mut head = Vec::with_capacity(16);
    File::open(path)
        .and_then(|f| f.take(16).read_to_end(&mut head))
        .map_err(|e| Error::io(path, e))?;
    Ok(head)
}

/// `(rows, cols)` of the matrix a stored tensor is read as: axis 0 is samples, the other axes features,
/// except that a 3-D `[sequences, tokens, hidden]` tensor follows `tokens`.
pub fn matrix_shape(
    shape: &[usize],
    tokens: TokenMode,
) -> std::result::Result<(usize, usize), String> {
    let product = |dims: &[usize]| {
        dims.iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| format!("shape {shape:?} overflows"))
    };
    let (rows, cols) = match (shape, tokens) {
        ([], _) => return Err("0-D tensor (a scalar) has no sample axis".to_string()),
        ([s, t, h], TokenMode::Samples) => (product(&[*s, *t])?, *h),
        ([n, rest @ ..], _) => (*n, product(rest)?),
    };
    if cols == 0 {
        return Err(format!("shape {shape:?} has no features"));
    }
    Ok((rows, cols))
}

/// Shards after the first must hold the same layers, in the same order, with the same widths and dtypes.
fn check_same_layers(first: &ShardInfo, other: &ShardInfo) -> Result<()> {
    let names = |s: &ShardInfo| {
        s.layers
            .iter()
            .map(|l| l.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if first.layers.len() != other.layers.len()
        || first
            .layers
            .iter()
            .zip(&other.layers)
            .any(|(a, b)| a.name != b.name)
    {
        return Err(Error::format(
            &other.path,
            format!(
                "layers differ from the first input {}: [{}] vs [{}]",
                first.path.display(),
                names(other),
                names(first)
            ),
        ));
    }
    for (a, b) in first.layers.iter().zip(&other.layers) {
        if a.cols != b.cols {
            return Err(Error::layer(
                &other.path,
                &b.name,
                format!(
                    "{} features per sample (shape {:?}), but {} in the first input {} (shape {:?})",
                    b.cols,
                    b.shape,
                    a.cols,
                    first.path.display(),
                    a.shape
                ),
            ));
        }
        if a.dtype != b.dtype {
            return Err(Error::layer(
                &other.path,
                &b.name,
                format!(
                    "dtype {}, but {} in the first input {}",
                    b.dtype.name(),
                    a.dtype.name(),
                    first.path.display()
                ),
            ));
        }
    }
    Ok(())
}

/// The set's layers: the first shard's, with axis 0 of the stored shape summed over the shards.
fn set_layers(shards: &[ShardInfo]) -> Vec<LayerMeta> {
    let mut layers = shards[0].layers.clone();
    for (i, layer) in layers.iter_mut().enumerate() {
        layer.shape[0] = shards.iter().map(|s| s.layers[i].shape[0]).sum();
    }
    layers
}

/// Memory-map `path`, which must still be `expected_len` bytes long.
fn map_file(path: &Path, expected_len: u64) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len != expected_len {
        return Err(Error::format(
            path,
            format!("file changed since it was opened: {len} bytes, its header was read at {expected_len}"),
        ));
    }
    // SAFETY: the map is only read, and its size was just checked against the header. Another process
    // truncating the file while we read it is outside what any reader of mapped files can prevent.
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}
