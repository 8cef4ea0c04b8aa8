//! Entry points shared by the `cargo fuzz` targets (`fuzz/fuzz_targets/`) and their stable replay
//! (`tests/fuzz_replay.rs`): one function per parser of outside bytes, each feeding arbitrary bytes to the
//! same entry points the CLI uses and asserting what every reader promises:
//!
//! * no panic;
//! * an error's `Display` is one non-empty line ([`assert_one_line`]);
//! * no single allocation sized from numbers in a header beyond what the bytes can hold: with
//!   [`CappedAlloc`] as the global allocator, an allocation larger than [`alloc_cap`] of the input aborts
//!   the process (libFuzzer reports it as a crash; the replay test dies).
//!
//! Readers that take a path get the bytes through a file in a temporary directory, so the path API (and
//! the memory maps behind it) is what is exercised. Not part of the crate's API.

use crate::error::{Error, Result};
use crate::io::{ActivationSet, ActivationSource, ReadOptions, TokenMode};
use crate::runtime::cnn::Images;
use crate::runtime::text::{tokenize_str, tokenizer_from_bytes, TextSpec};
use crate::runtime::weights::{parse_index, Weights};
use crate::runtime::{ModelConfig, Tokens};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Every fuzz target: its name (the directory under `fuzz/corpus/` and `fuzz/regressions/`) and its
/// entry point.
pub const TARGETS: &[(&str, Entry)] = &[
    ("safetensors", safetensors),
    ("npy", npy),
    ("config", config),
    ("weight_index", weight_index),
    ("tokens", tokens),
    ("images", images),
    ("matrix", matrix),
    ("tokenizer", tokenizer),
    ("torch", torch),
];

/// A fuzz entry point.
pub type Entry = fn(&[u8]);

/// The entry point of target `name`.
pub fn target(name: &str) -> Option<Entry> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|&(_, f)| f)
}

/// The body of every libFuzzer target. libfuzzer-sys installs a panic hook that aborts on any panic,
/// even one the engine catches on purpose (the tokenizers library panics on some malformed files, and
/// `runtime::text` turns that into an error); so std's default hook is put back, and a panic that
/// escapes the entry point aborts (a finding).
pub fn fuzz_main(f: Entry, data: &[u8]) {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| drop(std::panic::take_hook()));
    if std::panic::catch_unwind(|| f(data)).is_err() {
        std::process::abort();
    }
}

thread_local! {
    /// Largest single allocation allowed on this thread; 0 = no limit. `const`-initialised with no
    /// destructor, so the allocator can read it without allocating.
    static LIMIT: Cell<usize> = const { Cell::new(0) };
}

/// The system allocator, aborting on any single allocation above the limit set by [`with_cap`] on the
/// calling thread. Install it with `#[global_allocator]` in the fuzz targets and the replay test.
pub struct CappedAlloc;

impl CappedAlloc {
    fn check(size: usize) {
        let limit = LIMIT.try_with(Cell::get).unwrap_or(0);
        // Not while panicking: the panic hook's message and backtrace are not the reader's allocations
        // (a panic is reported as the finding it is).
        if limit != 0 && size > limit && !std::thread::panicking() {
            // An allocator must not unwind; say why on stderr (no allocation) and abort.
            let msg = b"fuzz_entry: an allocation larger than the input's cap: a size taken from a header \
                        is not bounded by the file's length\n";
            // SAFETY: writing a static buffer to fd 2.
            unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
            std::process::abort();
        }
    }
}

