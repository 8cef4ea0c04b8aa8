//! `sglp-engine compare`: flags → [`crate::pruning::compare::compare`] → the table on stdout, and the
//! JSON, PNG and HTML page in `--out-dir`.

use super::common::{emit, EvalTokenArgs, TextCut, TokenArgs};
use super::notes;
use super::prune::SglpArgs;
use crate::error::{Error, Result};
use crate::pruning::compare::{compare, parse_budgets, CompareSpec, Criterion};
use crate::pruning::prune::param_counts;
use crate::report::compare::{text_table, write_compare, COMPARE_HTML};
use crate::runtime::Model;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// Hugging Face checkpoint directory.
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub tokens: TokenArgs,
    #[command(flatten)]
    pub eval: EvalTokenArgs,
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
    /// Criteria to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "sglp,sglp-paper,shortgpt,angular,mpruner,random,sleb"
    )]
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
    let calib = a.tokens.required(&a.cut, "compare")?;
    let held_input = a.eval.input(&a.cut).ok_or_else(|| {
        Error::invalid("compare needs held-out tokens: --eval-tokens FILE.npy or --eval-text FILE")
    })?;
    let spec = CompareSpec {
        budgets: parse_budgets(&a.remove)?,
        criteria: a.criteria.clone(),
        sglp: a.sglp.options(false)?,
        seed: a.seed,
        random_seeds: a.seeds,
        mpruner_threshold: a.mpruner_threshold,
    };
    let model = Model::load(&a.model)?;
    let tokens = model.load_token_input(&calib)?;
    let held = model.load_token_input(&held_input)?;
    let params = param_counts(&a.model, model.num_layers())?;
    let mut backend = a.sglp.est.backend()?;
    let names = (
        a.model.display().to_string(),
        calib.path().display().to_string(),
        held_input.path().display().to_string(),
    );
    let r = compare(
        &model,
        &tokens,
        &held,
        &params,
        &spec,
        backend.as_mut(),
        (&names.0, &names.1, &names.2),
    )?;
    for n in &r.notes {
        notes::note(n);
    }
    print!("{}", text_table(&r));
    if let Some(out) = &a.out {
        emit(
            Some(out),
            &(serde_json::to_string_pretty(&r).expect("serialises") + "\n"),
        )?;
    }
    if let Some(dir) = &a.out_dir {
        write_compare(dir, &r)?;
        println!("wrote {}", dir.join(COMPARE_HTML).display());
    }
    Ok(())
}
