//! `sglp-engine info`: the inputs' layers, shapes and dtypes, and the compute devices of this machine.

use super::common::InputArgs;
use crate::error::Result;
use crate::io::ActivationSource;
use crate::similarity::device::describe_devices;

#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    pub input: Option<InputArgs>,
}

pub fn run(a: InfoArgs) -> Result<()> {
    if let Some(input) = a.input.as_ref().filter(|i| !i.inputs.is_empty()) {
        let set = input.open()?;
        for shard in set.describe() {
            println!(
                "{} ({}, {} samples)",
                shard.path.display(),
                shard.format,
                shard.rows
            );
        }
        println!(
            "{} layers, {} samples in all (--tokens {:?})",
            set.layers().len(),
            set.n_samples(),
            input.token_mode()?
        );
        println!(
            "  {:<40} {:>5} {:>10}  shape (first shard)",
            "layer", "dtype", "features"
        );
        for m in &set.describe()[0].layers {
            println!(
                "  {:<40} {:>5} {:>10}  {:?}",
                m.name,
                m.dtype.name(),
                m.cols,
                m.shape
            );
        }
    }
    println!("devices:");
    for d in describe_devices() {
        println!("  {d}");
    }
    Ok(())
}
