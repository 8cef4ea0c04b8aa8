//! Fisher optimal segmentation (being written).
