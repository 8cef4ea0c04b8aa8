//! `prune` as a library call: the SGLP decision on a checkpoint, held-out perplexity before and after,
//! the pruned checkpoint and its report, written into a staging directory and renamed at the end.

use super::calibration::{perplexity, Perplexity};
use super::checkpoint::{parameter_counts, write_pruned_checkpoint, StagedDir};
use super::compare::ParamCounts;
use super::pipeline::{sglp_decide, Budget, SglpOptions};
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

/// The parameter counts of a checkpoint directory of `num_layers` decoder layers.
pub fn param_counts(model_dir: &Path, num_layers: usize) -> Result<ParamCounts> {
    let (other, per_layer) = parameter_counts(model_dir, num_layers)?;
    Ok(ParamCounts { other, per_layer })
}

/// Prune: decide, evaluate, write the checkpoint and the report. Returns the report and where the
/// checkpoint went. Warnings are in `report.warnings` (and the CKA's own in `report.cka.warnings`).
/// `open_backend` is called once the output directory, the model and the tokens have been checked, so a
/// bad argument is reported before any device is opened.
pub fn prune(
    spec: &PruneSpec,
    open_backend: &mut dyn FnMut() -> Result<Box<dyn Backend>>,
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
    let model = Model::load(&spec.model)?;
    let l = model.num_layers();
    let budget = spec.budget.layers_to_remove(l)?;
    let tokens = model.load_token_input(&spec.tokens)?;
    let eval = match &spec.eval_tokens {
        Some(p) => Some(model.load_token_input(p)?),
        None => None,
    };
    if let Some(path) = &spec.gradnorm_file {
        if opts.selection != Selection::Gradnorm {
            return Err(Error::invalid(
                "--gradnorm FILE gives the importance of --selection gradnorm (the default with it); \
                 the selection asked for does not use it",
            ));
        }
        opts.gradnorm = Some(importance_for_layers(path, &model.layer_names())?);
    }
    let opts = &opts;

    let mut backend = open_backend()?;
    let mut d = sglp_decide(&model, &tokens, budget, opts, backend.as_mut())?;
    if let Some(path) = &spec.gradnorm_file {
        d.notes.push(format!(
            "importance: the gradient norms of {} (no backward pass)",
            path.display()
        ));
    }
    let kept: Vec<usize> = (0..l).filter(|i| !d.removed.contains(i)).collect();

    let t_eval = Instant::now();
    let (ppl_before, ppl_after): (Option<Perplexity>, Option<Perplexity>) = match &eval {
        Some(e) => (
            Some(perplexity(&model, e, opts.forward_batch, &[])?),
            Some(perplexity(&model, e, opts.forward_batch, &d.removed)?),
        ),
        None => (None, None),
    };
    let eval_s = t_eval.elapsed().as_secs_f64();

    let t_write = Instant::now();
    let params = param_counts(&spec.model, l)?;
    let staged = StagedDir::new(&spec.out, spec.force)?;
    write_pruned_checkpoint(&spec.model, staged.path(), l, &kept)?;
    let names = model.layer_names();
    let mut report = PruneReport {
        format: REPORT_FORMAT.into(),
        model: spec.model.display().to_string(),
        tokens: spec.tokens.path().display().to_string(),
        calibration_sequences: tokens.sequences,
        calibration_tokens_per_sequence: tokens.len,
        layers: names.clone(),
        method: spec.method.clone(),
        features: opts.features,
        k: d.segmentation.k,
        k_rule: match opts.k {
            KChoice::Auto { .. } => "auto".into(),
            KChoice::Elbow { .. } => "elbow".into(),
            KChoice::Fixed(_) => "fixed".into(),
        },
        segments: d.segments.clone(),
        loss_curve: d
            .segmentation
            .loss_curve
            .iter()
            .enumerate()
            .map(|(i, &v)| (i + 1, v))
            .collect(),
        allocation: opts.allocation,
        removed_per_segment: d.removed_per_segment.clone(),
        selection: opts.selection,
        subset_search: d.subset_search.clone(),
        greedy_steps: d.greedy_steps.clone(),
        gradnorm: d.gradnorm.as_ref().map(|g| g.per_layer.clone()),
        block_influence: d.block_influence.clone(),
        single_removal_loss: d.single_removal_loss.clone(),
        calibration_loss: d.score_baseline.or_else(|| {
            d.gradnorm
                .as_ref()
                .map(|g| g.loss)
                .filter(|l| l.is_finite())
        }),
        removed: d.removed.clone(),
        removed_layers: d.removed.iter().map(|&i| names[i].clone()).collect(),
        kept: kept.clone(),
        params_before: params.total(),
        params_after: params.without(&d.removed),
        eval_tokens: spec
            .eval_tokens
            .as_ref()
            .map(|p| p.path().display().to_string()),
        perplexity_before: ppl_before.map(|p| p.perplexity),
        perplexity_after: ppl_after.map(|p| p.perplexity),
        arch: None,
        accuracy_before: None,
        accuracy_after: None,
        timings: StageTimes {
            capture_s: d.times.capture.as_secs_f64(),
            cka_s: d.times.cka.as_secs_f64(),
            segmentation_s: d.times.segmentation.as_secs_f64(),
            gradnorm_s: d.times.gradnorm.as_secs_f64(),
            selection_s: d.times.selection.as_secs_f64(),
            eval_s,
            writing_s: 0.0,
            total_s: 0.0,
        },
        warnings: d.notes.clone(),
        cka: d.cka,
    };
    // Writing time covers the checkpoint and the pictures; the JSON and HTML that carry it follow.
    write_plots(staged.path(), &report)?;
    report.timings.writing_s = t_write.elapsed().as_secs_f64();
    report.timings.total_s = t0.elapsed().as_secs_f64();
    write_json_and_html(staged.path(), &report)?;
    let out = staged.commit()?;
    Ok((report, out))
}
