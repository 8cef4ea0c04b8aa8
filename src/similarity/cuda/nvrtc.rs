//! Run-time compilation of the embedded kernels (`kernels/*.cu`, embedded by build.rs) with NVRTC, for
//! the device's own architecture, and an on-disk cache of the results.
//!
//! We ask NVRTC for a CUBIN (machine code for one real architecture, `sm_90` on Hopper) rather than PTX:
//! loading a CUBIN needs no JIT at module load, and a CUBIN built by a newer NVRTC loads on any driver of
//! the same CUDA major version (PTX from a newer NVRTC would need a driver that knows its PTX ISA).
//! The cache key is a hash of the source, the headers, the options, the architecture and the NVRTC
//! version; a second run loads the file and compiles nothing.

use crate::error::{Error, Result};
use cudarc::nvrtc::sys;
use std::ffi::{c_char, c_int, CStr, CString};
use std::path::PathBuf;

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// Options given to NVRTC for every kernel (besides `--gpu-architecture`).
const NVRTC_OPTIONS: &[&str] = &["--std=c++17", "--fmad=true"];

/// Whether libnvrtc can be loaded (checked before any NVRTC call: cudarc panics on a missing library).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library names cudarc knows.
    unsafe { sys::is_culib_present() }
}

/// The library names cudarc's loader tries for NVRTC (for messages telling the user what to install).
pub fn nvrtc_library_names() -> Vec<String> {
    cudarc::get_lib_name_candidates("nvrtc")
}

/// NVRTC's version (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    require_nvrtc()?;
    let (mut major, mut minor) = (0 as c_int, 0 as c_int);
    // SAFETY: the library is present; two out-pointers to live ints.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::cuda_from(format!("nvrtcVersion failed: {e:?}"), e))?;
    Ok((major, minor))
}

/// NVRTC loaded, or the error saying how to get it.
pub(crate) fn require_nvrtc() -> Result<()> {
    if nvrtc_available() {
        return Ok(());
    }
    // CUDA 13 names its library libnvrtc.so.13, which is not among the names this build (made against
    // CUDA 12) asks the loader for; the toolkit's unversioned link is, when its directory is searched.
    Err(Error::cuda(format!(
        "NVRTC (libnvrtc), needed to compile the kernels, not found: install the CUDA toolkit or `pip \
         install nvidia-cuda-nvrtc-cu12` and put its lib directory on LD_LIBRARY_PATH; with CUDA 13 \
         (libnvrtc.so.13), put a directory holding a link `libnvrtc.so` to it first on LD_LIBRARY_PATH, \
         with libnvrtc.so.13's own directory (looked for {})",
        nvrtc_library_names().join(", ")
    )))
}

/// A compiled kernel file: its CUBIN and NVRTC's log (warnings, `-Xptxas -v` reports).
pub struct Compiled {
    pub file: &'static str,
    pub cubin: Vec<u8>,
    pub log: String,
}

/// Compile one embedded kernel file (by file name, e.g. `gram_linear.cu`) for `arch` (e.g. `sm_90`).
/// `extra` options are appended (e.g. `--ptxas-options=-v` for resource reports).
pub fn compile_kernel(file: &str, arch: &str, extra: &[&str]) -> Result<Compiled> {
    let (file, prog, log) = compile_program(file, arch, extra)?;
    let nvrtc_err = |what: &str, e| nvrtc_error(what, file, arch, e);
    let mut size = 0usize;
    // SAFETY: live program, compiled; out-pointer to a usize.
    unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) }
        .result()
        .map_err(|e| nvrtc_err("get CUBIN size", e))?;
    if size == 0 {
        return Err(Error::cuda(format!(
            "NVRTC produced no CUBIN for {file} (arch {arch} must be a real architecture, sm_XY)"
        )));
    }
    let mut cubin = vec![0u8; size];
    // SAFETY: `cubin` has the size NVRTC reported.
    unsafe { sys::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr() as *mut c_char) }
        .result()
        .map_err(|e| nvrtc_err("get CUBIN", e))?;
    Ok(Compiled { file, cubin, log })
}

