//! `prune` as a library call: the SGLP decision on a checkpoint, held-out perplexity before and after,
//! the pruned checkpoint and its report, written into a staging directory and renamed at the end.

use super::calibration::{perplexity, Perplexity};
use super::checkpoint::{parameter_counts, write_pruned_checkpoint, StagedDir};
use super::compare::ParamCounts;
use super::pipeline::{sglp_decide, Budget, SglpDecision, SglpOptions};
use super::select::Selection;
use crate::error::{Error, Result};
use crate::io::matrix::importance_for_layers;
use crate::report::{write_json_and_html, write_plots, PruneReport, StageTimes, REPORT_FORMAT};
use crate::runtime::{Model, TokenInput};
use crate::segmentation::KChoice;
use crate::similarity::Backend;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One `prune` run.
#[derive(Clone, Debug)]
pub struct PruneSpec {
    pub model: PathBuf,
    pub tokens: TokenInput,
    pub budget: Budget,
    pub out: PathBuf,
    /// Replace an existing `out`.
    pub force: bool,
    /// Held-out tokens for perplexity before and after.
    pub eval_tokens: Option<TokenInput>,
    /// Per-layer gradient norms measured elsewhere (`--gradnorm FILE`, read by
    /// [`crate::io::matrix::read_importance`]): the selection by gradient norm uses them, with no
    /// backward pass.
    pub gradnorm_file: Option<PathBuf>,
    /// The preset's name, for the report.
    pub method: String,
    pub options: SglpOptions,
}

/// The parameter counts of a model's checkpoint: per decoder layer, and the rest.
pub fn param_counts(model: &Model) -> Result<ParamCounts> {
    let (other, per_layer) =
        parameter_counts(&model.dir, &model.names.layers_prefix(), model.num_layers())?;
    Ok(ParamCounts { other, per_layer })
}

/// Prune: decide, evaluate, write the checkpoint and the report. Returns the report and where the
/// checkpoint went. Warnings are in `report.warnings` (and the CKA's own in `report.cka.warnings`).
/// `open_backend` is called once the output directory, the model and the tokens have been checked, so a
/// bad argument is reported before any device is opened. `load_model` loads the checkpoint (and chooses
/// the device its passes run on: `cli::common::load_decoder`).
pub fn prune(
    spec: &PruneSpec,
    open_backend: &mut dyn FnMut() -> Result<Box<dyn Backend>>,
    load_model: &mut dyn FnMut(&Path) -> Result<Model>,
) -> Result<(PruneReport, PathBuf)> {
    let t0 = Instant::now();
    let mut opts = spec.options.clone();
    if let (Ok(o), Ok(m)) = (spec.out.canonicalize(), spec.model.canonicalize()) {
        if o == m {
            return Err(Error::invalid(format!(
                "{}: --out is the input model directory; choose another OUTDIR",
                spec.out.display()
            )));
        }
    }
    // Refuse an existing OUTDIR before any work; the staging directory beside it is made only when the
    // checkpoint is written, so an interrupted analysis leaves nothing behind.
    StagedDir::check_dest(&spec.out, spec.force)?;
    let model = load_model(&spec.model)?;
    let l = model.num_layers();
    let budget = spec.budget.layers_to_remove(l)?;
    let tokens = model.load_token_input(&spec.tokens)?;
    let eval = match &spec.eval_tokens {
        Some(p) => Some(model.load_token_input(p)?),
        None => None,
    };
    use_gradnorm_file(
        &mut opts,
        spec.gradnorm_file.as_deref(),
        &model.layer_names(),
    )?;
    let opts = &opts;

    let mut backend = open_backend()?;
    let mut d = sglp_decide(&model, &tokens, budget, opts, backend.as_mut())?;
    note_gradnorm_file(&mut d, spec.gradnorm_file.as_deref());
    let kept: Vec<usize> = (0..l).filter(|i| !d.removed.contains(i)).collect();
    let removed = d.removed.clone();

    let t_eval = Instant::now();
    let (ppl_before, ppl_after): (Option<Perplexity>, Option<Perplexity>) = match &eval {
        Some(e) => (
            Some(perplexity(&model, e, opts.forward_batch, &[])?),
            Some(perplexity(&model, e, opts.forward_batch, &removed)?),
        ),
        None => (None, None),
    };
    let eval_s = t_eval.elapsed().as_secs_f64();

    let t_write = Instant::now();
    let params = param_counts(&model)?;
    let staged = StagedDir::new(&spec.out, spec.force)?;
    write_pruned_checkpoint(
        &spec.model,
        staged.path(),
        &model.names.layers_prefix(),
        l,
        &kept,
    )?;
    let report = decision_report(
        d,
        opts,
        ReportInputs {
            model: spec.model.display().to_string(),
            calibration: spec.tokens.path().display().to_string(),
            items: tokens.sequences,
            rows_per_item: tokens.len,
            units: model.layer_names(),
            method: spec.method.clone(),
            params: (params.total(), params.without(&removed)),
            eval: spec
                .eval_tokens
                .as_ref()
                .map(|p| p.path().display().to_string()),
            perplexity: (
                ppl_before.map(|p| p.perplexity),
                ppl_after.map(|p| p.perplexity),
            ),
            arch: None,
            accuracy: (None, None),
            eval_s,
        },
    );
    finish_report(staged, report, t_write, t0)
}

