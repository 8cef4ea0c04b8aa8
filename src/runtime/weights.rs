//! Memory-mapped checkpoint weights: safetensors (`model.safetensors`, or shards listed in
//! `model.safetensors.index.json`) or, for older checkpoints, `torch.save` files (`pytorch_model.bin`, or
//! shards listed in `pytorch_model.bin.index.json`; read by [`crate::io::torch`] without running the
//! pickle). Nothing is copied at load: a tensor is read when an op asks for it, borrowed straight from the
//! map when it is f32 and aligned, otherwise converted to f32 for that op (bf16/f16 → f32,
//! rayon-parallel) and dropped when the op is done.

use super::tape::ParamStore;
use crate::error::{Error, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The single weights file of an unsharded checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint: `weight_map` maps each tensor to its shard's file name.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The same two of a checkpoint saved with `torch.save` (transformers' format before safetensors).
pub const TORCH_SINGLE_FILE: &str = "pytorch_model.bin";
pub const TORCH_INDEX_FILE: &str = "pytorch_model.bin.index.json";

/// How a checkpoint's weight files are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    Safetensors,
    /// `torch.save` zip archives.
    Torch,
}

/// The weight files of a checkpoint directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightFiles {
    /// File names (in the directory), in natural order, each once.
    pub files: Vec<String>,
    /// Whether they are the shards named by an index (else the one single file).
    pub sharded: bool,
    pub format: WeightFormat,
}

impl WeightFiles {
    /// The index file of a sharded checkpoint of this format.
    pub fn index_file(&self) -> &'static str {
        match self.format {
            WeightFormat::Safetensors => INDEX_FILE,
            WeightFormat::Torch => TORCH_INDEX_FILE,
        }
    }
}

/// The weight files of the checkpoint in `dir`, in the order transformers looks for them:
/// `model.safetensors`, the shards named by `model.safetensors.index.json`, `pytorch_model.bin`, the
/// shards named by `pytorch_model.bin.index.json`. The one reader of the indexes, for the runtime and
/// for writing pruned checkpoints, so both see the same files.
pub fn weight_files(dir: &Path) -> Result<WeightFiles> {
    for (single, index, format) in [
        (SINGLE_FILE, INDEX_FILE, WeightFormat::Safetensors),
        (TORCH_SINGLE_FILE, TORCH_INDEX_FILE, WeightFormat::Torch),
    ] {
        if dir.join(single).exists() {
            return Ok(WeightFiles {
                files: vec![single.to_string()],
                sharded: false,
                format,
            });
        }
        let index = dir.join(index);
        if index.exists() {
            let bytes = std::fs::read(&index).map_err(|e| Error::io(&index, e))?;
            return Ok(WeightFiles {
                files: parse_index(&bytes, &index)?,
                sharded: true,
                format,
            });
        }
    }
    Err(Error::Model(format!(
        "{}: no {SINGLE_FILE}, {INDEX_FILE}, {TORCH_SINGLE_FILE} or {TORCH_INDEX_FILE}",
        dir.display()
    )))
}

/// The shard file names of an index (`model.safetensors.index.json`, `pytorch_model.bin.index.json`;
/// its bytes; `index` names it in errors), in natural order, each once.
pub fn parse_index(bytes: &[u8], index: &Path) -> Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| Error::format(index, format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::format(index, "no 'weight_map' object"))?;
    let mut files: Vec<String> = Vec::new();
    for f in map.values() {
        let f = f
            .as_str()
            .ok_or_else(|| Error::format(index, "weight_map values must be file names"))?;
        // A shard is a file of this directory: a path elsewhere would be read (and, when pruning,
        // written) outside the checkpoint.
        if f.is_empty() || f == "." || f == ".." || f.contains(['/', '\\']) {
            return Err(Error::format(
                index,
                format!("weight_map value '{f}' is not a file name in the checkpoint directory"),
            ));
        }
        if !files.iter().any(|g| g == f) {
            files.push(f.to_string());
        }
    }
    files.sort_by(|a, b| crate::io::natural_cmp(a, b));
    Ok(files)
}

