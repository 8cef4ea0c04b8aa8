//! What `prune` leaves beside the checkpoint: `sglp-report.json` (every number the decision used), three
//! PNG pictures, and `sglp-report.html`, one self-contained page showing them (PNGs inlined as base64
//! data URIs, so the page can be mailed or opened anywhere).

pub mod plots;

use crate::error::{Error, Result};
use crate::pruning::allocate::Allocation;
use crate::pruning::select::{GreedyStep, Selection, SubsetSearch};
use crate::segmentation::Features;
use crate::similarity::CkaResult;
use base64::Engine;
use std::path::Path;

pub mod compare;

pub const REPORT_FORMAT: &str = "sglp-prune-report/2";
pub const REPORT_FILE: &str = "sglp-report.json";
pub const HTML_FILE: &str = "sglp-report.html";
pub const CKA_PNG: &str = "sglp-cka.png";
/// Per-layer importance bars: the gradient norms, or the block influence when no gradient norms were
/// computed (`--selection loss`).
pub const GRADNORM_PNG: &str = "sglp-gradnorm.png";
pub const LOSS_PNG: &str = "sglp-segmentation-loss.png";

/// Wall time of each stage, seconds.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct StageTimes {
    /// Forward-only passes that produce hidden states. The calibration batches that also give gradient
    /// norms capture their hidden states in the same forward, counted under `gradnorm_s`; with every
    /// batch used for gradient norms (the default) this is 0.
    pub capture_s: f64,
    /// CKA accumulation, excluding the forward passes.
    pub cka_s: f64,
    pub segmentation_s: f64,
    /// Forward + backward passes for the per-layer gradient norms (their forward also captures the hidden
    /// states), and with `--selection subset` the candidate evaluations.
    pub gradnorm_s: f64,
    /// `--selection loss`: the forward passes that score candidate removals.
    pub selection_s: f64,
    /// Perplexity before and after, when `--eval-tokens` is given.
    pub eval_s: f64,
    /// Checkpoint, report and pictures.
    pub writing_s: f64,
    pub total_s: f64,
}

/// `sglp-report.json`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PruneReport {
    pub format: String,
    pub model: String,
    pub tokens: String,
    pub calibration_sequences: usize,
    pub calibration_tokens_per_sequence: usize,
    pub layers: Vec<String>,
    /// The preset (`sglp`, `sglp-paper`) the options started from.
    pub method: String,
    pub features: Features,
    /// The full CKA result (matrix, HSIC, estimator, batches, warnings).
    pub cka: CkaResult,
    /// Number of segments and how it was chosen ("auto" or "fixed").
    pub k: usize,
    pub k_rule: String,
    /// Segments as inclusive `[start, end]` layer indices.
    pub segments: Vec<(usize, usize)>,
    /// Segmentation loss for each candidate k: `[k, loss]`.
    pub loss_curve: Vec<(usize, f64)>,
    pub allocation: Allocation,
    /// Layers removed from each segment.
    pub removed_per_segment: Vec<usize>,
    pub selection: Selection,
    /// Per-segment subset searches (`--selection subset`), every candidate's score included.
    pub subset_search: Vec<SubsetSearch>,
    /// `--selection loss`: each step's candidates and their calibration losses.
    pub greedy_steps: Vec<GreedyStep>,
    /// Mean over calibration batches of each decoder layer's gradient norm (when computed).
    pub gradnorm: Option<Vec<f64>>,
    /// ShortGPT's block influence 1 − mean cos(h_in, h_out) per layer (when computed).
    pub block_influence: Option<Vec<f64>>,
    /// Calibration loss with each layer removed alone (`--shortlist-by loss`).
    pub single_removal_loss: Option<Vec<f64>>,
    /// Calibration loss of the unpruned model (scoring sequences, or the gradient-norm passes).
    pub calibration_loss: Option<f64>,
    pub removed: Vec<usize>,
    pub removed_layers: Vec<String>,
    pub kept: Vec<usize>,
    pub params_before: usize,
    pub params_after: usize,
    pub eval_tokens: Option<String>,
    pub perplexity_before: Option<f64>,
    pub perplexity_after: Option<f64>,
    /// CNNs (`prune --arch`): the architecture, and top-1 accuracy on the held-out images before and
    /// after (`eval_tokens` then names the images; the calibration counts images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy_before: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy_after: Option<f64>,
    pub timings: StageTimes,
    pub warnings: Vec<String>,
}

/// Draw the three pictures into `dir`.
pub fn write_plots(dir: &Path, r: &PruneReport) -> Result<()> {
    plots::cka_heatmap(
        &dir.join(CKA_PNG),
        &r.cka.cka_matrix(),
        &r.segments,
        &r.removed,
    )?;
    let (values, title, axis) = match (&r.gradnorm, &r.single_removal_loss, &r.block_influence) {
        (Some(g), _, _) => (
            g.as_slice(),
            "Gradient norm per layer (colour = segment, red = removed)",
            "‖∂loss/∂θ‖ of the layer",
        ),
        (None, Some(s), _) => (
            s.as_slice(),
            "Calibration loss with the layer removed alone (red = removed)",
            "calibration loss",
        ),
        (None, None, Some(b)) => (
            b.as_slice(),
            "Block influence per layer (colour = segment, red = removed)",
            "1 − mean cos(h_in, h_out)",
        ),
        _ => (&[][..], "No per-layer importance computed", ""),
    };
    plots::importance_bars(
        &dir.join(GRADNORM_PNG),
        values,
        title,
        axis,
        &r.segments,
        &r.removed,
    )?;
    plots::loss_curve(&dir.join(LOSS_PNG), &r.loss_curve, r.k)
}

