//! `.safetensors` activation files: one tensor per layer, shape `[n, ...]`.
//!
//! Reading: only the header is read here (the 8-byte length, then the JSON, parsed by the `safetensors`
//! crate's own `Metadata`); the data is memory-mapped later, one shard at a time, by [`super::shards`].
//! Writing: [`StreamedSafetensors`], batch by batch (what `capture` writes).

use super::output::AtomicFile;
use super::{natural_cmp, DType, StoredTensor};
use crate::error::{Error, Result};
use regex::Regex;
use safetensors::tensor::Metadata;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

/// The safetensors crate refuses headers above 100 MB; so do we, before allocating anything.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Bytes of the little-endian header-length prefix.
const LEN_PREFIX: u64 = 8;

/// Read the header of the `.safetensors` file at `path` and list its layers in order: the metadata key
/// `layers` (comma-separated tensor names; other tensors are ignored) when present, else every tensor in
/// natural name order. Only the layers `keep` accepts are checked and listed.
pub(crate) fn read_header(path: &Path, keep: Option<&Regex>) -> Result<Vec<StoredTensor>> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut prefix = [0u8; LEN_PREFIX as usize];
    if file_len >= LEN_PREFIX {
        file.read_exact(&mut prefix)
            .map_err(|e| Error::io(path, e))?;
    }
    let header_len = header_len(prefix, file_len, path)?;
    // Checked against the file size, so this allocation is bounded by the file.
    let mut json = vec![0u8; header_len as usize];
    file.read_exact(&mut json).map_err(|e| Error::io(path, e))?;
    parse_header(&json, file_len, path, keep)
}

/// [`read_header`] of a whole file's bytes (`path` names it in errors and in the returned tensors).
pub(crate) fn header_from_bytes(
    bytes: &[u8],
    path: &Path,
    keep: Option<&Regex>,
) -> Result<Vec<StoredTensor>> {
    let file_len = bytes.len() as u64;
    let mut prefix = [0u8; LEN_PREFIX as usize];
    if let Some(p) = bytes.get(..LEN_PREFIX as usize) {
        prefix.copy_from_slice(p);
    }
    let header_len = header_len(prefix, file_len, path)?;
    let json = &bytes[LEN_PREFIX as usize..(LEN_PREFIX + header_len) as usize];
    parse_header(json, file_len, path, keep)
}

/// The layers of a safetensors file of `file_len` bytes whose header JSON is `json`.
fn parse_header(
    json: &[u8],
    file_len: u64,
    path: &Path,
    keep: Option<&Regex>,
) -> Result<Vec<StoredTensor>> {
    let header_len = json.len() as u64;
    let metadata: Metadata = serde_json::from_slice(json)
        .map_err(|e| Error::format(path, format!("corrupt safetensors header: {e}")))?;

    let data_start = LEN_PREFIX + header_len;
    let data_len = metadata.data_len() as u64;
    if data_start.checked_add(data_len) != Some(file_len) {
        return Err(Error::format(
            path,
            format!(
                "truncated or corrupt safetensors file: the header declares {data_len} bytes of tensor \
                 data but the file holds {}",
                file_len - data_start
            ),
        ));
    }

    let names = layer_order(&metadata, path)?;
    names
        .into_iter()
        .filter(|name| keep.is_none_or(|re| re.is_match(name)))
        .map(|name| {
            let info = metadata
                .info(&name)
                .ok_or_else(|| Error::format(path, format!("no tensor named '{name}'")))?;
            let dtype = dtype_of(info.dtype).ok_or_else(|| {
                Error::layer(
                    path,
                    &name,
                    format!(
                        "unsupported dtype {:?} (expected F32, F64, F16 or BF16)",
                        info.dtype
                    ),
                )
            })?;
            Ok(StoredTensor {
                name,
                dtype,
                shape: info.shape.clone(),
                file: path.to_path_buf(),
                offset: data_start + info.data_offsets.0 as u64,
                file_len,
            })
        })
        .collect()
}

/// The 8-byte little-endian JSON length (`prefix`, the file's first bytes), checked against the file size
/// (and the crate's 100 MB cap).
fn header_len(prefix: [u8; LEN_PREFIX as usize], file_len: u64, path: &Path) -> Result<u64> {
    if file_len < LEN_PREFIX {
        return Err(Error::format(
            path,
            format!("truncated safetensors file: {file_len} bytes, shorter than the 8-byte header length"),
        ));
    }
    let header_len = u64::from_le_bytes(prefix);
    if header_len > file_len - LEN_PREFIX {
        return Err(Error::format(
            path,
            format!(
                "truncated or corrupt safetensors file: header length {header_len} exceeds the file size \
                 {file_len}"
            ),
        ));
    }
    if header_len > MAX_HEADER_BYTES {
        return Err(Error::format(
            path,
            format!("safetensors header of {header_len} bytes is larger than the 100 MB limit"),
        ));
    }
    Ok(header_len)
}

