//! `sglp-engine segment`: Fisher's optimal segmentation of the layers from a similarity matrix; with
//! `--gradnorm FILE --remove N`, also the SGLP decision from importance measured elsewhere.

use super::common::{emit_json, segment_and_write, SegmentOpts};
use super::notes;
use crate::error::{Error, Result};
use crate::io::matrix::{importance_for_layers, read_similarity_matrix};
use crate::pruning::allocate::Allocation;
use crate::pruning::pipeline::{plan_from_importance, Method, SglpOptions};
use crate::segmentation::SegmentResult;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct SegmentArgs {
    /// A square layer-similarity matrix: the CKA JSON of `sglp-engine cka`, a JSON object with `cka`
    /// (and optionally `layers`), an L×L `.npy` (float32/float64), or CSV (header row and first column of
    /// layer names optional).
    #[arg(long)]
    pub cka: PathBuf,
    #[command(flatten)]
    pub opts: SegmentOpts,
    /// Per-layer gradient norms (or any importance, lower = less important) measured elsewhere: the JSON
    /// of `sglp-engine gradnorm`, a JSON object with `gradnorm` (and optionally `layers`), a JSON list, or
    /// a 1-D `.npy`. With --remove N, the output adds the plan: the N layers of lowest importance under
    /// the segments' quotas.
    #[arg(long, requires = "remove")]
    pub gradnorm: Option<PathBuf>,
    /// With --gradnorm: number of layers to remove.
    #[arg(long, requires = "gradnorm")]
    pub remove: Option<usize>,
    /// With --gradnorm: how the budget is split over the segments (`proportional` to their length, to
    /// their `removable` layers, or `adaptive`: lowest importance first, no segment emptied).
    #[arg(long, value_enum, default_value_t = Allocation::Proportional, requires = "gradnorm")]
    pub allocation: Allocation,
    /// Output file (default: stdout).
    #[arg(long, short = 'o')]
    pub out: Option<PathBuf>,
}

#[derive(serde::Serialize)]
struct SegmentsWithPlan<'a> {
    #[serde(flatten)]
    segmentation: &'a SegmentResult,
    plan: &'a crate::pruning::pipeline::ImportancePlan,
}

pub fn run(a: SegmentArgs) -> Result<()> {
    let (layers, cka) = read_similarity_matrix(&a.cka)?;
    let in_file = |e: Error| match e {
        Error::InvalidInput(m) => Error::format(&a.cka, m),
        e => e,
    };
    let (Some(gradnorm), Some(remove)) = (&a.gradnorm, a.remove) else {
        return segment_and_write(&layers, &cka, &a.opts, a.out.as_deref())
            .map_err(in_file)
            .map(|_| ());
    };
    let importance = importance_for_layers(gradnorm, &layers)?;
    if a.allocation == Allocation::Open {
        // With no floor and no loss to guide it, the lowest importance anywhere would go: no segments.
        return Err(Error::invalid(
            "--allocation open does not apply to --gradnorm: use proportional, removable or adaptive",
        ));
    }
    let opts = SglpOptions {
        features: a.opts.features,
        k: a.opts.k_choice(),
        min_len: a.opts.min_len,
        allocation: a.allocation,
        ..SglpOptions::preset(Method::SglpPaper)
    };
    let plan = plan_from_importance(&layers, &cka, &importance, remove, &opts)?;
    for w in &plan.segmentation.warnings {
        notes::warn(w);
    }
    for n in &plan.notes {
        notes::note(n);
    }
    let out = SegmentsWithPlan {
        segmentation: &plan.segmentation,
        plan: &plan,
    };
    emit_json(a.out.as_deref(), &out)
}
