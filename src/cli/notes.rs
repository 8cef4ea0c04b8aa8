//! What the CLI tells the user on stderr besides errors: warnings (always), notes (silenced by `-q`), and
//! the one note that would repeat on every run of a machine without a GPU — `--device auto` falling back
//! to the CPU — shown once per machine and reason (every time with `-v`).
//!
//! "Once per machine" is a marker file per message under `$SGLP_ENGINE_CACHE_DIR`, else
//! `$XDG_CACHE_HOME/sglp-engine`, else `~/.cache/sglp-engine`. Where none can be written the note is
//! shown every time: a lost note is worse than a repeated one.

use std::path::PathBuf;
use std::sync::atomic::{AtomicI8, Ordering};

/// −1: `-q`; 0: default; 1: `-v`.
static VERBOSITY: AtomicI8 = AtomicI8::new(0);

pub fn set_verbosity(quiet: bool, verbose: bool) {
    let v = match (quiet, verbose) {
        (true, _) => -1,
        (false, true) => 1,
        (false, false) => 0,
    };
    VERBOSITY.store(v, Ordering::Relaxed);
}

fn verbosity() -> i8 {
    VERBOSITY.load(Ordering::Relaxed)
}

/// `warning: …` on stderr, whatever the verbosity: it is about the result.
pub fn warn(msg: &str) {
    crate::progress::suspend(|| eprintln!("warning: {msg}"));
}

/// `note: …` on stderr unless `-q`.
pub fn note(msg: &str) {
    if verbosity() >= 0 {
        crate::progress::suspend(|| {
            eprintln!("note: {}", msg.strip_prefix("note: ").unwrap_or(msg))
        });
    }
}

/// The device-fallback note: once per machine and message (always with `-v`, never with `-q`).
pub fn device_note(msg: &str) {
    match verbosity() {
        v if v < 0 => {}
        v if v > 0 => note(msg),
        _ => {
            if first_time(msg) {
                note(&format!(
                    "{} (shown once on this machine; -v shows it on every run)",
                    msg.strip_prefix("note: ").unwrap_or(msg)
                ));
            }
        }
    }
}

fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("SGLP_ENGINE_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("sglp-engine")))
        .or_else(|| var("HOME").map(|d| d.join(".cache").join("sglp-engine")))
}

/// Whether `msg` has not been shown on this machine yet; records it. True when nothing can be recorded.
fn first_time(msg: &str) -> bool {
    let Some(dir) = cache_dir().map(|d| d.join("notes")) else {
        return true;
    };
    // FNV-1a: a stable name for the message (std's hasher is not stable across releases).
    let hash = msg.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let marker = dir.join(format!("{hash:016x}"));
    if marker.exists() {
        return false;
    }
    let _ = std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&marker, msg));
    true
}