/// One tensor of a checkpoint file, located.
#[derive(Clone, Debug)]
pub struct StoredWeight {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file (of the elements, when `contiguous`).
    pub start: usize,
    pub end: usize,
    /// False for a view `torch.save` kept with other strides (never in safetensors): such a tensor
    /// cannot be read in place, and is refused when read.
    pub contiguous: bool,
}

/// The tensors of one checkpoint file (its mapped bytes; `path` names it in errors): a safetensors file,
/// or a `torch.save` zip archive (the legacy `torch.save` format is refused by the torch reader, by name).
pub fn stored_weights(map: &[u8], path: &Path) -> Result<Vec<StoredWeight>> {
    if crate::io::torch::is_torch_zip(map) || crate::io::torch::is_legacy_torch(map) {
        let tensors = crate::io::torch::read_tensors(map, path)?;
        return Ok(tensors
            .into_iter()
            .map(|t| {
                let start = t.offset as usize;
                // Checked against the storage's bytes by `read_tensors` when contiguous; a strided
                // view's (refused when read) is left empty.
                let len = match t.contiguous {
                    true => t.shape.iter().product::<usize>() * t.dtype.size(),
                    false => 0,
                };
                StoredWeight {
                    name: t.name,
                    dtype: t.dtype.safetensors(),
                    shape: t.shape,
                    start,
                    end: start + len,
                    contiguous: t.contiguous,
                }
            })
            .collect());
    }
    let (n, meta) = SafeTensors::read_metadata(map)
        .map_err(|e| Error::format(path, format!("not a safetensors file: {e}")))?;
    let base = 8 + n;
    Ok(meta
        .tensors()
        .into_iter()
        .map(|(name, info)| StoredWeight {
            name,
            dtype: info.dtype,
            shape: info.shape.clone(),
            start: base + info.data_offsets.0,
            end: base + info.data_offsets.1,
            contiguous: true,
        })
        .collect())
}

/// Tensor `t` of the mapped checkpoint file `map` as a safetensors view of its bytes, for writing it out
/// unchanged; an error for a view [`StoredWeight::contiguous`] is false for.
pub fn tensor_view<'a>(
    map: &'a [u8],
    t: &StoredWeight,
    path: &Path,
) -> Result<safetensors::tensor::TensorView<'a>> {
    if !t.contiguous {
        return Err(Error::layer(path, &t.name, NOT_CONTIGUOUS));
    }
    let bytes = map
        .get(t.start..t.end)
        .ok_or_else(|| Error::layer(path, &t.name, "data offsets run past the end of the file"))?;
    safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), bytes)
        .map_err(|e| Error::layer(path, &t.name, e.to_string()))
}

