//! Progress bars on stderr for long passes (hidden automatically when stderr is not a terminal).

use indicatif::{ProgressBar, ProgressStyle};

/// A bar counting `total` units of `what` (e.g. "batches").
pub fn bar(total: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {what} {{pos}}/{{len}} [{{bar:30}}] {{elapsed_precise}} (eta {{eta}})"
        ))
        .expect("static progress template")
        .progress_chars("=> "),
    );
    pb
}
