//! Choosing the runtime's device (`--device auto|cpu|cuda[:N]` of `gradnorm`, `capture`, `eval`, and of
//! `cka --model`, `run --model`, `prune`, `compare`, where the same flag also picks the CKA's backend).
//!
//! As for the similarity stage ([`crate::similarity::device`]): `auto` takes the GPU when a driver, a GPU
//! and NVRTC are there, the device opens and it passes the start-up self-check against the CPU
//! ([`super::ops::self_check`]), else the CPU with a one-line note saying why; `cuda[:N]` without a usable
//! GPU, or one that fails the self-check, is an error. On the GPU the linear layers' products run as
//! `matmul` says ([`Matmul`]: bf16 tensor cores by default, `--matmul f32` for f32 throughout); the
//! self-check holds bf16 products to the CPU's product of the rounded operands.

use super::model::{DecoderRunner, OnDevice};
use super::ops::{self, cpu::Cpu, Matmul};
use crate::error::{Error, Result};
use crate::similarity::cuda;
use crate::similarity::device::{cuda_reason, DeviceChoice};

/// Largest relative difference the runtime's self-check accepts (f32 on both sides; the GPU's
/// reductions run in another order).
pub const RUNTIME_SELF_CHECK_TOL: f64 = 1e-4;

/// The runner for `choice` (a GPU's linear products as `matmul` says), and a one-line note for the user
/// when `auto` fell back to the CPU.
pub fn open_runtime(
    choice: DeviceChoice,
    matmul: Matmul,
) -> Result<(Box<dyn DecoderRunner>, Option<String>)> {
    match choice {
        DeviceChoice::Cpu => Ok((Box::new(OnDevice::new(Cpu)), None)),
        DeviceChoice::Cuda(i) => Ok((open_cuda(i, matmul)?, None)),
        DeviceChoice::Auto => {
            let why = match cuda::list_devices() {
                Ok(devs) if devs.is_empty() => Some("the CUDA driver sees no GPU".to_string()),
                Ok(_) => None,
                Err(e) => Some(cuda_reason(&e)),
            };
            let why = match why {
                Some(w) => w,
                None => match open_cuda(0, matmul) {
                    Ok(runner) => return Ok((runner, None)),
                    Err(e) => format!("the GPU cannot run the model ({})", cuda_reason(&e)),
                },
            };
            Ok((
                Box::new(OnDevice::new(Cpu)),
                Some(format!("note: {why}; the runtime uses the CPU")),
            ))
        }
    }
}

/// The CUDA runner on GPU `ordinal`, after the self-check.
fn open_cuda(ordinal: usize, matmul: Matmul) -> Result<Box<dyn DecoderRunner>> {
    let dev = ops::cuda::CudaDevice::open(ordinal)?;
    dev.set_matmul(matmul);
    let diff = ops::self_check(&dev)?;
    if diff > RUNTIME_SELF_CHECK_TOL {
        return Err(Error::cuda(format!(
            "cuda:{ordinal} disagrees with the CPU on the runtime's start-up self-check (max relative \
             difference {diff:.2e} > {RUNTIME_SELF_CHECK_TOL:.0e}); use --device cpu and report this"
        )));
    }
    Ok(Box::new(OnDevice::new(dev)))
}
