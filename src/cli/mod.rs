//! The `sglp-engine` command line. Each subcommand lives in its own file with its clap arguments and
//! a `run` function (what several of them share is in `common`); this file only lists them.

mod capture;
mod cka;
mod common;
mod compare;
mod eval;
mod gradnorm;
mod info;
pub mod notes;
mod prune;
mod run;
mod segment;

use crate::error::{Error, Result};
use clap::{Parser, Subcommand};
use std::ffi::OsString;

#[derive(Parser, Debug)]
#[command(
    name = "sglp-engine",
    version,
    about = "Similarity-guided layer pruning: all-pairs CKA, Fisher segmentation, gradient-norm importance"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// No notes on stderr (warnings and errors still show).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Every note on every run (e.g. the CPU fallback of `--device auto`, otherwise shown once per
    /// machine).
    #[arg(short, long, global = true)]
    pub verbose: bool,
    /// Precision of the model runtime's matrix products on a GPU (`--device cuda` / `auto`): bf16
    /// operands on tensor cores with f32 accumulation, or f32 throughout. The CPU always runs f32.
    #[arg(long, global = true, value_enum, default_value_t = crate::runtime::ops::Matmul::Bf16)]
    pub matmul: crate::runtime::ops::Matmul,
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
    notes::set_verbosity(cli.quiet, cli.verbose);
    common::set_matmul(cli.matmul);
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

/// Flags renamed so that one name has one meaning in every command: an old spelling is refused with the
/// new one, rather than silently meaning something else. `args` is the whole command line.
pub fn check_renamed_flags(args: &[OsString]) -> Result<()> {
    let args: Vec<&str> = args.iter().skip(1).filter_map(|a| a.to_str()).collect();
    let command = args
        .iter()
        .find(|a| !a.starts_with('-'))
        .copied()
        .unwrap_or("");
    for (i, arg) in args.iter().enumerate() {
        if *arg == "--" {
            break;
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f, Some(v)),
            None => (*arg, None),
        };
        let hint = match flag {
            "--batch-size" if matches!(command, "capture" | "gradnorm" | "eval") => {
                "--batch-size is now --batch (sequences per forward pass)"
            }
            "--batch-size" => {
                "--batch-size is now --cka-batch (samples per batch of the unbiased CKA estimator); \
                 sequences per forward pass are --batch"
            }
            "--capture-batch" | "--forward-batch" => {
                "this flag is now --batch (sequences per forward pass)"
            }
            "--tokens" => match inline.or(args.get(i + 1).copied()) {
                Some("samples" | "features") => {
                    "--tokens samples|features is now --token-mode samples|features (--tokens names a \
                     token file)"
                }
                _ => continue,
            },
            _ => continue,
        };
        return Err(Error::invalid(format!("{flag}: {hint}")));
    }
    Ok(())
}

/// On SIGINT, SIGTERM or SIGHUP: delete the staging files of outputs being written and exit with
/// 128 + the signal's number (130, 143, 129), as a shell reports a process the signal killed. Outputs
/// already in place are never touched (see [`crate::io::output`]). Call it first thing in `main`.
pub fn install_interrupt_handler() -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(|e| Error::invalid(format!("cannot install the signal handler: {e}")))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                crate::io::output::remove_staging_and_exit(128 + sig);
            }
        })
        .map_err(|e| Error::invalid(format!("cannot start the signal thread: {e}")))?;
    Ok(())
}

/// Restore the default action of SIGPIPE, so that output into a closed pipe (`sglp-engine info | head`)
/// ends the process quietly, as for other command-line tools, instead of a panic in `println!`.
pub fn restore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: called at the start of `main`, before any thread exists; SIG_DFL is a valid disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
