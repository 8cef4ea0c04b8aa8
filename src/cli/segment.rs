//! placeholder
use crate::error::Result;
#[derive(clap::Args, Debug)]
pub struct SegmentArgs {}
pub fn run(_a: SegmentArgs) -> Result<()> {
    Ok(())
}
