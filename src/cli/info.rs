//! `sglp-engine info`: the inputs' layers, shapes and dtypes, and the compute devices of this machine.

use super::cka::InputArgs;
use crate::error::Result;
use crate::io::ActivationSource;
use crate::similarity::device::describe_devices;

#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    pub input: Option<InputArgs>,
}

pub fn run(a: InfoArgs) -> Result<()> {
    if let Some(input) = &a.input {
        let set = input.open()?;
        for p in set.paths() {
            println!("shard: {}", p.display());
        }
        if let Some(n) = set.n_samples_hint() {
            println!("samples: {n} (with --tokens {:?})", input.tokens);
        }
        println!("{:<40} {:>8} {:>10}  shape", "layer", "dtype", "features");
        for m in set.layers() {
            println!(
                "{:<40} {:>8} {:>10}  {:?}",
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