/// `--gradnorm FILE`: its per-unit importance into `opts`, for `--selection gradnorm` only.
pub(crate) fn use_gradnorm_file(
    opts: &mut SglpOptions,
    file: Option<&Path>,
    units: &[String],
) -> Result<()> {
    if let Some(path) = file {
        if opts.selection != Selection::Gradnorm {
            return Err(Error::invalid(
                "--gradnorm FILE gives the importance of --selection gradnorm (the default with it); \
                 the selection asked for does not use it",
            ));
        }
        opts.gradnorm = Some(importance_for_layers(path, units)?);
    }
    Ok(())
}

/// The decision's note that its importance came from `--gradnorm FILE`.
pub(crate) fn note_gradnorm_file(d: &mut SglpDecision, file: Option<&Path>) {
    if let Some(path) = file {
        d.notes.push(format!(
            "importance: the gradient norms of {} (no backward pass)",
            path.display()
        ));
    }
}

/// The last steps of a prune: the report's pictures into `staged`, its writing (since `t_write`) and
/// total (since `t0`) times, its JSON and HTML, and `staged` moved into place. Writing time covers the
/// model and the pictures; the JSON and HTML that carry it follow.
pub(crate) fn finish_report(
    staged: StagedDir,
    mut report: PruneReport,
    t_write: Instant,
    t0: Instant,
) -> Result<(PruneReport, PathBuf)> {
    write_plots(staged.path(), &report)?;
    report.timings.writing_s = t_write.elapsed().as_secs_f64();
    report.timings.total_s = t0.elapsed().as_secs_f64();
    write_json_and_html(staged.path(), &report)?;
    let out = staged.commit()?;
    Ok((report, out))
}

/// What a report holds beside the decision: the inputs as the user named them, the parameter counts
/// before and after, and the held-out evaluation (perplexity of a decoder, accuracy of a CNN).
pub(crate) struct ReportInputs {
    pub model: String,
    pub calibration: String,
    /// Calibration items (sequences, images) and rows per item (tokens per sequence; 1).
    pub items: usize,
    pub rows_per_item: usize,
    pub units: Vec<String>,
    pub method: String,
    pub params: (usize, usize),
    pub eval: Option<String>,
    pub perplexity: (Option<f64>, Option<f64>),
    pub arch: Option<String>,
    pub accuracy: (Option<f64>, Option<f64>),
    pub eval_s: f64,
}

/// How `k` was chosen, as a report names it: `auto`, `elbow` or `fixed`.
pub fn k_rule(k: KChoice) -> &'static str {
    match k {
        KChoice::Auto { .. } => "auto",
        KChoice::Elbow { .. } => "elbow",
        KChoice::Fixed(_) => "fixed",
    }
}

/// The report of a decision (timings of writing and the total left at 0 for the caller).
pub(crate) fn decision_report(
    d: SglpDecision,
    opts: &SglpOptions,
    inputs: ReportInputs,
) -> PruneReport {
    let n = inputs.units.len();
    PruneReport {
        format: REPORT_FORMAT.into(),
        model: inputs.model,
        tokens: inputs.calibration,
        calibration_sequences: inputs.items,
        calibration_tokens_per_sequence: inputs.rows_per_item,
        method: inputs.method,
        features: opts.features,
        k: d.segmentation.k,
        k_rule: k_rule(opts.k).into(),
        segments: d.segments,
        loss_curve: (1..).zip(d.segmentation.loss_curve).collect(),
        allocation: opts.allocation,
        removed_per_segment: d.removed_per_segment,
        selection: opts.selection,
        subset_search: d.subset_search,
        greedy_steps: d.greedy_steps,
        calibration_loss: d.score_baseline.or_else(|| {
            d.gradnorm
                .as_ref()
                .map(|g| g.loss)
                .filter(|l| l.is_finite())
        }),
        gradnorm: d.gradnorm.map(|g| g.per_layer),
        block_influence: d.block_influence,
        single_removal_loss: d.single_removal_loss,
        removed_layers: d.removed.iter().map(|&i| inputs.units[i].clone()).collect(),
        kept: (0..n).filter(|i| !d.removed.contains(i)).collect(),
        removed: d.removed,
        layers: inputs.units,
        params_before: inputs.params.0,
        params_after: inputs.params.1,
        eval_tokens: inputs.eval,
        perplexity_before: inputs.perplexity.0,
        perplexity_after: inputs.perplexity.1,
        arch: inputs.arch,
        accuracy_before: inputs.accuracy.0,
        accuracy_after: inputs.accuracy.1,
        timings: StageTimes {
            capture_s: d.times.capture.as_secs_f64(),
            cka_s: d.times.cka.as_secs_f64(),
            segmentation_s: d.times.segmentation.as_secs_f64(),
            gradnorm_s: d.times.gradnorm.as_secs_f64(),
            selection_s: d.times.selection.as_secs_f64(),
            eval_s: inputs.eval_s,
            writing_s: 0.0,
            total_s: 0.0,
        },
        warnings: d.notes,
        cka: d.cka,
    }
}
