//! A layer-similarity matrix from a file, whoever made it: the input of `sglp-engine segment`.
//!
//! Accepted, detected by extension and content:
//!
//! * the engine's own `sglp-cka/1` JSON ([`crate::similarity::CkaResult`]);
//! * any other JSON: an object with a `cka` key (a list of lists of numbers) and optionally `layers` (a list
//!   of names), or a bare list of lists;
//! * `.npy`: a 2-D L×L float32 or float64 array (C or Fortran order);
//! * CSV (comma-, tab- or whitespace-separated), with or without a header row of layer names and with or
//!   without a first column of layer names — `sglp-engine cka --format csv` writes both.
//!
//! Without names, the layers are `layer0..layer{L-1}`. The matrix must be square, non-empty, finite and
//! symmetric within [`SYMMETRY_TOL`]; every error is one line naming the file and, where it applies, the
//! position.

use super::npy::{check_npy_bytes, dtype_of};
use super::{convert_into, DType};
use crate::error::{Error, Result};
use crate::similarity::{CkaResult, CKA_FORMAT};
use std::path::Path;

/// Largest |S\[i\]\[j\] − S\[j\]\[i\]| accepted.
pub const SYMMETRY_TOL: f64 = 1e-6;

/// Layer names and the L×L similarity matrix in `path` (see the module documentation for the formats).
pub fn read_similarity_matrix(path: &Path) -> Result<(Vec<String>, Vec<Vec<f64>>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_similarity_matrix(&bytes, path)
}

/// [`read_similarity_matrix`] of a file's bytes; `path` names it in errors and its extension picks the
/// format, as for the file itself.
pub fn parse_similarity_matrix(bytes: &[u8], path: &Path) -> Result<(Vec<String>, Vec<Vec<f64>>)> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let (layers, m, engine) = if ext == "npy" || bytes.starts_with(b"\x93NUMPY") {
        let (l, m) = read_npy(bytes, path)?;
        (l, m, false)
    } else {
        let text = std::str::from_utf8(bytes)
            .ok()
            .filter(|t| !t.contains('\0'))
            .ok_or_else(|| {
                Error::format(
                    path,
                    "not a similarity matrix: a binary file that is not .npy (expected JSON, .npy or CSV)",
                )
            })?;
        let text = text.trim_start_matches('\u{feff}');
        let first = text.trim_start().chars().next();
        if ext == "json" || matches!(first, Some('{') | Some('[')) {
            read_json(path, text)?
        } else {
            let (l, m) = read_csv(path, text)?;
            (l, m, false)
        }
    };
    check_matrix(path, &layers, &m, engine)?;
    Ok((layers, m))
}

fn default_names(l: usize) -> Vec<String> {
    (0..l).map(|i| format!("layer{i}")).collect()
}

/// JSON: the engine's format (the third value is true), an object with `cka` (and `layers`), or a bare
/// list of lists.
fn read_json(path: &Path, text: &str) -> Result<(Vec<String>, Vec<Vec<f64>>, bool)> {
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| Error::format(path, format!("not a JSON file: {e}")))?;
    if v.get("format").is_some() {
        let res = read_engine_json(path, text)?;
        let m = res.cka_matrix();
        return Ok((res.layers, m, true));
    }
    let (rows, names) = match &v {
        serde_json::Value::Array(_) => (&v, None),
        serde_json::Value::Object(o) => match o.get("cka") {
            Some(c) => (c, o.get("layers")),
            None => {
                return Err(Error::format(
                    path,
                    "a JSON similarity matrix needs a 'cka' key (a list of lists of numbers)",
                ))
            }
        },
        _ => {
            return Err(Error::format(
                path,
                "a JSON similarity matrix is an object with a 'cka' key or a list of lists",
            ))
        }
    };
    let rows = rows
        .as_array()
        .ok_or_else(|| Error::format(path, "'cka' is not a list of lists of numbers"))?;
    let mut m = Vec::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        let r = r
            .as_array()
            .ok_or_else(|| Error::format(path, format!("'cka' row {i} is not a list")))?;
        let row = r
            .iter()
            .enumerate()
            .map(|(j, x)| match x {
                serde_json::Value::Null => Ok(f64::NAN),
                x => x.as_f64().ok_or_else(|| {
                    Error::format(
                        path,
                        format!("'cka' row {i}, column {j}: not a number ({x})"),
                    )
                }),
            })
            .collect::<Result<Vec<_>>>()?;
        m.push(row);
    }
    let layers = match names {
        None => default_names(m.len()),
        Some(n) => {
            let n = n
                .as_array()
                .ok_or_else(|| Error::format(path, "'layers' is not a list of names"))?;
            let names = n
                .iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| Error::format(path, "'layers' is not a list of strings"))?;
            if names.len() != m.len() {
                return Err(Error::format(
                    path,
                    format!(
                        "{} layer names for a matrix of {} rows",
                        names.len(),
                        m.len()
                    ),
                ));
            }
            names
        }
    };
    Ok((layers, m, false))
}

