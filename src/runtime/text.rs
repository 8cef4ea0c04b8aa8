//! Calibration text → token sequences, with the checkpoint's own `tokenizer.json` (Hugging Face's
//! `tokenizers`, the same library Python's `transformers` uses, so the ids are the ones Python gives).
//!
//! The rule: every document — the whole file for plain text, each line's `--text-field` for `.jsonl` — is
//! encoded with the tokenizer's own template (special tokens as the template adds them, e.g. LLaMA's BOS
//! in front of each document; no truncation or padding), the documents' ids are concatenated, and cut into
//! consecutive sequences of `seq_len` ids. The remainder is dropped; `max_sequences` stops early.

use super::Tokens;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Where calibration tokens come from: a `.npy` array of ids, or text tokenised here.
#[derive(Clone, Debug, PartialEq)]
pub enum TokenInput {
    /// `.npy` `[sequences, tokens]`, int32 or int64.
    Npy(PathBuf),
    Text(TextSpec),
}

impl TokenInput {
    /// The input file, as reports name it.
    pub fn path(&self) -> &Path {
        match self {
            TokenInput::Npy(p) => p,
            TokenInput::Text(t) => &t.path,
        }
    }
}

/// Text to tokenise (`--text FILE [--text-field NAME] --seq-len N [--max-sequences N]`).
#[derive(Clone, Debug, PartialEq)]
pub struct TextSpec {
    pub path: PathBuf,
    /// `.jsonl`: the string field of each line to read (`None`: `text`). Giving one makes the file JSON
    /// lines whatever its extension.
    pub field: Option<String>,
    pub seq_len: usize,
    pub max_sequences: Option<usize>,
}

impl TextSpec {
    /// Whether the file is read as JSON lines (a `--text-field` given, or a `.jsonl` name).
    pub fn is_jsonl(&self) -> bool {
        self.field.is_some()
            || self
                .path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("jsonl"))
    }
}

/// Tokenise `spec.path` with the tokenizer at `tokenizer_json` (see the module doc for the rule).
pub fn tokenize_text(tokenizer_json: &Path, spec: &TextSpec) -> Result<Tokens> {
    if spec.seq_len < 2 {
        return Err(Error::invalid(format!(
            "--seq-len must be at least 2 (got {})",
            spec.seq_len
        )));
    }
    if spec.max_sequences == Some(0) {
        return Err(Error::invalid("--max-sequences must be at least 1"));
    }
    if !tokenizer_json.is_file() {
        return Err(Error::format(
            tokenizer_json,
            "not found: --text tokenises with the checkpoint's own tokenizer.json (or pass --tokens FILE.npy)",
        ));
    }
    let bytes = std::fs::read(tokenizer_json).map_err(|e| Error::io(tokenizer_json, e))?;
    let tokenizer = tokenizer_from_bytes(&bytes, tokenizer_json)?;
    let text = read_text(&spec.path)?;
    tokenize_str(&tokenizer, &text, spec)
}

/// A `tokenizer.json` (its bytes; `path` names it in errors), with truncation and padding off.
pub fn tokenizer_from_bytes(bytes: &[u8], path: &Path) -> Result<tokenizers::Tokenizer> {
    let mut tokenizer = no_panic(path, "not a tokenizer.json", || {
        tokenizers::Tokenizer::from_bytes(bytes)
    })?
    .map_err(|e| Error::format(path, format!("not a tokenizer.json: {e}")))?;
    tokenizer
        .with_truncation(None)
        .map_err(|e| Error::format(path, format!("cannot turn truncation off: {e}")))?;
    tokenizer.with_padding(None);
    Ok(tokenizer)
}

/// The token sequences of `text`, the content of `spec.path` (see the module doc for the rule).
pub fn tokenize_str(
    tokenizer: &tokenizers::Tokenizer,
    text: &str,
    spec: &TextSpec,
) -> Result<Tokens> {
    if spec.seq_len == 0 {
        return Err(Error::invalid("--seq-len must be at least 1"));
    }
    let wanted = spec.max_sequences.map(|m| m.saturating_mul(spec.seq_len));
    let mut ids: Vec<i64> = Vec::new();
    let encode = |doc: &str, ids: &mut Vec<i64>| -> Result<()> {
        let enc = no_panic(&spec.path, "tokenizer failed", || {
            tokenizer.encode(doc, true)
        })?
        .map_err(|e| Error::format(&spec.path, format!("tokenizer failed: {e}")))?;
        ids.extend(enc.get_ids().iter().map(|&i| i64::from(i)));
        Ok(())
    };
    if spec.is_jsonl() {
        let field = spec.field.as_deref().unwrap_or("text");
        for (i, line) in text.lines().enumerate() {
            if wanted.is_some_and(|w| ids.len() >= w) {
                break;
            }
            if line.trim().is_empty() {
                continue;
            }
            encode(&jsonl_field(&spec.path, i + 1, line, field)?, &mut ids)?;
        }
    } else {
        encode(text, &mut ids)?;
    }

    let mut sequences = ids.len() / spec.seq_len;
    if let Some(m) = spec.max_sequences {
        sequences = sequences.min(m);
    }
    if sequences == 0 {
        return Err(Error::format(
            &spec.path,
            format!(
                "{} tokens, fewer than one sequence of --seq-len {}",
                ids.len(),
                spec.seq_len
            ),
        ));
    }
    ids.truncate(sequences * spec.seq_len);
    Ok(Tokens {
        data: ids,
        sequences,
        len: spec.seq_len,
    })
}

/// Run a call into the `tokenizers` library, turning a panic into an error: it panics on some malformed
/// files instead of returning an error (its deserialisers `expect` on parts of the JSON, e.g. a
/// `decoder` holding a raw control character), and a bad tokenizer.json must not crash the engine.
fn no_panic<T>(path: &Path, what: &str, f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Error::format(
            path,
            format!("{what}: the tokenizers library panicked ({msg})"),
        )
    })
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    String::from_utf8(bytes).map_err(|e| {
        Error::format(
            path,
            format!(
                "not UTF-8 text (first bad byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// The string `field` of one JSON-lines record; errors name the line.
fn jsonl_field(path: &Path, line_no: usize, line: &str, field: &str) -> Result<String> {
    let at = |msg: String| Error::format(path, format!("line {line_no}: {msg}"));
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| at(format!("not JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| at("not a JSON object".into()))?;
    match obj.get(field) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(at(format!(
            "field '{field}' is not a string (it is {})",
            match other {
                serde_json::Value::Null => "null",
                serde_json::Value::Bool(_) => "a boolean",
                serde_json::Value::Number(_) => "a number",
                serde_json::Value::Array(_) => "an array",
                _ => "an object",
            }
        ))),
        None => {
            let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            Err(at(format!(
                "no field '{field}' (fields: {}); choose one with --text-field",
                keys.join(", ")
            )))
        }
    }
}
