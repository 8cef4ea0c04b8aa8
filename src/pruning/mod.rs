//! Layer pruning: from the CKA matrix, the segmentation and the gradient norms to the layers removed and
//! the pruned checkpoint.
//!
//! * [`allocate`]: the removal budget split over the segments.
//! * [`calibration`]: the runtime passes decisions are made from (CKA, gradient norms, hidden-state
//!   statistics in one pass; cached calibration losses of skip sets; held-out perplexity).
//! * [`select`]: the layers removed inside each segment (loss-guided greedy, lowest gradient norm, or
//!   SGLP's subset search).
//! * [`criteria`]: the other criteria `compare` sets beside SGLP (ShortGPT, Gromov et al., MPruner, random).
//! * [`checkpoint`]: the pruned Hugging Face checkpoint, written atomically.
//! * [`pipeline`]: the SGLP decision on a model (calibration pass → segments → caps → selection), with the
//!   `sglp` and `sglp-paper` presets.
//! * [`compare`]: the quality suite — every criterion over a sweep of budgets, held-out perplexity.

pub mod allocate;
pub mod calibration;
pub mod checkpoint;
pub mod cnn;
pub mod compare;
pub mod criteria;
pub mod pipeline;
pub mod prune;
pub mod select;