/// The PTX of one embedded kernel file for a virtual architecture (e.g. `compute_90`): what the tests
/// read the kernels' parameter lists from (`kernels::ptx_entries`).
pub fn compile_ptx(file: &str, arch: &str) -> Result<String> {
    let (file, prog, _log) = compile_program(file, arch, &[])?;
    let mut size = 0usize;
    // SAFETY: live program, compiled; out-pointer to a usize; then a buffer of that size.
    let ptx = unsafe {
        sys::nvrtcGetPTXSize(prog.0, &mut size)
            .result()
            .and_then(|_| {
                let mut buf = vec![0 as c_char; size.max(1)];
                sys::nvrtcGetPTX(prog.0, buf.as_mut_ptr())
                    .result()
                    .map(|_| CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned())
            })
    };
    ptx.map_err(|e| nvrtc_error("get PTX", file, arch, e))
}

/// An NVRTC call's failure, naming the call, the kernel file and the architecture.
fn nvrtc_error(what: &str, file: &str, arch: &str, e: cudarc::nvrtc::result::NvrtcError) -> Error {
    Error::cuda_from(
        format!("NVRTC {what} failed for {file} ({arch}): {:?}", e.0),
        e,
    )
}

/// Create and compile the program of embedded file `file`; returns its `'static` name, the program and
/// NVRTC's log.
fn compile_program(
    file: &str,
    arch: &str,
    extra: &[&str],
) -> Result<(&'static str, ProgramGuard, String)> {
    let (file, src) =
        embedded(file).ok_or_else(|| Error::cuda(format!("no embedded kernel named {file}")))?;
    require_nvrtc()?;
    let mut options: Vec<String> = vec![format!("--gpu-architecture={arch}")];
    options.extend(NVRTC_OPTIONS.iter().map(|s| s.to_string()));
    options.extend(extra.iter().map(|s| s.to_string()));
    let cstr = |s: &str| CString::new(s).expect("kernel text has no NUL");
    let c_src = cstr(src);
    let c_name = cstr(file);
    let h_src: Vec<CString> = KERNEL_HEADERS.iter().map(|(_, s)| cstr(s)).collect();
    let h_name: Vec<CString> = KERNEL_HEADERS.iter().map(|(n, _)| cstr(n)).collect();
    let h_src_p: Vec<*const c_char> = h_src.iter().map(|s| s.as_ptr()).collect();
    let h_name_p: Vec<*const c_char> = h_name.iter().map(|s| s.as_ptr()).collect();
    let c_opts: Vec<CString> = options.iter().map(|s| cstr(s)).collect();
    let c_opts_p: Vec<*const c_char> = c_opts.iter().map(|s| s.as_ptr()).collect();
    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: every pointer is to a NUL-terminated string that outlives the program; counts match.
    unsafe {
        sys::nvrtcCreateProgram(
            &mut prog,
            c_src.as_ptr(),
            c_name.as_ptr(),
            h_src_p.len() as c_int,
            h_src_p.as_ptr(),
            h_name_p.as_ptr(),
        )
    }
    .result()
    .map_err(|e| nvrtc_error("create", file, arch, e))?;
    let guard = ProgramGuard(prog);
    // SAFETY: `prog` is a live program; the option pointers outlive the call.
    let compiled =
        unsafe { sys::nvrtcCompileProgram(prog, c_opts_p.len() as c_int, c_opts_p.as_ptr()) };
    let log = program_log(prog);
    if compiled != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(Error::cuda(format!(
            "NVRTC could not compile {file} for {arch} ({compiled:?}): {}",
            log.trim()
        )));
    }
    Ok((file, guard, log))
}

struct ProgramGuard(sys::nvrtcProgram);
impl Drop for ProgramGuard {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram and destroyed once, here.
        unsafe {
            let _ = sys::nvrtcDestroyProgram(&mut self.0);
        }
    }
}

fn program_log(prog: sys::nvrtcProgram) -> String {
    let mut size = 0usize;
    // SAFETY: live program; the buffer has the size NVRTC reported.
    unsafe {
        if sys::nvrtcGetProgramLogSize(prog, &mut size) != sys::nvrtcResult::NVRTC_SUCCESS
            || size == 0
        {
            return String::new();
        }
        let mut buf = vec![0 as c_char; size];
        if sys::nvrtcGetProgramLog(prog, buf.as_mut_ptr()) != sys::nvrtcResult::NVRTC_SUCCESS {
            return String::new();
        }
        CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
    }
}

/// The text of embedded kernel file `file` (e.g. `rbf.cu`).
pub fn kernel_source(file: &str) -> Option<&'static str> {
    embedded(file).map(|(_, s)| s)
}