/// Read and check a `sglp-cka/1` file.
pub fn read_engine_json(path: &Path, text: &str) -> Result<CkaResult> {
    let res: CkaResult = serde_json::from_str(text)
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

/// `.npy`: a 2-D square float32/float64 array, C or Fortran order.
fn read_npy(bytes: &[u8], path: &Path) -> Result<(Vec<String>, Vec<Vec<f64>>)> {
    let (shape, flat, fortran) = read_npy_floats(bytes, path, "a similarity matrix")?;
    let [r, c] = shape[..] else {
        return Err(Error::format(
            path,
            format!("a similarity matrix is a 2-D array, not of shape {shape:?}"),
        ));
    };
    if r != c {
        return Err(Error::format(
            path,
            format!("the matrix is not square: shape [{r}, {c}]"),
        ));
    }
    if r == 0 {
        return Err(Error::format(path, "the matrix is empty (shape [0, 0])"));
    }
    let l = r as usize;
    let m = (0..l)
        .map(|i| {
            (0..l)
                .map(|j| {
                    if fortran {
                        flat[j * l + i]
                    } else {
                        flat[i * l + j]
                    }
                })
                .collect()
        })
        .collect();
    Ok((default_names(l), m))
}

/// A float32/float64 `.npy` file of `what` (its bytes): its shape, its values in storage order, and whether
/// that order is Fortran's. The data size is checked against the file's length before anything is
/// allocated.
fn read_npy_floats(bytes: &[u8], path: &Path, what: &str) -> Result<(Vec<u64>, Vec<f64>, bool)> {
    check_npy_bytes(bytes, path)?;
    let mut rest = bytes;
    let header = npyz::NpyHeader::from_reader(&mut rest)
        .map_err(|e| Error::format(path, format!("corrupt npy header: {e}")))?;
    let offset = (bytes.len() - rest.len()) as u64;
    let file_len = bytes.len() as u64;
    let dtype = dtype_of(&header).map_err(|m| Error::format(path, m))?;
    if dtype == DType::F16 {
        return Err(Error::format(
            path,
            format!("npy dtype float16: {what} must be float32 or float64"),
        ));
    }
    let shape = header.shape().to_vec();
    let n = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .and_then(|n| usize::try_from(n).ok())
        .filter(|n| n.checked_mul(dtype.size()).is_some())
        .ok_or_else(|| Error::format(path, format!("shape {shape:?} does not fit in memory")))?;
    let nbytes = (n * dtype.size()) as u64;
    if offset.checked_add(nbytes) != Some(file_len) {
        return Err(Error::format(
            path,
            format!(
                "truncated or corrupt npy file: shape {shape:?} of {} declares {nbytes} bytes of data \
                 but the file holds {}",
                dtype.name(),
                file_len.saturating_sub(offset)
            ),
        ));
    }
    let mut flat = vec![0f64; n];
    convert_into(dtype, rest, &mut flat);
    Ok((shape, flat, header.order() == npyz::Order::Fortran))
}

/// Per-layer importance scores from a file, whoever made them: the input of `--gradnorm FILE`.
///
/// Accepted: the engine's `sglp-gradnorm/1` JSON (`sglp-engine gradnorm`), any JSON object with a
/// `gradnorm` list of numbers (and optionally `layers`, their names), a bare JSON list of numbers, or a
/// 1-D `.npy` of float32/float64. Returns the names when the file has them, and the values, which must be
/// finite and at least one.
pub fn read_importance(path: &Path) -> Result<(Option<Vec<String>>, Vec<f64>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_importance(&bytes, path)
}

/// [`read_importance`] of a file's bytes; `path` names it in errors and its extension picks the format.
pub fn parse_importance(bytes: &[u8], path: &Path) -> Result<(Option<Vec<String>>, Vec<f64>)> {
    let is_npy = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npy"))
        || bytes.starts_with(b"\x93NUMPY");
    let (names, values) = if is_npy {
        let (shape, flat, _) = read_npy_floats(bytes, path, "a gradient-norm vector")?;
        if shape.iter().filter(|&&d| d != 1).count() > 1 {
            return Err(Error::format(
                path,
                format!("gradient norms are a vector (1-D array), not of shape {shape:?}"),
            ));
        }
        (None, flat)
    } else {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| Error::format(path, "not gradient norms: neither JSON nor .npy"))?;
        let v: serde_json::Value = serde_json::from_str(text.trim_start_matches('\u{feff}'))
            .map_err(|e| Error::format(path, format!("not a JSON file: {e}")))?;
        let list = |v: &serde_json::Value, key: &str| -> Result<Vec<f64>> {
            let a = v
                .as_array()
                .ok_or_else(|| Error::format(path, format!("`{key}` is not a list of numbers")))?;
            a.iter()
                .enumerate()
                .map(|(i, x)| {
                    x.as_f64().ok_or_else(|| {
                        Error::format(path, format!("`{key}`[{i}] is not a number ({x})"))
                    })
                })
                .collect()
        };
        match &v {
            serde_json::Value::Array(_) => (None, list(&v, "the list")?),
            serde_json::Value::Object(o) => {
                let g = o.get("gradnorm").ok_or_else(|| {
                    Error::format(
                        path,
                        "no `gradnorm` key (expected the JSON of `sglp-engine gradnorm`, an object with \
                         `gradnorm`, a list of numbers, or a 1-D .npy)",
                    )
                })?;
                let names = match o.get("layers") {
                    None => None,
                    Some(serde_json::Value::Array(a)) => Some(
                        a.iter()
                            .map(|x| x.as_str().map(String::from))
                            .collect::<Option<Vec<_>>>()
                            .ok_or_else(|| {
                                Error::format(path, "`layers` is not a list of strings")
                            })?,
                    ),
                    Some(_) => {
                        return Err(Error::format(path, "`layers` is not a list of strings"))
                    }
                };
                (names, list(g, "gradnorm")?)
            }
            _ => return Err(Error::format(
                path,
                "not gradient norms: expected a JSON object with `gradnorm` or a list of numbers",
            )),
        }
    };
    if values.is_empty() {
        return Err(Error::format(path, "no gradient norms (an empty list)"));
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::format(
            path,
            format!("gradient norm {i} is not finite ({})", values[i]),
        ));
    }
    if let Some(n) = names.as_ref().filter(|n| n.len() != values.len()) {
        return Err(Error::format(
            path,
            format!(
                "{} layer names for {} gradient norms",
                n.len(),
                values.len()
            ),
        ));
    }
    Ok((names, values))
}

