//! Embeds the hand-written CUDA kernels (`kernels/*.cu`) into the crate: generates `$OUT_DIR/kernels.rs`
//! with one `(file stem, source)` entry per kernel file, sorted by name. NVRTC compiles them at run time
//! for the device's own architecture (see `src/similarity/cuda/nvrtc.rs`).

use std::fmt::Write as _;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=build.rs");
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"))
        .join("kernels");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "cu" || x == "cuh"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let mut sources = String::new();
    let mut headers = String::new();
    for p in &files {
        println!("cargo:rerun-if-changed={}", p.display());
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let entry = format!(
            "    ({name:?}, include_str!({:?})),\n",
            p.display().to_string()
        );
        if p.extension().is_some_and(|x| x == "cuh") {
            headers.push_str(&entry);
        } else {
            sources.push_str(&entry);
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "/// Kernel sources `(file name, text)` of `kernels/*.cu`, sorted by name.\n\
         pub const KERNEL_SOURCES: &[(&str, &str)] = &[\n{sources}];\n\
         /// Headers `(file name, text)` of `kernels/*.cuh`, given to NVRTC as in-memory includes.\n\
         pub const KERNEL_HEADERS: &[(&str, &str)] = &[\n{headers}];"
    );
    let out_path = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("kernels.rs");
    std::fs::write(out_path, out).expect("write kernels.rs");
}
