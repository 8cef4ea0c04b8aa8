//! The crate's one error type. Every fallible function returns [`Result`]; the CLI prints the error's
//! `Display` on one line and exits with [`Error::exit_code`].

use std::borrow::Cow;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened, read, or written.
    #[error("{}: {}", one_line_path(path), one_line(&source.to_string()))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file's content is not what its format promises (truncated, corrupt header, unsupported dtype...).
    #[error("{}: {}", one_line_path(path), one_line(msg))]
    Format { path: PathBuf, msg: String },
    /// Something wrong with one layer of an input file (shape mismatch, NaN, ...).
    #[error(
        "{}: layer '{}': {}",
        one_line_path(path),
        one_line(layer),
        one_line(msg)
    )]
    Layer {
        path: PathBuf,
        layer: String,
        msg: String,
    },
    /// Input that is well-formed but cannot be used as asked (bad option values, too few samples, ...).
    #[error("{}", one_line(.0))]
    InvalidInput(String),
    /// A model checkpoint or config the runtime cannot run.
    #[error("{}", one_line(.0))]
    Model(String),
    /// The CUDA backend was asked for but cannot run, or a CUDA call failed. `msg` is the whole message
    /// (it names the failed call and its error); `source` is the driver's or NVRTC's error, when there is one.
    #[error("CUDA: {}", one_line(msg))]
    Cuda {
        msg: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl Error {
    /// Exit code for the CLI. Every variant is something the user meets through their input, options or
    /// machine, so all map to 2 (clap's own usage errors also exit 2).
    pub fn exit_code(&self) -> i32 {
        2
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }

    pub fn layer(
        path: impl Into<PathBuf>,
        layer: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Layer {
            path: path.into(),
            layer: layer.into(),
            msg: msg.into(),
        }
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidInput(msg.into())
    }

    /// A CUDA error of our own (no underlying error).
    pub fn cuda(msg: impl Into<String>) -> Self {
        Error::Cuda {
            msg: msg.into(),
            source: None,
        }
    }

    /// A failed CUDA or NVRTC call: `msg` (which names it), and the library's error kept as the source.
    pub fn cuda_from(
        msg: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Cuda {
            msg: msg.into(),
            source: Some(Box::new(source)),
        }
    }
}

/// Messages quote names and values read from input files (tensor names, JSON strings, CSV cells, file
/// names); a control character in one (a newline, a carriage return, an escape sequence) or a Unicode line
/// separator would break the one-line message the CLI promises, or rewrite the terminal. They are shown
/// escaped (`\n`, `\u{1b}`), everything else as written.
pub fn one_line(s: &str) -> Cow<'_, str> {
    let breaks = |c: char| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}');
    if !s.chars().any(breaks) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if breaks(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn one_line_path(path: &Path) -> String {
    one_line(&path.display().to_string()).into_owned()
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::Error;
    use std::error::Error as _;

    #[test]
    fn cuda_errors_keep_the_library_error_as_source_and_their_message() {
        let e = Error::cuda_from("cuInit: boom", std::io::Error::other("boom"));
        assert_eq!(e.to_string(), "CUDA: cuInit: boom");
        assert_eq!(e.source().unwrap().to_string(), "boom");
        let e = Error::cuda("no CUDA driver found");
        assert_eq!(e.to_string(), "CUDA: no CUDA driver found");
        assert!(e.source().is_none());
    }

    #[test]
    fn names_from_input_files_cannot_break_the_one_line_message() {
        let e = Error::layer("a\nb.safetensors", "x\r\ny\u{1b}[2J", "bad\tshape\u{2028}");
        let s = e.to_string();
        assert_eq!(
            s,
            "a\\nb.safetensors: layer 'x\\r\\ny\\u{1b}[2J': bad\\tshape\\u{2028}"
        );
        assert!(!s.chars().any(char::is_control), "{s}");
        // Plain messages are left as written (non-ASCII included).
        assert_eq!(Error::invalid("K̃ ≠ 0").to_string(), "K̃ ≠ 0");
    }
}