// SAFETY: forwards every call to `System` unchanged; `check` only reads a thread-local `Cell`.
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::check(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::check(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::check(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

/// The largest single allocation a reader may make for `len` input bytes: a fixed 1 MiB (small tables,
/// buffers) plus 64 bytes per input byte. Parsed JSON and CSV legitimately take a few tens of bytes per
/// input byte (a `serde_json::Value` is 32 bytes for a 2-byte `0,`, and vectors double when they grow); a
/// size read from a header is not bounded at all.
pub fn alloc_cap(len: usize) -> usize {
    (1 << 20) + 64 * len
}

/// Run `f` with the allocation cap for `len` input bytes on this thread.
pub fn with_cap<R>(len: usize, f: impl FnOnce() -> R) -> R {
    struct Reset(usize);
    impl Drop for Reset {
        fn drop(&mut self) {
            LIMIT.with(|l| l.set(self.0));
        }
    }
    let _reset = Reset(LIMIT.with(|l| l.replace(alloc_cap(len))));
    f()
}

/// An error's message must be one non-empty line: no control character (newline, carriage return,
/// escape) and no Unicode line or paragraph separator.
pub fn assert_one_line(e: &Error) {
    let s = e.to_string();
    assert!(!s.trim().is_empty(), "empty error message: {e:?}");
    assert!(
        !s.chars()
            .any(|c| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')),
        "error message is not one line: {s:?}"
    );
}

/// The value, or check the error and drop it.
fn checked<T>(r: Result<T>) -> Option<T> {
    r.map_err(|e| assert_one_line(&e)).ok()
}

/// A fresh temporary directory (the readers under test take paths).
fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary directory")
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("write a temporary file");
}

/// Split `data` into up to `max` parts: the first byte picks how many (1..=max); each part but the last
/// is preceded by its length (u16, little-endian, clamped to what is left).
fn split(data: &[u8], max: usize) -> Vec<&[u8]> {
    let Some((&k, mut rest)) = data.split_first() else {
        return vec![data];
    };
    let k = usize::from(k) % max + 1;
    let mut parts = Vec::with_capacity(k);
    for _ in 1..k {
        if rest.len() < 2 {
            break;
        }
        let n = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        parts.push(&rest[2..2 + n]);
        rest = &rest[2 + n..];
    }
    parts.push(rest);
    parts
}

/// Stream every chunk of an activation set (a few rows at a time, so that chunks straddle shards).
fn stream(inputs: &[PathBuf], tokens: TokenMode) {
    let opts = ReadOptions {
        tokens,
        layers: None,
    };
    let Some(mut set) = checked(ActivationSet::open(inputs, &opts)) else {
        return;
    };
    let _ = (set.describe(), set.n_samples(), set.shard_rows());
    while let Some(Some(chunk)) = checked(set.next_chunk(3)) {
        assert!(
            chunk.rows >= 1 && chunk.rows <= 3,
            "chunk of {} rows",
            chunk.rows
        );
    }
}

/// `.safetensors` activation shards (1 to 3, see `split`): the header parser on the bytes, then the
/// shard reader (`ActivationSet`: headers cross-checked, data memory-mapped and streamed) and the
/// runtime's weight reader (`Weights`, every tensor converted to f32) on the files.
pub fn safetensors(data: &[u8]) {
    let parts = split(data, 3);
    let dir = tempdir();
    let paths: Vec<PathBuf> = parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let path = dir.path().join(format!("shard{i}.safetensors"));
            write(&path, p);
            path
        })
        .collect();
    with_cap(data.len(), || {
        for (part, path) in parts.iter().zip(&paths) {
            checked(crate::io::safetensors::header_from_bytes(part, path, None));
        }
        stream(&paths, TokenMode::Samples);
        stream(&paths, TokenMode::Features);
        read_every_weight(&paths[0]);
    });
}

/// The runtime's weight reader on `path`: every tensor it lists checked and converted to f32.
fn read_every_weight(path: &Path) {
    if let Some(w) = checked(Weights::open_file(path)) {
        let mut names: Vec<String> = w.names().map(str::to_string).collect();
        names.sort();
        for name in names {
            let shape = w.shape(&name).expect("a listed tensor").to_vec();
            if checked(w.expect(&name, &shape)).is_some() {
                checked(w.get_f32(&name));
            }
        }
    }
}

/// A `torch.save` file, read as activations (streamed) and as checkpoint weights (every tensor as f32).
/// A first byte 0 instead hands the rest to the pickle interpreter alone, which the fuzzer could
/// otherwise barely reach (a zip entry's checksum catches most changes to a pickle).
pub fn torch(data: &[u8]) {
    if let Some((&0, pickle)) = data.split_first() {
        with_cap(data.len(), || {
            let _ = crate::io::torch::pickle_tensor_count(pickle);
        });
        return;
    }
    let dir = tempdir();
    let path = dir.path().join("acts.pt");
    write(&path, data);
    with_cap(data.len(), || {
        if let Some(ts) = checked(crate::io::torch::read_tensors(data, &path)) {
            for t in ts.iter().filter(|t| t.contiguous) {
                let bytes = t.shape.iter().product::<usize>() as u64 * t.dtype.size() as u64;
                assert!(
                    t.offset + bytes <= data.len() as u64,
                    "{}: located past the end of the file",
                    t.name
                );
            }
        }
        stream(std::slice::from_ref(&path), TokenMode::Samples);
        read_every_weight(&path);
    });
}

/// A directory of `.npy` activation files (1 or 2 layers): the header parser on the bytes, then the
/// shard reader on the directory.
pub fn npy(data: &[u8]) {
    let parts = split(data, 2);
    let dir = tempdir();
    for (i, p) in parts.iter().enumerate() {
        write(&dir.path().join(format!("layer{i}.npy")), p);
    }
    let inputs = [dir.path().to_path_buf()];
    with_cap(data.len(), || {
        for (i, p) in parts.iter().enumerate() {
            let path = dir.path().join(format!("layer{i}.npy"));
            checked(crate::io::npy::parse_header(
                p,
                p.len() as u64,
                &path,
                format!("layer{i}"),
            ));
        }
        stream(&inputs, TokenMode::Samples);
        stream(&inputs, TokenMode::Features);
    });
}

/// A Hugging Face `config.json`.
pub fn config(data: &[u8]) {
    with_cap(data.len(), || {
        if let Some(c) = checked(ModelConfig::parse(data, Path::new("config.json"))) {
            let _ = c.rope_frequencies(false, 16);
            let _ = c.rope_frequencies(true, 1 << 20);
            for l in 0..c.num_hidden_layers.min(64) {
                let _ = c.layer_window(l);
            }
        }
    });
}

/// A `model.safetensors.index.json`.
pub fn weight_index(data: &[u8]) {
    with_cap(data.len(), || {
        if let Some(files) = checked(parse_index(data, Path::new("model.safetensors.index.json"))) {
            for f in files {
                assert!(
                    !f.is_empty() && !f.contains(['/', '\\']) && f != "." && f != "..",
                    "{f:?} is not a file name in the checkpoint directory"
                );
            }
        }
    });
}

/// A token array (`.npy` of int32/int64 ids, `[sequences, tokens]`).
pub fn tokens(data: &[u8]) {
    with_cap(data.len(), || {
        let path = Path::new("tokens.npy");
        if let Some(t) = checked(Tokens::from_npy_bytes(data, path)) {
            assert_eq!(t.data.len(), t.sequences * t.len);
            checked(t.check_vocab(1000, path));
            let b = t.batch(1, 2);
            assert_eq!(b.data.len(), b.sequences * b.len);
        }
    });
}

/// Images and labels (two `.npy` files, see `split`), through `Images::load_npy`.
pub fn images(data: &[u8]) {
    let mut parts = split(data, 2);
    if parts.len() < 2 {
        parts.push(&[]);
    }
    let dir = tempdir();
    let (ip, lp) = (dir.path().join("images.npy"), dir.path().join("labels.npy"));
    write(&ip, parts[0]);
    write(&lp, parts[1]);
    with_cap(data.len(), || {
        if let Some(im) = checked(Images::load_npy(&ip, &lp)) {
            assert_eq!(im.data.len(), im.n * im.image_len());
            assert_eq!(im.labels.len(), im.n);
            let b = im.batch(1, 2);
            assert_eq!(b.data.len(), b.n * b.image_len());
            let _ = im.first(1);
        }
    });
}

/// Similarity matrices and gradient norms (`src/io/matrix.rs`): the first byte picks the reader and the
/// file extension (which picks the format as it does for the CLI); a matrix that reads is segmented.
pub fn matrix(data: &[u8]) {
    let Some((&sel, bytes)) = data.split_first() else {
        return;
    };
    let ext = ["json", "csv", "npy", "txt"][usize::from(sel & 3)];
    let path = PathBuf::from(format!("input.{ext}"));
    with_cap(data.len(), || {
        if sel & 4 == 0 {
            let Some((layers, m)) =
                checked(crate::io::matrix::parse_similarity_matrix(bytes, &path))
            else {
                return;
            };
            assert_eq!(layers.len(), m.len());
            assert!(m.iter().all(|r| r.len() == m.len()));
            // The matrix is what `segment` runs on: the DP must take any finite symmetric matrix.
            if m.len() <= 48 {
                use crate::segmentation::{segment_cka, Features, KChoice};
                for features in [Features::ColSum, Features::Rows] {
                    let ks = [
                        KChoice::Fixed(2usize.min(m.len())),
                        KChoice::Auto {
                            k_max: 8,
                            threshold: 0.05,
                        },
                        KChoice::Elbow { k_max: 8 },
                    ];
                    for k in ks {
                        if let Some(s) = checked(segment_cka(&layers, &m, features, k, 1)) {
                            let covered: usize = s.segments.iter().map(|&[a, b]| b - a + 1).sum();
                            assert_eq!(covered, m.len(), "segments do not cover the layers");
                        }
                    }
                }
            }
        } else if let Some((names, v)) = checked(crate::io::matrix::parse_importance(bytes, &path))
        {
            assert!(!v.is_empty() && v.iter().all(|x| x.is_finite()));
            if let Some(n) = names {
                assert_eq!(n.len(), v.len());
            }
        }
    });
}

/// The fixture tokenizer (`tests/fixtures/tokenizer/tokenizer.json`), parsed once, outside any cap.
fn fixture_tokenizer() -> &'static tokenizers::Tokenizer {
    static T: OnceLock<tokenizers::Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let bytes = include_bytes!("../tests/fixtures/tokenizer/tokenizer.json");
        tokenizer_from_bytes(bytes, Path::new("tokenizer.json")).expect("the fixture tokenizer")
    })
}

