//! CUDA backend of the similarity stage: hand-written kernels (`kernels/*.cu`) compiled at first use by
//! NVRTC for the device's own architecture (cached on disk, see [`nvrtc`]), driven through cudarc.
//!
//! Gram route, per batch of n samples and L layers (see [`CudaBackend::batch_hsic`]):
//! 1. the layers' raw rows (stored dtype) go up in chunks of consecutive layers on a copy stream, so
//!    chunk c+1 (of this batch or the next) uploads while chunk c computes: straight from the batch when
//!    a reader wrote it into page-locked memory this backend handed out
//!    ([`Backend::page_locked_batch`]), else through two pinned staging buffers;
//! 2. per chunk, the batch's column means are subtracted in place (f64 sums; 16-bit layers become f16
//!    scaled by a power of two, kernels/centre_columns.cu: large-mean LLM activations keep their digits),
//!    then one launch computes the Grams of all its f32/f64 layers (FMA) and one those of its
//!    16-bit layers (tensor cores), split over the features when their tiles alone would leave SMs idle
//!    ([`plan::gram_splits`]; the planes are added in order), then (RBF) distances, an exact
//!    radix-select median and exp, then the centring (double or U) packs each Gram's lower triangle into
//!    a row of G (L × n(n+1)/2 f32);
//! 3. all pairs are one split-K product G·Gᵀ with f32 tiles reduced into f64 planes, one per split,
//!    summed in order (no atomics: the same input gives the same bits);
//! 4. [`Backend::batch_hsic`] downloads that L×L matrix; [`Backend::submit`] instead adds it into a sum
//!    kept on the device (`hsic_accumulate`), with no host synchronisation: the next batch is copied into
//!    the other pinned slot and uploaded while this one computes, and [`Backend::finish_sum`] downloads
//!    once.
//!
//! The feature route ([`Backend::accumulate_cross`]): ZᵀZ in f64 tiles on the device
//! (kernels/feature_cross.cu), the per-sample statistics on the host.

pub mod kernels;
pub mod nvrtc;
pub mod plan;
pub mod stages;

use super::backend::{Backend, Estimator, HsicSum, Kernel};
use super::cpu::{normaliser, stacked_f64};
use crate::error::{Error, Result};
use crate::io::{Batch, BatchRef, DType, HostBytes, LayerBlock, LayerMeta, PageLocked};
pub use crate::io::{DeviceBatch, DeviceLayer};
use cudarc::driver::{
    result as cu, sys, CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr,
    DevicePtrMut, DriverError, LaunchConfig, PinnedHostSlice,
};
use kernels::kernel_times::KernelTime;
use kernels::CkaKernels;
use plan::MemoryPlan;
use std::sync::{Arc, Weak};

/// Device memory left free besides the plan (the driver, other processes, fragmentation).
const RESERVE_BYTES: usize = 512 << 20;

/// Whether the CUDA driver library (libcuda) can be loaded. Checked before ANY driver call: cudarc
/// panics when it calls into a library that is not there.
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen the library names cudarc knows.
    unsafe { sys::is_culib_present() }
}

/// Restores, when dropped, the CUDA context current on this thread when it was made. The engine's calls
/// make its own context current and cudarc never unbinds it, which would otherwise change a host
/// program's current device under it (PyTorch reads its current device from the current context): the
/// Python package keeps one of these around each call into a backend.
pub struct KeepCurrentContext(Option<sys::CUcontext>);

