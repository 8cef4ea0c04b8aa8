//! What the GPU benches share.

/// No usable GPU: print why and return (exit 0), or, under `SGLP_REQUIRE_GPU=1` (the GPU machine's
/// scripts set it), exit 2, so that a driver or NVRTC problem there is not a silent "skipped".
pub fn no_gpu(bench: &str, why: impl std::fmt::Display) {
    if std::env::var("SGLP_REQUIRE_GPU").as_deref() == Ok("1") {
        eprintln!("{bench}: SGLP_REQUIRE_GPU=1 but no usable GPU ({why})");
        std::process::exit(2);
    }
    println!("{bench}: skipped, no usable GPU ({why})");
}

/// `SGLP_BENCH_SMOKE=1`: small shapes through the same code (a plumbing check, e.g. on the GPU emulator;
/// the timings mean nothing there).
#[allow(dead_code)] // cka_kernels has no smoke mode
pub fn smoke() -> bool {
    std::env::var("SGLP_BENCH_SMOKE").as_deref() == Ok("1")
}

/// The similarity kernels that compute Gram products, and which layers each takes: `Some(true)` for the
/// tensor-core ones (every `GramKernel`: the 16-bit layers), `Some(false)` for `gram_fma` (f32 and f64
/// layers), `None` for every other kernel (`gram_row_sums` belongs to the centring). For the Gram
/// TFLOP/s of `cka_kernels` and `cka_gpu`.
#[allow(dead_code)] // runtime_gpu has no Gram
pub fn gram_product_of_16bit(kernel: &str) -> Option<bool> {
    use sglp_engine::similarity::cuda::GramKernel;
    if kernel == "gram_fma" {
        Some(false)
    } else if GramKernel::ALL.iter().any(|k| k.kernel_name() == kernel) {
        Some(true)
    } else {
        None
    }
}
