//! Output files are written atomically: to a staging file (or directory) beside the destination, then
//! renamed over it, so a failed or interrupted run never leaves a half-written or clobbered output.
//!
//! Every staging path of the process is listed in one registry while it is live, so that a signal handler
//! ([`remove_staging_and_exit`], installed by the CLI) can delete them all before the process exits.
//! Staging names are recognisable: `.sglp-partial-<pid>-<seq>-<name>` in the destination's directory (the
//! destination's name last, so its extension, which some encoders read, is kept).
//!
//! Renames into place happen while the registry is locked: a signal arriving meanwhile waits for the
//! rename to finish, so the destination is always either the old file or the complete new one.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Marker in every staging name.
pub const STAGING_MARKER: &str = ".sglp-partial-";

/// The live staging paths of this process (created, neither committed nor removed yet).
static STAGING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Makes staging names unique within the process.
static SEQ: AtomicU64 = AtomicU64::new(0);

/// The registry, even if a thread panicked while holding it (the list itself is always consistent).
fn registry() -> MutexGuard<'static, Vec<PathBuf>> {
    STAGING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Delete every live staging path and exit with `code`, never returning. For a signal handler: it holds
/// the registry until the process is gone, so no staging path is created or renamed into place after
/// the clean-up.
pub fn remove_staging_and_exit(code: i32) -> ! {
    let reg = registry();
    for p in reg.iter() {
        remove_path(p);
    }
    std::process::exit(code)
}

fn remove_path(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            // Another thread may still be writing files into the directory (the signal handler runs
            // beside it), and `remove_dir_all` fails when an entry appears after its listing. Move the
            // directory out of the writer's way first (it creates files by path), then delete it;
            // retry while entries keep appearing.
            let mut moved = p.as_os_str().to_owned();
            moved.push(".removing");
            let target = match std::fs::rename(p, &moved) {
                Ok(()) => PathBuf::from(moved),
                Err(_) => p.to_path_buf(),
            };
            for _ in 0..100 {
                if std::fs::remove_dir_all(&target).is_ok() || !target.exists() {
                    break;
                }
            }
        }
        Ok(_) => {
            let _ = std::fs::remove_file(p);
        }
        Err(_) => {}
    }
}

/// The directory `dest` lives in (`.` for a bare name).
fn parent_of(dest: &Path) -> &Path {
    match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A registered staging path beside a destination. Dropped without [`Staging::commit`], it is deleted.
pub(crate) struct Staging {
    path: PathBuf,
    live: bool,
}

impl Staging {
    /// Create a staging path beside `dest` with `make` (a file or a directory, created exclusively) and
    /// register it, under the registry lock so a signal cannot strike between the two.
    pub(crate) fn create<T>(
        dest: &Path,
        make: impl FnOnce(&Path) -> std::io::Result<T>,
    ) -> Result<(Self, T)> {
        let name = dest.file_name().ok_or_else(|| {
            Error::invalid(format!("{}: not a file or directory name", dest.display()))
        })?;
        let mut reg = registry();
        let path = parent_of(dest).join(format!(
            "{STAGING_MARKER}{}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            name.to_string_lossy()
        ));
        let made = make(&path).map_err(|e| Error::io(dest, e))?;
        reg.push(path.clone());
        Ok((Staging { path, live: true }, made))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Run `finish` (the rename into place) with signals held off, and unregister the staging path if it
    /// succeeds. On an error the staging path is deleted (on drop).
    pub(crate) fn commit(mut self, finish: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let mut reg = registry();
        finish(&self.path)?;
        reg.retain(|p| p != &self.path);
        self.live = false;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.live {
            let mut reg = registry();
            remove_path(&self.path);
            reg.retain(|p| p != &self.path);
        }
    }
}

/// What identifies the file at a path: a rename puts another inode there, an in-place write changes the
/// modification time.
#[derive(Clone, Debug, PartialEq)]
struct FileId {
    dev: u64,
    ino: u64,
    modified: Option<std::time::SystemTime>,
}

fn file_id(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(FileId {
        dev: m.dev(),
        ino: m.ino(),
        modified: m.modified().ok(),
    })
}

/// An advisory lock on a directory, held while another run could be renaming into it (best effort: on a
/// file system without `flock` the check it guards is merely racy, the rename still atomic).
struct DirLock(Option<std::fs::File>);

impl DirLock {
    fn take(dir: &Path) -> Self {
        let f = std::fs::File::open(dir).ok().filter(|f| {
            use std::os::unix::io::AsRawFd;
            // SAFETY: a valid open descriptor; flock has no memory effects.
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) == 0 }
        });
        DirLock(f)
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        if let Some(f) = &self.0 {
            use std::os::unix::io::AsRawFd;
            // SAFETY: as in `take`.
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
        }
    }
}

/// A file being written: a staging file beside the destination, renamed over it by
/// [`AtomicFile::commit`]. Dropped without a commit, it is deleted.
pub struct AtomicFile {
    path: PathBuf,
    file: std::fs::File,
    /// The destination as it was when writing began (`None`: absent).
    before: Option<FileId>,
    staging: Staging,
}

