//! Directories of `.npy` activation files, one file per layer, the layer named by the file stem.
//!
//! Headers are parsed by `npyz`; the data is memory-mapped later, one shard at a time, by
//! [`super::shards`]. Supported: little-endian f32 / f64 / f16 in C order (or any order when at most one
//! axis is longer than 1, where both orders coincide).

use super::{natural_cmp, DType, StoredTensor};
use crate::error::{Error, Result};
use npyz::{NpyHeader, Order, TypeChar};
use regex::Regex;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Read the header of every `.npy` file in `dir` and list them as layers in natural order of their stems.
/// Only the layers `keep` accepts are opened.
pub(crate) fn read_dir_headers(dir: &Path, keep: Option<&Regex>) -> Result<Vec<StoredTensor>> {
    let mut files = npy_files(dir)?;
    if files.is_empty() {
        return Err(Error::format(dir, "directory holds no .npy files"));
    }
    files.sort_by(|a, b| natural_cmp(&a.0, &b.0));
    files
        .into_iter()
        .filter(|(name, _)| keep.is_none_or(|re| re.is_match(name)))
        .map(|(name, path)| read_header(&path, name))
        .collect()
}

/// `(stem, path)` of every regular `.npy` file directly in `dir`.
fn npy_files(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let is_npy = path
            .extension()
            .is_some_and(|x| x.eq_ignore_ascii_case("npy"));
        if is_npy && path.is_file() {
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            files.push((stem, path));
        }
    }
    Ok(files)
}

/// Parse one `.npy` header and check that the data it declares is exactly what follows it in the file.
fn read_header(path: &Path, name: String) -> Result<StoredTensor> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut pre = [0u8; 12];
    let n = (&mut file)
        .take(12)
        .read(&mut pre)
        .map_err(|e| Error::io(path, e))?;
    // Checked against the file size, so this buffer is bounded by the file.
    let mut head = vec![0u8; header_bytes(&pre[..n], file_len, path)? as usize];
    file.seek(SeekFrom::Start(0))
        .map_err(|e| Error::io(path, e))?;
    file.read_exact(&mut head).map_err(|e| Error::io(path, e))?;
    parse_header(&head, file_len, path, name)
}

/// One `.npy` layer from the first bytes of its file (`head`: at least the whole header; the file is
/// `file_len` bytes long): its dtype and shape, checked to declare exactly the data after the header.
/// `path` and `name` are what errors and the returned tensor name.
pub(crate) fn parse_header(
    head: &[u8],
    file_len: u64,
    path: &Path,
    name: String,
) -> Result<StoredTensor> {
    check_header(head, file_len, path)?;
    let mut rest = head;
    let header = NpyHeader::from_reader(&mut rest)
        .map_err(|e| Error::format(path, format!("corrupt npy header: {e}")))?;
    let offset = (head.len() - rest.len()) as u64;

    let dtype = dtype_of(&header).map_err(|msg| Error::layer(path, &name, msg))?;
    let shape: Vec<usize> = header
        .shape()
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<_, _>>()
        .map_err(|_| Error::layer(path, &name, "shape does not fit in memory"))?;
    let fortran_differs = shape.iter().filter(|&&d| d > 1).count() > 1;
    if header.order() == Order::Fortran && fortran_differs {
        return Err(Error::layer(
            path,
            &name,
            "Fortran-order arrays are not supported; save with np.ascontiguousarray",
        ));
    }
    let data_bytes = shape
        .iter()
        .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64));
    if data_bytes.and_then(|b| b.checked_add(offset)) != Some(file_len) {
        let declared = data_bytes.map_or("an overflowing number of".to_string(), |b| b.to_string());
        return Err(Error::layer(
            path,
            &name,
            format!(
                "truncated or corrupt npy file: shape {shape:?} of {} declares {declared} bytes of data \
                 but the file holds {}",
                dtype.name(),
                file_len - offset
            ),
        ));
    }
    Ok(StoredTensor {
        name,
        dtype,
        shape,
        file: path.to_path_buf(),
        offset,
        file_len,
    })
}