/// The `__metadata__` of a mapped checkpoint file: a safetensors file's, none for a `torch.save` file.
pub fn file_metadata(map: &[u8], path: &Path) -> Result<HashMap<String, String>> {
    if crate::io::torch::is_torch_zip(map) {
        return Ok(HashMap::new());
    }
    let (_, meta) = SafeTensors::read_metadata(map)
        .map_err(|e| Error::format(path, format!("not a safetensors file: {e}")))?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// Memory-map a checkpoint file (read-only).
pub fn map_weights(path: &Path) -> Result<Mmap> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the checkpoint is opened read-only; like every mmap-based loader we assume the file is not
    // truncated by another process while it is mapped.
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

/// What is said of a tensor [`StoredWeight::contiguous`] is false for.
pub const NOT_CONTIGUOUS: &str =
    "saved by torch.save as a view with other strides, which cannot be \
     read in place; save the state_dict with contiguous tensors, or as safetensors";

/// One stored value (its little-endian bytes) as f32.
type Decode = fn(&[u8]) -> f32;

struct TensorLoc {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
    /// See [`StoredWeight::contiguous`].
    contiguous: bool,
    /// What the name reads: the stored bytes, or a view made at load.
    view: View,
}

enum View {
    /// The bytes `start..end` as stored (or a row block of a stored tensor: [`Weights::split_rows`]).
    Stored,
    /// Columns of a stored `[rows, stored_cols]` matrix, transposed ([`Weights::transposed_columns`],
    /// [`Weights::strided_columns`]): `shape` is `[cols, rows]` (or `[cols]` of a one-row matrix),
    /// `start..end` the whole stored matrix.
    Columns(Columns),
    /// Tensors of one shape stacked ([`Weights::stack`]): `shape` is `[parts, their shape…]`, the
    /// location fields the first part's.
    Stack(Vec<String>),
    /// FP8 e4m3 values, each × the scale of its block ([`Weights::block_scaled`]): the scales' tensor
    /// and the block's rows and columns.
    BlockScaled { scale: String, block: [usize; 2] },
}

/// Columns `first`, `first + step`, … of a matrix of `stored_cols` columns.
#[derive(Clone, Copy)]
struct Columns {
    stored_cols: usize,
    first: usize,
    step: usize,
}

/// An FP8 e4m3 value (`float8_e4m3fn`: bias 7, no infinities, S.1111.111 NaN), exactly, as f32: a
/// lookup in a table of the 256 codes, built once (it runs on every element of an FP8 weight read).
pub fn e4m3_to_f32(b: u8) -> f32 {
    static TABLE: std::sync::LazyLock<[f32; 256]> =
        std::sync::LazyLock::new(|| std::array::from_fn(|b| e4m3_decode(b as u8)));
    TABLE[b as usize]
}

/// [`e4m3_to_f32`] computed from the code's fields.
fn e4m3_decode(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (exp, man) = (((b >> 3) & 0xF) as i32, (b & 7) as f32);
    sign * match (exp, man) {
        (15, 7.0) => f32::NAN,
        (0, _) => man / 8.0 * (-6f32).exp2(),
        _ => (1.0 + man / 8.0) * ((exp - 7) as f32).exp2(),
    }
}

pub struct Weights {
    files: Vec<(PathBuf, Mmap)>,
    /// Every tensor by name: those stored in the files, and the row blocks of fused ones
    /// ([`Weights::split_rows`]), named in `parts`.
    tensors: HashMap<String, TensorLoc>,
    parts: std::collections::HashSet<String>,
    /// [`ParamStore::id`]: from a process-wide counter.
    id: u64,
}

impl Weights {
    /// Open the checkpoint directory's weight file(s) ([`weight_files`]) and index their tensors.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_paths(weight_files(dir)?.files.into_iter().map(|f| dir.join(f)))
    }

    /// Open one weights file (a PyTorch `state_dict` saved with `safetensors.torch.save_file`, or with
    /// `torch.save`).
    pub fn open_file(path: &Path) -> Result<Self> {
        Self::open_paths(std::iter::once(path.to_path_buf()))
    }

    fn open_paths(names: impl Iterator<Item = PathBuf>) -> Result<Self> {
        let mut files = Vec::new();
        let mut tensors = HashMap::new();
        for path in names {
            let map = map_weights(&path)?;
            for t in stored_weights(&map, &path)? {
                tensors.insert(
                    t.name,
                    TensorLoc {
                        file: files.len(),
                        dtype: t.dtype,
                        shape: t.shape,
                        start: t.start,
                        end: t.end,
                        contiguous: t.contiguous,
                        view: View::Stored,
                    },
                );
            }
            files.push((path, map));
        }
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Weights {
            files,
            tensors,
            parts: Default::default(),
            id,
        })
    }

    /// Name consecutive row blocks of the stored 2-D tensor `fused` as tensors of their own, read in place
    /// (rows of a row-major matrix are contiguous bytes): `parts` lists each block's name and row count, in
    /// order, and their rows must add up to the fused tensor's. For checkpoints that store projections
    /// fused (Phi-3's `qkv_proj`, `gate_up_proj`) while the runtime reads them one by one. The parts are
    /// not listed by [`Weights::names`] (it lists what the files store). A 3-D tensor splits as the
    /// stack of its matrices' rows (transformers 5's fused experts).
    pub fn split_rows(&mut self, fused: &str, parts: &[(String, usize)]) -> Result<()> {
        let loc = self
            .tensors
            .get(fused)
            .ok_or_else(|| Error::Model(format!("checkpoint has no tensor '{fused}'")))?;
        let total: usize = parts.iter().map(|p| p.1).sum();
        // A 1-D tensor (a fused bias) splits into 1-D parts: rows of one value.
        let stored = matches!(loc.view, View::Stored);
        let (rows, cols) = match loc.shape[..] {
            [r, c] if r == total && stored => (r, c),
            // A stack of matrices (a mixture's experts fused, `[experts, rows, cols]`): their rows one
            // after the other.
            [e, r, c] if e * r == total && stored => (e * r, c),
            [r] if r == total => (r, 1),
            _ => {
                return Err(Error::layer(
                    &self.files[loc.file].0,
                    fused,
                    format!(
                        "shape {:?} cannot be split into row blocks of {:?}",
                        loc.shape,
                        parts.iter().map(|p| p.1).collect::<Vec<_>>()
                    ),
                ))
            }
        };
        let one_d = loc.shape.len() == 1;
        let row_bytes = cols * loc.dtype.bitsize() / 8;
        if rows * row_bytes != loc.end - loc.start {
            return Err(Error::layer(
                &self.files[loc.file].0,
                fused,
                "data offsets do not match the shape and dtype",
            ));
        }
        let (file, dtype, mut start, contiguous) = (loc.file, loc.dtype, loc.start, loc.contiguous);
        for (name, r) in parts {
            let end = start + r * row_bytes;
            self.tensors.insert(
                name.clone(),
                TensorLoc {
                    file,
                    dtype,
                    shape: if one_d { vec![*r] } else { vec![*r, cols] },
                    start,
                    end,
                    contiguous,
                    view: View::Stored,
                },
            );
            self.parts.insert(name.clone());
            start = end;
        }
        Ok(())
    }

    /// Name consecutive column blocks of the stored 2-D tensor `stored` (`[rows, cols]`), transposed, as
    /// tensors of their own: `parts` lists each block's name and column count, in order, adding up to
    /// `cols`; part i is `[its columns, rows]`, copied out when read. For GPT-2's `Conv1D` layers, which
    /// store `[in, out]` (y = x W + b) where the runtime reads `[out, in]`, and its fused `c_attn`,
    /// whose q, k and v are column blocks. Not listed by [`Weights::names`]; never read as bf16 bits.
    pub fn transposed_columns(&mut self, stored: &str, parts: &[(String, usize)]) -> Result<()> {
        let loc = self
            .tensors
            .get(stored)
            .ok_or_else(|| Error::Model(format!("checkpoint has no tensor '{stored}'")))?;
        let total: usize = parts.iter().map(|p| p.1).sum();
        let rows = match loc.shape[..] {
            [r, c] if c == total && matches!(loc.view, View::Stored) => r,
            _ => {
                return Err(Error::layer(
                    &self.files[loc.file].0,
                    stored,
                    format!(
                        "shape {:?} cannot be split into column blocks of {:?}",
                        loc.shape,
                        parts.iter().map(|p| p.1).collect::<Vec<_>>()
                    ),
                ))
            }
        };
        let (file, dtype, start, end, contiguous) =
            (loc.file, loc.dtype, loc.start, loc.end, loc.contiguous);
        let mut first = 0;
        for (name, c) in parts {
            self.tensors.insert(
                name.clone(),
                TensorLoc {
                    file,
                    dtype,
                    shape: vec![*c, rows],
                    start,
                    end,
                    contiguous,
                    view: View::Columns(Columns {
                        stored_cols: total,
                        first,
                        step: 1,
                    }),
                },
            );
            self.parts.insert(name.clone());
            first += c;
        }
        Ok(())
    }

    /// Name the columns `first`, `first + step`, … (`count` of them) of matrix `m` of the stored tensor
    /// `stored`, transposed, as `name`: of a stack of matrices `[n, rows, cols]` a `[count, rows]`
    /// tensor, of a stack of rows `[n, cols]` (row `m`) a `[count]` one; copied out when read. For
    /// GPT-OSS's experts, stored inputs first with the gate and up columns interleaved
    /// (`gate_up_proj` `[experts, hidden, 2 inter]`: the gate is columns 0, 2, …, of each expert's
    /// matrix; its biases `[experts, 2 inter]` likewise). Not listed by [`Weights::names`]; never read as
    /// bf16 bits.
    pub fn strided_columns(
        &mut self,
        stored: &str,
        m: usize,
        (first, step, count): (usize, usize, usize),
        name: &str,
    ) -> Result<()> {
        let loc = self
            .tensors
            .get(stored)
            .ok_or_else(|| Error::Model(format!("checkpoint has no tensor '{stored}'")))?;
        let (n, rows, cols, shape) = match loc.shape[..] {
            [n, r, c] => (n, r, c, vec![count, r]),
            [n, c] => (n, 1, c, vec![count]),
            _ => (0, 0, 0, vec![]),
        };
        let fits = count > 0 && step > 0 && first + (count - 1) * step < cols;
        if m >= n || !fits || !matches!(loc.view, View::Stored) {
            return Err(Error::layer(
                &self.files[loc.file].0,
                stored,
                format!(
                    "shape {:?} has no matrix {m} with {count} columns from {first} in steps of {step}",
                    loc.shape
                ),
            ));
        }
        let bytes = rows * cols * loc.dtype.bitsize() / 8;
        let start = loc.start + m * bytes;
        let view = View::Columns(Columns {
            stored_cols: cols,
            first,
            step,
        });
        let part = TensorLoc {
            shape,
            start,
            end: start + bytes,
            view,
            ..*loc
        };
        self.tensors.insert(name.to_string(), part);
        self.parts.insert(name.to_string());
        Ok(())
    }

    /// Read the stored FP8 (e4m3) matrix `weight` `[rows, cols]` as its values × the scale of their
    /// block: `scale` `[⌈rows / block[0]⌉, ⌈cols / block[1]⌉]` (transformers' fine-grained FP8,
    /// DeepSeek-V3's `weight_scale_inv`: despite the name, a factor). Converted when read; never read
    /// as bf16 bits.
    pub fn block_scaled(&mut self, weight: &str, scale: &str, block: [usize; 2]) -> Result<()> {
        let (Some(w), Some(s)) = (self.tensors.get(weight), self.tensors.get(scale)) else {
            return Err(Error::Model(format!(
                "FP8 tensor '{weight}' has no block scales '{scale}'"
            )));
        };
        let path = &self.files[w.file].0;
        let [rows, cols] = match w.shape[..] {
            [r, c] if w.dtype == Dtype::F8_E4M3 && matches!(w.view, View::Stored) => [r, c],
            _ => {
                return Err(Error::layer(
                    path,
                    weight,
                    format!(
                        "{:?} {:?} is not an FP8 (e4m3) matrix as stored",
                        w.dtype, w.shape
                    ),
                ))
            }
        };
        let want = [rows.div_ceil(block[0]), cols.div_ceil(block[1])];
        if s.shape != want || !matches!(s.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
            return Err(Error::layer(
                path,
                scale,
                format!(
                    "{:?} {:?}: the scales of {rows} × {cols} in blocks of {} × {} are {want:?} \
                     floats",
                    s.dtype, s.shape, block[0], block[1]
                ),
            ));
        }
        let scale = scale.to_string();
        self.tensors.get_mut(weight).expect("checked above").view =
            View::BlockScaled { scale, block };
        Ok(())
    }

    /// Name the stored tensors `parts` (all of one shape and dtype), stacked in order, as `name`:
    /// `[parts, their shape…]`, copied out when read. For StableLM 2 12B's per-head q/k LayerNorms, one
    /// module (and weight) per head, which the runtime reads as one norm with a weight row per head.
    /// Not listed by [`Weights::names`]; never read as bf16 bits.
    pub fn stack(&mut self, name: &str, parts: &[String]) -> Result<()> {
        let Some(first) = parts.first() else {
            return Err(Error::Model(format!("'{name}': no tensors to stack")));
        };
        let loc = self
            .tensors
            .get(first)
            .ok_or_else(|| Error::Model(format!("checkpoint has no tensor '{first}'")))?;
        let (file, dtype, part_shape, start, end, contiguous) = (
            loc.file,
            loc.dtype,
            loc.shape.clone(),
            loc.start,
            loc.end,
            loc.contiguous,
        );
        for p in parts {
            let loc = self
                .tensors
                .get(p)
                .ok_or_else(|| Error::Model(format!("checkpoint has no tensor '{p}'")))?;
            if loc.shape != part_shape || loc.dtype != dtype || !matches!(loc.view, View::Stored) {
                return Err(Error::layer(
                    &self.files[loc.file].0,
                    p,
                    format!(
                        "{:?} {:?} cannot be stacked with '{first}' ({dtype:?} {part_shape:?})",
                        loc.dtype, loc.shape
                    ),
                ));
            }
        }
        let shape = std::iter::once(parts.len()).chain(part_shape).collect();
        self.tensors.insert(
            name.into(),
            TensorLoc {
                file,
                dtype,
                shape,
                start,
                end,
                contiguous,
                view: View::Stack(parts.to_vec()),
            },
        );
        self.parts.insert(name.into());
        Ok(())
    }

    /// Read the stored tensor `stored` as `name` from now on (the other name is gone): for checkpoints
    /// whose modules the runtime knows under other names (Granite MoE's `input_linear`, transformers'
    /// `experts.gate_up_proj`). [`Weights::names`] lists it as `name`. Nothing if `stored` is absent.
    pub fn rename(&mut self, stored: &str, name: &str) {
        if let Some(loc) = self.tensors.remove(stored) {
            self.tensors.insert(name.to_string(), loc);
        }
    }

    /// The stored dtype of `name`.
    pub fn dtype(&self, name: &str) -> Option<Dtype> {
        self.tensors.get(name).map(|t| t.dtype)
    }

    /// The stored shape of `name`.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| &t.shape[..])
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Check that `name` exists with `shape` and a float dtype the runtime reads.
    pub fn expect(&self, name: &str, shape: &[usize]) -> Result<()> {
        let loc = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::Model(format!("checkpoint has no tensor '{name}'")))?;
        let path = &self.files[loc.file].0;
        if loc.shape != shape {
            return Err(Error::layer(
                path,
                name,
                format!("shape {:?}, the config implies {:?}", loc.shape, shape),
            ));
        }
        self.decoder(name, loc).map(|_| ())
    }

    /// How tensor `name`'s stored values read as f32: their size in bytes and the conversion of one;
    /// an error naming the tensor for a dtype the runtime does not read.
    fn decoder(&self, name: &str, loc: &TensorLoc) -> Result<(usize, Decode)> {
        let f: Decode = match loc.dtype {
            Dtype::F8_E4M3 if matches!(loc.view, View::BlockScaled { .. }) => |c| e4m3_to_f32(c[0]),
            Dtype::F8_E4M3 => {
                return Err(Error::layer(
                    &self.files[loc.file].0,
                    name,
                    format!(
                        "dtype F8_E4M3 without block scales ('{name}_scale_inv' and a \
                         quantization_config with quant_method 'fp8' and a weight_block_size)"
                    ),
                ))
            }
            Dtype::F32 => |c| f32::from_le_bytes(c.try_into().expect("4-byte chunk")),
            Dtype::BF16 => |c| bf16::from_le_bytes([c[0], c[1]]).to_f32(),
            Dtype::F16 => |c| f16::from_le_bytes([c[0], c[1]]).to_f32(),
            Dtype::F64 => |c| f64::from_le_bytes(c.try_into().expect("8-byte chunk")) as f32,
            other => {
                return Err(Error::layer(
                    &self.files[loc.file].0,
                    name,
                    format!("dtype {other:?} is not supported (f32, f16, bf16, f64)"),
                ))
            }
        };
        Ok((loc.dtype.bitsize() / 8, f))
    }

    /// The stored bytes of tensor `name` at `loc` in its mapped file.
    fn stored_bytes(&self, name: &str, loc: &TensorLoc) -> Result<&[u8]> {
        let (path, map) = &self.files[loc.file];
        if !loc.contiguous {
            return Err(Error::layer(path, name, NOT_CONTIGUOUS));
        }
        map.get(loc.start..loc.end)
            .ok_or_else(|| Error::layer(path, name, "data offsets run past the end of the file"))
    }

    /// The tensor as f32: borrowed when stored as aligned f32, converted otherwise.
    pub fn get_f32(&self, name: &str) -> Result<Cow<'_, [f32]>> {
        let loc = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::Model(format!("checkpoint has no tensor '{name}'")))?;
        let cols = match &loc.view {
            View::Stored => None,
            View::Columns(cols) => Some(*cols),
            View::Stack(parts) => {
                let mut out = Vec::new();
                for p in parts {
                    out.extend_from_slice(&self.get_f32(p)?);
                }
                return Ok(Cow::Owned(out));
            }
            View::BlockScaled { scale, block } => {
                return self
                    .block_scaled_f32(name, loc, scale, *block)
                    .map(Cow::Owned)
            }
        };
        let bytes = self.stored_bytes(name, loc)?;
        if let Some(cols) = cols {
            return self.transposed_f32(name, loc, cols, bytes).map(Cow::Owned);
        }
        let (size, value) = self.decoder(name, loc)?;
        if loc.dtype == Dtype::F32 && cfg!(target_endian = "little") {
            if let Ok(s) = bytemuck::try_cast_slice::<u8, f32>(bytes) {
                return Ok(Cow::Borrowed(s));
            }
        }
        let mut out = vec![0f32; bytes.len() / size];
        out.par_chunks_mut(8192)
            .zip(bytes.par_chunks(8192 * size))
            .for_each(|(o, b)| {
                o.iter_mut()
                    .zip(b.chunks_exact(size))
                    .for_each(|(o, c)| *o = value(c))
            });
        Ok(Cow::Owned(out))
    }

    /// An FP8 matrix × its block scales, as f32 (each product rounded once, as transformers'
    /// dequantisation in f32).
    fn block_scaled_f32(
        &self,
        name: &str,
        loc: &TensorLoc,
        scale: &str,
        block: [usize; 2],
    ) -> Result<Vec<f32>> {
        let bytes = self.stored_bytes(name, loc)?;
        let cols = loc.shape[1];
        let scales = self.get_f32(scale)?;
        let per_row = cols.div_ceil(block[1]);
        if bytes.len() != loc.shape[0] * cols {
            return Err(Error::layer(
                &self.files[loc.file].0,
                name,
                "data offsets do not match the shape and dtype",
            ));
        }
        let mut out = vec![0f32; bytes.len()];
        (out.par_chunks_mut(cols).zip(bytes.par_chunks(cols)))
            .enumerate()
            .for_each(|(r, (o, b))| {
                let s = &scales[(r / block[0]) * per_row..][..per_row];
                for (c, (o, &b)) in o.iter_mut().zip(b).enumerate() {
                    *o = e4m3_to_f32(b) * s[c / block[1]];
                }
            });
        Ok(out)
    }

    /// A transposed column block as f32 (`[cols, rows]` from the stored `[rows, stored_cols]`).
    fn transposed_f32(
        &self,
        name: &str,
        loc: &TensorLoc,
        cols: Columns,
        bytes: &[u8],
    ) -> Result<Vec<f32>> {
        let (width, rows) = (loc.shape[0], loc.shape.get(1).copied().unwrap_or(1));
        let (size, value) = self.decoder(name, loc)?;
        if bytes.len() != rows * cols.stored_cols * size {
            return Err(Error::layer(
                &self.files[loc.file].0,
                name,
                "data offsets do not match the shape and dtype",
            ));
        }
        let mut out = vec![0f32; width * rows];
        out.par_chunks_mut(rows).enumerate().for_each(|(j, o)| {
            let col = cols.first + j * cols.step;
            for (i, o) in o.iter_mut().enumerate() {
                let at = (i * cols.stored_cols + col) * size;
                *o = value(&bytes[at..at + size]);
            }
        });
        Ok(out)
    }

    /// Names of every tensor the files store (unordered; not the parts of [`Weights::split_rows`]).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors
            .keys()
            .filter(|n| !self.parts.contains(*n))
            .map(String::as_str)
    }
}

