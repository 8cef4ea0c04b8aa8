//! Choosing the compute device for the similarity stage (`--device auto|cpu|cuda[:N]`).
//!
//! `auto` takes the CUDA backend when a driver, a GPU and NVRTC are there and it opens, else the CPU with
//! a one-line note saying why; `cuda[:N]` without a usable GPU is an [`Error::Cuda`] (CLI exit 2).
//! The driver library is probed before any CUDA call (cudarc panics on a missing library).

use super::backend::Backend;
use super::cpu::CpuBackend;
use super::cuda::{self, CudaBackend};
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

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Auto => write!(f, "auto"),
            DeviceChoice::Cpu => write!(f, "cpu"),
            DeviceChoice::Cuda(i) => write!(f, "cuda:{i}"),
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
        DeviceChoice::Cuda(i) => Ok((Box::new(CudaBackend::open(i, cpu_threads)?), None)),
        DeviceChoice::Auto => {
            // No driver, or a driver without GPUs: the ordinary CPU machine, said quietly.
            let why = match cuda::list_devices() {
                Ok(devs) if devs.is_empty() => Some("the CUDA driver sees no GPU".to_string()),
                Ok(_) => None,
                Err(e) => Some(cuda_reason(&e)),
            };
            if let Some(why) = why {
                return Ok((
                    Box::new(CpuBackend::new(cpu_threads)),
                    Some(format!("note: {why}; using the CPU")),
                ));
            }
            match CudaBackend::open(0, cpu_threads) {
                Ok(b) => Ok((Box::new(b), None)),
                Err(e) => Ok((
                    Box::new(CpuBackend::new(cpu_threads)),
                    Some(format!(
                        "note: the GPU cannot be used ({}); using the CPU",
                        cuda_reason(&e)
                    )),
                )),
            }
        }
    }
}

/// The message of a CUDA error without the "CUDA: " prefix of its Display.
fn cuda_reason(e: &Error) -> String {
    match e {
        Error::Cuda(m) => m.clone(),
        other => other.to_string(),
    }
}

/// One line per compute device, for `sglp-engine info`: the CPU threads, then each GPU's name, memory
/// and compute capability (and whether NVRTC is there to compile the kernels), or why CUDA is unavailable.
pub fn describe_devices() -> Vec<String> {
    let mut lines = vec![format!("cpu: {} threads", rayon::current_num_threads())];
    match cuda::list_devices() {
        Err(e) => lines.push(format!("cuda: unavailable ({})", cuda_reason(&e))),
        Ok(devs) if devs.is_empty() => lines.push("cuda: the driver sees no GPU".into()),
        Ok(devs) => {
            let nvrtc = if cuda::nvrtc::nvrtc_available() {
                match cuda::nvrtc::nvrtc_version() {
                    Ok((a, b)) => format!("NVRTC {a}.{b}"),
                    Err(_) => "NVRTC present".into(),
                }
            } else {
                "NVRTC missing: the kernels cannot be compiled".into()
            };
            for d in devs {
                lines.push(format!(
                    "cuda:{}: {}, {:.1} GiB, compute capability {}.{} ({nvrtc})",
                    d.ordinal,
                    d.name,
                    d.total_mem as f64 / (1u64 << 30) as f64,
                    d.compute_capability.0,
                    d.compute_capability.1
                ));
            }
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_choice_parses_and_prints() {
        for (s, c) in [
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda(0)),
            ("cuda:3", DeviceChoice::Cuda(3)),
        ] {
            assert_eq!(s.parse::<DeviceChoice>().unwrap(), c);
        }
        assert_eq!(DeviceChoice::Cuda(2).to_string(), "cuda:2");
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let e = bad.parse::<DeviceChoice>().unwrap_err();
            assert!(e.contains("expected auto, cpu, cuda or cuda:N"), "{e}");
        }
    }

    #[test]
    fn describe_lists_the_cpu_first_and_says_something_about_cuda() {
        let lines = describe_devices();
        assert!(lines[0].starts_with("cpu: "));
        assert!(
            lines.len() >= 2 && lines[1].starts_with("cuda"),
            "{lines:?}"
        );
    }
}