/// Check the header of the `.npy` file held in `bytes` before any npyz reader sees it: its length field
/// against the file's length (npyz allocates that many bytes first: 4 GB for a 100-byte file), and the
/// nesting of its Python literal (npyz's parser takes time exponential in the depth: a 200-byte header
/// of 30 nested brackets would run for hours). Every reader of a `.npy` file calls this first.
pub fn check_npy_bytes(bytes: &[u8], path: &Path) -> Result<()> {
    check_header(bytes, bytes.len() as u64, path)
}

/// Deepest bracket nesting accepted in an npy header: numpy writes depth 2 for the plain dtypes read
/// here (`{... 'shape': (4, 3), }`), 4 for structured ones. Depth 8 already costs npyz's parser ~0.1 s,
/// and each further level doubles it.
const MAX_HEADER_NESTING: usize = 6;

/// [`check_npy_bytes`] on the first bytes of a file of `file_len` bytes (`head`: the whole header, or
/// the whole file when shorter).
fn check_header(head: &[u8], file_len: u64, path: &Path) -> Result<()> {
    let total = header_bytes(&head[..head.len().min(12)], file_len, path)? as usize;
    let prefix = if head[6] == 1 { 10 } else { 12 };
    let text = &head[prefix.min(head.len())..total.min(head.len())];
    // Brackets inside quoted strings do not nest, but a closing one there must not be counted as
    // closing either: npyz's parser would see the depth that this count would otherwise miss (a 175-byte
    // header with `'}'` strings between `{{` ran past the fuzzer's 10 s timeout).
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut quote, mut escaped) = (None::<u8>, false);
    for &c in text {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == b'\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            b'\'' | b'"' => quote = Some(c),
            b'(' | b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    if deepest > MAX_HEADER_NESTING {
        return Err(Error::format(
            path,
            format!(
                "corrupt npy header: brackets nested {deepest} deep (at most {MAX_HEADER_NESTING})"
            ),
        ));
    }
    match shape_element_count(text) {
        Some(ShapeCount::Overflows) => Err(Error::format(
            path,
            "corrupt npy header: the shape's element count does not fit in 64 bits",
        )),
        Some(ShapeCount::NotIntegers) => Err(Error::format(
            path,
            "corrupt npy header: the shape is not a tuple of non-negative integers",
        )),
        _ => Ok(()),
    }
}

/// What [`shape_element_count`] found wrong, or the count.
enum ShapeCount {
    Fits,
    Overflows,
    NotIntegers,
}

/// The header's `'shape': (...)`: a tuple of plain non-negative integers (numpy writes nothing else;
/// Python 2 wrote a trailing `L`) whose product fits u64. npyz evaluates more than plain integers (`1-1`)
/// and multiplies unchecked: a panic with overflow checks, a wrapped count without (found by the `tokens`
/// and `matrix` fuzz targets). None when no shape tuple can be found: npyz's own errors then apply.
fn shape_element_count(text: &[u8]) -> Option<ShapeCount> {
    let at = text.windows(5).position(|w| w == b"shape")?;
    let rest = &text[at..];
    let open = rest.iter().position(|&c| c == b'(')?;
    let close = rest.iter().position(|&c| c == b')')?;
    if close < open {
        return None;
    }
    let mut product: u64 = 1;
    for part in rest[open + 1..close].split(|&c| c == b',') {
        let part = part.trim_ascii();
        if part.is_empty() {
            continue; // `(3,)` and `()`
        }
        let digits = part.strip_suffix(b"L").unwrap_or(part);
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return Some(ShapeCount::NotIntegers);
        }
        let value = std::str::from_utf8(digits)
            .ok()
            .and_then(|d| d.parse::<u64>().ok());
        match value.and_then(|v| product.checked_mul(v)) {
            Some(p) => product = p,
            None => return Some(ShapeCount::Overflows),
        }
    }
    Some(ShapeCount::Fits)
}