impl KeepCurrentContext {
    pub fn new() -> Self {
        if !driver_available() {
            return KeepCurrentContext(None);
        }
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: the driver library is present; the call only writes the handle (an error, e.g. before
        // cuInit, leaves nothing to restore).
        let ok = unsafe { sys::cuCtxGetCurrent(&mut ctx) }.result().is_ok();
        KeepCurrentContext(ok.then_some(ctx))
    }
}

impl Default for KeepCurrentContext {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for KeepCurrentContext {
    fn drop(&mut self) {
        if let Some(ctx) = self.0 {
            // SAFETY: the handle was current on this thread (null: none); its owner keeps it alive.
            let _ = unsafe { sys::cuCtxSetCurrent(ctx) };
        }
    }
}

/// A driver result with the call named in the error (shared with the runtime's CUDA device).
pub(crate) trait CuResult<T> {
    fn cu(self, what: &str) -> Result<T>;
}
impl<T> CuResult<T> for std::result::Result<T, DriverError> {
    fn cu(self, what: &str) -> Result<T> {
        self.map_err(|e| Error::cuda_from(format!("{what}: {e}"), e))
    }
}

/// One GPU as `info` shows it.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub total_mem: usize,
    pub compute_capability: (i32, i32),
}

/// The GPUs the driver sees, or why none can be used.
pub fn list_devices() -> Result<Vec<DeviceInfo>> {
    if !driver_available() {
        return Err(Error::cuda(
            "no CUDA driver found (libcuda.so.1 could not be loaded)",
        ));
    }
    cu::init().cu("cuInit")?;
    let count = cu::device::get_count().cu("cuDeviceGetCount")?;
    let attr = |dev, a| unsafe { cu::device::get_attribute(dev, a) };
    (0..count)
        .map(|i| {
            let dev = cu::device::get(i).cu("cuDeviceGet")?;
            let major = attr(
                dev,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
            )
            .cu("cuDeviceGetAttribute")?;
            let minor = attr(
                dev,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
            )
            .cu("cuDeviceGetAttribute")?;
            Ok(DeviceInfo {
                ordinal: i as usize,
                name: cu::device::get_name(dev).cu("cuDeviceGetName")?,
                // SAFETY: `dev` is a valid device handle from cuDeviceGet.
                total_mem: unsafe { cu::device::total_mem(dev) }.cu("cuDeviceTotalMem")?,
                compute_capability: (major, minor),
            })
        })
        .collect()
}

/// The context of GPU `ordinal` and its description, after checking what every CUDA user of the crate
/// needs: a driver, the GPU, compute capability 8.0 or newer and NVRTC.
fn open_context(ordinal: usize) -> Result<(Arc<CudaContext>, DeviceInfo)> {
    let devices = list_devices()?;
    let info = devices.get(ordinal).ok_or_else(|| {
        Error::cuda(if devices.is_empty() {
            "the CUDA driver sees no GPU".to_string()
        } else {
            format!(
                "cuda:{ordinal} requested but there are {} GPU(s) (cuda:0..cuda:{})",
                devices.len(),
                devices.len() - 1
            )
        })
    })?;
    let (major, minor) = info.compute_capability;
    if major < 8 {
        return Err(Error::cuda(format!(
            "{} has compute capability {major}.{minor}; the kernels need 8.0 or newer \
                 (bf16 tensor-core mma)",
            info.name
        )));
    }
    nvrtc::require_nvrtc()?;
    let ctx = CudaContext::new(ordinal).cu("creating the CUDA context")?;
    Ok((ctx, info.clone()))
}

/// A GPU opened for one of the crate's CUDA users (this backend and the runtime's CUDA device,
/// `runtime::ops::cuda`): its context, a compute and a copy stream, the NVRTC
/// architecture of its kernels, its name for reports ("cuda:0 NVIDIA H100 (sm_90, 80 GiB)") and its
/// multiprocessor count.
pub(crate) struct OpenGpu {
    pub ctx: Arc<CudaContext>,
    pub compute: Arc<CudaStream>,
    pub copy: Arc<CudaStream>,
    pub arch: String,
    /// Whether the kernels are built for sm_90a, which has wgmma ([`kernel_arch`]).
    pub wgmma: bool,
    pub name: String,
    pub sms: usize,
}

/// [`open_context`], then the streams and facts both CUDA users need ([`OpenGpu`]).
pub(crate) fn open_gpu(ordinal: usize) -> Result<OpenGpu> {
    let (ctx, info) = open_context(ordinal)?;
    let (major, minor) = info.compute_capability;
    let compute = ctx.new_stream().cu("creating a stream")?;
    let copy = ctx.new_stream().cu("creating a stream")?;
    let sms = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .cu("cuDeviceGetAttribute")? as usize;
    let name = format!(
        "cuda:{ordinal} {} (sm_{major}{minor}, {:.0} GiB)",
        info.name,
        info.total_mem as f64 / (1u64 << 30) as f64
    );
    let arch = kernel_arch(major, minor, nvrtc::nvrtc_version().ok());
    Ok(OpenGpu {
        ctx,
        compute,
        copy,
        wgmma: arch == "sm_90a",
        arch,
        name,
        sms,
    })
}

/// The architecture NVRTC builds a device's kernels for: `sm_XY`, except Hopper (9.0) with NVRTC 12 or
/// newer, `sm_90a`, which adds wgmma (kernels/gram_linear.cu's gram_wgmma*); its CUBINs run on sm_90
/// devices only, as these are. NVRTC 11.8 knows sm_90 but not sm_90a.
fn kernel_arch(major: i32, minor: i32, nvrtc: Option<(i32, i32)>) -> String {
    match nvrtc {
        Some((v, _)) if (major, minor) == (9, 0) && v >= 12 => "sm_90a".to_string(),
        _ => format!("sm_{major}{minor}"),
    }
}

/// The embedded kernel files `files`, compiled for `arch` (from the disk cache when there) and loaded;
/// [`Modules::function`] fetches a kernel from them.
pub(crate) fn load_modules(
    ctx: &Arc<CudaContext>,
    arch: &str,
    files: impl IntoIterator<Item = &'static str>,
) -> Result<Modules> {
    let mut modules = Vec::new();
    for file in files {
        let (cubin, _cached) = nvrtc::cubin_cached(file, arch)?;
        let m = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
            .cu(&format!("loading {file} ({arch})"))?;
        modules.push((file, m));
    }
    Ok(Modules(modules))
}

/// Loaded kernel modules, by file name ([`load_modules`]).
pub(crate) struct Modules(Vec<(&'static str, Arc<cudarc::driver::CudaModule>)>);

impl Modules {
    /// Kernel `name` of `file`.
    pub(crate) fn function(&self, file: &str, name: &str) -> Result<CudaFunction> {
        let (_, m) = self
            .0
            .iter()
            .find(|(f, _)| *f == file)
            .ok_or_else(|| Error::cuda(format!("kernel file {file} is not loaded")))?;
        m.load_function(name)
            .cu(&format!("kernel {name} in {file}"))
    }
}

/// Device buffers for one batch shape (n and the layers' row widths), allocated once per shape.
struct Workspace {
    /// n, and per layer its row bytes and dtype code.
    key: (usize, Vec<(usize, u64)>),
    plan: MemoryPlan,
    staging: [PinnedHostSlice<u8>; 2],
    dev_in: [CudaSlice<u8>; 2],
    /// Recorded on the copy stream after slot s's upload; the host waits on it before refilling slot s,
    /// the compute stream before reading it.
    uploaded: [CudaEvent; 2],
    /// Recorded on the compute stream after the Gram launches that read slot s.
    consumed: [CudaEvent; 2],
    /// The layer tables of each block `(start, end)` of layers, built and uploaded once per shape.
    tables: Vec<((usize, usize), Tables)>,
    /// Per Gram slot: the largest column range's f32 bits and the f16 scale exponent (centre_columns.cu).
    col_scale: CudaSlice<u32>,
    gram: CudaSlice<f32>,
    rowsum: CudaSlice<f64>,
    offsets: CudaSlice<f64>,
    diag: CudaSlice<f32>,
    select_state: CudaSlice<u32>,
    select_hist: CudaSlice<u32>,
    g: CudaSlice<f32>,
    out: CudaSlice<f64>,
    partials: CudaSlice<f64>,
}

/// The CUDA backend of one device.
pub struct CudaBackend {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    compute: Arc<CudaStream>,
    copy: Arc<CudaStream>,
    k: CkaKernels,
    name: String,
    sms: usize,
    ws: Option<Workspace>,
    /// Device bytes the plan may use at most (tests set it to force layer blocks).
    budget_cap: Option<usize>,
    /// Which kernel forms the 16-bit Grams.
    gram_kernel: GramKernel,
    /// Whether the device has wgmma (its kernels are built for sm_90a).
    wgmma: bool,
    /// A fixed split-K factor of the Gram launches ([`CudaBackend::set_gram_splits`]).
    gram_splits: Option<usize>,
    /// The pinned/device upload slot the next chunk goes to (alternating across chunks and batches).
    next_slot: usize,
    /// Device-resident sums of [`Backend::submit`], by [`HsicSum`] slot, each with its per-layer
    /// first-non-finite-sample flags; `None` once finished.
    sums: Vec<Option<(CudaSlice<f64>, CudaSlice<u64>)>>,
    /// During a Gram route: where column_centre records non-finite samples (per layer, ~sample, 0 =
    /// none) and the global index of the batch's first sample.
    nonfinite: Option<(CudaSlice<u64>, u64)>,
    /// The page-locked chunk buffers handed out by [`Backend::page_locked_batch`], found by address when
    /// a batch is uploaded (weak: a buffer belongs to its reader and is freed with it).
    locked: Vec<Weak<PinnedBlock>>,
    /// Profiling: every kernel of a batch timed with CUDA events ([`kernels::kernel_times`]).
    profile: bool,
    last_kernels: Vec<KernelTime>,
    last_times: Option<StageTimes>,
}

/// The most page-locked memory one chunk buffer of [`Backend::page_locked_batch`] takes (a reader
/// circulates two), and at most this fraction of the host's available memory: pinning more is not worth
/// the risk to the rest of the machine, and a larger chunk falls back to the staging path.
const PAGE_LOCKED_CHUNK_MAX_BYTES: usize = 2 << 30;
const PAGE_LOCKED_CHUNK_MAX_SHARE: u64 = 8;

/// One layer's chunk buffer in page-locked memory ([`Backend::page_locked_batch`]): a reader writes it,
/// the copy stream uploads from it, and `in_use`, recorded after each upload, keeps the two apart
/// (every write through [`HostBytes`] waits for it).
struct PinnedBlock {
    mem: PinnedHostSlice<u8>,
    ptr: *mut u8,
    in_use: CudaEvent,
}

// SAFETY: `ptr` is `mem`'s memory, which is Send + Sync; CudaEvent is thread safe.
unsafe impl Send for PinnedBlock {}
unsafe impl Sync for PinnedBlock {}

impl PinnedBlock {
    fn new(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self> {
        // Not write-combined (the staging slots are): the reader's finiteness check and the accumulator
        // read these bytes on the host too.
        // SAFETY: written (by the reader) before any read; `HostBytes` reads only what was written.
        let mut mem = unsafe { ctx.alloc_pinned_with_flags::<u8>(bytes, 0) }
            .cu("allocating page-locked chunk memory")?;
        let ptr = mem.as_mut_ptr().cu("page-locked chunk memory")?;
        let in_use = ctx
            .new_event(Some(sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC))
            .cu("event")?;
        Ok(PinnedBlock { mem, ptr, in_use })
    }
}

// SAFETY: `ptr` holds `mem.len()` bytes until `mem` is dropped with self; `in_use` is recorded after
// every device copy from the memory (`upload_chunk`), so waiting for it waits for all of them.
unsafe impl PageLocked for PinnedBlock {
    fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    fn capacity(&self) -> usize {
        self.mem.len()
    }

    fn wait_unused(&self) {
        wait_for(&self.in_use);
    }
}

impl Drop for PinnedBlock {
    /// The memory is freed only once no upload reads it.
    fn drop(&mut self) {
        self.wait_unused();
    }
}

/// Wait for `event` before host memory a copy reads is written or freed, whatever happened before.
/// Not `CudaEvent::synchronize`: its context bind returns (and clears) an error an earlier drop recorded,
/// and it would then return without waiting. A failed device fails the next call that checks
/// (CUDA errors are sticky).
pub(crate) fn wait_for(event: &CudaEvent) {
    let _ = event.context().bind_to_thread();
    // SAFETY: the event is alive and was created in that context.
    let _ = unsafe { cu::event::synchronize(event.cu_event()) };
}

/// Wait for `stream` before memory its copies read is reused or freed: the wait happens whatever error
/// an earlier drop recorded in cudarc (see [`wait_for`]); the driver's own error is returned.
pub(crate) fn sync_stream(stream: &CudaStream) -> Result<()> {
    let _ = stream.context().bind_to_thread();
    // SAFETY: the stream is alive and belongs to that context.
    unsafe { cu::stream::synchronize(stream.cu_stream()) }.cu("synchronize")
}

/// The block among `blocks` (alive ones) whose memory holds all of `bytes`, if any.
pub(crate) fn block_holding<T: PageLocked>(blocks: &[Weak<T>], bytes: &[u8]) -> Option<Arc<T>> {
    let (start, end) = (
        bytes.as_ptr() as usize,
        bytes.as_ptr() as usize + bytes.len(),
    );
    blocks.iter().filter_map(Weak::upgrade).find(|b| {
        let base = b.as_ptr() as usize;
        base <= start && end <= base + b.capacity()
    })
}

/// The kernel of the 16-bit (tensor-core) Grams: `gram_mma` (registers staging, 32-bit fragment loads),
/// the candidate `gram_mma_pipelined` (cp.async double buffering, ldmatrix) or, on Hopper (sm_90a), the
/// candidates `gram_wgmma` (warpgroup MMA from 128-byte-swizzled shared memory, 4 stages filled by
/// cp.async) and `gram_wgmma_tma` (the same, the stages filled by TMA copies through tensor maps). None
/// has been timed on a GPU yet: the default stays `gram_mma` until the benchmark says otherwise;
/// `SGLP_GRAM_KERNEL=pipelined`, `=wgmma` or `=wgmma_tma` (or [`CudaBackend::set_gram_kernel`]) selects
/// another (`=mma` the default; any other value fails the backend's opening). The wgmma kernels on a
/// device without wgmma run `gram_mma`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GramKernel {
    Mma,
    MmaPipelined,
    Wgmma,
    WgmmaTma,
}

impl GramKernel {
    /// Every 16-bit Gram kernel.
    pub const ALL: [GramKernel; 4] = [
        GramKernel::Mma,
        GramKernel::MmaPipelined,
        GramKernel::Wgmma,
        GramKernel::WgmmaTma,
    ];

    fn from_env() -> Result<Self> {
        env_choice(
            "SGLP_GRAM_KERNEL",
            &[
                ("mma", GramKernel::Mma),
                ("pipelined", GramKernel::MmaPipelined),
                ("wgmma", GramKernel::Wgmma),
                ("wgmma_tma", GramKernel::WgmmaTma),
            ],
            GramKernel::Mma,
        )
    }

    /// Whether this is one of the Hopper (wgmma) kernels.
    pub fn is_wgmma(self) -> bool {
        matches!(self, GramKernel::Wgmma | GramKernel::WgmmaTma)
    }

    /// The kernel's name (its `extern "C"` symbol in kernels/gram_linear.cu).
    pub fn kernel_name(self) -> &'static str {
        match self {
            GramKernel::Mma => "gram_mma",
            GramKernel::MmaPipelined => "gram_mma_pipelined",
            GramKernel::Wgmma => "gram_wgmma",
            GramKernel::WgmmaTma => "gram_wgmma_tma",
        }
    }
}

/// The value of `var` among `choices` (its spelling, then what it selects); `default` when the variable
/// is unset or empty. Anything else is an error naming the variable and the values it takes: a typo must
/// not quietly run another kernel than the one being measured.
pub(crate) fn env_choice<T: Copy>(var: &str, choices: &[(&str, T)], default: T) -> Result<T> {
    choice_of(var, std::env::var(var).ok().as_deref(), choices, default)
}

fn choice_of<T: Copy>(
    var: &str,
    value: Option<&str>,
    choices: &[(&str, T)],
    default: T,
) -> Result<T> {
    match value {
        None | Some("") => Ok(default),
        Some(v) => choices
            .iter()
            .find(|(name, _)| *name == v)
            .map(|&(_, t)| t)
            .ok_or_else(|| {
                let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
                Error::cuda(format!("{var}={v}: expected one of {}", names.join(", ")))
            }),
    }
}

/// `SGLP_GRAM_SPLITS`: a fixed split-K factor (≥ 1), or none when unset or empty.
fn env_gram_splits() -> Result<Option<usize>> {
    match std::env::var("SGLP_GRAM_SPLITS").ok().as_deref() {
        None | Some("") => Ok(None),
        Some(v) => match v.parse::<usize>() {
            Ok(s) if s >= 1 => Ok(Some(s)),
            _ => Err(Error::cuda(format!(
                "SGLP_GRAM_SPLITS={v}: expected a whole number of at least 1"
            ))),
        },
    }
}

/// Dynamic shared memory of a wgmma block (`gram_wgmma(_tma)`, the runtime's `linear_wgmma`): 4 stages
/// of 2 × 128 rows × 128 bytes, 1 KiB to align the swizzle atoms and 64 bytes for the stages' mbarriers
/// (`WGMMA_SHARED` in kernels/wgmma.cuh, which asserts the sum).
pub(crate) const WGMMA_SHARED: usize = 132_160;

/// Bytes of one CUtensorMap (the driver's opaque 128-byte, 64-aligned object).
const TENSOR_MAP_BYTES: usize = 128;

/// The tensor map of a 16-bit layer of `rows × cols` at device address `addr` for `gram_wgmma_tma`: 2-D
/// (features innermost, `cols·2` bytes a row), boxes of 64 features × 128 rows, 128-byte swizzle (the
/// layout the wgmma descriptors read), zeros outside. Needs `cols % 8 == 0` and `addr % 16 == 0`.
fn tensor_map_16bit(addr: u64, rows: usize, cols: usize) -> Result<[u8; TENSOR_MAP_BYTES]> {
    use sys::{
        CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave,
        CUtensorMapL2promotion, CUtensorMapSwizzle,
    };
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    let dims = [cols as u64, rows as u64];
    let strides = [cols as u64 * 2];
    let boxes = [64u32, 128];
    let element_strides = [1u32, 1];
    // SAFETY: the arrays hold `rank` (2) entries (strides rank − 1); `map` is written by the call.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT16,
            2,
            addr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    r.result().cu("cuTensorMapEncodeTiled")?;
    // SAFETY: initialised by the successful call (and zeroed before).
    let map = unsafe { map.assume_init() };
    Ok(bytemuck::cast(map.opaque))
}

/// Device time of the stages of the last batch (with profiling on), in milliseconds: the sums of their
/// kernels' times ([`CudaBackend::last_kernel_times`]). `wall_ms` is the host time of the whole
/// `batch_hsic` call (uploads and synchronisation included).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StageTimes {
    /// The column centring and the Gram products (gram_fma / gram_mma, and their split-K reduction).
    pub gram_ms: f64,
    /// RBF (when used) and centring/packing.
    pub centre_ms: f64,
    /// The all-pairs product.
    pub pairs_ms: f64,
    pub wall_ms: f64,
}

impl StageTimes {
    /// The stages' sums of their kernels' times (`wall_ms` left 0).
    fn from_kernels(times: &[KernelTime]) -> Self {
        let mut t = StageTimes::default();
        for k in times {
            let stage = match k.kernel {
                "column_centre" | "column_to_f16" | "gram_fma" | "gram_reduce_splits" => {
                    &mut t.gram_ms
                }
                g if GramKernel::ALL.iter().any(|k| k.kernel_name() == g) => &mut t.gram_ms,
                "hsic_pairs" | "hsic_reduce_splits" => &mut t.pairs_ms,
                // RBF and the centring.
                _ => &mut t.centre_ms,
            };
            *stage += k.total_ms;
        }
        t
    }
}

/// Stored dtype code of the kernels (`DT_*` in kernels/common.cuh).
fn dtype_code(d: DType) -> u64 {
    match d {
        DType::F32 => 0,
        DType::F64 => 1,
        DType::F16 => 2,
        DType::BF16 => 3,
    }
}

fn grid(x: usize, y: usize, z: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (x.max(1) as u32, y.max(1) as u32, z.max(1) as u32),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn tri(t: usize) -> usize {
    t * (t + 1) / 2
}

impl Drop for CudaBackend {
    /// Work still queued may read the workspace's pinned staging slots and the kernels' modules, which
    /// go with the backend: wait for it first (errors are moot at this point).
    fn drop(&mut self) {
        let _ = self.drain();
    }
}

impl CudaBackend {
    /// Open device `ordinal`: create its context and streams and load the kernels (compiled by NVRTC
    /// for its architecture on first use, then from the disk cache).
    pub fn open(ordinal: usize) -> Result<Self> {
        let OpenGpu {
            ctx,
            compute,
            copy,
            arch,
            wgmma,
            name,
            sms,
        } = open_gpu(ordinal)?;
        let k = CkaKernels::load(&ctx, &arch)?;
        if wgmma {
            k.gram_wgmma.allow_dynamic_shared(WGMMA_SHARED)?;
            k.gram_wgmma_tma.allow_dynamic_shared(WGMMA_SHARED)?;
        }
        Ok(CudaBackend {
            wgmma,
            ordinal,
            ctx,
            compute,
            copy,
            k,
            name,
            sms,
            ws: None,
            budget_cap: None,
            next_slot: 0,
            gram_kernel: GramKernel::from_env()?,
            gram_splits: env_gram_splits()?,
            sums: Vec::new(),
            nonfinite: None,
            locked: Vec::new(),
            profile: false,
            last_kernels: Vec::new(),
            last_times: None,
        })
    }

    /// Time every kernel of every batch with CUDA events (costs a little, and a host synchronisation
    /// per batch; for benchmarks).
    pub fn set_profiling(&mut self, on: bool) {
        self.profile = on;
        self.last_times = None;
        self.last_kernels.clear();
    }

    /// Stage times of the last batch, when profiling is on.
    pub fn last_stage_times(&self) -> Option<StageTimes> {
        self.last_times
    }

    /// Each kernel's device time in the last batch, when profiling is on.
    pub fn last_kernel_times(&self) -> &[KernelTime] {
        &self.last_kernels
    }

    /// Cap the device memory the plan may use (to exercise the layer-block path on a large GPU).
    pub fn set_memory_cap(&mut self, bytes: Option<usize>) -> Result<()> {
        self.budget_cap = bytes;
        self.drop_workspace()
    }

    /// Free the workspace once nothing queued on either stream can still read it (an upload may still
    /// be copying from its pinned staging slots).
    fn drop_workspace(&mut self) -> Result<()> {
        let drained = self.drain();
        self.ws = None;
        drained
    }

    /// Wait for both streams (even after an error cudarc recorded: memory they read is freed next).
    fn drain(&self) -> Result<()> {
        let copy = sync_stream(&self.copy);
        sync_stream(&self.compute).and(copy)
    }

    /// Choose the 16-bit Gram kernel (see [`GramKernel`]).
    pub fn set_gram_kernel(&mut self, kernel: GramKernel) {
        self.gram_kernel = kernel;
    }

    /// The 16-bit Gram kernel launches use: the chosen one, or `gram_mma` for a wgmma kernel on a device
    /// without wgmma.
    pub fn gram_kernel_in_use(&self) -> GramKernel {
        match self.gram_kernel {
            k if k.is_wgmma() && !self.wgmma => GramKernel::Mma,
            k => k,
        }
    }

    /// Fix the split-K factor of every Gram launch (`None`: [`plan::gram_splits`] chooses per launch;
    /// the environment's `SGLP_GRAM_SPLITS` sets it at start-up), capped by the scratch room for split
    /// planes. For tests and benchmarks.
    pub fn set_gram_splits(&mut self, splits: Option<usize>) {
        self.gram_splits = splits.map(|s| s.max(1));
    }

    /// Device memory in use on this GPU (all processes: total − free), for memory benchmarks.
    pub fn device_memory_used(&self) -> Result<usize> {
        let (free, total) = self.ctx.mem_get_info().cu("cuMemGetInfo")?;
        Ok(total.saturating_sub(free))
    }

    /// The plan in use for the last batch shape, if any.
    pub fn memory_plan(&self) -> Option<&MemoryPlan> {
        self.ws.as_ref().map(|w| &w.plan)
    }

    /// Buffers for batches of this shape: n rows and these per-row byte widths (re-planned when the
    /// shape or a dtype changes; the layer tables depend on both).
    fn workspace(&mut self, batch: Input<'_>, row_bytes: &[usize]) -> Result<()> {
        let n = batch.rows();
        let key = (
            n,
            row_bytes
                .iter()
                .enumerate()
                .map(|(i, &w)| (w, dtype_code(batch.layer(i).1)))
                .collect::<Vec<_>>(),
        );
        if self.ws.as_ref().is_some_and(|w| w.key == key) {
            return Ok(());
        }
        self.drop_workspace()?; // free the old buffers before measuring what is free
        let (free, _total) = self.ctx.mem_get_info().cu("cuMemGetInfo")?;
        let mut budget = free.saturating_sub(RESERVE_BYTES);
        if let Some(cap) = self.budget_cap {
            budget = budget.min(cap);
        }
        let plan = plan::plan(n, row_bytes, budget)?;
        let b = plan.buffers(row_bytes.len());
        let s = &self.compute;
        let alloc_err =
            |what: &str| format!("allocating {what} ({} MiB plan)", plan.device_bytes >> 20);
        // SAFETY: pinned host memory, written before every read (only the filled prefix is copied).
        let pinned = || unsafe { self.ctx.alloc_pinned::<u8>(b.stage_bytes) };
        // SAFETY: device buffers that every kernel writes before it reads them (the result and the
        // histograms are zeroed explicitly).
        let ws = unsafe {
            Workspace {
                key,
                staging: [
                    pinned().cu("pinned staging")?,
                    pinned().cu("pinned staging")?,
                ],
                dev_in: [
                    s.alloc::<u8>(b.stage_bytes).cu(&alloc_err("upload slot"))?,
                    s.alloc::<u8>(b.stage_bytes).cu(&alloc_err("upload slot"))?,
                ],
                uploaded: [
                    self.ctx.new_event(None).cu("event")?,
                    self.ctx.new_event(None).cu("event")?,
                ],
                consumed: [
                    self.ctx.new_event(None).cu("event")?,
                    self.ctx.new_event(None).cu("event")?,
                ],
                tables: Vec::new(),
                col_scale: s
                    .alloc_zeros::<u32>(b.col_scale)
                    .cu(&alloc_err("column scales"))?,
                gram: s.alloc::<f32>(b.gram).cu(&alloc_err("Gram scratch"))?,
                rowsum: s.alloc::<f64>(b.rowsum).cu(&alloc_err("row sums"))?,
                offsets: s
                    .alloc::<f64>(b.offsets)
                    .cu(&alloc_err("centring offsets"))?,
                diag: s.alloc::<f32>(b.diag).cu(&alloc_err("diagonals"))?,
                select_state: s
                    .alloc::<u32>(b.select_state)
                    .cu(&alloc_err("median state"))?,
                select_hist: s
                    .alloc_zeros::<u32>(b.select_hist)
                    .cu(&alloc_err("histograms"))?,
                g: s.alloc::<f32>(b.g).cu(&alloc_err("packed Grams"))?,
                out: s.alloc_zeros::<f64>(b.out).cu(&alloc_err("result"))?,
                partials: s
                    .alloc_zeros::<f64>(b.partials)
                    .cu(&alloc_err("pair partials"))?,
                plan,
            }
        };
        // The buffers were allocated in stream order on `compute`; the copy stream writes them too.
        self.copy.join(&self.compute).cu("stream wait")?;
        self.ws = Some(ws);
        Ok(())
    }

    /// The Gram route of one batch up to its unscaled L×L result in `ws.out` (lower triangle), enqueued
    /// on the compute stream: uploads, Grams, centring, all pairs by blocks of layers.
    fn gram_route(&mut self, batch: Input<'_>, estimator: Estimator, kernel: Kernel) -> Result<()> {
        let (n, l) = (batch.rows(), batch.layers());
        let sizes = self.prepare_route(batch, estimator)?;
        let (block, blocks) = {
            let ws = self.ws.as_ref().expect("workspace planned");
            (ws.plan.layer_block, ws.plan.blocks(l))
        };
        for a in 0..blocks {
            let (a0, a1) = (a * block, ((a + 1) * block).min(l));
            self.compute_block(batch, &sizes, a0, a1, 0, estimator, kernel)?;
            self.pairs(n, l, 0, a1 - a0, 0, a1 - a0, a0, a0, true)?;
            for b in a + 1..blocks {
                let (b0, b1) = (b * block, ((b + 1) * block).min(l));
                self.compute_block(batch, &sizes, b0, b1, block, estimator, kernel)?;
                // Rows: block b (the later layers), columns: block a — the lower triangle.
                self.pairs(n, l, block, b1 - b0, 0, a1 - a0, b0, a0, false)?;
            }
        }
        self.reduce_pairs(l)
    }

    /// The checks of a Gram route, and the workspace for the batch's shape with the pair partials
    /// cleared; returns each layer's bytes in an upload slot.
    fn prepare_route(&mut self, batch: Input<'_>, estimator: Estimator) -> Result<Vec<usize>> {
        let n = batch.rows();
        let l = batch.layers();
        super::backend::check_batch_rows(estimator, n)?;
        if l == 0 {
            return Err(Error::invalid("no layers to compare"));
        }
        // Radix-select counts and Gram indices are 32-bit: n² < 2³².
        if n > 65535 {
            return Err(Error::invalid(format!(
                "a batch of {n} samples is too large for the GPU kernels (at most 65535)"
            )));
        }
        let row_bytes: Vec<usize> = (0..l)
            .map(|i| {
                let (cols, dtype) = batch.layer(i);
                cols * dtype.size()
            })
            .collect();
        let sizes: Vec<usize> = row_bytes
            .iter()
            .map(|&w| plan::layer_bytes(n, w, 1))
            .collect();
        self.workspace(batch, &row_bytes)?;
        let ws = self.ws.as_mut().expect("workspace planned");
        self.compute
            .memset_zeros(&mut ws.partials)
            .cu("clearing the pair partials")?;
        Ok(sizes)
    }

    /// Step 4: the split planes of the pair products, summed in order into `out`.
    fn reduce_pairs(&mut self, l: usize) -> Result<()> {
        let ws = self.ws.as_mut().expect("workspace planned");
        let (splits, l_i) = (ws.plan.pair_splits as i32, l as i32);
        // SAFETY: `partials` holds pair_splits·l² f64, `out` l².
        unsafe {
            self.k.hsic_reduce_splits.launch(
                &self.compute,
                grid((l * l).div_ceil(256), 1, 1, 256),
                &ws.partials,
                splits,
                l_i,
                &mut ws.out,
            )
        }
    }

    /// `submit` for host or device input: enqueue the batch and add its scaled result into the sum's
    /// device buffer (allocated on first use).
    fn submit_input(
        &mut self,
        sum: &mut HsicSum,
        batch: Input<'_>,
        estimator: Estimator,
        kernel: Kernel,
    ) -> Result<()> {
        let (n, l) = (batch.rows(), batch.layers());
        if l != sum.layers() {
            return Err(Error::invalid(format!(
                "a batch of {l} layers submitted into a sum over {}",
                sum.layers()
            )));
        }
        let wall = std::time::Instant::now();
        let slot = match sum.device_slot {
            Some(i) => i,
            None => {
                let buf = self
                    .compute
                    .alloc_zeros::<f64>(l * l)
                    .cu("allocating the HSIC sum")?;
                let flags = self
                    .compute
                    .alloc_zeros::<u64>(l)
                    .cu("allocating non-finite flags")?;
                self.sums.push(Some((buf, flags)));
                sum.device_slot = Some(self.sums.len() - 1);
                self.sums.len() - 1
            }
        };
        let (buf, flags) = self.sums[slot]
            .take()
            .ok_or_else(|| Error::invalid("this HSIC sum was already finished"))?;
        self.nonfinite = Some((flags, sum.rows_submitted() as u64));
        let routed = self.gram_route_timed(batch, estimator, kernel);
        let (flags, _) = self.nonfinite.take().expect("set above");
        self.sums[slot] = Some((buf, flags));
        routed?;
        sum.add_rows(n);
        let ws = self.ws.as_ref().expect("workspace planned");
        let (dst, _) = self.sums[slot].as_mut().expect("put back above");
        let (l_i, scale) = (l as i32, 2.0 / normaliser(estimator, n));
        // SAFETY: `out` and `dst` hold l·l f64.
        unsafe {
            self.k.hsic_accumulate.launch(
                &self.compute,
                grid((l * l).div_ceil(256), 1, 1, 256),
                &ws.out,
                l_i,
                scale,
                dst,
            )?;
        }
        self.collect_stage_times(wall);
        Ok(())
    }

    /// Like [`Backend::submit`], for a batch already in this GPU's memory (activations computed on the
    /// device, a PyTorch CUDA tensor): its layers are copied device to device into the upload slots, so
    /// nothing crosses PCIe. Returns once the copies are done: the caller may then reuse the memory.
    ///
    /// # Safety
    /// Every layer's `ptr` must be a device address in this backend's CUDA context (device and primary
    /// context) holding `rows × cols` values of its dtype, row-major and contiguous, fully written
    /// (the producer's stream synchronised) before the call.
    pub unsafe fn submit_device(
        &mut self,
        sum: &mut HsicSum,
        batch: &DeviceBatch,
        estimator: Estimator,
        kernel: Kernel,
    ) -> Result<()> {
        let submitted = self.submit_input(sum, Input::Device(batch), estimator, kernel);
        // The copies of the last chunks are the last thing recorded on the copy stream; waited for on an
        // error too, since the caller may reuse its memory as soon as this returns.
        let copied = sync_stream(&self.copy);
        submitted.and(copied)
    }

    /// The HSIC matrix of one device-resident batch, as [`Backend::batch_hsic`] returns it.
    ///
    /// # Safety
    /// As [`CudaBackend::submit_device`].
    pub unsafe fn batch_hsic_device(
        &mut self,
        batch: &DeviceBatch,
        estimator: Estimator,
        kernel: Kernel,
    ) -> Result<Vec<f64>> {
        let mut sum = HsicSum::new(batch.layers.len());
        // SAFETY: forwarded to the caller.
        unsafe { self.submit_device(&mut sum, batch, estimator, kernel)? };
        self.finish_sum(sum)
    }

    /// The CUDA device ordinal this backend runs on.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// A host copy of a device batch (the few rows the accumulator keeps between batches).
    ///
    /// # Safety
    /// As [`CudaBackend::submit_device`].
    pub unsafe fn download(&self, batch: &DeviceBatch) -> Result<Batch> {
        // The raw copy below needs the context current on this thread (a caller's thread may be new).
        self.ctx.bind_to_thread().cu("binding the CUDA context")?;
        let mut layers = Vec::with_capacity(batch.layers.len());
        for l in &batch.layers {
            let mut data = vec![0u8; batch.rows * l.cols * l.dtype.size()];
            if !data.is_empty() {
                // SAFETY: the caller's promise on `l.ptr`; `data` holds exactly the bytes copied.
                unsafe { cu::memcpy_dtoh_sync(&mut data, l.ptr) }.cu("downloading device rows")?;
            }
            layers.push(LayerBlock {
                dtype: l.dtype,
                cols: l.cols,
                data: data.into(),
            });
        }
        Ok(Batch {
            rows: batch.rows,
            layers,
        })
    }

    /// A copy of a host batch in this GPU's memory (benchmarks and tests of the device path).
    pub fn upload(&self, batch: &BatchRef<'_>) -> Result<DeviceCopy> {
        let mut buffers = Vec::with_capacity(batch.layers.len());
        let mut layers = Vec::with_capacity(batch.layers.len());
        for s in &batch.layers {
            let buf = self
                .compute
                .clone_htod(s.bytes)
                .cu("uploading a device copy")?;
            let ptr = {
                let (ptr, _record) = buf.device_ptr(&self.compute);
                ptr
            };
            layers.push(DeviceLayer {
                ptr,
                cols: s.cols,
                dtype: s.dtype,
            });
            buffers.push(buf);
        }
        self.compute.synchronize().cu("synchronize")?;
        Ok(DeviceCopy {
            _buffers: buffers,
            batch: DeviceBatch {
                rows: batch.rows,
                layers,
            },
        })
    }

    /// [`CudaBackend::gram_route`], with every kernel timed when profiling (which waits for them).
    fn gram_route_timed(
        &mut self,
        batch: Input<'_>,
        estimator: Estimator,
        kernel: Kernel,
    ) -> Result<()> {
        if !self.profile {
            return self.gram_route(batch, estimator, kernel);
        }
        let ((), times) =
            kernels::kernel_times::record(|| self.gram_route(batch, estimator, kernel))?;
        self.last_kernels = times;
        Ok(())
    }

    /// With profiling on: the last batch's stage times, from its kernels' times.
    fn collect_stage_times(&mut self, wall: std::time::Instant) {
        if self.profile {
            let mut t = StageTimes::from_kernels(&self.last_kernels);
            t.wall_ms = wall.elapsed().as_secs_f64() * 1e3;
            self.last_times = Some(t);
        }
    }

    /// Upload layers `[start, end)` chunk by chunk and turn each into centred, packed Grams in G rows
    /// `g_row0 ..`. Uploads of chunk c+1 overlap the kernels of chunk c; the pinned slots alternate across
    /// calls too, so the next batch's first chunk uploads while this batch's last one computes.
    #[allow(clippy::too_many_arguments)]
    fn compute_block(
        &mut self,
        batch: Input<'_>,
        sizes: &[usize],
        start: usize,
        end: usize,
        g_row0: usize,
        estimator: Estimator,
        kernel: Kernel,
    ) -> Result<()> {
        // The workspace is taken out for the steps below (they borrow it beside `self`) and put back.
        let mut ws = self.ws.take().expect("workspace planned");
        let mut run = || -> Result<()> {
            let ti = self.tables_for(&mut ws, batch, sizes, start, end)?;
            for ci in 0..ws.tables[ti].1.chunks.len() {
                let slot = self.next_slot;
                self.next_slot ^= 1;
                let ch = ws.tables[ti].1.chunks[ci].clone();
                let span = ws.tables[ti].1.spans[ci];
                self.upload_chunk(&mut ws, slot, batch, sizes, &ch)?;
                self.launch_grams(&mut ws, slot, batch.rows(), ti, span)?;
                let row0 = g_row0 + ch.start - start;
                self.centre_and_pack(
                    &mut ws,
                    batch.rows(),
                    ch.end - ch.start,
                    row0,
                    estimator,
                    kernel,
                )?;
            }
            Ok(())
        };
        let res = run();
        self.ws = Some(ws);
        res
    }

    /// The index in `ws.tables` of the layer tables of block `[start, end)`, built and uploaded on first
    /// use (the workspace, and so its tables, is per batch shape).
    fn tables_for(
        &self,
        ws: &mut Workspace,
        batch: Input<'_>,
        sizes: &[usize],
        start: usize,
        end: usize,
    ) -> Result<usize> {
        if let Some(i) = ws.tables.iter().position(|(k, _)| *k == (start, end)) {
            return Ok(i);
        }
        let chunks = plan::chunks(sizes, start, end, ws.plan.stage_bytes, ws.plan.gram_layers);
        let (descs, spans) = layer_tables(batch, &chunks);
        let host_descs = descs;
        let descs = self
            .compute
            .clone_htod(&host_descs)
            .cu("uploading layer tables")?;
        ws.tables.push((
            (start, end),
            Tables {
                descs,
                host_descs,
                maps: None,
                chunks,
                spans,
            },
        ));
        Ok(ws.tables.len() - 1)
    }

    /// Steps 1 and 2 of a chunk: refill pinned slot `slot` once its previous upload has finished, then
    /// upload it on the copy stream after the kernels that last read this device slot. Layers a reader
    /// wrote into this backend's page-locked buffers are uploaded from there instead, without the host
    /// waiting (each buffer's `in_use` event makes its next write wait). Device input is copied device
    /// to device into the slot (the kernels centre the slot in place, never the caller's memory).
    fn upload_chunk(
        &self,
        ws: &mut Workspace,
        slot: usize,
        batch: Input<'_>,
        sizes: &[usize],
        ch: &plan::Chunk,
    ) -> Result<()> {
        let batch = match batch {
            Input::Host(b) => b,
            Input::Device(d) => {
                return self.copy_into_slot(ws, slot, ch, |dst, l| {
                    let layer = &d.layers[l];
                    let bytes = d.rows * layer.cols * layer.dtype.size();
                    // SAFETY: the slot holds ch.bytes ≥ offsets[k] + bytes; the source's validity for
                    // `bytes` is the caller's promise (`submit_device` is unsafe).
                    unsafe { cu::memcpy_dtod_async(dst, layer.ptr, bytes, self.copy.cu_stream()) }
                        .cu("copying device activations")
                });
            }
        };
        let locked: Option<Vec<Arc<PinnedBlock>>> = (ch.start..ch.end)
            .map(|l| block_holding(&self.locked, batch.layers[l].bytes))
            .collect();
        if let Some(blocks) = locked {
            self.copy_into_slot(ws, slot, ch, |dst, l| {
                // SAFETY: the slot holds ch.bytes ≥ offsets[k] + this layer's bytes; the source is
                // page-locked memory that stays alive and unwritten until `in_use`, recorded below, has
                // passed (PinnedBlock's Drop and every HostBytes write wait for it).
                unsafe { cu::memcpy_htod_async(dst, batch.layers[l].bytes, self.copy.cu_stream()) }
                    .cu("uploading activations")
            })?;
            for b in &blocks {
                b.in_use.record(&self.copy).cu("event record")?;
            }
            return Ok(());
        }
        ws.uploaded[slot]
            .synchronize()
            .cu("waiting for an upload")?;
        {
            let host = ws.staging[slot].as_mut_slice().cu("pinned staging")?;
            fill_staging(&mut host[..ch.bytes], batch, sizes, ch.start, ch.end);
        }
        self.copy.wait(&ws.consumed[slot]).cu("stream wait")?;
        {
            let host = ws.staging[slot].as_mut_slice().cu("pinned staging")?;
            let (dst, _record) = ws.dev_in[slot].device_ptr_mut(&self.copy);
            // SAFETY: `dst` holds stage_bytes ≥ ch.bytes; the pinned source stays alive and
            // untouched until `uploaded[slot]` completes (waited on before the next refill).
            unsafe { cu::memcpy_htod_async(dst, &host[..ch.bytes], self.copy.cu_stream()) }
                .cu("uploading activations")?;
        }
        ws.uploaded[slot].record(&self.copy).cu("event record")
    }

    /// Copy layers `ch.start..ch.end` into device slot `slot` on the copy stream, after the kernels that
    /// last read it: `copy(dst, l)` copies layer `l` to `dst`, its address in the slot. Then the slot is
    /// marked uploaded.
    fn copy_into_slot(
        &self,
        ws: &mut Workspace,
        slot: usize,
        ch: &plan::Chunk,
        mut copy: impl FnMut(u64, usize) -> Result<()>,
    ) -> Result<()> {
        self.copy.wait(&ws.consumed[slot]).cu("stream wait")?;
        {
            let (dst, _record) = ws.dev_in[slot].device_ptr_mut(&self.copy);
            for (k, l) in (ch.start..ch.end).enumerate() {
                copy(dst + ch.offsets[k] as u64, l)?;
            }
        }
        ws.uploaded[slot].record(&self.copy).cu("event record")
    }

    /// Step 3a: once slot `slot` is uploaded, subtract its layers' column means in place (16-bit layers
    /// become scaled f16, centre_columns.cu), then the Gram products (gram_fma for f32/f64 layers,
    /// gram_mma for 16-bit ones) into the Gram scratch.
    fn launch_grams(
        &mut self,
        ws: &mut Workspace,
        slot: usize,
        n: usize,
        ti: usize,
        span: ChunkSpan,
    ) -> Result<()> {
        self.compute.wait(&ws.uploaded[slot]).cu("stream wait")?;
        let n_i = n as i32;
        let (first, n_fma, n_mma) = (span.first, span.n_fma, span.n_mma);
        let layer0 = span.layer0 as i32;
        if n_mma > 0 && self.gram_kernel_in_use() == GramKernel::WgmmaTma {
            self.make_tensor_maps(ws, ti, n)?;
        }
        // Split-K (kernels/gram_linear.cu): plane z of the chunk's Grams is scratch slots z·nl.. .
        let nl = n_fma + n_mma;
        let splits = self.gram_splits_for(n, span, ws.plan.gram_layers / nl);
        let plane = (nl * n * n) as u64;
        let (flags, first_sample) = self
            .nonfinite
            .as_mut()
            .expect("the Gram route's caller sets the non-finite flags");
        let descs = &ws.tables[ti].1.descs;
        let all = descs.slice(first * 3..(first + n_fma + n_mma) * 3);
        let sixteen = descs.slice((first + n_fma) * 3..(first + n_fma + n_mma) * 3);
        self.compute
            .memset_zeros(&mut ws.col_scale)
            .cu("clearing the column scales")?;
        // SAFETY: the table slices hold 3 words per layer of the launch; buffers sized by the plan, the
        // Gram scratch holding gram_layers ≥ splits·nl Grams.
        unsafe {
            self.k.column_centre.launch(
                &self.compute,
                grid(span.max_cols.div_ceil(256), n_fma + n_mma, 1, 256),
                &mut ws.dev_in[slot],
                &all,
                n_i,
                &mut ws.col_scale,
                flags,
                *first_sample,
                layer0,
            )?;
            if n_mma > 0 {
                self.k.column_to_f16.launch(
                    &self.compute,
                    grid(span.max_cols_16.div_ceil(256), n_mma, 1, 256),
                    &mut ws.dev_in[slot],
                    &sixteen,
                    n_i,
                    &mut ws.col_scale,
                )?;
            }
            if n_fma > 0 {
                let table = descs.slice(first * 3..(first + n_fma) * 3);
                self.k.gram_fma.launch(
                    &self.compute,
                    grid(tri(n.div_ceil(64)), n_fma, splits, 256),
                    &ws.dev_in[slot],
                    &table,
                    n_i,
                    plane,
                    &mut ws.gram,
                )?;
            }
            if n_mma > 0 {
                // The 16-bit layers are f16 now, whatever their table's dtype (which column_to_f16 read).
                let as_f16 = 1i32;
                let mut cfg = grid(tri(n.div_ceil(128)), n_mma, splits, 256);
                let kernel = self.gram_kernel_in_use();
                if kernel.is_wgmma() {
                    cfg.shared_mem_bytes = WGMMA_SHARED as u32;
                }
                match kernel {
                    GramKernel::WgmmaTma => {
                        let maps = ws.tables[ti].1.maps.as_ref().expect("made above");
                        let maps = maps[slot].slice(
                            (first + n_fma) * TENSOR_MAP_BYTES
                                ..(first + n_fma + n_mma) * TENSOR_MAP_BYTES,
                        );
                        self.k.gram_wgmma_tma.launch(
                            &self.compute,
                            cfg,
                            &ws.dev_in[slot],
                            &sixteen,
                            n_i,
                            as_f16,
                            plane,
                            &maps,
                            &mut ws.gram,
                        )?;
                    }
                    GramKernel::Mma | GramKernel::MmaPipelined | GramKernel::Wgmma => {
                        let f = match kernel {
                            GramKernel::MmaPipelined => &self.k.gram_mma_pipelined,
                            GramKernel::Wgmma => &self.k.gram_wgmma,
                            _ => &self.k.gram_mma,
                        };
                        f.launch(
                            &self.compute,
                            cfg,
                            &ws.dev_in[slot],
                            &sixteen,
                            n_i,
                            as_f16,
                            plane,
                            &mut ws.gram,
                        )?;
                    }
                }
            }
            if splits > 1 {
                self.k.gram_reduce_splits.launch(
                    &self.compute,
                    grid((plane as usize).div_ceil(256), 1, 1, 256),
                    &mut ws.gram,
                    plane,
                    splits as i32,
                )?;
            }
        }
        ws.consumed[slot].record(&self.compute).cu("event record")
    }

    /// The tensor maps of tables `ti` for both upload slots (`gram_wgmma_tma`), made and uploaded on first
    /// use.
    fn make_tensor_maps(&self, ws: &mut Workspace, ti: usize, rows: usize) -> Result<()> {
        if ws.tables[ti].1.maps.is_none() {
            let descs = &ws.tables[ti].1.host_descs;
            let maps_of = |slot: &CudaSlice<u8>| -> Result<CudaSlice<u8>> {
                let base = {
                    let (ptr, _record) = slot.device_ptr(&self.compute);
                    ptr
                };
                let bytes = tensor_maps(descs, base, rows)?;
                self.compute.clone_htod(&bytes).cu("uploading tensor maps")
            };
            let maps = [maps_of(&ws.dev_in[0])?, maps_of(&ws.dev_in[1])?];
            ws.tables[ti].1.maps = Some(maps);
        }
        Ok(())
    }

    /// The split-K factor of a chunk's Gram launches (one for both, so they share the planes): what the
    /// worse-filled launch needs ([`plan::gram_splits`]), or the fixed factor, within `planes`.
    fn gram_splits_for(&self, n: usize, span: ChunkSpan, planes: usize) -> usize {
        if let Some(s) = self.gram_splits {
            return s.min(planes).max(1);
        }
        let launches = [
            (span.n_fma, tri(n.div_ceil(64))),
            (span.n_mma, tri(n.div_ceil(128))),
        ];
        let blocks = launches
            .iter()
            .filter(|(layers, _)| *layers > 0)
            .map(|(layers, tiles)| layers * tiles)
            .min()
            .unwrap_or(0);
        plan::gram_splits(self.sms, blocks, span.max_cols, planes)
    }

    /// Step 3b: the `nl` Grams in the scratch become (RBF kernels, then) centred, packed rows of G
    /// from `row0`.
    fn centre_and_pack(
        &mut self,
        ws: &mut Workspace,
        n: usize,
        nl: usize,
        row0: usize,
        estimator: Estimator,
        kernel: Kernel,
    ) -> Result<()> {
        self.rbf_stage(ws, n, nl, kernel)?;
        self.centre_stage(ws, n, nl, row0, estimator, kernel)
    }

    /// With the RBF kernel: the `nl` Grams in the scratch become RBF kernel matrices.
    fn rbf_stage(&self, ws: &mut Workspace, n: usize, nl: usize, kernel: Kernel) -> Result<()> {
        if let Kernel::Rbf { threshold } = kernel {
            rbf_in_place(
                &self.k,
                &self.compute,
                self.sms,
                &mut ws.gram,
                &mut ws.diag,
                &mut ws.select_state,
                &mut ws.select_hist,
                n,
                nl,
                threshold,
            )?;
        }
        Ok(())
    }

    /// The `nl` (kernel) matrices in the scratch become centred, packed rows of G from `row0`.
    fn centre_stage(
        &self,
        ws: &mut Workspace,
        n: usize,
        nl: usize,
        row0: usize,
        estimator: Estimator,
        kernel: Kernel,
    ) -> Result<()> {
        let p = plan::packed_len(n);
        let unbiased = i32::from(estimator == Estimator::Unbiased);
        // A linear Gram of rescaled f16 layers is scaled back; an RBF kernel matrix does not depend on it.
        let unscale = i32::from(kernel == Kernel::Linear);
        let (n_i, row0, p64) = (n as i32, row0 as u64, p as u64);
        // SAFETY: buffers sized by the plan (gram_layers ≥ nl).
        unsafe {
            let s = &self.compute;
            let k = &self.k;
            k.gram_row_sums.launch(
                s,
                grid(n.div_ceil(8), nl, 1, 256),
                &ws.gram,
                n_i,
                unbiased,
                &mut ws.rowsum,
            )?;
            k.centre_offsets.launch(
                s,
                grid(nl, 1, 1, 256),
                &ws.rowsum,
                n_i,
                unbiased,
                &mut ws.offsets,
            )?;
            k.centre_pack.launch(
                s,
                grid(p.div_ceil(256), nl, 1, 256),
                &ws.gram,
                &ws.offsets,
                n_i,
                unbiased,
                &ws.col_scale,
                unscale,
                &mut ws.g,
                row0,
                p64,
            )?;
        }
        Ok(())
    }

    /// out[row0 + a, col0 + b] += ⟨G[ga + a], G[gb + b]⟩ for a < la, b < lb (tri: ga == gb, la == lb,
    /// lower tiles only).
    #[allow(clippy::too_many_arguments)]
    fn pairs(
        &mut self,
        n: usize,
        l: usize,
        ga: usize,
        la: usize,
        gb: usize,
        lb: usize,
        row0: usize,
        col0: usize,
        tri_only: bool,
    ) -> Result<()> {
        let p = plan::packed_len(n);
        let tiles = if tri_only {
            tri(la.div_ceil(32))
        } else {
            la.div_ceil(32) * lb.div_ceil(32)
        };
        // Split p so that about 4 blocks per SM run, in steps of at least 1024 (whole 32-wide steps).
        let splits = (4 * self.sms)
            .div_ceil(tiles)
            .clamp(1, p.div_ceil(1024))
            .min(
                self.ws
                    .as_ref()
                    .expect("workspace planned")
                    .plan
                    .pair_splits,
            );
        let chunk = p.div_ceil(splits).div_ceil(32) * 32;
        let cfg = grid(p.div_ceil(chunk), tiles, 1, 256);
        let ws = self.ws.as_mut().expect("workspace planned");
        let a = ws.g.slice(ga * p..(ga + la) * p);
        let b = ws.g.slice(gb * p..(gb + lb) * p);
        let (la_i, lb_i, l_i) = (la as i32, lb as i32, l as i32);
        let (r0, c0, t) = (row0 as i32, col0 as i32, i32::from(tri_only));
        let (p64, chunk64) = (p as u64, chunk as u64);
        // SAFETY: the views hold la·P and lb·P elements, `partials` splits·L².
        unsafe {
            self.k.hsic_pairs.launch(
                &self.compute,
                cfg,
                &a,
                la_i,
                &b,
                lb_i,
                p64,
                chunk64,
                &mut ws.partials,
                l_i,
                r0,
                c0,
                t,
            )
        }
    }
}

/// A device copy of a host batch ([`CudaBackend::upload`]); its memory lives as long as this value.
pub struct DeviceCopy {
    _buffers: Vec<CudaSlice<u8>>,
    pub batch: DeviceBatch,
}

/// What the Gram route reads: a host batch (uploaded through the pinned slots) or a device batch.
#[derive(Clone, Copy)]
enum Input<'a> {
    Host(&'a BatchRef<'a>),
    Device(&'a DeviceBatch),
}

impl Input<'_> {
    fn rows(&self) -> usize {
        match self {
            Input::Host(b) => b.rows,
            Input::Device(d) => d.rows,
        }
    }

    fn layers(&self) -> usize {
        match self {
            Input::Host(b) => b.layers.len(),
            Input::Device(d) => d.layers.len(),
        }
    }

    /// Layer `l`'s (cols, dtype).
    fn layer(&self, l: usize) -> (usize, DType) {
        match self {
            Input::Host(b) => (b.layers[l].cols, b.layers[l].dtype),
            Input::Device(d) => (d.layers[l].cols, d.layers[l].dtype),
        }
    }
}

/// The error for the first layer (in order) whose flags (column_centre's ~sample, 0 = none) record a NaN or
/// Inf, naming the layer and its first bad sample.
fn check_nonfinite(flags: &[u64], names: Option<&[String]>) -> Result<()> {
    match flags.iter().position(|&f| f != 0) {
        None => Ok(()),
        Some(l) => {
            let name = names
                .and_then(|n| n.get(l).cloned())
                .unwrap_or_else(|| format!("#{l}"));
            Err(Error::invalid(format!(
                "layer '{name}': NaN or Inf in activations (first bad sample: {})",
                !flags[l]
            )))
        }
    }
}

/// The layer tables of one block of layers, on the device, with its upload chunks.
struct Tables {
    descs: CudaSlice<u64>,
    /// The same words on the host (what the tensor maps are made from).
    host_descs: Vec<u64>,
    /// Once `gram_wgmma_tma` has run on these tables: per upload slot, a tensor map per table entry
    /// (zeros for entries it does not read through one).
    maps: Option<[CudaSlice<u8>; 2]>,
    chunks: Vec<plan::Chunk>,
    spans: Vec<ChunkSpan>,
}

/// Where a chunk's layers are in its block's table: entries `first ..` hold `n_fma` f32/f64 layers, then
/// `n_mma` 16-bit ones; the widest layer of the chunk and the widest 16-bit one (grids of one thread per
/// column).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ChunkSpan {
    /// The chunk's first layer (its layer k is batch layer `layer0 + k`).
    layer0: usize,
    first: usize,
    n_fma: usize,
    n_mma: usize,
    max_cols: usize,
    max_cols_16: usize,
}

