//! # sglp-engine
//!
//! Similarity-guided layer pruning (SGLP): the all-pairs CKA of a network's layers, Fisher's optimal
//! segmentation of the ordered layers, and gradient-norm importance, on the CPU or a CUDA GPU.
//!
//! The modules follow the pipeline: [`io`] (activations in) → [`similarity`] (CKA) → [`segmentation`]
//! (Fisher's exact DP) → runtime (gradient norms) → pruning → report. The [`cli`] module is the
//! `sglp-engine` command line on top of them.

pub mod cli;
pub mod error;
#[doc(hidden)]
pub mod fuzz_entry;
pub mod io;
pub mod linalg;
pub mod progress;
pub mod pruning;
pub mod report;
pub mod runtime;
pub mod segmentation;
pub mod similarity;

pub use error::{Error, Result};
