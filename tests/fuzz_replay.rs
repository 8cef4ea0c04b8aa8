//! Replays the fuzz corpora and crash regressions (`fuzz/corpus/<target>/`, `fuzz/regressions/<target>/`)
//! through the same entry points as the `cargo fuzz` targets (`sglp_engine::fuzz_entry`), on the stable
//! toolchain: no input may panic, make a multi-line error, or allocate beyond its cap (the capped
//! allocator aborts the test binary, naming why on stderr).

use sglp_engine::fuzz_entry::{target, CappedAlloc, TARGETS};
use std::path::{Path, PathBuf};

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

/// Every file of `dir/<target>/`, per target directory; a directory not named after a target is an error
/// (a renamed target would otherwise silently stop being replayed).
fn inputs(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries {
        let sub = e.unwrap().path();
        if !sub.is_dir() {
            continue;
        }
        let name = sub.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            target(&name).is_some(),
            "{}: no fuzz target named '{name}'",
            sub.display()
        );
        for f in std::fs::read_dir(&sub).unwrap() {
            let f = f.unwrap().path();
            if f.is_file() {
                out.push((name.clone(), f));
            }
        }
    }
    out.sort();
    out
}

fn replay(kind: &str) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind);
    let all = inputs(&dir);
    let mut failed = Vec::new();
    for (name, path) in &all {
        let data = std::fs::read(path).unwrap();
        let f = target(name).unwrap();
        if std::panic::catch_unwind(|| f(&data)).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(failed.is_empty(), "inputs that failed: {failed:#?}");
    all.len()
}

#[test]
fn every_corpus_input_reads_or_fails_with_a_one_line_error() {
    let n = replay("corpus");
    // Every target has a corpus, and the corpora are not empty: a missing directory would pass silently.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (name, _) in TARGETS {
        let count = std::fs::read_dir(dir.join(name))
            .map(|d| d.count())
            .unwrap_or(0);
        assert!(count > 0, "fuzz/corpus/{name} is empty or missing");
    }
    assert!(n >= TARGETS.len());
}

#[test]
fn every_crash_regression_now_reads_or_fails_with_a_one_line_error() {
    replay("regressions");
}