/// The layer tables of every chunk, for one upload: per layer 3 words (its offset in the upload slot,
/// its Gram's offset in the scratch, `cols | dtype << 32`), f32/f64 layers first, then 16-bit ones; and per
/// chunk where its entries are.
fn layer_tables(batch: Input<'_>, chunks: &[plan::Chunk]) -> (Vec<u64>, Vec<ChunkSpan>) {
    let nn = batch.rows() * batch.rows();
    let mut descs: Vec<u64> = Vec::new();
    let mut spans = Vec::with_capacity(chunks.len());
    for ch in chunks {
        let first = descs.len() / 3;
        let mut push = |sixteen: bool| {
            let (mut count, mut widest) = (0, 0);
            for (k, l) in (ch.start..ch.end).enumerate() {
                let (cols, dtype) = batch.layer(l);
                if dtype.is_16bit() == sixteen {
                    descs.extend([
                        ch.offsets[k] as u64,
                        (k * nn) as u64,
                        cols as u64 | (dtype_code(dtype) << 32),
                    ]);
                    count += 1;
                    widest = widest.max(cols);
                }
            }
            (count, widest)
        };
        let (n_fma, max_fma) = push(false);
        let (n_mma, max_cols_16) = push(true);
        spans.push(ChunkSpan {
            layer0: ch.start,
            first,
            n_fma,
            n_mma,
            max_cols: max_fma.max(max_cols_16),
            max_cols_16,
        });
    }
    (descs, spans)
}

