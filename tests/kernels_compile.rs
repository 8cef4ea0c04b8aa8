//! Every embedded kernel compiles with NVRTC for Hopper (sm_90a, what the backend builds there, and
//! sm_90) and Ampere (sm_80), without spilling registers to local memory. Needs libnvrtc only, no GPU.
//!
//! Without libnvrtc the test prints why and passes, unless `SGLP_REQUIRE_NVRTC=1` (CI), where a missing
//! NVRTC is a failure.

use sglp_engine::similarity::cuda::kernels::{all_kernels, ptx_entries, KernelDecl};
use sglp_engine::similarity::cuda::nvrtc;

fn nvrtc_or_skip() -> bool {
    if nvrtc::nvrtc_available() {
        return true;
    }
    let msg = format!(
        "libnvrtc not found (looked for {}); install nvidia-cuda-nvrtc-cu12 and put its lib dir on \
         LD_LIBRARY_PATH",
        nvrtc::nvrtc_library_names().join(", ")
    );
    if std::env::var("SGLP_REQUIRE_NVRTC").as_deref() == Ok("1") {
        panic!("SGLP_REQUIRE_NVRTC=1 but {msg}");
    }
    eprintln!("skipping: {msg}");
    false
}

#[test]
fn every_kernel_compiles_for_sm90a_sm90_and_sm80_without_spills() {
    if !nvrtc_or_skip() {
        return;
    }
    let (major, minor) = nvrtc::nvrtc_version().unwrap();
    eprintln!("NVRTC {major}.{minor}");
    let files = nvrtc::kernel_files();
    assert!(files.len() >= 4, "{files:?}");
    for arch in ["sm_90a", "sm_90", "sm_80"] {
        for file in &files {
            let c = nvrtc::compile_kernel(file, arch, &["--ptxas-options=-v"])
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(
                c.cubin.starts_with(b"\x7fELF"),
                "{file} {arch}: not a CUBIN"
            );
            // ptxas reports per function "N bytes stack frame, N bytes spill stores, N bytes spill loads".
            for line in c.log.lines().filter(|l| l.contains("spill stores")) {
                assert!(
                    line.contains(" 0 bytes spill stores") && line.contains(" 0 bytes spill loads"),
                    "{file} {arch} spills registers: {line}\n{}",
                    c.log
                );
            }
            let functions = c.log.matches("Compiling entry function").count();
            assert!(
                functions >= 1,
                "{file} {arch}: no entry function in log:\n{}",
                c.log
            );
        }
    }
}

/// What the compiler made of each kernel's parameters is what `kernels.rs` declares: the same count, and
/// per parameter the same size and kind in the PTX entry (`.u64` pointer or u64, `.u32` int, `.f32`,
/// `.f64`); and every entry of every file is declared. A launch can only pass the declared parameters,
/// so this holds every launch to the compiled kernel.
#[test]
fn every_compiled_kernel_takes_the_declared_parameters() {
    if !nvrtc_or_skip() {
        return;
    }
    let mut checked = 0;
    for file in nvrtc::kernel_files() {
        let ptx = nvrtc::compile_ptx(file, "compute_90").unwrap_or_else(|e| panic!("{e}"));
        let entries = ptx_entries(&ptx);
        assert!(!entries.is_empty(), "{file}: no .entry in the PTX");
        let declared: Vec<&KernelDecl> = all_kernels().filter(|d| d.file == file).collect();
        for (name, types) in &entries {
            let d = declared
                .iter()
                .find(|d| d.name == name)
                .unwrap_or_else(|| panic!("{file}: kernel {name} is compiled but not declared"));
            let expected: Vec<&str> = d.params.iter().map(|p| p.ptx_type()).collect();
            assert_eq!(
                types, &expected,
                "{file}: {name}'s PTX parameters differ from its declaration {:?}",
                d.params
            );
            checked += 1;
        }
        for d in &declared {
            assert!(
                entries.iter().any(|(n, _)| n == d.name),
                "{file}: {} is declared but not compiled",
                d.name
            );
        }
    }
    assert_eq!(checked, all_kernels().count());
    eprintln!("{checked} kernels: PTX parameters as declared");
}

