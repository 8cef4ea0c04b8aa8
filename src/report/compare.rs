//! What `compare` leaves in its output directory: `sglp-compare.json` (every number), `sglp-compare.png`
//! (held-out perplexity or top-1 error against layers removed, one curve per criterion, random as a band) and
//! `sglp-compare.html` (the table and the picture, inlined), plus the text table for the terminal.

use super::{escape, plots};
use crate::error::{Error, Result};
use crate::pruning::compare::{CompareReport, Criterion, Metric};
use base64::Engine;
use std::path::Path;

pub const COMPARE_JSON: &str = "sglp-compare.json";
pub const COMPARE_PNG: &str = "sglp-compare.png";
pub const COMPARE_HTML: &str = "sglp-compare.html";

/// The plain-text table: one row per budget, one column per criterion (the held-out metric; random as
/// the median), the best criterion of each row marked with `*`, then each criterion's decision time.
pub fn text_table(r: &CompareReport) -> String {
    let mut out = format!(
        "{} after removing N of {} layers (unpruned {:.4}); * = best\n",
        r.metric.label(),
        r.num_layers,
        r.baseline.value
    );
    out += &format!("{:>4}", "N");
    for c in &r.curves {
        out += &format!(" {:>12}", c.criterion.name());
    }
    out.push('\n');
    for (i, &n) in r.budgets.iter().enumerate() {
        out += &format!("{n:>4}");
        let best = r
            .curves
            .iter()
            .map(|c| c.points[i].value)
            .fold(f64::INFINITY, f64::min);
        for c in &r.curves {
            let p = c.points[i].value;
            let mark = if p == best { "*" } else { " " };
            out += &format!(" {:>11.4}{mark}", p);
        }
        out.push('\n');
    }
    out += &format!("{:>4}", "s");
    for c in &r.curves {
        out += &format!(" {:>12.2}", c.decide_s);
    }
    out += &format!(
        "\n(s: seconds each criterion's decisions took over the sweep, beyond the shared calibration pass \
         of {:.2} s: {})\n",
        r.calibration_pass_s, r.calibration_pass
    );
    out
}

/// Draw the quality curves.
pub fn write_png(path: &Path, r: &CompareReport) -> Result<()> {
    let curves: Vec<(String, Vec<(usize, f64)>)> = r
        .curves
        .iter()
        .filter(|c| c.criterion != Criterion::Random)
        .map(|c| {
            (
                c.criterion.name().to_string(),
                c.points.iter().map(|p| (p.remove, p.value)).collect(),
            )
        })
        .collect();
    let band: Option<Vec<(usize, f64, f64, f64)>> = r.curve(Criterion::Random).map(|c| {
        c.points
            .iter()
            .filter_map(|p| {
                p.random
                    .as_ref()
                    .map(|b| (p.remove, b.median, b.min, b.max))
            })
            .collect()
    });
    plots::quality_curves(
        path,
        r.metric.label(),
        r.baseline.value,
        &curves,
        band.as_deref(),
    )
}

/// The HTML page (the PNG must already be in `dir`).
pub fn html_page(dir: &Path, r: &CompareReport) -> Result<String> {
    let png = dir.join(COMPARE_PNG);
    let bytes = std::fs::read(&png).map_err(|e| Error::io(&png, e))?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    let mut head = String::from("<tr><th>N</th>");
    for c in &r.curves {
        head += &format!("<th>{}</th>", c.criterion.name());
    }
    head += "</tr>\n";
    let mut rows = String::new();
    for (i, &n) in r.budgets.iter().enumerate() {
        let best = r
            .curves
            .iter()
            .map(|c| c.points[i].value)
            .fold(f64::INFINITY, f64::min);
        rows += &format!("<tr><td>{n}</td>");
        for c in &r.curves {
            let p = &c.points[i];
            let removed = p
                .removed
                .iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .join(",");
            let cell = match &p.random {
                Some(b) => format!("{:.3} <small>[{:.3}–{:.3}]</small>", b.median, b.min, b.max),
                None => format!("{:.3} <small>({removed})</small>", p.value),
            };
            if p.value == best {
                rows += &format!("<td><b>{cell}</b></td>");
            } else {
                rows += &format!("<td>{cell}</td>");
            }
        }
        rows += "</tr>\n";
    }
    rows += "<tr><td>decide (s)</td>";
    for c in &r.curves {
        rows += &format!("<td>{:.2}</td>", c.decide_s);
    }
    rows += "</tr>\n";
    let notes: String = r
        .notes
        .iter()
        .map(|n| format!("<li>{}</li>", escape(n)))
        .collect();
    Ok(format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>SGLP compare</title>\n\
         <style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}\
         table{{border-collapse:collapse}}th,td{{text-align:left;padding:4px 10px;border-bottom:1px solid #ddd}}\
         img{{max-width:100%}}</style></head><body>\n\
         <h1>Layer-removal criteria compared</h1>\n\
         <p>Model <code>{}</code>, {} layers; calibration <code>{}</code> ({}); held out \
         <code>{}</code> ({} items). Unpruned {} {:.4}. Each cell: the same \
         with the N layers bypassed (no fine-tuning), the removed layers in brackets; random: median and \
         range over {} seeds. Shared calibration pass {:.2} s ({}).</p>\n\
         <table>\n{head}{rows}</table>\n<img alt=\"quality curves\" src=\"data:image/png;base64,{b64}\">\n{}\
         </body></html>\n",
        escape(&r.model),
        r.num_layers,
        escape(&r.tokens),
        match r.metric {
            Metric::Perplexity => format!(
                "{} × {} tokens",
                r.calibration_sequences, r.tokens_per_sequence
            ),
            Metric::Top1Error => format!("{} images", r.calibration_sequences),
        },
        escape(&r.eval_tokens),
        r.eval_sequences,
        r.metric.label(),
        r.baseline.value,
        r.curve(Criterion::Random)
            .and_then(|c| c.points.first())
            .and_then(|p| p.random.as_ref())
            .map_or(0, |b| b.seeds.len()),
        r.calibration_pass_s,
        escape(&r.calibration_pass),
        if notes.is_empty() {
            String::new()
        } else {
            format!("<h2>Notes</h2><ul>{notes}</ul>\n")
        },
    ))
}

/// Write the JSON, the PNG and the HTML page into `dir` (made if missing).
pub fn write_compare(dir: &Path, r: &CompareReport) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let json_path = dir.join(COMPARE_JSON);
    let json = serde_json::to_string_pretty(r)
        .map_err(|e| Error::format(&json_path, e.to_string()))?
        + "\n";
    crate::io::output::write_atomic(&json_path, json.as_bytes())?;
    // Atomic like the others: the encoder writes the staging file, renamed into place after.
    crate::io::output::write_atomic_with(&dir.join(COMPARE_PNG), |p| write_png(p, r))?;
    let html = html_page(dir, r)?;
    crate::io::output::write_atomic(&dir.join(COMPARE_HTML), html.as_bytes())
}
