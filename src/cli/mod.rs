//! The `sglp-engine` command line. Each subcommand lives in its own file with its clap arguments and
//! a `run` function (what several of them share is in `common`); this file only lists them.

mod capture;
mod cka;
mod common;
mod compare;
mod eval;
mod gradnorm;
mod info;
mod prune;
mod run;
mod segment;

use crate::error::Result;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "sglp-engine",
    version,
    about = "Similarity-guided layer pruning: all-pairs CKA, Fisher segmentation, gradient-norm importance"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// All-pairs CKA between the layers of a calibration set.
    Cka(cka::CkaArgs),
    /// Fisher's optimal segmentation of the layers from a CKA JSON.
    Segment(segment::SegmentArgs),
    /// `cka` then `segment` in one go.
    Run(run::RunArgs),
    /// List the inputs' layers, shapes and dtypes, and the backends available on this machine.
    Info(info::InfoArgs),
    /// Per-decoder-layer gradient norms of a LLaMA-family checkpoint on calibration tokens.
    Gradnorm(gradnorm::GradnormArgs),
    /// Every decoder layer's hidden states on calibration tokens, as a safetensors file for `cka`.
    Capture(capture::CaptureArgs),
    /// Prune decoder layers of a checkpoint with SGLP: capture, CKA, segments, gradient norms, pruned
    /// checkpoint and report.
    Prune(prune::PruneArgs),
    /// Perplexity of a checkpoint on a tokens file.
    Eval(eval::EvalArgs),
    /// SGLP beside ShortGPT, angular distance, MPruner and random removal, on held-out perplexity.
    Compare(compare::CompareArgs),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Cka(a) => cka::run_cka(a),
        Command::Segment(a) => segment::run(a),
        Command::Run(a) => run::run_pipeline(a),
        Command::Info(a) => info::run(a),
        Command::Gradnorm(a) => gradnorm::run(a),
        Command::Capture(a) => capture::run(a),
        Command::Prune(a) => prune::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Compare(a) => compare::run(a),
    }
}