pub(crate) fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.4}")).unwrap_or_else(|| "—".into())
}

/// The HTML page: a summary table and the three pictures (read from `dir`, inlined).
pub fn html_page(dir: &Path, r: &PruneReport) -> Result<String> {
    let img = |file: &str, alt: &str| -> Result<String> {
        let p = dir.join(file);
        let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
        let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
        Ok(format!(
            "<figure><img alt=\"{}\" src=\"data:image/png;base64,{b64}\"><figcaption>{}</figcaption></figure>",
            escape(alt),
            escape(alt)
        ))
    };
    let segs: Vec<String> = r
        .segments
        .iter()
        .zip(&r.removed_per_segment)
        .map(|(&(s, e), n)| format!("[{s}–{e}] −{n}"))
        .collect();
    let rows = [
        ("Model", escape(&r.model)),
        (
            "Calibration",
            match &r.arch {
                Some(_) => format!("{} ({} images)", escape(&r.tokens), r.calibration_sequences),
                None => format!(
                    "{} ({} × {} tokens)",
                    escape(&r.tokens),
                    r.calibration_sequences,
                    r.calibration_tokens_per_sequence
                ),
            },
        ),
        (
            "Layers",
            format!("{} → {}", r.layers.len(), r.kept.len()),
        ),
        (
            "Removed",
            escape(
                &r.removed
                    .iter()
                    .map(|l| l.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        ),
        (
            "Decision",
            format!(
                "{} (features {:?}, allocation {:?}, selection {:?})",
                escape(&r.method),
                r.features,
                r.allocation,
                r.selection
            ),
        ),
        (
            "Segments",
            format!("k = {} ({}): {}", r.k, escape(&r.k_rule), segs.join(", ")),
        ),
        (
            "CKA",
            format!(
                "{:?}, {} samples in {} batch(es)",
                r.cka.estimator, r.cka.n_samples, r.cka.n_batches
            ),
        ),
        (
            "Parameters",
            format!("{} → {}", r.params_before, r.params_after),
        ),
        match &r.arch {
            Some(arch) => (
                "Top-1 accuracy",
                format!(
                    "{} → {} ({})",
                    fmt_opt(r.accuracy_before),
                    fmt_opt(r.accuracy_after),
                    escape(arch)
                ),
            ),
            None => (
                "Perplexity",
                format!(
                    "{} → {}",
                    fmt_opt(r.perplexity_before),
                    fmt_opt(r.perplexity_after)
                ),
            ),
        },
        (
            "Wall time (s)",
            format!(
                "capture {:.2}, CKA {:.2}, segmentation {:.3}, gradnorm {:.2}, selection {:.2}, eval {:.2}, writing {:.2}; total {:.2}",
                r.timings.capture_s,
                r.timings.cka_s,
                r.timings.segmentation_s,
                r.timings.gradnorm_s,
                r.timings.selection_s,
                r.timings.eval_s,
                r.timings.writing_s,
                r.timings.total_s
            ),
        ),
    ];
    let table: String = rows
        .iter()
        .map(|(k, v)| format!("<tr><th>{k}</th><td>{v}</td></tr>\n"))
        .collect();
    let warnings: String = r
        .warnings
        .iter()
        .chain(&r.cka.warnings)
        .map(|w| format!("<li>{}</li>", escape(w)))
        .collect();
    Ok(format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>SGLP pruning report</title>\n\
         <style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}\
         table{{border-collapse:collapse}}th,td{{text-align:left;padding:4px 10px;border-bottom:1px solid #ddd}}\
         figure{{display:inline-block;margin:1em}}img{{max-width:100%}}</style></head><body>\n\
         <h1>SGLP pruning report</h1>\n<table>\n{table}</table>\n{}\n{}{}{}\n</body></html>\n",
        if warnings.is_empty() {
            String::new()
        } else {
            format!("<h2>Warnings</h2><ul>{warnings}</ul>")
        },
        img(CKA_PNG, "CKA heatmap with segment boundaries and removed layers")?,
        img(
            GRADNORM_PNG,
            match (&r.gradnorm, &r.single_removal_loss) {
                (Some(_), _) => "Gradient norm per layer",
                (None, Some(_)) => "Calibration loss with each layer removed alone",
                _ => "Block influence per layer",
            }
        )?,
        img(LOSS_PNG, "Segmentation loss curve")?,
    ))
}

/// Write `sglp-report.json` and the HTML page into `dir` (the pictures must be there:
/// [`write_plots`]).
pub fn write_json_and_html(dir: &Path, r: &PruneReport) -> Result<()> {
    let json_path = dir.join(REPORT_FILE);
    let mut json =
        serde_json::to_string_pretty(r).map_err(|e| Error::format(&json_path, e.to_string()))?;
    json.push('\n');
    crate::io::output::write_atomic(&json_path, json.as_bytes())?;
    let html = html_page(dir, r)?;
    crate::io::output::write_atomic(&dir.join(HTML_FILE), html.as_bytes())
}

/// Write the pictures, `sglp-report.json` and the HTML page into `dir`.
pub fn write_report(dir: &Path, r: &PruneReport) -> Result<()> {
    write_plots(dir, r)?;
    write_json_and_html(dir, r)
}