/// Embedded kernel file `file`: its `'static` name and its text.
fn embedded(file: &str) -> Option<(&'static str, &'static str)> {
    KERNEL_SOURCES.iter().find(|(f, _)| *f == file).copied()
}

/// The names of the embedded kernel files.
pub fn kernel_files() -> Vec<&'static str> {
    KERNEL_SOURCES.iter().map(|(f, _)| *f).collect()
}

/// Where compiled kernels are cached: `$SGLP_KERNEL_CACHE`, else `$XDG_CACHE_HOME/sglp-engine/kernels`,
/// else `~/.cache/sglp-engine/kernels`; `None` when none of these can be found.
pub fn cache_dir() -> Option<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("SGLP_KERNEL_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|p| p.join("sglp-engine").join("kernels")))
        .or_else(|| env("HOME").map(|p| p.join(".cache").join("sglp-engine").join("kernels")))
}

/// FNV-1a, 64 bits: a hash that is stable across Rust versions (unlike `DefaultHasher`); also the
/// runtime's key of cached rotary tables.
pub(crate) fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff; // separator, so ("ab","c") and ("a","bc") differ
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The cache file name of a kernel file compiled for `arch`.
fn cache_key(file: &str, arch: &str) -> Result<String> {
    let src = kernel_source(file).unwrap_or("");
    let (maj, min) = nvrtc_version()?;
    let version = format!("nvrtc {maj}.{min}");
    let mut parts: Vec<&[u8]> = vec![src.as_bytes(), arch.as_bytes(), version.as_bytes()];
    for (n, s) in KERNEL_HEADERS {
        parts.push(n.as_bytes());
        parts.push(s.as_bytes());
    }
    for o in NVRTC_OPTIONS {
        parts.push(o.as_bytes());
    }
    let stem = file.trim_end_matches(".cu");
    Ok(format!("{stem}-{arch}-{:016x}.cubin", fnv1a(&parts)))
}

/// The CUBIN of `file` for `arch`: from the cache when present, else compiled (and cached when the
/// cache directory is writable; a cache that cannot be written only costs the compile next time).
/// Returns the CUBIN and whether it came from the cache.
pub fn cubin_cached(file: &'static str, arch: &str) -> Result<(Vec<u8>, bool)> {
    let key = cache_key(file, arch)?;
    let dir = cache_dir();
    if let Some(path) = dir.as_ref().map(|d| d.join(&key)) {
        if let Ok(bytes) = std::fs::read(&path) {
            if is_elf(&bytes) {
                return Ok((bytes, true));
            }
        }
    }
    let compiled = compile_kernel(file, arch, &[])?;
    if let Some(d) = dir {
        if std::fs::create_dir_all(&d).is_ok() {
            let _ = crate::io::output::write_atomic(&d.join(&key), &compiled.cubin);
        }
    }
    Ok((compiled.cubin, false))
}

/// A CUBIN is an ELF file; anything else in the cache (a truncated or foreign file) is recompiled.
fn is_elf(bytes: &[u8]) -> bool {
    bytes.len() > 64 && bytes.starts_with(b"\x7fELF")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_file_is_embedded_with_a_header_comment() {
        let files = kernel_files();
        for f in [
            "gram_linear.cu",
            "gram_centre.cu",
            "hsic_pairs.cu",
            "rbf.cu",
        ] {
            assert!(files.contains(&f), "{f} not embedded: {files:?}");
        }
        for (f, src) in KERNEL_SOURCES {
            assert!(
                src.starts_with(&format!("// {f}")),
                "{f} must open with a header comment naming it"
            );
        }
        assert!(KERNEL_HEADERS.iter().any(|(n, _)| *n == "common.cuh"));
    }

    #[test]
    fn hash_separates_parts_and_is_stable() {
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
        // A fixed value: the cache key must not change between builds or Rust versions.
        assert_eq!(fnv1a(&[b""]), {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            h ^= 0xff;
            h.wrapping_mul(0x0000_0100_0000_01b3)
        });
    }

    #[test]
    fn cache_dir_prefers_the_explicit_variable() {
        // Only reads the environment; does not set it (tests run in parallel).
        if let Some(d) = std::env::var_os("SGLP_KERNEL_CACHE").filter(|v| !v.is_empty()) {
            assert_eq!(cache_dir(), Some(PathBuf::from(d)));
        }
    }
}
