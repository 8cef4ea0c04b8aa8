//! placeholder
use crate::error::Result;
#[derive(clap::Args, Debug)]
pub struct InfoArgs {}
pub fn run(_a: InfoArgs) -> Result<()> {
    Ok(())
}
