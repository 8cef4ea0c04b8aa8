//! `sglp-engine compare`: flags → [`crate::pruning::compare::compare`] → the table on stdout, and the
//! JSON, PNG and HTML page in `--out-dir`.

use super::common::{emit_json, CnnArgs, EvalImageArgs, EvalTokenArgs, TextCut, TokenArgs};
use super::notes;
use super::prune::SglpArgs;
use crate::error::{Error, Result};
use crate::pruning::compare::{
    compare, parse_budgets, CompareReport, CompareSpec, Criterion, ImageHeldOut, ParamCounts,
    TokenHeldOut,
};
use crate::pruning::prune::param_counts;
use crate::report::compare::{text_table, write_compare, COMPARE_HTML};
use crate::runtime::cnn::CnnModel;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// Hugging Face checkpoint directory; with --arch, a CNN's `state_dict` (safetensors).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub tokens: TokenArgs,
    #[command(flatten)]
    pub eval: EvalTokenArgs,
    #[command(flatten)]
    pub cnn: CnnArgs,
    #[command(flatten)]
    pub eval_images: EvalImageArgs,
    #[command(flatten)]
    pub cut: TextCut,
    /// Layers every criterion removes: N, a range A..B (inclusive) or a list (`1,2,4..6`).
    #[arg(long)]
    pub remove: String,
    /// First seed of the `random` criterion.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Seeds of the `random` criterion (seed, seed+1, …): the curve is their median, the band their range.
    #[arg(long, default_value_t = 5)]
    pub seeds: usize,
    /// MPruner: grow a cluster while CKA(first, next)·100 ≥ this. When the clusters hold fewer removable
    /// (non-first) layers than the budget, the threshold is lowered one point at a time until they do
    /// (the threshold used is in the JSON).
    #[arg(long, default_value_t = 98.0)]
    pub mpruner_threshold: f64,
    /// Criteria to run, comma-separated (default: sglp, sglp-paper, shortgpt, angular, mpruner, random,
    /// sleb; with --arch: sglp, sglp-paper, cka-removal, mpruner, random — ShortGPT and the angular
    /// distance compare a unit's input and output, which a CNN's downsampling blocks change).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub criteria: Vec<Criterion>,
    /// JSON output file.
    #[arg(long, short = 'o')]
    pub out: Option<PathBuf>,
    /// Directory for sglp-compare.json, sglp-compare.png and sglp-compare.html.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    #[command(flatten)]
    pub sglp: SglpArgs,
}

pub fn run(a: CompareArgs) -> Result<()> {
    a.cut
        .check_used(a.tokens.text.is_some() || a.eval.eval_text.is_some())?;
    let cnn = a.cnn.arch.is_some();
    let criteria = if !a.criteria.is_empty() {
        a.criteria.clone()
    } else if cnn {
        vec![
            Criterion::Sglp,
            Criterion::SglpPaper,
            Criterion::CkaRemoval,
            Criterion::Mpruner,
            Criterion::Random,
        ]
    } else {
        vec![
            Criterion::Sglp,
            Criterion::SglpPaper,
            Criterion::Shortgpt,
            Criterion::Angular,
            Criterion::Mpruner,
            Criterion::Random,
            Criterion::Sleb,
        ]
    };
    let spec = CompareSpec {
        budgets: parse_budgets(&a.remove)?,
        criteria,
        sglp: a.sglp.options(false)?,
        seed: a.seed,
        random_seeds: a.seeds,
        mpruner_threshold: a.mpruner_threshold,
    };
    let r = if cnn {
        run_cnn(&a, &spec)?
    } else {
        run_llm(&a, &spec)?
    };
    for n in &r.notes {
        notes::note(n);
    }
    print!("{}", text_table(&r));
    if let Some(out) = &a.out {
        emit_json(Some(out), &r)?;
    }
    if let Some(dir) = &a.out_dir {
        write_compare(dir, &r)?;
        println!("wrote {}", dir.join(COMPARE_HTML).display());
    }
    Ok(())
}

fn run_llm(a: &CompareArgs, spec: &CompareSpec) -> Result<CompareReport> {
    let calib = a.tokens.required(&a.cut, "compare")?;
    let held_input = a.eval.input(&a.cut).ok_or_else(|| {
        Error::invalid("compare needs held-out tokens: --eval-tokens FILE.npy or --eval-text FILE")
    })?;
    let model = super::common::load_decoder(&a.model, a.sglp.est.device)?;
    let tokens = model.load_token_input(&calib)?;
    let held = model.load_token_input(&held_input)?;
    let params = param_counts(&model)?;
    let mut backend = a.sglp.est.backend()?;
    let mut held_out = TokenHeldOut::new(&model, &held, spec.sglp.forward_batch)?;
    compare(
        &model,
        &tokens,
        &mut held_out,
        &params,
        spec,
        backend.as_mut(),
        (
            &a.model.display().to_string(),
            &calib.path().display().to_string(),
            &held_input.path().display().to_string(),
        ),
    )
}

/// `compare --arch`: the criteria on a CNN, held-out top-1 error.
fn run_cnn(a: &CompareArgs, spec: &CompareSpec) -> Result<CompareReport> {
    if a.tokens.tokens.is_some()
        || a.tokens.text.is_some()
        || a.eval.eval_tokens.is_some()
        || a.eval.eval_text.is_some()
    {
        return Err(Error::invalid(
            "compare --arch takes images (--images/--labels, --eval-images/--eval-labels), not tokens \
             or text",
        ));
    }
    if let Some(c) = spec
        .criteria
        .iter()
        .find(|c| matches!(c, Criterion::Shortgpt | Criterion::Angular))
    {
        return Err(Error::invalid(format!(
            "--criteria {}: it compares a unit's input and output, which a CNN's downsampling blocks \
             change; use sglp, sglp-paper, cka-removal, mpruner, random or sleb",
            c.name()
        )));
    }
    let arch = a.cnn.arch.as_deref().expect("checked by the caller");
    let model = CnnModel::load(&a.model, arch)?;
    let files = a.cnn.image_files("compare")?;
    let held_files = a.eval_images.files().ok_or_else(|| {
        Error::invalid(
            "compare --arch needs held-out images: --eval-images X.npy --eval-labels Y.npy",
        )
    })?;
    let images = files.load(&model)?;
    let held = held_files.load(&model)?;
    let s = &model.structure;
    let params = ParamCounts {
        other: s.stem_params + s.head_params,
        per_layer: model.units().iter().map(|u| u.params).collect(),
    };
    let mut backend = a.sglp.est.backend()?;
    let mut held_out = ImageHeldOut::new(&model, &held, spec.sglp.forward_batch.max(64));
    compare(
        &model,
        &images,
        &mut held_out,
        &params,
        spec,
        backend.as_mut(),
        (
            &a.model.display().to_string(),
            &files.images.display().to_string(),
            &held_files.images.display().to_string(),
        ),
    )
}
