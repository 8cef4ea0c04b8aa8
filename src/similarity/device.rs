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
        DeviceChoice::Cuda(i) => {
            let mut gpu = CudaBackend::open(i)?;
            let diff = self_check(&mut gpu, &mut CpuBackend::new(cpu_threads))?;
            if diff > SELF_CHECK_TOL {
                return Err(Error::cuda(format!(
                    "cuda:{i} disagrees with the CPU on the start-up self-check (max |ΔHSIC| {diff:.2e} \
                     relative > {SELF_CHECK_TOL:.0e}); use --device cpu and report this"
                )));
            }
            Ok((Box::new(gpu), None))
        }
        DeviceChoice::Auto => {
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
            let cpu_fallback = |why: String| -> Result<(Box<dyn Backend>, Option<String>)> {
                Ok((
                    Box::new(CpuBackend::new(cpu_threads)),
                    Some(format!(
                        "note: the GPU cannot be used ({why}); using the CPU"
                    )),
                ))
            };
            match CudaBackend::open(0) {
                Ok(mut gpu) => match self_check(&mut gpu, &mut CpuBackend::new(cpu_threads)) {
                    Ok(diff) if diff <= SELF_CHECK_TOL => Ok((Box::new(gpu), None)),
                    Ok(diff) => cpu_fallback(format!(
                        "it disagrees with the CPU on the start-up self-check: max |ΔHSIC| {diff:.2e} relative"
                    )),
                    Err(e) => cpu_fallback(cuda_reason(&e)),
                },
                Err(e) => cpu_fallback(cuda_reason(&e)),
            }
        }
    }
}

/// Largest relative HSIC difference the start-up self-check accepts (f32 arithmetic on the GPU against
/// f64 on the CPU, on inputs exactly representable in every dtype used).
pub const SELF_CHECK_TOL: f64 = 1e-4;

/// Run one small fixed batch (awkward sizes, f32, bf16 and f16 layers, two with large means; both estimators; linear and RBF
/// kernels) through `candidate` and `reference`; the largest |ΔHSIC| relative to the largest |HSIC|.
/// A backend whose kernels were never run on this device is checked before it is trusted.
pub fn self_check(candidate: &mut dyn Backend, reference: &mut dyn Backend) -> Result<f64> {
    use super::backend::{Estimator, Kernel};
    use crate::io::{Batch, DType, LayerBlock};
    let rows = 37;
    // Small integers divided by 8: exact in f32 and bf16, so both backends see the same numbers.
    let value = |l: usize, i: usize| ((i * 7919 + l * 104_729) % 17) as f32 / 8.0 - 1.0;
    let widths = [5usize, 33, 70, 40, 24];
    // Layers 3 and 4 are LLM-like: large per-feature means (1000, a few features 4096 more; 64 in f16),
    // still exact. A backend that forms raw Grams in f32 without subtracting the batch's column means
    // first loses most digits of their centred Grams and fails the check.
    let offset = |l: usize, i: usize| match l {
        3 => {
            1000.0
                + if (i % widths[3]) % 7 == 3 {
                    4096.0
                } else {
                    0.0
                }
        }
        4 => 64.0,
        _ => 0.0,
    };
    let layers = widths
        .iter()
        .enumerate()
        .map(|(l, &w)| {
            let vals: Vec<f32> = (0..rows * w).map(|i| value(l, i) + offset(l, i)).collect();
            if l == 1 || l == 4 {
                let bits: Vec<u8> = if l == 1 {
                    vals.iter()
                        .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                        .collect()
                } else {
                    vals.iter()
                        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                        .collect()
                };
                LayerBlock {
                    dtype: if l == 1 { DType::BF16 } else { DType::F16 },
                    cols: w,
                    data: bits.into(),
                }
            } else {
                LayerBlock {
                    dtype: DType::F32,
                    cols: w,
                    data: bytemuck::cast_slice(&vals).to_vec().into(),
                }
            }
        })
        .collect();
    let batch = Batch { rows, layers };
    let mut worst: f64 = 0.0;
    for estimator in [Estimator::Biased, Estimator::Unbiased] {
        for kernel in [Kernel::Linear, Kernel::Rbf { threshold: 1.0 }] {
            let a = candidate.batch_hsic(&batch.as_ref(), estimator, kernel)?;
            let b = reference.batch_hsic(&batch.as_ref(), estimator, kernel)?;
            let scale = b
                .iter()
                .fold(0.0f64, |m, v| m.max(v.abs()))
                .max(f64::MIN_POSITIVE);
            for (x, y) in a.iter().zip(&b) {
                let d = (x - y).abs() / scale;
                worst = worst.max(if d.is_nan() { f64::INFINITY } else { d });
            }
        }
    }
    Ok(worst)
}

pub(crate) fn cuda_reason(e: &Error) -> String {
    match e {
        Error::Cuda { msg, .. } => msg.clone(),
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
    fn self_check_accepts_an_equal_backend_and_rejects_a_wrong_one() {
        use crate::io::BatchRef;
        use crate::similarity::{Estimator, Kernel};
        let (mut a, mut b) = (CpuBackend::new(1), CpuBackend::new(2));
        assert!(self_check(&mut a, &mut b).unwrap() < 1e-12);
        /// A backend that is off by 1% on one entry.
        struct Skewed(CpuBackend);
        impl Backend for Skewed {
            fn name(&self) -> String {
                "skewed".into()
            }
            fn batch_hsic(
                &mut self,
                batch: &BatchRef<'_>,
                e: Estimator,
                k: Kernel,
            ) -> Result<Vec<f64>> {
                let mut h = self.0.batch_hsic(batch, e, k)?;
                h[1] *= 1.01;
                Ok(h)
            }
            fn accumulate_cross(&mut self, batch: &BatchRef<'_>, cross: &mut [f64]) -> Result<()> {
                self.0.accumulate_cross(batch, cross)
            }
        }
        let diff = self_check(&mut Skewed(CpuBackend::new(1)), &mut b).unwrap();
        assert!(diff > SELF_CHECK_TOL, "{diff}");
    }

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
