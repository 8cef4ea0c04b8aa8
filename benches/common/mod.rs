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
