//! `sglp-engine capture`: every decoder layer's output hidden states on calibration tokens, written as the
//! safetensors input of `cka` (tensors `model.layers.{i}` `[sequences, tokens, hidden]` f32, metadata
//! `layers` = the names in order, comma-separated).

use crate::error::{Error, Result};
use crate::runtime::Model;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct CaptureArgs {
    /// Hugging Face checkpoint directory (config.json + safetensors) of a llama, mistral or qwen2 model.
    #[arg(long)]
    pub model: PathBuf,
    /// Calibration tokens: .npy [sequences, tokens], int32 or int64.
    #[arg(long)]
    pub tokens: PathBuf,
    /// Output .safetensors file.
    #[arg(long)]
    pub out: PathBuf,
    /// Sequences per forward pass.
    /// Sequences per forward (+ backward) pass.
    #[arg(long, default_value_t = crate::pruning::pipeline::DEFAULT_FORWARD_BATCH)]
    pub batch_size: usize,
}

pub fn run(a: CaptureArgs) -> Result<()> {
    if a.batch_size == 0 {
        return Err(Error::invalid("--batch-size must be at least 1"));
    }
    let model = Model::load(&a.model)?;
    let tokens = model.load_tokens(&a.tokens)?;
    let names = model.layer_names();
    let mut out = StreamedSafetensors::create(
        &a.out,
        &names,
        &[tokens.sequences, tokens.len, model.hidden_size()],
    )?;
    let n_batches = tokens.sequences.div_ceil(a.batch_size);
    let bar = crate::progress::bar(n_batches as u64, "capture batches");
    for b in 0..n_batches {
        let first = b * a.batch_size;
        let batch = tokens.batch(first, a.batch_size);
        let mut result = Ok(());
        model.forward(&batch, &[], &mut |i, hs| {
            if i >= 1 && result.is_ok() {
                result = out.write_rows(i - 1, first, hs);
            }
        })?;
        result?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    out.finish()
}

/// A safetensors file written in place, batch by batch: every tensor's shape is known up front, so the
/// header and each tensor's byte range are fixed before any data exists, and a batch's rows of every layer
/// are written at their offsets. Memory stays at one batch whatever the calibration set's size. Atomic like
/// `io::output::write_atomic`: written to a temporary file beside the destination, renamed at the end.
struct StreamedSafetensors {
    path: PathBuf,
    tmp: tempfile::NamedTempFile,
    /// Byte offset of each tensor's data in the file.
    starts: Vec<u64>,
    /// Bytes of one leading-axis row (one sequence) of a tensor.
    row_bytes: u64,
}

impl StreamedSafetensors {
    /// One f32 tensor per name, each of `shape`, metadata `layers` = the names, comma-separated.
    fn create(path: &Path, names: &[String], shape: &[usize]) -> Result<Self> {
        let elems: usize = shape.iter().product();
        let tensor_bytes = (elems * 4) as u64;
        let mut header = serde_json::Map::new();
        header.insert(
            "__metadata__".into(),
            serde_json::json!({ "layers": names.join(",") }),
        );
        for (i, n) in names.iter().enumerate() {
            let (b, e) = (i as u64 * tensor_bytes, (i as u64 + 1) * tensor_bytes);
            header.insert(
                n.clone(),
                serde_json::json!({ "dtype": "F32", "shape": shape, "data_offsets": [b, e] }),
            );
        }
        let mut json = serde_json::to_vec(&header).expect("JSON of plain values");
        // Pad with spaces so the data starts 8-byte aligned (as the safetensors writers do).
        while !json.len().is_multiple_of(8) {
            json.push(b' ');
        }
        let data_start = 8 + json.len() as u64;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(path, e))?;
        let file = tmp.as_file();
        file.set_len(data_start + tensor_bytes * names.len() as u64)
            .map_err(|e| Error::io(path, e))?;
        let mut head = (json.len() as u64).to_le_bytes().to_vec();
        head.extend_from_slice(&json);
        write_at(file, 0, &head).map_err(|e| Error::io(path, e))?;
        Ok(StreamedSafetensors {
            path: path.to_path_buf(),
            tmp,
            starts: (0..names.len() as u64)
                .map(|i| data_start + i * tensor_bytes)
                .collect(),
            row_bytes: (shape[1..].iter().product::<usize>() * 4) as u64,
        })
    }

    /// Write `data` (whole rows of tensor `tensor`) starting at leading-axis row `first_row`.
    fn write_rows(&mut self, tensor: usize, first_row: usize, data: &[f32]) -> Result<()> {
        let at = self.starts[tensor] + first_row as u64 * self.row_bytes;
        write_at(self.tmp.as_file(), at, bytemuck::cast_slice(data))
            .map_err(|e| Error::io(&self.path, e))
    }

    fn finish(self) -> Result<()> {
        // Temporary files are created 0600; an output file gets the usual permissions (as write_atomic).
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            self.tmp
                .as_file()
                .set_permissions(std::fs::Permissions::from_mode(0o644))
                .map_err(|e| Error::io(&self.path, e))?;
        }
        self.tmp
            .as_file()
            .sync_all()
            .map_err(|e| Error::io(&self.path, e))?;
        self.tmp
            .persist(&self.path)
            .map_err(|e| Error::io(&self.path, e.error))?;
        Ok(())
    }
}

fn write_at(mut file: &std::fs::File, at: u64, bytes: &[u8]) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(at))?;
    file.write_all(bytes)
}
