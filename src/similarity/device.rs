//! Choosing the compute device for the similarity stage (`--device auto|cpu|cuda[:N]`).
//! (CPU-only for now; the CUDA issue adds the GPU here.)

use super::backend::Backend;
use super::cpu::CpuBackend;
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| {
                    format!("unknown device '{s}' (expected auto, cpu, cuda or cuda:N)")
                }),
        }
    }
}

/// Open the backend for `choice`; the string is a one-line note for the user (e.g. a fallback).
pub fn open_backend(
    choice: DeviceChoice,
    cpu_threads: usize,
) -> Result<(Box<dyn Backend>, Option<String>)> {
    match choice {
        DeviceChoice::Cpu => Ok((Box::new(CpuBackend::new(cpu_threads)), None)),
        DeviceChoice::Auto => Ok((
            Box::new(CpuBackend::new(cpu_threads)),
            Some("note: CUDA backend not available in this build; using the CPU".into()),
        )),
        DeviceChoice::Cuda(i) => Err(Error::Cuda(format!(
            "cuda:{i} requested but this build has no CUDA backend"
        ))),
    }
}

/// One line per compute device, for `sglp-engine info`.
pub fn describe_devices() -> Vec<String> {
    vec![format!("cpu: {} threads", rayon::current_num_threads())]
}
