//! Calibration and evaluation images: a float32 `.npy` `[N, C, H, W]` (already normalised) and an integer
//! `.npy` `[N]` of class labels.

use crate::error::{Error, Result};
use std::path::Path;
use std::sync::Arc;

/// `n` images of `c × h × w` (NCHW, row-major) and their labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Images {
    pub data: Arc<Vec<f32>>,
    pub labels: Vec<i64>,
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

fn read_npy(path: &Path) -> Result<(Vec<u64>, String, Vec<u8>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    // The header-length field and the header's nesting, before npyz allocates or parses from them.
    crate::io::npy::check_npy_bytes(&bytes, path)?;
    let npy = npyz::NpyFile::new(&bytes[..])
        .map_err(|e| Error::format(path, format!("not a .npy file: {e}")))?;
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
    Ok((npy.shape().to_vec(), descr, bytes))
}

impl Images {
    /// Read `images` (float32 `[N, C, H, W]`) and `labels` (int64 or int32 `[N]`, each ≥ 0).
    pub fn load_npy(images: &Path, labels: &Path) -> Result<Images> {
        let (shape, descr, bytes) = read_npy(images)?;
        if shape.len() != 4 || shape.contains(&0) {
            return Err(Error::format(
                images,
                format!("image array has shape {shape:?}, expected non-empty [N, C, H, W]"),
            ));
        }
        if descr != "<f4" {
            return Err(Error::format(
                images,
                format!("image dtype '{descr}' is not supported (float32, little-endian)"),
            ));
        }
        let data = npyz::NpyFile::new(&bytes[..])
            .and_then(|f| f.into_vec::<f32>())
            .map_err(|e| Error::format(images, format!("cannot read the image array: {e}")))?;
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::format(
                images,
                format!("value {} at flat index {i} is not finite", data[i]),
            ));
        }
        let (lshape, ldescr, lbytes) = read_npy(labels)?;
        if lshape != [shape[0]] {
            return Err(Error::format(
                labels,
                format!(
                    "label array has shape {lshape:?}, expected [{}] (one per image of {})",
                    shape[0],
                    images.display()
                ),
            ));
        }
        let file = npyz::NpyFile::new(&lbytes[..])
            .map_err(|e| Error::format(labels, format!("not a .npy file: {e}")))?;
        let labels_v: Vec<i64> = match ldescr.as_str() {
            "<i8" => file.into_vec::<i64>(),
            "<i4" => file
                .into_vec::<i32>()
                .map(|v| v.into_iter().map(i64::from).collect()),
            other => {
                return Err(Error::format(
                    labels,
                    format!("label dtype '{other}' is not supported (int64 or int32)"),
                ))
            }
        }
        .map_err(|e| Error::format(labels, format!("cannot read the label array: {e}")))?;
        if let Some(i) = labels_v.iter().position(|&l| l < 0) {
            return Err(Error::format(
                labels,
                format!("label {} of image {i} is negative", labels_v[i]),
            ));
        }
        let d = |i: usize| shape[i] as usize;
        Ok(Images {
            data: Arc::new(data),
            labels: labels_v,
            n: d(0),
            c: d(1),
            h: d(2),
            w: d(3),
        })
    }

    /// Values per image.
    pub fn image_len(&self) -> usize {
        self.c * self.h * self.w
    }

    /// Images `first .. first + count` (clamped to the end).
    pub fn batch(&self, first: usize, count: usize) -> Images {
        let end = (first + count).min(self.n);
        let start = first.min(end);
        let len = self.image_len();
        Images {
            data: Arc::new(self.data[start * len..end * len].to_vec()),
            labels: self.labels[start..end].to_vec(),
            n: end - start,
            ..*self
        }
    }

    /// The first `count` images (all when `count ≥ n`), sharing the data when that is all of them.
    pub fn first(&self, count: usize) -> Images {
        if count >= self.n {
            self.clone()
        } else {
            self.batch(0, count)
        }
    }
}
