//! `sglp-engine prune`: flags → [`crate::pruning::prune::prune`] → a summary on stdout.

use super::common::{
    positive, CnnArgs, EstimatorArgs, EvalImageArgs, EvalTokenArgs, KArg, TextCut, TokenArgs,
};
use super::notes;
use crate::error::{Error, Result};
use crate::pruning::allocate::Allocation;
use crate::pruning::cnn::{prune_cnn, CnnPruneSpec};
use crate::pruning::pipeline::{Budget, Method, SglpOptions, Shortlist, DEFAULT_FORWARD_BATCH};
use crate::pruning::prune::{prune, PruneSpec};
use crate::pruning::select::Selection;
use crate::segmentation::{Features, KChoice};
use std::path::PathBuf;

/// The SGLP options shared by `prune` and `compare`: a preset (`--method`), each of whose choices a flag
/// may override.
#[derive(clap::Args, Debug, Clone)]
pub struct SglpArgs {
    /// `sglp` (default): CKA-row segments, then loss-guided removal inside them (one layer at a time, the
    /// removal that raises the calibration loss least, candidates shortlisted by block influence,
    /// adaptive allocation, no segment emptied). `sglp-paper`: as published — column-sum features, 5%
    /// rule with k ≤ 6, proportional allocation, subsets scored by the pruned network's gradient norm.
    #[arg(long, value_enum, default_value_t = Method::Sglp)]
    pub method: Method,
    #[command(flatten)]
    pub est: EstimatorArgs,
    /// Per-layer feature for the segmentation: `colsum` (x_l = Σ_m CKA[m][l]) or `rows` (each layer's
    /// CKA row). Default: the method's (sglp: rows; sglp-paper: colsum).
    #[arg(long, value_enum)]
    pub features: Option<Features>,
    /// Number of segments, `auto` (the relative-gain rule over k = 1..k-max) or `elbow` (the knee of the
    /// segmentation loss curve). Default: the method's.
    #[arg(long)]
    pub k: Option<KArg>,
    /// Largest k tried by `--k auto|elbow` (sglp: 8; sglp-paper: 6; lowered to L − budget).
    #[arg(long)]
    pub k_max: Option<usize>,
    /// `--k auto`: the largest k+1 whose relative loss gain exceeds this (default 0.05).
    #[arg(long)]
    pub threshold: Option<f64>,
    /// Minimum layers per segment (default 1).
    #[arg(long)]
    pub min_len: Option<usize>,
    /// How the budget is split over the segments: `proportional` to their length, to their `removable`
    /// layers (length − 1), or `adaptive` (the selection decides, no segment emptied). Default: the
    /// method's (sglp: adaptive; sglp-paper: proportional).
    #[arg(long, value_enum)]
    pub allocation: Option<Allocation>,
    /// Inside a segment: `loss` removes, one at a time, the candidate whose removal raises the calibration
    /// loss least; `gradnorm` the layers of lowest gradient norm; `subset` scores whole candidate subsets
    /// by the pruned network's global gradient norm (smallest wins). Default: the method's.
    #[arg(long, value_enum)]
    pub selection: Option<Selection>,
    /// `--selection subset`: most candidate subsets scored per segment; beyond it, greedy removal one
    /// layer at a time.
    #[arg(long, default_value_t = 64)]
    pub max_candidates: usize,
    /// `--selection loss`: candidates per segment and step, the lowest by `--shortlist-by` (0: every
    /// layer of the segment).
    #[arg(long, default_value_t = 2)]
    pub shortlist: usize,
    /// `--selection loss`: rank a segment's layers for the shortlist by `loss` (the calibration loss with
    /// the layer removed alone: one forward per layer, once) or `influence` (block influence
    /// 1 − cos(h_in, h_out), free).
    #[arg(long, value_enum, default_value_t = Shortlist::Loss)]
    pub shortlist_by: Shortlist,
    /// `--selection loss`: calibration sequences each candidate's loss is measured on (default: all).
    #[arg(long)]
    pub score_sequences: Option<usize>,
    /// `--shortlist-by loss`: calibration sequences the single-removal ranking is measured on (default: a
    /// quarter of the scoring sequences).
    #[arg(long)]
    pub rank_sequences: Option<usize>,
    /// Sequences per forward / backward pass of the runtime.
    #[arg(long, default_value_t = DEFAULT_FORWARD_BATCH)]
    pub batch: usize,
    /// Calibration batches (of --batch sequences) for the gradient norms (default: all).
    #[arg(long)]
    pub gradnorm_batches: Option<usize>,
    /// `--selection loss`: memory (GiB) for the hidden states the loss scorers keep so that each
    /// candidate runs only the layers from its first removed one on (default: 40% of the available
    /// memory, at least 2). When the calibration set's states need more than half of it, every candidate
    /// runs the whole network (about 1.6× the work on 32 layers; the same decision). 0 turns it off.
    #[arg(long)]
    pub prefix_cache_gib: Option<f64>,
}