/// `tokenizer.json` (first byte even: the rest is the tokenizer, run on a fixed text), or calibration
/// text cut by the fixture tokenizer (first byte odd: its bits pick plain text or JSON lines, the
/// sequence length and the sequence cap; the rest is the text).
pub fn tokenizer(data: &[u8]) {
    let Some((&sel, bytes)) = data.split_first() else {
        return;
    };
    let fixture = fixture_tokenizer();
    let spec = |jsonl: bool, seq_len: usize, max: Option<usize>| TextSpec {
        path: PathBuf::from(if jsonl { "text.jsonl" } else { "text.txt" }),
        field: None,
        seq_len,
        max_sequences: max,
    };
    with_cap(data.len(), || {
        if sel & 1 == 0 {
            if let Some(t) = checked(tokenizer_from_bytes(bytes, Path::new("tokenizer.json"))) {
                let text = "Hello, world! 123 héllo\tÿ 🦀\n{\"text\": \"x\"}";
                for (jsonl, seq_len) in [(false, 2), (true, 1)] {
                    checked(tokenize_str(&t, text, &spec(jsonl, seq_len, None)));
                }
            }
        } else {
            let Ok(text) = std::str::from_utf8(bytes) else {
                return;
            };
            let seq_len = usize::from((sel >> 1) & 7);
            let max = (sel & 0x40 != 0).then_some(usize::from((sel >> 4) & 3));
            if let Some(t) = checked(tokenize_str(
                fixture,
                text,
                &spec(sel & 0x80 != 0, seq_len, max),
            )) {
                assert_eq!(t.data.len(), t.sequences * t.len);
                assert!(t.sequences >= 1 && t.len == seq_len);
            }
        }
    });
}
