//! `.safetensors` activation files: one tensor per layer, shape `[n, ...]`.
//!
//! Only the header is read here (the 8-byte length, then the JSON, parsed by the `safetensors` crate's own
//! `Metadata`); the data is memory-mapped later, one shard at a time, by [`super::shards`].

use super::{natural_cmp, DType, StoredTensor};
use crate::error::{Error, Result};
use regex::Regex;
use safetensors::tensor::Metadata;
use std::fs::File;
use std::io::Read;
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
    let header_len = read_header_len(&mut file, path, file_len)?;

    // Checked against the file size above, so this allocation is bounded by the file.
    let mut json = vec![0u8; header_len as usize];
    file.read_exact(&mut json).map_err(|e| Error::io(path, e))?;
    let metadata: Metadata = serde_json::from_slice(&json)
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

/// The 8-byte little-endian JSON length, checked against the file size (and the crate's 100 MB cap).
fn read_header_len(file: &mut File, path: &Path, file_len: u64) -> Result<u64> {
    if file_len < LEN_PREFIX {
        return Err(Error::format(
            path,
            format!("truncated safetensors file: {file_len} bytes, shorter than the 8-byte header length"),
        ));
    }
    let mut prefix = [0u8; LEN_PREFIX as usize];
    file.read_exact(&mut prefix)
        .map_err(|e| Error::io(path, e))?;
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