impl SglpArgs {
    /// The options: the preset's, overridden by the flags given. `precomputed_gradnorm`: the gradient
    /// norms come from a file (`prune --gradnorm`), so the selection defaults to `gradnorm` and the
    /// allocation to `proportional` (SGLP's fixed per-segment counts), unless given.
    pub fn options(&self, precomputed_gradnorm: bool) -> Result<SglpOptions> {
        positive(self.batch, "--batch")?;
        if self.max_candidates == 0 {
            return Err(Error::invalid("--max-candidates must be at least 1"));
        }
        if self
            .prefix_cache_gib
            .is_some_and(|g| !(g.is_finite() && g >= 0.0))
        {
            return Err(Error::invalid(
                "--prefix-cache-gib must be a number of GiB, 0 or more",
            ));
        }
        if self.score_sequences == Some(0) || self.rank_sequences == Some(0) {
            return Err(Error::invalid(
                "--score-sequences and --rank-sequences must be at least 1",
            ));
        }
        let p = SglpOptions::preset(self.method);
        let preset_k_max = p.k.k_max().unwrap_or(8);
        let k_arg = self.k.unwrap_or(match p.k {
            KChoice::Auto { .. } => KArg::Auto,
            KChoice::Elbow { .. } => KArg::Elbow,
            KChoice::Fixed(k) => KArg::Fixed(k),
        });
        let k = k_arg.choice(
            self.k_max.unwrap_or(preset_k_max),
            self.threshold.unwrap_or(0.05),
        );
        let (selection, allocation) = match precomputed_gradnorm {
            true => (Selection::Gradnorm, Allocation::Proportional),
            false => (p.selection, p.allocation),
        };
        Ok(SglpOptions {
            cka: self.est.spec(),
            features: self.features.unwrap_or(p.features),
            k,
            min_len: self.min_len.unwrap_or(p.min_len),
            allocation: self.allocation.unwrap_or(allocation),
            selection: self.selection.unwrap_or(selection),
            max_candidates: self.max_candidates,
            shortlist: self.shortlist,
            shortlist_by: self.shortlist_by,
            score_sequences: self.score_sequences,
            rank_sequences: self.rank_sequences,
            forward_batch: self.batch,
            gradnorm_batches: self.gradnorm_batches,
            prefix_cache: self
                .prefix_cache_gib
                .map(|g| (g * (1u64 << 30) as f64) as usize),
            gradnorm: None,
        })
    }