/// Bytes of the whole header (magic, version, length field and text) of an npy file of `file_len` bytes
/// whose first bytes are `pre` (12, or all when the file is shorter), checked to fit in the file.
fn header_bytes(pre: &[u8], file_len: u64, path: &Path) -> Result<u64> {
    let truncated = || Error::format(path, "truncated or corrupt npy file (no complete header)");
    let n = pre.len();
    if n < 10 || &pre[..6] != b"\x93NUMPY" {
        return Err(Error::format(path, "not an npy file (magic not found)"));
    }
    let (prefix, text_len) = match pre[6] {
        1 => (10u64, u16::from_le_bytes([pre[8], pre[9]]) as u64),
        2 | 3 if n == 12 => (
            12,
            u32::from_le_bytes([pre[8], pre[9], pre[10], pre[11]]) as u64,
        ),
        2 | 3 => return Err(truncated()),
        v => {
            return Err(Error::format(
                path,
                format!("unsupported npy format version {v}"),
            ))
        }
    };
    if prefix + text_len > file_len {
        return Err(Error::format(
            path,
            format!(
                "truncated or corrupt npy file: header of {text_len} bytes exceeds the file size {file_len}"
            ),
        ));
    }
    Ok(prefix + text_len)
}

/// Our dtype for a plain little-endian float npy dtype, or why not.
pub(crate) fn dtype_of(header: &NpyHeader) -> std::result::Result<DType, String> {
    let npyz::DType::Plain(ts) = header.dtype() else {
        return Err(format!(
            "unsupported npy dtype {} (expected <f4, <f8 or <f2)",
            header.dtype().descr()
        ));
    };
    let unsupported = || format!("unsupported npy dtype '{ts}' (expected <f4, <f8 or <f2)");
    if ts.type_char() != TypeChar::Float {
        return Err(unsupported());
    }
    let dtype = match ts.size_field() {
        4 => DType::F32,
        8 => DType::F64,
        2 => DType::F16,
        _ => return Err(unsupported()),
    };
    if ts.endianness() == npyz::Endianness::Big && dtype.size() > 1 {
        return Err(format!(
            "big-endian npy dtype '{ts}' is not supported (expected little-endian)"
        ));
    }
    Ok(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An npy file of `header` (padded as numpy pads it) and a few data bytes.
    fn npy(header: &str) -> Vec<u8> {
        let mut h = header.to_string();
        while !(10 + h.len() + 1).is_multiple_of(64) {
            h.push(' ');
        }
        h.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(h.len() as u16).to_le_bytes());
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(&[0u8; 16]);
        out
    }

    #[test]
    fn a_shape_whose_element_count_overflows_is_refused_before_npyz_reads_it() {
        let p = Path::new("t.npy");
        for shape in [
            "(1099511627776, 1099511627776)",
            "(99999999999999999999, 2)",
        ] {
            let bytes = npy(&format!(
                "{{'descr': '<i8', 'fortran_order': False, 'shape': {shape}, }}"
            ));
            let err = check_npy_bytes(&bytes, p).unwrap_err().to_string();
            assert!(err.contains("does not fit in 64 bits"), "{shape}: {err}");
        }
        // Brackets inside quoted strings neither open nor close: `{{'}'` is two deep, not one.
        let deep = npy(&format!(
            "{{'descr': '<f4', 'x': {}'}}', 'shape': (2,), }}",
            "{{'}}': ".repeat(6) + "1" + &"}".repeat(6)
        ));
        let err = check_npy_bytes(&deep, p).unwrap_err().to_string();
        assert!(err.contains("nested"), "{err}");
        // Not plain integers (npyz would evaluate the expression): refused.
        for shape in ["(3, 1111111111111-111111, 2)", "(3, x)"] {
            let bytes = npy(&format!(
                "{{'descr': '<f8', 'fortran_order': False, 'shape': {shape}, }}"
            ));
            let err = check_npy_bytes(&bytes, p).unwrap_err().to_string();
            assert!(
                err.contains("not a tuple of non-negative integers"),
                "{shape}: {err}"
            );
        }
        // Large but representable, the empty shape of a scalar, Python 2's `L`: left to the readers.
        for shape in ["(4294967296, 4294967295)", "()", "(3,)", "(3L, 4L)"] {
            let bytes = npy(&format!(
                "{{'descr': '<i8', 'fortran_order': False, 'shape': {shape}, }}"
            ));
            assert!(check_npy_bytes(&bytes, p).is_ok(), "{shape}");
        }
    }
}