impl AtomicFile {
    /// Create the staging file for `path` (in `path`'s directory, so the rename stays on one file system).
    pub fn create(path: &Path) -> Result<Self> {
        let before = file_id(path);
        let (staging, file) = Staging::create(path, |p| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(p)
        })?;
        Ok(AtomicFile {
            path: path.to_path_buf(),
            file,
            before,
            staging,
        })
    }

    /// The destination (for error messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The staging file's own path (for writers that open a path themselves; they must write this file in
    /// place, not replace it).
    pub fn staging_path(&self) -> &Path {
        self.staging.path()
    }

    /// The staging file, to write into.
    pub fn file(&self) -> &std::fs::File {
        &self.file
    }

    /// Give the file the usual permissions, flush it to disk and rename it over the destination. Refused
    /// if another process put a different file at the destination since [`AtomicFile::create`] (two runs
    /// writing one output at once: the first to finish wins, the other errors and leaves it alone).
    pub fn commit(self) -> Result<()> {
        let AtomicFile {
            path,
            file,
            before,
            staging,
        } = self;
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(0o644))
                .map_err(|e| Error::io(&path, e))?;
        }
        file.sync_all().map_err(|e| Error::io(&path, e))?;
        drop(file);
        let _lock = DirLock::take(parent_of(&path));
        staging.commit(|staged| {
            let now = file_id(&path);
            if now.is_some() && now != before {
                return Err(Error::invalid(format!(
                    "{}: written by another process while this run was writing it; left as it is",
                    path.display()
                )));
            }
            std::fs::rename(staged, &path).map_err(|e| Error::io(&path, e))
        })
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

/// Write `path` atomically with a writer that takes a path (an image encoder): `write` is given the
/// staging file's path, which ends in `path`'s own name and extension.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let out = AtomicFile::create(path)?;
    {
        // The writer opens the staging path by name, so it could re-create the file after the signal
        // handler deleted it and before the process exited (seen in the interrupt test: a compare PNG's
        // staging file left behind). Holding the registry keeps the handler waiting until the write is
        // done (milliseconds for an image); `write` must not create staging paths itself.
        let _signals_held = registry();
        write(out.staging_path())?;
    }
    out.commit()
}

/// Rename the directory `staged` to `dest`. An existing `dest` is refused unless `replace`; with
/// `replace` the two are exchanged in one step where the file system can (Linux `renameat2`), so `dest`
/// never goes missing, and the old content is left at `staged` for the caller to delete.
pub(crate) fn rename_dir(staged: &Path, dest: &Path, replace: bool) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| {
            std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other)
        };
        let (from, to) = (c(staged)?, c(dest)?);
        let flags = if !replace {
            libc::RENAME_NOREPLACE
        } else if dest.exists() {
            libc::RENAME_EXCHANGE
        } else {
            0
        };
        // SAFETY: two NUL-terminated paths; renameat2 reads them only.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                flags,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        // EINVAL: the file system has no such flags; fall back below.
        if err.raw_os_error() != Some(libc::EINVAL) {
            return Err(err);
        }
    }
    if dest.exists() {
        if !replace {
            return Err(std::io::Error::from(std::io::ErrorKind::AlreadyExists));
        }
        // Move the old one aside, into the staging path's place once the new one is in.
        let aside = staged.with_extension("old");
        std::fs::rename(dest, &aside)?;
        std::fs::rename(staged, dest)?;
        return std::fs::rename(&aside, staged);
    }
    std::fs::rename(staged, dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staging_files(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(STAGING_MARKER))
            .collect()
    }

    #[test]
    fn staging_is_registered_while_live_and_gone_after_commit_or_drop() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.json");
        let f = AtomicFile::create(&dest).unwrap();
        let staged = f.staging_path().to_path_buf();
        assert!(registry().contains(&staged));
        assert_eq!(staging_files(dir.path()).len(), 1);
        drop(f);
        assert!(!registry().contains(&staged));
        assert!(staging_files(dir.path()).is_empty() && !dest.exists());

        write_atomic(&dest, b"one").unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"one");
        assert!(staging_files(dir.path()).is_empty());
        assert!(!registry().iter().any(|p| p.starts_with(dir.path())));
    }

    #[test]
    fn a_destination_replaced_by_another_run_meanwhile_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.json");
        let ours = AtomicFile::create(&dest).unwrap();
        ours.file().write_all(b"ours").unwrap();
        // The other run finishes first.
        write_atomic(&dest, b"theirs").unwrap();
        let err = ours.commit().unwrap_err().to_string();
        assert!(
            err.contains("out.json") && err.contains("another process"),
            "{err}"
        );
        assert_eq!(std::fs::read(&dest).unwrap(), b"theirs");
        assert!(staging_files(dir.path()).is_empty());
        // A destination that existed before and was not touched is replaced as usual.
        let again = AtomicFile::create(&dest).unwrap();
        again.file().write_all(b"again").unwrap();
        again.commit().unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"again");
    }

    #[test]
    fn directories_are_exchanged_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("ckpt");
        let staged = dir.path().join("staged");
        std::fs::create_dir(&staged).unwrap();
        std::fs::write(staged.join("new"), "new").unwrap();
        rename_dir(&staged, &dest, false).unwrap();
        std::fs::create_dir(&staged).unwrap();
        std::fs::write(staged.join("newer"), "newer").unwrap();
        assert!(rename_dir(&staged, &dest, false).is_err());
        rename_dir(&staged, &dest, true).unwrap();
        assert!(dest.join("newer").exists() && !dest.join("new").exists());
        // The old content is left at the staging path.
        assert!(staged.join("new").exists());
    }
}