impl ParamStore for Weights {
    fn param(&self, name: &str) -> Result<Cow<'_, [f32]>> {
        self.get_f32(name)
    }
    fn id(&self) -> u64 {
        self.id
    }
    fn param_bf16(&self, name: &str) -> Result<Option<Cow<'_, [u16]>>> {
        let Some(loc) = self.tensors.get(name) else {
            return Ok(None);
        };
        // A transposed or stacked view is no run of stored bits: read it through `param`.
        if loc.dtype != Dtype::BF16 || !matches!(loc.view, View::Stored) {
            return Ok(None);
        }
        let bytes = self.stored_bytes(name, loc)?;
        Ok(Some(match bytemuck::try_cast_slice::<u8, u16>(bytes) {
            Ok(s) if cfg!(target_endian = "little") => Cow::Borrowed(s),
            _ => Cow::Owned(
                bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_values_are_float8_e4m3fn() {
        // 1, −2, the largest (448), the smallest subnormal (2⁻⁹) and normal (2⁻⁶), 0, −0, NaN.
        for (b, want) in [
            (0x38, 1.0),
            (0xC0, -2.0),
            (0x7E, 448.0),
            (0x01, 2f32.powi(-9)),
            (0x08, 2f32.powi(-6)),
            (0x00, 0.0),
        ] {
            assert_eq!(e4m3_to_f32(b), want, "{b:#x}");
        }
        assert!(e4m3_to_f32(0x80) == 0.0 && e4m3_to_f32(0x80).is_sign_negative());
        assert!(e4m3_to_f32(0x7F).is_nan() && e4m3_to_f32(0xFF).is_nan());
        // Monotone over the positive codes: each a distinct, larger value.
        let pos: Vec<f32> = (0..0x7F).map(e4m3_to_f32).collect();
        assert!(pos.windows(2).all(|w| w[0] < w[1]));
    }

    /// A bf16 checkpoint's tensors come back as their stored bits, the same values `param` converts to
    /// f32; an f32 checkpoint has no bf16 bits to give.
    #[test]
    fn bf16_bits_are_read_as_stored() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let w = Weights::open(&fixtures.join("llama_bf16_tied")).unwrap();
        let name = "model.layers.0.mlp.up_proj.weight";
        let bits = w.param_bf16(name).unwrap().expect("stored as bf16");
        let vals = w.param(name).unwrap();
        assert_eq!(bits.len(), vals.len());
        assert!(vals.iter().any(|&v| v != 0.0));
        for (&b, &v) in bits.iter().zip(vals.iter()) {
            assert_eq!(bf16::from_bits(b).to_f32().to_bits(), v.to_bits());
        }
        assert!(w.param_bf16("no.such.tensor").unwrap().is_none());
        let f32_model = Weights::open(&fixtures.join("llama_llama3_rope")).unwrap();
        let name = "model.layers.0.mlp.up_proj.weight";
        assert!(f32_model.shape(name).is_some());
        assert!(f32_model.param_bf16(name).unwrap().is_none());
    }

    /// Tensors stacked under a name of their own read as their concatenation, in order, and are not
    /// listed as stored (nor read as bf16 bits, a bf16 checkpoint's though they are); parts of other
    /// shapes, or missing, are errors naming them.
    #[test]
    fn stacked_tensors_read_as_their_concatenation() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let mut w = Weights::open(&fixtures.join("stablelm_qk_layernorm")).unwrap();
        let part = |h: usize| format!("model.layers.1.self_attn.q_layernorm.norms.{h}.weight");
        let parts: Vec<String> = [2, 0, 3].map(part).to_vec();
        w.stack("stacked", &parts).unwrap();
        assert_eq!(w.shape("stacked"), Some(&[3, 16][..]));
        let want: Vec<f32> = (parts.iter())
            .flat_map(|p| w.get_f32(p).unwrap().into_owned())
            .collect();
        assert!(want[..16] != want[16..32]);
        assert_eq!(w.get_f32("stacked").unwrap(), want);
        assert!(w.param_bf16("stacked").unwrap().is_none());
        assert!(w.param_bf16(&parts[0]).unwrap().is_some());
        assert!(w.names().all(|n| n != "stacked"));
        let other = "model.layers.1.self_attn.k_proj.weight".to_string();
        let e = w.stack("bad", &[part(0), other]).unwrap_err().to_string();
        assert!(
            e.contains("k_proj") && e.contains("cannot be stacked"),
            "{e}"
        );
        let e = w.stack("bad", &[part(0), part(9)]).unwrap_err().to_string();
        assert!(e.contains("norms.9"), "{e}");
        assert!(!w.contains("bad"));
    }
}
