//! Output files are written atomically: to a temporary file in the destination's directory, then renamed,
//! so a failed run never leaves a half-written or clobbered output.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A file being written: a temporary file beside the destination, renamed over it by
/// [`AtomicFile::commit`]. Dropped without a commit, it is deleted.
pub struct AtomicFile {
    path: PathBuf,
    tmp: tempfile::NamedTempFile,
}

impl AtomicFile {
    /// Create the temporary file for `path` (in `path`'s directory, so the rename stays on one file system).
    pub fn create(path: &Path) -> Result<Self> {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(path, e))?;
        Ok(AtomicFile {
            path: path.to_path_buf(),
            tmp,
        })
    }

    /// The destination (for error messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The temporary file, to write into.
    pub fn file(&self) -> &std::fs::File {
        self.tmp.as_file()
    }

    /// Give the file the usual permissions, flush it to disk and rename it over the destination.
    pub fn commit(self) -> Result<()> {
        let path = &self.path;
        // Temporary files are created 0600; an output file should have the usual permissions.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            self.file()
                .set_permissions(std::fs::Permissions::from_mode(0o644))
                .map_err(|e| Error::io(path, e))?;
        }
        self.file().sync_all().map_err(|e| Error::io(path, e))?;
        self.tmp
            .persist(path)
            .map_err(|e| Error::io(path, e.error))?;
        Ok(())
    }
}

/// Write `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let out = AtomicFile::create(path)?;
    out.file()
        .write_all(bytes)
        .map_err(|e| Error::io(path, e))?;
    out.commit()
}