/// The tensor maps of a table's entries (`layer_tables`' 3 words each) for the upload slot at device
/// address `base`: each 16-bit layer whose rows `gram_wgmma_tma` reads by TMA (16-byte aligned,
/// `cols % 8 == 0`) gets its map, the others zeros (that kernel stages them otherwise).
fn tensor_maps(descs: &[u64], base: u64, rows: usize) -> Result<Vec<u8>> {
    let mut out = vec![0u8; descs.len() / 3 * TENSOR_MAP_BYTES];
    for (e, d) in descs.chunks_exact(3).enumerate() {
        let (in_off, cols, code) = (d[0], (d[2] & 0xffff_ffff) as usize, d[2] >> 32);
        let sixteen = code == dtype_code(DType::F16) || code == dtype_code(DType::BF16);
        if sixteen && cols % 8 == 0 && in_off % 16 == 0 && rows > 0 {
            let map = tensor_map_16bit(base + in_off, rows, cols)?;
            out[e * TENSOR_MAP_BYTES..(e + 1) * TENSOR_MAP_BYTES].copy_from_slice(&map);
        }
    }
    Ok(out)
}

/// Copy layers `[start, end)` of the batch into the staging slot (layer l at its 16-byte-aligned offset,
/// `sizes[l]` bytes apart), in parallel: one thread copies at a few GB/s, below the PCIe rate.
fn fill_staging(host: &mut [u8], batch: &BatchRef<'_>, sizes: &[usize], start: usize, end: usize) {
    use rayon::prelude::*;
    const PIECE: usize = 1 << 20;
    let mut rest = host;
    let mut pieces: Vec<(&mut [u8], &[u8])> = Vec::new();
    for l in start..end {
        let (slot, tail) = std::mem::take(&mut rest).split_at_mut(sizes[l]);
        rest = tail;
        let src = batch.layers[l].bytes;
        pieces.extend(slot[..src.len()].chunks_mut(PIECE).zip(src.chunks(PIECE)));
    }
    pieces
        .into_par_iter()
        .for_each(|(dst, src)| dst.copy_from_slice(src));
}