/// Layer names in order: the `layers` metadata key when present, else natural order of the tensor names.
fn layer_order(metadata: &Metadata, path: &Path) -> Result<Vec<String>> {
    let listed = metadata.metadata().as_ref().and_then(|m| m.get("layers"));
    let names: Vec<String> = match listed {
        Some(list) => {
            let names: Vec<String> = list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            for (i, name) in names.iter().enumerate() {
                if metadata.info(name).is_none() {
                    return Err(Error::format(
                        path,
                        format!(
                            "metadata 'layers' names '{name}', which is not a tensor in the file"
                        ),
                    ));
                }
                if names[..i].contains(name) {
                    return Err(Error::format(
                        path,
                        format!("metadata 'layers' lists '{name}' twice"),
                    ));
                }
            }
            names
        }
        None => {
            let mut names = metadata.offset_keys();
            names.sort_by(|a, b| natural_cmp(a, b));
            names
        }
    };
    if names.is_empty() {
        return Err(Error::format(path, "no tensors in the file"));
    }
    Ok(names)
}

fn dtype_of(d: safetensors::Dtype) -> Option<DType> {
    match d {
        safetensors::Dtype::F32 => Some(DType::F32),
        safetensors::Dtype::F64 => Some(DType::F64),
        safetensors::Dtype::F16 => Some(DType::F16),
        safetensors::Dtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

/// A safetensors file written in place, batch by batch: every tensor's shape is known up front, so the
/// header and each tensor's byte range are fixed before any data exists, and a batch's rows of every layer
/// are written at their offsets. Memory stays at one batch whatever the calibration set's size. Atomic
/// ([`AtomicFile`]): written to a temporary file beside the destination, renamed at the end.
pub struct StreamedSafetensors {
    out: AtomicFile,
    /// Byte offset of each tensor's data in the file.
    starts: Vec<u64>,
    /// Bytes of one leading-axis row (one sequence, one image) of each tensor.
    row_bytes: Vec<u64>,
}

impl StreamedSafetensors {
    /// One f32 tensor per name, each of `shape`, metadata `layers` = the names, comma-separated.
    pub fn create(path: &Path, names: &[String], shape: &[usize]) -> Result<Self> {
        Self::create_shapes(path, names, &vec![shape.to_vec(); names.len()])
    }

    /// One f32 tensor per name, tensor i of `shapes[i]` (a CNN's blocks differ), metadata `layers` = the
    /// names, comma-separated.
    pub fn create_shapes(path: &Path, names: &[String], shapes: &[Vec<usize>]) -> Result<Self> {
        assert_eq!(names.len(), shapes.len(), "one shape per tensor");
        let bytes: Vec<u64> = shapes
            .iter()
            .map(|s| (s.iter().product::<usize>() * 4) as u64)
            .collect();
        let mut header = serde_json::Map::new();
        header.insert(
            "__metadata__".into(),
            serde_json::json!({ "layers": names.join(",") }),
        );
        let mut offsets = Vec::with_capacity(names.len());
        let mut at = 0u64;
        for ((n, shape), &b) in names.iter().zip(shapes).zip(&bytes) {
            header.insert(
                n.clone(),
                serde_json::json!({ "dtype": "F32", "shape": shape, "data_offsets": [at, at + b] }),
            );
            offsets.push(at);
            at += b;
        }
        let mut json = serde_json::to_vec(&header).expect("JSON of plain values");
        // Pad with spaces so the data starts 8-byte aligned (as the safetensors writers do).
        while !json.len().is_multiple_of(8) {
            json.push(b' ');
        }
        let data_start = 8 + json.len() as u64;
        let out = AtomicFile::create(path)?;
        let file = out.file();
        file.set_len(data_start + at)
            .map_err(|e| Error::io(path, e))?;
        let mut head = (json.len() as u64).to_le_bytes().to_vec();
        head.extend_from_slice(&json);
        write_at(file, 0, &head).map_err(|e| Error::io(path, e))?;
        Ok(StreamedSafetensors {
            out,
            starts: offsets.iter().map(|o| data_start + o).collect(),
            row_bytes: shapes
                .iter()
                .map(|s| (s[1..].iter().product::<usize>() * 4) as u64)
                .collect(),
        })
    }

    /// Write `data` (whole rows of tensor `tensor`) starting at leading-axis row `first_row`.
    pub fn write_rows(&mut self, tensor: usize, first_row: usize, data: &[f32]) -> Result<()> {
        let at = self.starts[tensor] + first_row as u64 * self.row_bytes[tensor];
        write_at(self.out.file(), at, bytemuck::cast_slice(data))
            .map_err(|e| Error::io(self.out.path(), e))
    }

    /// Rename the finished file into place.
    pub fn finish(self) -> Result<()> {
        self.out.commit()
    }
}

fn write_at(mut file: &std::fs::File, at: u64, bytes: &[u8]) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(at))?;
    file.write_all(bytes)
}
