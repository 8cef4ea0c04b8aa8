//! `sglp-engine prune`: the whole SGLP pipeline on a checkpoint, writing the pruned checkpoint and a report.

use super::common::{EstimatorArgs, SegmentOpts};
use crate::error::{Error, Result};
use crate::pruning::allocate::Allocation;
use crate::pruning::checkpoint::{parameter_counts, write_pruned_checkpoint, StagedDir};
use crate::pruning::pipeline::{perplexity, sglp_decide, Budget, Perplexity, SglpOptions};
use crate::pruning::select::Selection;
use crate::report::{write_json_and_html, write_plots, PruneReport, StageTimes, REPORT_FORMAT};
use crate::runtime::Model;
use crate::similarity::device::open_backend;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The SGLP options shared by `prune` and `compare`.
#[derive(clap::Args, Debug, Clone)]
pub struct SglpArgs {
    #[command(flatten)]
    pub est: EstimatorArgs,
    #[command(flatten)]
    pub seg: SegmentOpts,
    /// How the budget is split over the segments: `proportional` to their length (largest remainder,
    /// never emptying a segment) or to their `removable` layers (length − 1).
    #[arg(long, value_enum, default_value_t = Allocation::Proportional)]
    pub allocation: Allocation,
    /// Inside a segment: `gradnorm` removes the layers of lowest gradient norm; `subset` scores whole
    /// candidate subsets by the pruned network's global gradient norm (SGLP paper).
    #[arg(long, value_enum, default_value_t = Selection::Gradnorm)]
    pub selection: Selection,
    /// `--selection subset`: most candidate subsets scored per segment; beyond it, greedy removal one
    /// layer at a time.
    #[arg(long, default_value_t = 64)]
    pub max_candidates: usize,
    /// Sequences per forward / backward pass of the runtime.
    #[arg(long, default_value_t = 4)]
    pub forward_batch: usize,
    /// Calibration batches (of --forward-batch sequences) for the gradient norms (default: all).
    #[arg(long)]
    pub gradnorm_batches: Option<usize>,
}

impl SglpArgs {
    pub fn options(&self) -> Result<SglpOptions> {
        if self.forward_batch == 0 {
            return Err(Error::invalid("--forward-batch must be at least 1"));
        }
        if self.max_candidates == 0 {
            return Err(Error::invalid("--max-candidates must be at least 1"));
        }
        Ok(SglpOptions {
            cka: self.est.spec(),
            features: self.seg.features,
            k: self.seg.k_choice()?,
            min_len: self.seg.min_len,
            allocation: self.allocation,
            selection: self.selection,
            max_candidates: self.max_candidates,
            forward_batch: self.forward_batch,
            gradnorm_batches: self.gradnorm_batches,
        })
    }
}

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("budget").required(true).args(["remove", "target_layers"])))]
pub struct PruneArgs {
    /// Hugging Face checkpoint directory (llama, mistral, qwen2).
    #[arg(long)]
    pub model: PathBuf,
    /// Calibration tokens: `.npy` [sequences, tokens], int32 or int64.
    #[arg(long)]
    pub tokens: PathBuf,
    /// Number of decoder layers to remove.
    #[arg(long)]
    pub remove: Option<usize>,
    /// Number of decoder layers to keep.
    #[arg(long)]
    pub target_layers: Option<usize>,
    /// Output checkpoint directory (written atomically; must not exist unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing OUTDIR.
    #[arg(long)]
    pub force: bool,
    /// Held-out tokens: perplexity before and after goes into the report.
    #[arg(long)]
    pub eval_tokens: Option<PathBuf>,
    #[command(flatten)]
    pub sglp: SglpArgs,
}

pub(crate) fn budget_of(remove: Option<usize>, target: Option<usize>) -> Budget {
    match (remove, target) {
        (Some(n), _) => Budget::Remove(n),
        (None, Some(m)) => Budget::TargetLayers(m),
        (None, None) => Budget::Remove(0),
    }
}

/// Parameters of the model and of the model without `removed`.
pub(crate) fn params_before_after(
    model_dir: &Path,
    num_layers: usize,
    removed: &[usize],
) -> Result<(usize, usize)> {
    let (other, per_layer) = parameter_counts(model_dir, num_layers)?;
    let all: usize = per_layer.iter().sum();
    let gone: usize = removed.iter().map(|&l| per_layer[l]).sum();
    Ok((other + all, other + all - gone))
}