/// Importance scores read by [`read_importance`], checked against the `layers` they must score: the
/// same number, and the same names in the same order when the file names them.
pub fn importance_for_layers(path: &Path, layers: &[String]) -> Result<Vec<f64>> {
    let (names, values) = read_importance(path)?;
    if values.len() != layers.len() {
        return Err(Error::format(
            path,
            format!(
                "{} gradient norms for {} layers (one per layer, in order)",
                values.len(),
                layers.len()
            ),
        ));
    }
    if let Some(names) = names {
        if let Some(i) = (0..layers.len()).find(|&i| names[i] != layers[i]) {
            return Err(Error::format(
                path,
                format!(
                    "layer {i} is '{}' in this file but '{}' in the model / matrix",
                    names[i], layers[i]
                ),
            ));
        }
    }
    Ok(values)
}

/// One CSV cell as a number, if it is one.
fn number(cell: &str) -> Option<f64> {
    if cell.is_empty() {
        return None;
    }
    cell.parse::<f64>().ok()
}

/// CSV: comma-, tab- or whitespace-separated; an optional header row of names and an optional first
/// column of names.
fn read_csv(path: &Path, text: &str) -> Result<(Vec<String>, Vec<Vec<f64>>)> {
    // (1-based line number, cells) of every non-blank, non-comment line.
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .collect();
    if lines.is_empty() {
        return Err(Error::format(path, "the matrix is empty (no rows)"));
    }
    let delim = if lines.iter().any(|(_, l)| l.contains(',')) {
        Some(',')
    } else if lines.iter().any(|(_, l)| l.contains('\t')) {
        Some('\t')
    } else if lines.iter().any(|(_, l)| l.contains(';')) {
        Some(';')
    } else {
        None
    };
    let unquote = |c: &str| {
        let c = c.trim();
        c.strip_prefix('"')
            .and_then(|c| c.strip_suffix('"'))
            .unwrap_or(c)
            .to_string()
    };
    let rows: Vec<(usize, Vec<String>)> = lines
        .iter()
        .map(|&(n, l)| {
            let cells = match delim {
                Some(d) => l.split(d).map(unquote).collect(),
                None => l.split_whitespace().map(unquote).collect(),
            };
            (n, cells)
        })
        .collect();

    // A header row: a cell after the first that is not a number, an empty first cell (pandas' index
    // header), a name in the first cell above rows that start with numbers, or pandas' `index=False`
    // header of column numbers 0..C-1 above C rows of C numbers. Otherwise a name in the first cell is
    // the first row's name.
    let first = &rows[0].1;
    let names_after_first = first.iter().skip(1).any(|c| number(c).is_none());
    let corner = first[0].is_empty()
        || (number(&first[0]).is_none()
            && rows.len() > 1
            && rows[1..].iter().all(|(_, r)| number(&r[0]).is_some()));
    let pandas_header = first.iter().all(|c| number(c).is_some())
        && rows.len() == first.len() + 1
        && rows[1..].iter().all(|(_, r)| r.len() == first.len())
        && first
            .iter()
            .enumerate()
            .all(|(i, c)| c.parse::<usize>().ok() == Some(i));
    let (header, data) = if names_after_first || corner || pandas_header {
        (Some(&rows[0]), &rows[1..])
    } else {
        (None, &rows[..])
    };
    if data.is_empty() {
        return Err(Error::format(
            path,
            "the matrix is empty (a header row and no data rows)",
        ));
    }
    let width = data[0].1.len();
    for (n, r) in data {
        if r.len() != width {
            return Err(Error::format(
                path,
                format!(
                    "line {n}: {} values, but line {} has {width} (ragged rows)",
                    r.len(),
                    data[0].0
                ),
            ));
        }
    }
    let nrows = data.len();
    // A first column of names: every row starts with a non-number, or one more value per row than rows
    // with a header or with integer names (pandas' index).
    let name_col = width > 1
        && (data.iter().all(|(_, r)| number(&r[0]).is_none())
            || (width == nrows + 1
                && (header.is_some() || data.iter().all(|(_, r)| r[0].parse::<i64>().is_ok()))));
    let cols = width - usize::from(name_col);
    if let Some((n, h)) = header {
        if h.len() != width && !(name_col && h.len() == cols) {
            return Err(Error::format(
                path,
                format!(
                    "line {n}: the header has {} names, but the rows have {width} values (ragged rows)",
                    h.len()
                ),
            ));
        }
    }
    if cols != nrows {
        return Err(Error::format(
            path,
            format!("the matrix is not square: {nrows} rows of {cols} values"),
        ));
    }
    let mut m = Vec::with_capacity(nrows);
    for (n, r) in data {
        let row = r[usize::from(name_col)..]
            .iter()
            .enumerate()
            .map(|(j, c)| {
                number(c).ok_or_else(|| {
                    Error::format(
                        path,
                        format!(
                            "line {n}, column {}: '{c}' is not a number",
                            j + 1 + usize::from(name_col)
                        ),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        m.push(row);
    }
    let layers = if name_col {
        data.iter().map(|(_, r)| r[0].clone()).collect()
    } else if let Some((_, h)) = header {
        h.clone()
    } else {
        default_names(nrows)
    };
    Ok((layers, m))
}

/// Square, non-empty, finite, symmetric within [`SYMMETRY_TOL`].
fn check_matrix(path: &Path, layers: &[String], m: &[Vec<f64>], engine: bool) -> Result<()> {
    let l = m.len();
    if l == 0 {
        return Err(Error::format(path, "the matrix is empty"));
    }
    if let Some((i, r)) = m.iter().enumerate().find(|(_, r)| r.len() != l) {
        return Err(Error::format(
            path,
            format!(
                "the matrix is not square: {l} rows, but row {i} has {} values",
                r.len()
            ),
        ));
    }
    let pairs = || (0..l).flat_map(|i| (0..l).map(move |j| (i, j)));
    if let Some((i, j)) = pairs().find(|&(i, j)| !m[i][j].is_finite()) {
        let hint = if engine {
            " (a zero-variance layer? drop it with --layers)"
        } else {
            ""
        };
        return Err(Error::format(
            path,
            format!(
                "the matrix is not finite at row {i}, column {j} (layers '{}', '{}'): {}{hint}",
                layers[i], layers[j], m[i][j]
            ),
        ));
    }
    let (mut worst, mut at) = (0.0f64, (0, 0));
    for (i, j) in pairs().filter(|&(i, j)| i < j) {
        let d = (m[i][j] - m[j][i]).abs();
        if d > worst {
            (worst, at) = (d, (i, j));
        }
    }
    if worst > SYMMETRY_TOL {
        let (i, j) = at;
        return Err(Error::format(
            path,
            format!(
                "the matrix is not symmetric: [{i}][{j}] = {} but [{j}][{i}] = {} (layers '{}', '{}'; \
                 the worst pair, difference {worst:.3e} > {SYMMETRY_TOL:e})",
                m[i][j], m[j][i], layers[i], layers[j]
            ),
        ));
    }
    Ok(())
}