/// gram_wgmma, gram_wgmma_tma and the runtime's linear_wgmma are warpgroup MMA on sm_90a (the 128-wide
/// product, the fences and waits around it; stages filled by cp.async, or by TMA copies on mbarriers)
/// and a trap on any other architecture, where the host never launches them.
#[test]
fn the_wgmma_kernels_are_built_for_sm90a_only() {
    if !nvrtc_or_skip() {
        return;
    }
    // The PTX of entry `name` (up to the next entry).
    let entry = |ptx: &str, name: &str| -> String {
        let start = ptx
            .find(&format!(".entry {name}("))
            .unwrap_or_else(|| panic!("no entry {name}"));
        let rest = &ptx[start..];
        let end = rest[1..].find(".entry").map_or(rest.len(), |e| e + 1);
        rest[..end].to_string()
    };
    let wgmma = [
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16",
        "wgmma.fence.sync.aligned",
        "wgmma.commit_group.sync.aligned",
        "wgmma.wait_group.sync.aligned",
    ];
    let f16 = ["wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16"];
    let cp_async = ["fence.proxy.async.shared::cta", "cp.async.cg.shared.global"];
    let tma = [
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes",
        "mbarrier.init.shared::cta.b64",
        "mbarrier.arrive.expect_tx.shared::cta.b64",
        "mbarrier.try_wait.parity.shared::cta.b64",
        "fence.proxy.tensormap::generic.acquire.sys",
    ];
    let gram_cp: Vec<&str> = f16.iter().chain(&cp_async).copied().collect();
    let gram_tma: Vec<&str> = f16.iter().chain(&tma).copied().collect();
    // Each file compiled once per architecture: (sm_90a PTX, sm_90 PTX).
    let ptx_of = |file: &str| {
        (
            nvrtc::compile_ptx(file, "compute_90a").unwrap(),
            nvrtc::compile_ptx(file, "compute_90").unwrap(),
        )
    };
    let (gram, runtime) = (ptx_of("gram_linear.cu"), ptx_of("runtime_linear.cu"));
    for ((hopper, plain), name, own) in [
        (&gram, "gram_wgmma", &gram_cp[..]),
        (&gram, "gram_wgmma_tma", &gram_tma[..]),
        (&runtime, "linear_wgmma", &cp_async[..]),
    ] {
        let h = entry(hopper, name);
        for needle in wgmma.iter().chain(own) {
            assert!(h.contains(needle), "sm_90a {name} lacks {needle}");
        }
        let p = entry(plain, name);
        assert!(
            !p.contains("wgmma.") && p.contains("trap"),
            "{name} on compute_90:\n{p}"
        );
    }
}

#[test]
fn compile_errors_name_the_file_and_architecture() {
    if !nvrtc_or_skip() {
        return;
    }
    // A virtual architecture gives PTX, not the CUBIN the backend loads: reported, not a panic.
    match nvrtc::compile_kernel("hsic_pairs.cu", "compute_90", &[]) {
        Ok(c) => assert!(c.cubin.is_empty(), "expected no CUBIN for compute_90"),
        Err(e) => {
            let m = e.to_string();
            assert!(
                m.contains("hsic_pairs.cu") && m.contains("compute_90"),
                "{m}"
            );
        }
    }
    let e = nvrtc::compile_kernel("no_such_kernel.cu", "sm_90", &[])
        .err()
        .expect("unknown kernel is an error");
    assert!(e.to_string().contains("no_such_kernel.cu"));
}

#[test]
fn compiled_kernels_are_cached_on_disk() {
    if !nvrtc_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Environment is process-wide; this is the only test in this binary that reads the cache.
    std::env::set_var("SGLP_KERNEL_CACHE", dir.path());
    let t0 = std::time::Instant::now();
    let (a, cached_a) = nvrtc::cubin_cached("gram_centre.cu", "sm_90").unwrap();
    let first = t0.elapsed();
    let t1 = std::time::Instant::now();
    let (b, cached_b) = nvrtc::cubin_cached("gram_centre.cu", "sm_90").unwrap();
    let second = t1.elapsed();
    std::env::remove_var("SGLP_KERNEL_CACHE");
    assert!(
        !cached_a && cached_b,
        "second call must come from the cache"
    );
    assert_eq!(a, b);
    let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(files.len(), 1);
    eprintln!("compile {first:?}, cached load {second:?}");
}