/// RBF kernel matrices in place on the `nl` Grams in `gram` (see kernels/rbf.cu).
#[allow(clippy::too_many_arguments)]
fn rbf_in_place(
    k: &CkaKernels,
    s: &Arc<CudaStream>,
    sms: usize,
    gram: &mut CudaSlice<f32>,
    diag: &mut CudaSlice<f32>,
    state: &mut CudaSlice<u32>,
    hist: &mut CudaSlice<u32>,
    n: usize,
    nl: usize,
    threshold: f64,
) -> Result<()> {
    let nn = n * n;
    let (n_i, nl_i, nn64) = (n as i32, nl as i32, nn as u64);
    s.memset_zeros(hist).cu("clearing histograms")?;
    let hist_blocks = nn.div_ceil(256 * 16).clamp(1, (2 * sms).max(1));
    // SAFETY: buffers hold gram_layers ≥ nl layers.
    unsafe {
        let diag_cfg = grid(n.div_ceil(256), nl, 1, 256);
        k.rbf_copy_diag
            .launch(s, diag_cfg, &*gram, n_i, &mut *diag)?;
        let elems = grid(nn.div_ceil(256), nl, 1, 256);
        k.rbf_sqdist.launch(s, elems, &mut *gram, &*diag, n_i)?;
        let init_cfg = grid(1, 1, 1, (2 * nl).div_ceil(32) as u32 * 32);
        k.rbf_select_init
            .launch(s, init_cfg, &mut *state, nl_i, nn64)?;
        for (shift, bits) in [(21i32, 11i32), (10, 11), (0, 10)] {
            k.rbf_select_hist.launch(
                s,
                grid(hist_blocks, nl, 2, 256),
                &*gram,
                nn64,
                &*state,
                &mut *hist,
                shift,
                bits,
            )?;
            k.rbf_select_step.launch(
                s,
                grid(2 * nl, 1, 1, 32),
                &mut *state,
                &mut *hist,
                shift,
                bits,
            )?;
        }
        k.rbf_exp
            .launch(s, elems, &mut *gram, nn64, &*state, threshold)?;
    }
    Ok(())
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn page_locked_batch(&mut self, layers: &[LayerMeta], rows: usize) -> Option<Batch> {
        let bytes = |l: &LayerMeta| rows * l.cols * l.dtype.size();
        let total: usize = layers.iter().map(bytes).sum();
        let available = super::available_memory().unwrap_or(u64::MAX) / PAGE_LOCKED_CHUNK_MAX_SHARE;
        if total == 0 || total > PAGE_LOCKED_CHUNK_MAX_BYTES || total as u64 > available {
            return None;
        }
        self.locked.retain(|w| w.strong_count() > 0);
        let mut blocks = Vec::with_capacity(layers.len());
        for l in layers {
            // A failed allocation (page-locked memory is limited) leaves the reader its heap buffers.
            let block = Arc::new(PinnedBlock::new(&self.ctx, bytes(l).max(1)).ok()?);
            let weak = Arc::downgrade(&block);
            let data = HostBytes::page_locked(block).expect("a new block has one owner");
            self.locked.push(weak);
            blocks.push(LayerBlock {
                dtype: l.dtype,
                cols: l.cols,
                data,
            });
        }
        Some(Batch {
            rows: 0,
            layers: blocks,
        })
    }

    fn batch_hsic(
        &mut self,
        batch: &BatchRef<'_>,
        estimator: Estimator,
        kernel: Kernel,
    ) -> Result<Vec<f64>> {
        let (n, l) = (batch.rows, batch.layers.len());
        let wall = std::time::Instant::now();
        let flags = self
            .compute
            .alloc_zeros::<u64>(l.max(1))
            .cu("allocating non-finite flags")?;
        self.nonfinite = Some((flags, 0));
        let routed = self.gram_route_timed(Input::Host(batch), estimator, kernel);
        let (flags, _) = self.nonfinite.take().expect("set above");
        routed?;
        let ws = self.ws.as_ref().expect("workspace planned");
        let raw = self
            .compute
            .clone_dtoh(&ws.out)
            .cu("downloading the result")?;
        let flags = self
            .compute
            .clone_dtoh(&flags)
            .cu("downloading non-finite flags")?;
        self.compute.synchronize().cu("synchronize")?;
        check_nonfinite(&flags, None)?;
        self.collect_stage_times(wall);
        let scale = 2.0 / normaliser(estimator, n);
        let mut h = vec![0.0f64; l * l];
        for i in 0..l {
            for j in 0..=i {
                let v = raw[i * l + j] * scale;
                h[i * l + j] = v;
                h[j * l + i] = v;
            }
        }
        Ok(h)
    }

    fn submit(
        &mut self,
        sum: &mut HsicSum,
        batch: &BatchRef<'_>,
        estimator: Estimator,
        kernel: Kernel,
    ) -> Result<()> {
        self.submit_input(sum, Input::Host(batch), estimator, kernel)
    }

    fn as_cuda(&mut self) -> Option<&mut CudaBackend> {
        Some(self)
    }

    fn finish_sum(&mut self, sum: HsicSum) -> Result<Vec<f64>> {
        let slot = sum.device_slot;
        let names = sum.names().map(<[String]>::to_vec);
        let mut total = sum.into_host();
        if let Some(i) = slot {
            let (buf, flags) = self
                .sums
                .get_mut(i)
                .and_then(Option::take)
                .ok_or_else(|| Error::invalid("this HSIC sum was already finished"))?;
            let dev = self
                .compute
                .clone_dtoh(&buf)
                .cu("downloading the HSIC sum")?;
            let flags = self
                .compute
                .clone_dtoh(&flags)
                .cu("downloading non-finite flags")?;
            self.compute.synchronize().cu("synchronize")?;
            check_nonfinite(&flags, names.as_deref())?;
            for (t, v) in total.iter_mut().zip(&dev) {
                *t += v;
            }
        }
        Ok(total)
    }

    fn accumulate_cross(&mut self, batch: &BatchRef<'_>, cross: &mut [f64]) -> Result<()> {
        // ZᵀZ in f64 on the device (feature_cross.cu): Z is built on the host as the CPU backend builds
        // it, uploaded, the lower tiles computed, downloaded and mirrored into `cross`.
        let n = batch.rows;
        let (z, dtot) = stacked_f64(batch);
        if cross.len() != dtot * dtot {
            return Err(Error::invalid(format!(
                "feature route: a {dtot}×{dtot} cross product into {} values",
                cross.len()
            )));
        }
        if n == 0 || dtot == 0 {
            return Ok(());
        }
        let (n_i, d_i) = (n as i32, dtot as i32);
        let z_dev = self
            .compute
            .clone_htod(&z)
            .cu("uploading the feature batch")?;
        let mut c_dev = self.compute.alloc_zeros::<f64>(dtot * dtot).cu(&format!(
            "allocating the {dtot}×{dtot} feature cross product ({} MiB)",
            (dtot * dtot * 8) >> 20
        ))?;
        // SAFETY: `z_dev` holds n·D f64, `c_dev` D·D.
        unsafe {
            self.k.cross_f64.launch(
                &self.compute,
                grid(tri(dtot.div_ceil(64)), 1, 1, 256),
                &z_dev,
                n_i,
                d_i,
                &mut c_dev,
            )?;
        }
        let c = self
            .compute
            .clone_dtoh(&c_dev)
            .cu("downloading the feature cross product")?;
        self.compute.synchronize().cu("synchronize")?;
        for i in 0..dtot {
            for j in 0..i {
                let v = c[i * dtot + j];
                cross[i * dtot + j] += v;
                cross[j * dtot + i] += v;
            }
            cross[i * dtot + i] += c[i * dtot + i];
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::Batch;

    /// The backends may move to another thread (read on one, compute on another): checked at compile time.
    #[test]
    fn backends_are_send() {
        fn send<T: Send>() {}
        send::<CudaBackend>();
        send::<crate::similarity::cpu::CpuBackend>();
    }

    /// SGLP_GRAM_KERNEL / SGLP_LINEAR_KERNEL: unset or empty gives the default, a listed spelling its
    /// choice, anything else an error naming the variable, the value and the spellings.
    #[test]
    fn a_misspelt_kernel_choice_is_an_error() {
        let choices = [("mma", GramKernel::Mma), ("wgmma", GramKernel::Wgmma)];
        let pick = |v| choice_of("SGLP_GRAM_KERNEL", v, &choices, GramKernel::Mma);
        assert_eq!(pick(None).unwrap(), GramKernel::Mma);
        assert_eq!(pick(Some("")).unwrap(), GramKernel::Mma);
        assert_eq!(pick(Some("wgmma")).unwrap(), GramKernel::Wgmma);
        assert_eq!(pick(Some("mma")).unwrap(), GramKernel::Mma);
        let e = pick(Some("wgma")).unwrap_err().to_string();
        assert!(
            e.contains("SGLP_GRAM_KERNEL=wgma") && e.contains("mma, wgmma"),
            "{e}"
        );
    }

    #[test]
    fn hopper_builds_for_sm90a_with_nvrtc_12_or_newer() {
        assert_eq!(kernel_arch(9, 0, Some((12, 9))), "sm_90a");
        assert_eq!(kernel_arch(9, 0, Some((13, 0))), "sm_90a");
        assert_eq!(kernel_arch(9, 0, Some((11, 8))), "sm_90");
        assert_eq!(kernel_arch(9, 0, None), "sm_90");
        assert_eq!(kernel_arch(8, 0, Some((12, 9))), "sm_80");
        assert_eq!(kernel_arch(10, 0, Some((13, 0))), "sm_100");
    }

    #[test]
    fn staging_places_each_layer_at_its_aligned_offset() {
        // Three layers of odd byte widths (not multiples of 16), more than one 1 MiB piece for one.
        let n = 3;
        let widths = [5usize, 100_003, 7];
        let data: Vec<Vec<f32>> = widths
            .iter()
            .enumerate()
            .map(|(l, &w)| (0..n * w).map(|i| (i * 7 + l) as f32).collect())
            .collect();
        let batch = Batch::from_f32(
            n,
            &[
                (widths[0], &data[0]),
                (widths[1], &data[1]),
                (widths[2], &data[2]),
            ],
        );
        let b = batch.as_ref();
        let sizes: Vec<usize> = widths
            .iter()
            .map(|&w| plan::layer_bytes(n, w * 4, 1))
            .collect();
        let chunks = plan::chunks(&sizes, 0, 3, sizes.iter().sum(), 8);
        assert_eq!(chunks.len(), 1);
        let ch = &chunks[0];
        let mut host = vec![0xAAu8; ch.bytes];
        fill_staging(&mut host, &b, &sizes, ch.start, ch.end);
        for (k, l) in (ch.start..ch.end).enumerate() {
            assert_eq!(ch.offsets[k] % 16, 0);
            let src = b.layers[l].bytes;
            assert_eq!(&host[ch.offsets[k]..ch.offsets[k] + src.len()], src);
        }
        // A chunk starting past layer 0 fills from its own first layer.
        let tail = plan::chunks(&sizes, 1, 3, sizes.iter().sum(), 8);
        let mut host = vec![0u8; tail[0].bytes];
        fill_staging(&mut host, &b, &sizes, 1, 3);
        assert_eq!(&host[..b.layers[1].bytes.len()], b.layers[1].bytes);
        assert_eq!(
            &host[tail[0].offsets[1]..tail[0].offsets[1] + b.layers[2].bytes.len()],
            b.layers[2].bytes
        );
    }
}