    /// The preset's name as the report shows it.
    pub fn method_name(&self) -> String {
        match self.method {
            Method::Sglp => "sglp",
            Method::SglpPaper => "sglp-paper",
        }
        .into()
    }
}

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("budget").required(true).args(["remove", "target_layers"])))]
pub struct PruneArgs {
    /// Hugging Face checkpoint directory (llama, mistral, qwen2, qwen3, phi3, gemma, gemma2,
    /// gemma3_text, olmo2), or with --arch a CNN's `state_dict` (safetensors).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub tokens: TokenArgs,
    #[command(flatten)]
    pub cnn: CnnArgs,
    #[command(flatten)]
    pub eval_images: EvalImageArgs,
    #[command(flatten)]
    pub eval: EvalTokenArgs,
    #[command(flatten)]
    pub cut: TextCut,
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
    /// Per-layer gradient norms measured elsewhere: the JSON of `sglp-engine gradnorm`, a JSON object with
    /// `gradnorm` (and optionally `layers`), a JSON list, or a 1-D `.npy`. The selection is then by these
    /// norms (no backward pass), with proportional allocation, unless --selection / --allocation say
    /// otherwise.
    #[arg(long)]
    pub gradnorm: Option<PathBuf>,
    #[command(flatten)]
    pub sglp: SglpArgs,
}

pub fn run(a: PruneArgs) -> Result<()> {
    a.cut
        .check_used(a.tokens.text.is_some() || a.eval.eval_text.is_some())?;
    let budget = match (a.remove, a.target_layers) {
        (Some(n), _) => Budget::Remove(n),
        (None, Some(m)) => Budget::TargetLayers(m),
        (None, None) => Budget::Remove(0),
    };
    let est = a.sglp.est.clone();
    let (r, out) = if let Some(arch) = &a.cnn.arch {
        if a.tokens.tokens.is_some()
            || a.tokens.text.is_some()
            || a.eval.eval_tokens.is_some()
            || a.eval.eval_text.is_some()
        {
            return Err(Error::invalid(
                "prune --arch takes images (--images/--labels, --eval-images/--eval-labels), not \
                 tokens or text",
            ));
        }
        let spec = CnnPruneSpec {
            model: a.model,
            arch: arch.clone(),
            images: a.cnn.image_files("prune")?,
            eval: a.eval_images.files(),
            budget,
            out: a.out,
            force: a.force,
            gradnorm_file: a.gradnorm.clone(),
            method: a.sglp.method_name(),
            options: a.sglp.options(a.gradnorm.is_some())?,
        };
        prune_cnn(&spec, &mut || est.backend())?
    } else {
        let spec = PruneSpec {
            model: a.model,
            tokens: a.tokens.required(&a.cut, "prune")?,
            budget,
            out: a.out,
            force: a.force,
            eval_tokens: a.eval.input(&a.cut),
            gradnorm_file: a.gradnorm.clone(),
            method: a.sglp.method_name(),
            options: a.sglp.options(a.gradnorm.is_some())?,
        };
        prune(&spec, &mut || est.backend(), &mut |dir| {
            super::common::load_decoder(dir, est.device)
        })?
    };
    for w in r.cka.warnings.iter().chain(&r.warnings) {
        notes::warn(w);
    }
    println!(
        "{} → {} layers: removed {:?} ({} segments: {})",
        r.layers.len(),
        r.kept.len(),
        r.removed,
        r.k,
        r.segments
            .iter()
            .zip(&r.removed_per_segment)
            .map(|(&(s, e), n)| format!("[{s}-{e}] −{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "parameters {} → {} ({:.1}% fewer)",
        r.params_before,
        r.params_after,
        100.0 * (r.params_before - r.params_after) as f64 / r.params_before.max(1) as f64
    );
    if let (Some(b), Some(a)) = (r.perplexity_before, r.perplexity_after) {
        println!("perplexity {b:.4} → {a:.4}");
    }
    if let (Some(b), Some(a)) = (r.accuracy_before, r.accuracy_after) {
        println!("top-1 accuracy {:.2}% → {:.2}%", 100.0 * b, 100.0 * a);
    }
    let t = &r.timings;
    println!(
        "time: capture (forward-only) {:.2}s, cka {:.2}s, segmentation {:.3}s, gradnorm (forward+backward, with capture) {:.2}s, selection {:.2}s, eval {:.2}s, writing {:.2}s, total {:.2}s",
        t.capture_s, t.cka_s, t.segmentation_s, t.gradnorm_s, t.selection_s, t.eval_s, t.writing_s, t.total_s
    );
    println!("wrote {}", out.display());
    Ok(())
}
