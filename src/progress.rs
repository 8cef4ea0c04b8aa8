//! Progress bars on stderr for long passes (hidden automatically when stderr is not a terminal). Every
//! bar joins one [`MultiProgress`], so a pass inside a longer job (the evaluations inside `compare`'s
//! criteria) shows its bar under the job's instead of over it; [`suspend`] prints between redraws.

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::sync::LazyLock;

static BARS: LazyLock<MultiProgress> = LazyLock::new(MultiProgress::new);

/// A bar counting `total` units of `what` (e.g. "batches").
pub fn bar(total: u64, what: &str) -> ProgressBar {
    let pb = BARS.add(ProgressBar::new(total));
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {what} {{pos}}/{{len}} [{{bar:30}}] {{elapsed_precise}} (eta {{eta}}) {{msg}}"
        ))
        .expect("static progress template")
        .progress_chars("=> "),
    );
    pb
}

/// Run `f` (which writes to stderr) with the bars cleared, then draw them again.
pub fn suspend<R>(f: impl FnOnce() -> R) -> R {
    BARS.suspend(f)
}
