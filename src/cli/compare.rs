//! `sglp-engine compare`: flags → [`crate::pruning::compare::compare`] → the table on stdout, and the
//! JSON, PNG and HTML page in `--out-dir`.

use super::common::emit;
use super::prune::SglpArgs;
use crate::error::Result;
use crate::pruning::compare::{compare, parse_budgets, CompareSpec, Criterion};
use crate::pruning::prune::param_counts;
use crate::report::compare::{text_table, write_compare, COMPARE_HTML};
use crate::runtime::Model;
use crate::similarity::device::open_backend;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// Hugging Face checkpoint directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Calibration tokens (`.npy` [sequences, tokens]).
    #[arg(long)]
    pub tokens: PathBuf,
    /// Held-out tokens for the perplexity of each pruned model.
    #[arg(long)]
    pub eval_tokens: PathBuf,
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
    let spec = CompareSpec {
        budgets: parse_budgets(&a.remove)?,
        criteria: a.criteria.clone(),
        sglp: a.sglp.options()?,
        seed: a.seed,
        random_seeds: a.seeds,
        mpruner_threshold: a.mpruner_threshold,
    };
    let model = Model::load(&a.model)?;
    let tokens = model.load_tokens(&a.tokens)?;
    let held = model.load_tokens(&a.eval_tokens)?;
    let params = param_counts(&a.model, model.num_layers())?;
    let (mut backend, note) = open_backend(a.sglp.est.device, a.sglp.est.threads)?;
    if let Some(n) = note {
        eprintln!("{n}");
    }
    let names = (
        a.model.display().to_string(),
        a.tokens.display().to_string(),
        a.eval_tokens.display().to_string(),
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
        eprintln!("note: {n}");
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
