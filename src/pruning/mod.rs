//! Layer pruning: from the CKA matrix, the segmentation and the gradient norms to the layers removed and
//! the pruned checkpoint.
//!
//! * [`allocate`]: the removal budget split over the segments.
//! * [`select`]: the layers removed inside each segment (lowest gradient norm, or SGLP's subset search).
//! * [`criteria`]: the other criteria `compare` sets beside SGLP (ShortGPT, Gromov et al., MPruner, random).
//! * [`checkpoint`]: the pruned Hugging Face checkpoint, written atomically.
//! * [`pipeline`]: the SGLP decision on a model (capture → CKA → segments → gradient norms → selection).

pub mod allocate;
pub mod checkpoint;
pub mod criteria;
pub mod pipeline;
pub mod select;