pub fn run(a: PruneArgs) -> Result<()> {
    let t0 = Instant::now();
    let opts = a.sglp.options()?;
    if let (Ok(o), Ok(m)) = (a.out.canonicalize(), a.model.canonicalize()) {
        if o == m {
            return Err(Error::invalid(format!(
                "{}: --out is the input model directory; choose another OUTDIR",
                a.out.display()
            )));
        }
    }
    // Refuse an existing OUTDIR before any work; the staging directory beside it is made only when the
    // checkpoint is written, so an interrupted analysis leaves nothing behind.
    StagedDir::check_dest(&a.out, a.force)?;
    let model = Model::load(&a.model)?;
    let l = model.num_layers();
    let budget = budget_of(a.remove, a.target_layers).layers_to_remove(l)?;
    let tokens = model.load_tokens(&a.tokens)?;
    let eval = match &a.eval_tokens {
        Some(p) => Some(model.load_tokens(p)?),
        None => None,
    };

    let (mut backend, note) = open_backend(a.sglp.est.device, a.sglp.est.threads)?;
    if let Some(n) = note {
        eprintln!("{n}");
    }
    let d = sglp_decide(&model, &tokens, budget, &opts, backend.as_mut())?;
    for w in d.cka.warnings.iter().chain(&d.notes) {
        eprintln!("warning: {w}");
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
    let (params_before, params_after) = params_before_after(&a.model, l, &d.removed)?;
    let staged = StagedDir::new(&a.out, a.force)?;
    write_pruned_checkpoint(&a.model, staged.path(), l, &kept)?;
    let names = model.layer_names();
    let mut report = PruneReport {
        format: REPORT_FORMAT.into(),
        model: a.model.display().to_string(),
        tokens: a.tokens.display().to_string(),
        calibration_sequences: tokens.sequences,
        calibration_tokens_per_sequence: tokens.len,
        layers: names.clone(),
        k: d.segmentation.k,
        k_rule: if a.sglp.seg.k == "auto" {
            "auto".into()
        } else {
            "fixed".into()
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
        gradnorm: d.gradnorm.per_layer.clone(),
        calibration_loss: d.gradnorm.loss,
        removed: d.removed.clone(),
        removed_layers: d.removed.iter().map(|&i| names[i].clone()).collect(),
        kept: kept.clone(),
        params_before,
        params_after,
        eval_tokens: a.eval_tokens.as_ref().map(|p| p.display().to_string()),
        perplexity_before: ppl_before.map(|p| p.perplexity),
        perplexity_after: ppl_after.map(|p| p.perplexity),
        timings: StageTimes {
            capture_s: d.times.capture.as_secs_f64(),
            cka_s: d.times.cka.as_secs_f64(),
            segmentation_s: d.times.segmentation.as_secs_f64(),
            gradnorm_s: d.times.gradnorm.as_secs_f64(),
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

    println!(
        "{} → {} layers: removed {:?} ({} segments: {})",
        l,
        kept.len(),
        report.removed,
        report.k,
        report
            .segments
            .iter()
            .zip(&report.removed_per_segment)
            .map(|(&(s, e), n)| format!("[{s}-{e}] −{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "parameters {} → {} ({:.1}% fewer)",
        params_before,
        params_after,
        100.0 * (params_before - params_after) as f64 / params_before.max(1) as f64
    );
    if let (Some(b), Some(a)) = (ppl_before, ppl_after) {
        println!("perplexity {:.4} → {:.4}", b.perplexity, a.perplexity);
    }
    let t = &report.timings;
    println!(
        "time: capture (forward-only) {:.2}s, cka {:.2}s, segmentation {:.3}s, gradnorm (forward+backward, with capture) {:.2}s, eval {:.2}s, writing {:.2}s, total {:.2}s",
        t.capture_s, t.cka_s, t.segmentation_s, t.gradnorm_s, t.eval_s, t.writing_s, t.total_s
    );
    println!("wrote {}", out.display());
    Ok(())
}
