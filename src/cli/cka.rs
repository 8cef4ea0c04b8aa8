//! placeholder
use crate::error::Result;
#[derive(clap::Args, Debug)]
pub struct CkaArgs {}
#[derive(clap::Args, Debug)]
pub struct RunArgs {}
pub fn run_cka(_a: CkaArgs) -> Result<()> {
    Ok(())
}
pub fn run_pipeline(_a: RunArgs) -> Result<()> {
    Ok(())
}
