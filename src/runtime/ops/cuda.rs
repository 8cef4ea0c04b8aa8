//! The runtime on a GPU: [`CudaDevice`] implements [`Device`] with the hand-written kernels of
//! `kernels/runtime_*.cu` (compiled by NVRTC for the device's architecture and cached on disk, through the
//! similarity backend's loader, [`crate::similarity::cuda::nvrtc`]).
//!
//! * Storage: [`Buf`] owns a `cudarc` device buffer of f32 and dereferences to it (`Slice` is
//!   `CudaSlice<f32>`); a parameter is an `Arc` of a device buffer from the weight cache; [`Ids`] are i64
//!   on the device with a host copy (the loss needs the number of predicted rows).
//! * Kernels, side by side forward and backward as in llm.c: elementwise ops and the f64 sum of squares
//!   (runtime_elementwise.cu), embedding (backward with atomicAdd), RMSNorm (f64 row reductions, the weight
//!   gradient reduced deterministically in row chunks, no atomics), rotary embedding, softmax
//!   cross-entropy (f64 row sums, the per-row losses summed on the host in row order), causal GQA
//!   attention with an optional window (flash-style: per-row log-sum-exp, probabilities recomputed by the
//!   backward; one warp per row, deterministic; in [`Matmul::Bf16`] mode with head dimension 64 or 128
//!   forward and backward run on tensor cores, runtime_attention_mma.cu) and the linear layer's three
//!   products: on tensor cores with bf16 operands and f32 accumulation ([`Matmul::Bf16`], the default),
//!   or as f32 tiled SIMT GEMMs ([`Matmul::F32`], [`CudaDevice::set_matmul`]). On Hopper the bf16
//!   products have a candidate second form, [`LinearKernel::Wgmma`]: the operands converted (and
//!   transposed where needed) to bf16 copies in scratch buffers, then warpgroup MMA.
//! * Weights: [`Device::param`] converts the host parameter to f32 and uploads it once; a linear layer's
//!   weight ([`Device::weight`], a [`CudaWeight`]) is that f32 copy in [`Matmul::F32`] mode and a bf16
//!   copy in [`Matmul::Bf16`] mode (half the device memory and the upload: a bf16 checkpoint's bits as
//!   stored, others rounded on the host as they are staged). Uploaded weights are cached by name and
//!   representation. When the model does not fit the weight budget ([`CudaDevice::set_weight_budget`],
//!   by default half the free memory at open), [`WeightWindow`] keeps a window of parameter groups: the
//!   group being computed and the next one, which [`Device::prefetch`] (called by the tape one group
//!   ahead) uploads on a separate copy stream through two pinned staging buffers (double-buffered: the
//!   host fills one while the other is copied), evicting the least recently used weights outside the
//!   window. The compute stream waits for a weight's copy through cudarc's per-buffer events.
//!
//! Every op returns a [`Result`]; nothing here calls into CUDA before [`CudaDevice::open`] has found a
//! driver, a GPU and NVRTC (cudarc panics on a missing library).

use super::{
    row_scale_rows, Activation, AttnShape, ColumnBlocks, Device, Matmul, NormShape, ParamUse,
    RopePairs, RopeTable, Xielu,
};
use crate::error::{Error, Result};
use crate::runtime::tape::ParamStore;
use crate::similarity::cuda::kernels::{self, Binary, Kernel, RuntimeKernels};
use crate::similarity::cuda::nvrtc::fnv1a;
use crate::similarity::cuda::{env_choice, open_gpu, CuResult, OpenGpu, WGMMA_SHARED};
use cudarc::driver::{
    result as cu, CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtrMut, LaunchConfig,
    PinnedHostSlice,
};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// The largest head dimension the attention kernels take (`ATT_MAXD` in runtime_attention.cu).
pub const MAX_HEAD_DIM: usize = 256;
/// Threads per block of the row and elementwise kernels.
const THREADS: u32 = 256;
/// Query rows (warps) per block of the attention kernels.
const ATT_WARPS: usize = 4;
/// Query (or key) rows per block of the tensor-core attention kernels (`FA_Q` in
/// runtime_attention_mma.cu).
const FA_QUERIES: usize = 64;
/// Threads per block of the tensor-core attention kernels (4 warps, `__launch_bounds__(128)`).
const FA_THREADS: u32 = 128;
/// Dims of dk, dv per block of the tensor-core attention backward (`FB_DIMS`).
const FA_BACKWARD_DIMS: usize = 64;
/// Tile of the f32 linear kernels' output (`LIN_BM`, `LIN_BN` in runtime_linear.cu).
const LIN_TILE: usize = 64;
/// Tile of the tensor-core linear kernels' output (`MM` in kernels/mma.cuh).
const LIN_MMA_TILE: usize = 128;
/// Rows per chunk of the RMSNorm weight-gradient reduction.
const RMS_ROWS_PER_CHUNK: usize = 64;
/// f32 values per pinned staging slot of the weight uploads (16 MiB).
const STAGE: usize = 1 << 22;

/// A device buffer of f32 owned by the tape (dereferences to the `CudaSlice` the ops take).
#[derive(Debug)]
pub struct Buf(CudaSlice<f32>);

impl std::ops::Deref for Buf {
    type Target = CudaSlice<f32>;
    fn deref(&self) -> &CudaSlice<f32> {
        &self.0
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut CudaSlice<f32> {
        &mut self.0
    }
}

/// Token ids or targets (−1: none) on the device, with their host copy.
#[derive(Debug)]
pub struct Ids {
    dev: CudaSlice<i64>,
    host: Vec<i64>,
}

impl Ids {
    pub fn len(&self) -> usize {
        self.host.len()
    }
    pub fn is_empty(&self) -> bool {
        self.host.is_empty()
    }
    /// The values, as uploaded.
    pub fn host(&self) -> &[i64] {
        &self.host
    }
}

// ---------------------------------------------------------------------------------------------------------
// The weight window: which weights stay on the device (host-side logic, no CUDA)
// ---------------------------------------------------------------------------------------------------------

/// Which weights are resident on the device under a byte budget. The tape announces each parameter group
/// one group ahead ([`WeightWindow::announce`]); the window protects the group being computed (the
/// previous announcement) and the announced one, and when a new weight does not fit
/// ([`WeightWindow::admit`]) evicts the least recently used weights outside them. While everything fits,
/// nothing is evicted: every weight is uploaded once. The budget is soft for the protected window: a
/// weight the ops need is admitted even when the window alone exceeds the budget.
#[derive(Debug, Default)]
pub struct WeightWindow {
    budget: usize,
    used: usize,
    clock: u64,
    /// name → (bytes, last use).
    entries: HashMap<String, (usize, u64)>,
    current: Vec<String>,
    next: Vec<String>,
}

impl WeightWindow {
    pub fn new(budget: usize) -> Self {
        WeightWindow {
            budget,
            ..Default::default()
        }
    }
    pub fn budget(&self) -> usize {
        self.budget
    }
    /// Change the budget; returns the weights to evict to meet it (outside the window).
    pub fn set_budget(&mut self, budget: usize) -> Vec<String> {
        self.budget = budget;
        self.make_room(0, None)
    }
    /// Bytes resident.
    pub fn used(&self) -> usize {
        self.used
    }
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// Record a use of a resident weight (for the least-recently-used order).
    pub fn touch(&mut self, name: &str) {
        self.clock += 1;
        if let Some(e) = self.entries.get_mut(name) {
            e.1 = self.clock;
        }
    }
    /// The next group's parameters, in the order they will be read: the previously announced group
    /// becomes the current one. Returns those of `names` not resident, to upload now (in order, once).
    pub fn announce(&mut self, names: &[&str]) -> Vec<String> {
        self.current = std::mem::take(&mut self.next);
        self.next = names.iter().map(|s| s.to_string()).collect();
        let mut seen = HashSet::new();
        names
            .iter()
            .filter(|n| !self.entries.contains_key(**n) && seen.insert(**n))
            .map(|n| n.to_string())
            .collect()
    }
    /// Record `name` (`bytes`) as resident; returns the weights to evict first (least recently used
    /// first, never `name` nor the current or announced group).
    pub fn admit(&mut self, name: &str, bytes: usize) -> Vec<String> {
        if let Some((b, _)) = self.entries.remove(name) {
            self.used -= b;
        }
        let evict = self.make_room(bytes, Some(name));
        self.clock += 1;
        self.entries.insert(name.to_string(), (bytes, self.clock));
        self.used += bytes;
        evict
    }
    /// Evict (least recently used first, outside the window and `keep`) until `extra` more bytes fit.
    fn make_room(&mut self, extra: usize, keep: Option<&str>) -> Vec<String> {
        let mut evict = Vec::new();
        if self.used + extra <= self.budget {
            return evict;
        }
        let protected: HashSet<&str> = self
            .current
            .iter()
            .chain(&self.next)
            .map(String::as_str)
            .chain(keep)
            .collect();
        let mut candidates: Vec<(u64, &String, usize)> = self
            .entries
            .iter()
            .filter(|(n, _)| !protected.contains(n.as_str()))
            .map(|(n, &(b, t))| (t, n, b))
            .collect();
        candidates.sort();
        let mut used = self.used;
        for (_, n, b) in candidates {
            if used + extra <= self.budget {
                break;
            }
            used -= b;
            evict.push(n.clone());
        }
        for n in &evict {
            self.entries.remove(n);
        }
        self.used = used;
        evict
    }
}

// ---------------------------------------------------------------------------------------------------------
// The device
// ---------------------------------------------------------------------------------------------------------

/// The weight cache: the resident weights, their window, the pinned staging slots of the uploads.
struct Weights {
    window: WeightWindow,
    /// By [`cache_key`]: the parameter's name, and its representation.
    resident: HashMap<String, CudaWeight>,
    /// Two pinned slots and, per slot, an event recorded after the copy that reads it.
    staging: Vec<(PinnedHostSlice<f32>, CudaEvent)>,
    next_slot: usize,
    /// The [`ParamStore::id`] of the store the cached weights came from (a new store empties the cache).
    store: u64,
    uploads: usize,
}

impl Drop for Weights {
    /// The pinned staging slots are freed only once no upload reads them.
    fn drop(&mut self) {
        for (_, copied) in &self.staging {
            crate::similarity::cuda::wait_for(copied);
        }
    }
}

/// A parameter on the GPU: f32 values, or a linear layer's weight rounded to bf16 for the tensor-core
/// products ([`Matmul::Bf16`]). In [`Matmul::F32`] mode a weight is its f32 parameter (one copy, shared
/// with any use as values, such as a tied embedding).
#[derive(Clone, Debug)]
pub enum CudaWeight {
    F32(Arc<CudaSlice<f32>>),
    Bf16(Arc<CudaSlice<u16>>),
}

impl CudaWeight {
    pub fn len(&self) -> usize {
        match self {
            CudaWeight::F32(w) => w.len(),
            CudaWeight::Bf16(w) => w.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn bytes(&self) -> usize {
        match self {
            CudaWeight::F32(w) => w.len() * 4,
            CudaWeight::Bf16(w) => w.len() * 2,
        }
    }
}

/// Which kernels compute a linear layer's products for a weight held as bf16 ([`Matmul::Bf16`]):
/// * `Mma`: `linear_*_bf16` (kernels/runtime_linear.cu), mma.sync with the f32 operands rounded to bf16
///   as they are staged through registers; any shape, any GPU from sm_80.
/// * `Wgmma`: `linear_wgmma`, Hopper's warpgroup MMA (kernels/wgmma.cuh) on bf16 copies of the operands
///   that `to_bf16_*` writes into scratch buffers (transposed where a product needs its reduction index
///   contiguous); for k and m multiples of 8 on a sm_90a device, other shapes and devices run `Mma`.
///
/// The same numbers (operands rounded once to bf16, f32 accumulation), another order of the sums.
/// Neither has been timed on a GPU yet: the default stays `Mma` until the benchmark says otherwise;
/// `SGLP_LINEAR_KERNEL=wgmma` or [`CudaDevice::set_linear_kernel`] selects the other (`=mma` the
/// default; any other value fails the device's opening).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinearKernel {
    Mma,
    Wgmma,
}

impl LinearKernel {
    /// Every kernel choice of the bf16 products.
    pub const ALL: [LinearKernel; 2] = [LinearKernel::Mma, LinearKernel::Wgmma];

    fn from_env() -> Result<Self> {
        env_choice(
            "SGLP_LINEAR_KERNEL",
            &[("mma", LinearKernel::Mma), ("wgmma", LinearKernel::Wgmma)],
            LinearKernel::Mma,
        )
    }
}

/// Where `to_bf16_*` reads: f32 values (activations, gradients) or a weight's bf16 bits.
enum Bf16Source<'a> {
    F32(&'a CudaSlice<f32>),
    Bf16(&'a CudaSlice<u16>),
}

/// How a parameter is held on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Repr {
    F32,
    Bf16,
}

/// The staging conversion of values uploaded as they are.
fn copy_values<T: Copy>(src: &[T], dst: &mut [T]) {
    dst.copy_from_slice(src);
}

/// The staging conversion of f32 values uploaded as bf16 (their bits, round to nearest even).
fn to_bf16_bits(src: &[f32], dst: &mut [u16]) {
    use rayon::prelude::*;
    dst.par_chunks_mut(1 << 16)
        .zip(src.par_chunks(1 << 16))
        .for_each(|(d, s)| {
            for (d, &s) in d.iter_mut().zip(s) {
                *d = half::bf16::from_f32(s).to_bits();
            }
        })
}

/// The weight cache's key of parameter `name` held as `repr`.
fn cache_key(name: &str, repr: Repr) -> String {
    match repr {
        Repr::F32 => name.to_string(),
        Repr::Bf16 => format!("{name} (bf16)"),
    }
}

/// The logits of a cross-entropy: read only, or overwritten with their gradient.
enum Logits<'a> {
    Read(&'a CudaSlice<f32>),
    Grad(&'a mut CudaSlice<f32>),
}

/// Rotary tables on the device, by (tokens, head_dim, rot_dim, fingerprint of the last position's values).
type RopeKey = (usize, usize, usize, RopePairs, u64);
/// The cos and sin tables of one [`RopeKey`].
type RopeDev = Arc<(CudaSlice<f32>, CudaSlice<f32>)>;

struct Inner {
    name: String,
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    copy: Arc<CudaStream>,
    k: RuntimeKernels,
    /// `true`: the linear products run on tensor cores ([`Matmul::Bf16`]).
    bf16_matmul: AtomicBool,
    /// `true`: [`LinearKernel::Wgmma`] was chosen.
    wgmma_linear: AtomicBool,
    /// Whether the device has wgmma (its kernels are built for sm_90a).
    has_wgmma: bool,
    /// `linear_wgmma`'s bf16 operand copies (4 slots, grown as needed, reused by every layer: one
    /// stream orders their uses).
    bf16_scratch: Mutex<Vec<CudaSlice<u16>>>,
    sms: usize,
    weights: Mutex<Weights>,
    rope: Mutex<HashMap<RopeKey, RopeDev>>,
}

/// The runtime's CUDA device (one GPU; cheap to clone, clones share the GPU state and the weight cache).
#[derive(Clone)]
pub struct CudaDevice {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("name", &self.inner.name)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| Error::cuda("a CUDA device lock was poisoned by a panic"))
}

fn blocks(n: usize, per: usize) -> usize {
    n.div_ceil(per).max(1)
}

fn cfg(grid: (usize, usize), threads: u32) -> Result<LaunchConfig> {
    cfg3((grid.0, grid.1, 1), threads)
}

/// A launch over a 3-D grid (x up to 2³¹ − 1 blocks, y and z up to 65535), `threads` per block.
fn cfg3(grid: (usize, usize, usize), threads: u32) -> Result<LaunchConfig> {
    if grid.0 > i32::MAX as usize || grid.1 > 65_535 || grid.2 > 65_535 {
        return Err(Error::cuda(format!(
            "a kernel launch of {grid:?} blocks is too large"
        )));
    }
    Ok(LaunchConfig {
        grid_dim: (
            grid.0.max(1) as u32,
            grid.1.max(1) as u32,
            grid.2.max(1) as u32,
        ),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// `v` as a kernel's `int`, or an error naming it.
fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| Error::cuda(format!("{what} = {v} exceeds the kernels' int range")))
}

fn check_len(got: usize, want: usize, what: &str) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::cuda(format!(
            "{what}: buffer of {got} values where {want} are expected"
        )))
    }
}

impl CudaDevice {
    /// Open GPU `ordinal`: its context, a compute and a copy stream, and the runtime's kernels. Fails (an
    /// error, never a panic) without a CUDA driver, a GPU of compute capability 8.0 or newer, or NVRTC.
    pub fn open(ordinal: usize) -> Result<Self> {
        let OpenGpu {
            ctx,
            compute: stream,
            copy,
            arch,
            wgmma: has_wgmma,
            name,
            sms,
        } = open_gpu(ordinal)?;
        let k = RuntimeKernels::load(&ctx, &arch)?;
        if has_wgmma {
            k.linear_wgmma.allow_dynamic_shared(WGMMA_SHARED)?;
        }
        let (free, _) = ctx.mem_get_info().cu("cuMemGetInfo")?;
        Ok(CudaDevice {
            inner: Arc::new(Inner {
                name,
                ordinal,
                ctx,
                stream,
                copy,
                k,
                bf16_matmul: AtomicBool::new(Matmul::default() == Matmul::Bf16),
                wgmma_linear: AtomicBool::new(LinearKernel::from_env()? == LinearKernel::Wgmma),
                has_wgmma,
                bf16_scratch: Mutex::new(Vec::new()),
                sms,
                weights: Mutex::new(Weights {
                    window: WeightWindow::new(free / 2),
                    resident: HashMap::new(),
                    staging: Vec::new(),
                    next_slot: 0,
                    store: 0,
                    uploads: 0,
                }),
                rope: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// How the linear layers' products are computed from now on (default [`Matmul::Bf16`]): the
    /// representation [`Device::weight`] returns (a weight fetched before keeps its own).
    pub fn set_matmul(&self, m: Matmul) {
        self.inner
            .bf16_matmul
            .store(m == Matmul::Bf16, Ordering::Relaxed);
    }

    /// Which kernels compute the bf16 products from now on ([`LinearKernel`]; `Wgmma` on a device
    /// without wgmma runs `Mma`).
    pub fn set_linear_kernel(&self, k: LinearKernel) {
        self.inner
            .wgmma_linear
            .store(k == LinearKernel::Wgmma, Ordering::Relaxed);
    }

    /// The kernels the bf16 products of shapes that allow both use: the chosen ones, or `Mma` for
    /// `Wgmma` on a device without wgmma.
    pub fn linear_kernel_in_use(&self) -> LinearKernel {
        if self.inner.has_wgmma && self.inner.wgmma_linear.load(Ordering::Relaxed) {
            LinearKernel::Wgmma
        } else {
            LinearKernel::Mma
        }
    }

    /// The bf16 weight when `linear_wgmma` computes this layer's products (k × m weight, both
    /// multiples of 8: 16-byte rows of every operand copy).
    fn wgmma_weight<'w>(
        &self,
        w: &'w CudaWeight,
        k: usize,
        m: usize,
    ) -> Option<&'w CudaSlice<u16>> {
        match w {
            CudaWeight::Bf16(w)
                if self.linear_kernel_in_use() == LinearKernel::Wgmma
                    && k > 0
                    && m > 0
                    && k.is_multiple_of(8)
                    && m.is_multiple_of(8) =>
            {
                Some(w)
            }
            _ => None,
        }
    }

    /// The 4 scratch slots of `linear_wgmma`'s operand copies, slot i holding at least `lens[i]` values.
    fn bf16_scratch(&self, lens: [usize; 4]) -> Result<MutexGuard<'_, Vec<CudaSlice<u16>>>> {
        let mut slots = lock(&self.inner.bf16_scratch)?;
        for (i, &len) in lens.iter().enumerate() {
            if slots.get(i).is_none_or(|b| b.len() < len) {
                let b = self
                    .s()
                    .alloc_zeros::<u16>(len.max(1))
                    .cu("allocating a bf16 operand buffer")?;
                match slots.get_mut(i) {
                    Some(slot) => *slot = b,
                    None => slots.push(b),
                }
            }
        }
        Ok(slots)
    }

    /// `to_bf16_*`: `x` (rows × cols) as bf16 into `y` and/or transposed into `yt` (cols rows of `ldt`
    /// values, zeros past `rows`).
    fn to_bf16(
        &self,
        x: Bf16Source<'_>,
        rows: usize,
        cols: usize,
        y: Option<&mut CudaSlice<u16>>,
        yt: Option<&mut CudaSlice<u16>>,
        ldt: usize,
    ) -> Result<()> {
        let c = cfg((blocks(cols, 32), blocks(rows.max(ldt), 32)), THREADS)?;
        let (r, co, l) = (int(rows, "rows")?, int(cols, "cols")?, int(ldt, "ldt")?);
        let (s, kern) = (self.s(), self.k());
        // SAFETY: x holds rows·cols values; y (when given) as many, yt (when given) cols·ldt (the
        // callers' scratch slots are sized so).
        unsafe {
            match x {
                Bf16Source::F32(x) => kern.to_bf16_f32.launch(s, c, x, r, co, y, yt, l),
                Bf16Source::Bf16(x) => kern.to_bf16_bf16.launch(s, c, x, r, co, y, yt, l),
            }
        }
    }

    /// `linear_wgmma`: c[m, n] (+)= a[m, r] · b[n, r]ᵀ (+ bias) on bf16 copies (r % 8 == 0).
    #[allow(clippy::too_many_arguments)]
    fn linear_wgmma(
        &self,
        a: &CudaSlice<u16>,
        b: &CudaSlice<u16>,
        bias: Option<&CudaSlice<f32>>,
        c: &mut CudaSlice<f32>,
        m: usize,
        n: usize,
        r: usize,
        accumulate: bool,
    ) -> Result<()> {
        let mut lc = cfg((blocks(n, LIN_MMA_TILE), blocks(m, LIN_MMA_TILE)), THREADS)?;
        lc.shared_mem_bytes = WGMMA_SHARED as u32;
        let (mi, ni, ri) = (int(m, "m")?, int(n, "n")?, int(r, "r")?);
        // SAFETY: a holds m·r, b n·r, c m·n values, the bias n (or is null).
        unsafe {
            self.k()
                .linear_wgmma
                .launch(self.s(), lc, a, b, bias, c, mi, ni, ri, accumulate as i32)
        }
    }

    /// The output tile of the linear kernels for a weight held as `w` (bf16: the tensor-core kernels).
    fn linear_tile(w: &CudaWeight) -> usize {
        match w {
            CudaWeight::Bf16(_) => LIN_MMA_TILE,
            CudaWeight::F32(_) => LIN_TILE,
        }
    }

    /// Bytes of weights kept on the device at most (outside the window of the current and next
    /// parameter group, see [`WeightWindow`]). Weights beyond it are evicted now.
    pub fn set_weight_budget(&self, bytes: usize) -> Result<()> {
        let mut w = lock(&self.inner.weights)?;
        for n in w.window.set_budget(bytes) {
            w.resident.remove(&n);
        }
        Ok(())
    }

    /// Drop every cached weight (the next op uploads again) and the wgmma path's bf16 operand copies.
    pub fn clear_weights(&self) -> Result<()> {
        lock(&self.inner.bf16_scratch)?.clear();
        let mut w = lock(&self.inner.weights)?;
        let budget = w.window.budget();
        w.window = WeightWindow::new(budget);
        w.resident.clear();
        Ok(())
    }

    /// (weights resident, their bytes, uploads so far): for tests and reports.
    pub fn weight_stats(&self) -> Result<(usize, usize, usize)> {
        let w = lock(&self.inner.weights)?;
        Ok((w.window.len(), w.window.used(), w.uploads))
    }

    /// Wait for everything enqueued on the device.
    pub fn synchronize(&self) -> Result<()> {
        self.inner.copy.synchronize().cu("synchronize")?;
        self.inner.stream.synchronize().cu("synchronize")
    }

    fn s(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    fn k(&self) -> &RuntimeKernels {
        &self.inner.k
    }

    /// Blocks of an elementwise (grid-stride) launch over `n` values.
    fn ew_cfg(&self, n: usize) -> Result<LaunchConfig> {
        cfg(
            (blocks(n, THREADS as usize).min(self.inner.sms * 16), 1),
            THREADS,
        )
    }

    /// The resident copy of the weights' cache for `store` (a different store empties it).
    fn weights_for(&self, store: &dyn ParamStore) -> Result<MutexGuard<'_, Weights>> {
        let mut w = lock(&self.inner.weights)?;
        if w.store != store.id() {
            let budget = w.window.budget();
            w.window = WeightWindow::new(budget);
            w.resident.clear();
            w.store = store.id();
        }
        Ok(w)
    }

    /// Upload `host` into a new device buffer of `T` on the copy stream through the pinned staging
    /// slots, alternating between them chunk by chunk (the host fills one, converting each value with
    /// `convert`, while the other is copied).
    fn upload_weight<S, T: cudarc::driver::DeviceRepr + bytemuck::Pod>(
        &self,
        w: &mut Weights,
        host: &[S],
        convert: impl Fn(&[S], &mut [T]),
    ) -> Result<CudaSlice<T>> {
        let copy = &self.inner.copy;
        let size = std::mem::size_of::<T>();
        // Values of T per slot.
        let per = STAGE * std::mem::size_of::<f32>() / size;
        // SAFETY: every element is written by the copies below before any kernel reads it (the compute
        // stream waits for the buffer's write event, recorded after the last copy).
        let mut dst = unsafe { copy.alloc::<T>(host.len()) }.cu("allocating a weight")?;
        while w.staging.len() < 2 {
            // SAFETY: the pinned memory is written before it is read.
            let pinned = unsafe { self.inner.ctx.alloc_pinned::<f32>(STAGE) }
                .cu("allocating pinned staging")?;
            let ev = self.inner.ctx.new_event(None).cu("event")?;
            w.staging.push((pinned, ev));
        }
        for (c, chunk) in host.chunks(per).enumerate() {
            let slot = w.next_slot;
            w.next_slot ^= 1;
            let (pinned, ev) = &mut w.staging[slot];
            ev.synchronize().cu("waiting for a staging slot")?;
            let staged: &mut [T] =
                bytemuck::cast_slice_mut(pinned.as_mut_slice().cu("pinned staging")?);
            convert(chunk, &mut staged[..chunk.len()]);
            let src = &bytemuck::cast_slice::<f32, T>(pinned.as_slice().cu("pinned staging")?)
                [..chunk.len()];
            let (ptr, _record) = dst.device_ptr_mut(copy);
            // SAFETY: `dst` holds host.len() ≥ c·per + chunk.len() values of T; the pinned source stays
            // untouched until `ev` (recorded below) completes, waited on before the slot is refilled.
            unsafe { cu::memcpy_htod_async(ptr + (c * per * size) as u64, src, copy.cu_stream()) }
                .cu("uploading a weight")?;
            ev.record(copy).cu("event record")?;
        }
        w.uploads += 1;
        Ok(dst)
    }

    /// Upload parameter `name` as `repr` and record it in the cache (evicting what the window says).
    fn load_weight(
        &self,
        w: &mut Weights,
        store: &dyn ParamStore,
        name: &str,
        repr: Repr,
    ) -> Result<CudaWeight> {
        let dev = match (repr, store.param_bf16(name)?) {
            (Repr::F32, _) => CudaWeight::F32(Arc::new(self.upload_weight(
                w,
                &store.param(name)?,
                copy_values,
            )?)),
            // Stored as bf16: the bits as they are, no conversion.
            (Repr::Bf16, Some(bits)) => {
                CudaWeight::Bf16(Arc::new(self.upload_weight(w, &bits, copy_values)?))
            }
            (Repr::Bf16, None) => CudaWeight::Bf16(Arc::new(self.upload_weight(
                w,
                &store.param(name)?,
                to_bf16_bits,
            )?)),
        };
        let key = cache_key(name, repr);
        for n in w.window.admit(&key, dev.bytes()) {
            w.resident.remove(&n);
        }
        w.resident.insert(key, dev.clone());
        Ok(dev)
    }

    /// How a parameter read as `u` is held in the current [`Matmul`] mode.
    fn repr(&self, u: ParamUse) -> Repr {
        match (u, self.matmul()) {
            (ParamUse::Weight, Matmul::Bf16) => Repr::Bf16,
            _ => Repr::F32,
        }
    }

    /// Parameter `name` as `repr`: from the cache, else uploaded now.
    fn fetch(
        &self,
        store: &dyn ParamStore,
        name: &str,
        len: usize,
        repr: Repr,
    ) -> Result<CudaWeight> {
        let mut w = self.weights_for(store)?;
        let key = cache_key(name, repr);
        let cached = w.resident.get(&key).cloned();
        let p = match cached {
            Some(p) => {
                w.window.touch(&key);
                p
            }
            None => self.load_weight(&mut w, store, name, repr)?,
        };
        check_len(p.len(), len, name)?;
        Ok(p)
    }

    /// The rotary tables on the device, uploaded once per (tokens, head_dim, pairing, values).
    fn rope_tables(&self, table: &RopeTable) -> Result<RopeDev> {
        let hd = table.head_dim;
        check_len(table.cos.len(), table.tokens * hd, "rope cos table")?;
        check_len(table.sin.len(), table.tokens * hd, "rope sin table")?;
        let last = table.tokens.saturating_sub(1) * hd..table.tokens * hd;
        let fp = fnv1a(&[
            bytemuck::cast_slice(&table.cos[last.clone()]),
            bytemuck::cast_slice(&table.sin[last]),
        ]);
        let key = (table.tokens, hd, table.rot_dim, table.pairs, fp);
        let mut cache = lock(&self.inner.rope)?;
        if let Some(t) = cache.get(&key) {
            return Ok(t.clone());
        }
        let cos = self.s().clone_htod(&table.cos).cu("uploading rope cos")?;
        let sin = self.s().clone_htod(&table.sin).cu("uploading rope sin")?;
        let t = Arc::new((cos, sin));
        cache.insert(key, t.clone());
        Ok(t)
    }

    fn rope_apply(
        &self,
        x: &CudaSlice<f32>,
        heads: usize,
        table: &RopeTable,
        sign: f32,
        add: bool,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let width = heads * table.head_dim;
        if width == 0
            || !x.len().is_multiple_of(width)
            || table.tokens == 0
            || !table.rot_dim.is_multiple_of(2)
            || table.rot_dim > table.head_dim
        {
            return Err(Error::cuda(format!(
                "rope: {} values are not rows of {heads} heads of {} (rotated {}, tokens {})",
                x.len(),
                table.head_dim,
                table.rot_dim,
                table.tokens
            )));
        }
        check_len(y.len(), x.len(), "rope output")?;
        let tabs = self.rope_tables(table)?;
        let rows = int(x.len() / width, "rope rows")?;
        let (h, hd, rot, t) = (
            int(heads, "heads")?,
            int(table.head_dim, "head_dim")?,
            int(table.rot_dim, "rot_dim")?,
            int(table.tokens, "tokens")?,
        );
        let add = add as i32;
        let c = self.ew_cfg(x.len())?;
        // SAFETY: x, y hold rows·width values, the tables tokens·head_dim.
        unsafe {
            self.k().rope_apply.launch(
                self.s(),
                c,
                x,
                &tabs.0,
                &tabs.1,
                y,
                rows,
                h,
                hd,
                rot,
                (table.pairs == RopePairs::Interleaved) as i32,
                t,
                sign,
                add,
            )
        }
    }

    /// A binary elementwise kernel `f(a, b, out, n)`.
    fn binary(
        &self,
        f: &Kernel<Binary>,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        check_len(b.len(), a.len(), f.name())?;
        check_len(y.len(), a.len(), f.name())?;
        let c = self.ew_cfg(a.len())?;
        // SAFETY: a, b and y hold n values.
        unsafe { f.launch(self.s(), c, a, b, y, a.len() as u64) }
    }

    /// A column-block gather (`f` the forward) or scatter (the backward) between `src` and `dst`, the
    /// lengths checked by the caller ([`ColumnBlocks::rows`]).
    fn column_blocks(
        &self,
        f: &Kernel<kernels::ColumnBlocks>,
        src: &CudaSlice<f32>,
        rows: usize,
        width: usize,
        cb: ColumnBlocks,
        dst: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let n = rows * (width / cb.stride) * cb.block;
        if n == 0 {
            return Ok(());
        }
        let c = self.ew_cfg(n)?;
        let (w, b, st, o) = (
            int(width, "width")?,
            int(cb.block, "block")?,
            int(cb.stride, "stride")?,
            int(cb.offset, "offset")?,
        );
        // SAFETY: the lengths were checked against rows, width and the blocks (ColumnBlocks::rows).
        unsafe { f.launch(self.s(), c, src, dst, rows as u64, w, b, st, o) }
    }

    /// The cross-entropy kernels; returns (Σ loss over rows in row order, predicted rows).
    fn cross_entropy(
        &self,
        logits: Logits<'_>,
        vocab: usize,
        targets: &Ids,
        lse: &mut CudaSlice<f32>,
    ) -> Result<(f64, usize)> {
        let rows = targets.len();
        let len = match &logits {
            Logits::Read(l) => l.len(),
            Logits::Grad(l) => l.len(),
        };
        check_len(len, rows * vocab, "cross-entropy logits")?;
        check_len(lse.len(), rows, "cross-entropy lse")?;
        if let Some(&t) = targets.host.iter().find(|&&t| t >= vocab as i64) {
            return Err(Error::invalid(format!(
                "target {t} outside the vocabulary of {vocab}"
            )));
        }
        if rows == 0 {
            return Ok((0.0, 0));
        }
        let count = targets.host.iter().filter(|&&t| t >= 0).count();
        let mut row_loss = self
            .s()
            .alloc_zeros::<f64>(rows)
            .cu("allocating row losses")?;
        let (v, r) = (int(vocab, "vocab")?, int(rows, "rows")?);
        let c = cfg((rows, 1), THREADS)?;
        // SAFETY: logits hold rows·vocab, lse and row_loss rows, targets rows values < vocab.
        unsafe {
            match logits {
                Logits::Grad(logits) => {
                    let scale = 1.0 / count.max(1) as f64;
                    self.k().cross_entropy_forward_grad.launch(
                        self.s(),
                        c,
                        logits,
                        v,
                        &targets.dev,
                        r,
                        scale,
                        lse,
                        &mut row_loss,
                    )
                }
                Logits::Read(logits) => self.k().cross_entropy_forward.launch(
                    self.s(),
                    c,
                    logits,
                    v,
                    &targets.dev,
                    r,
                    lse,
                    &mut row_loss,
                ),
            }
        }?;
        let host = self
            .s()
            .clone_dtoh(&row_loss)
            .cu("downloading row losses")?;
        self.s().synchronize().cu("synchronize")?;
        Ok((host.iter().sum(), count))
    }

    /// The attention kernels' scalar arguments: (seqs, tokens, heads, kv_heads, head_dim, window, scale,
    /// softcap, ALiBi's max_bias and factor; 0 = none).
    #[allow(clippy::type_complexity)]
    fn attn_args(
        &self,
        sh: &AttnShape,
    ) -> Result<(i32, i32, i32, i32, i32, i32, f32, f32, f32, f32)> {
        if sh.head_dim == 0 || sh.head_dim > MAX_HEAD_DIM {
            return Err(Error::cuda(format!(
                "attention: head_dim {} outside 1..={MAX_HEAD_DIM}",
                sh.head_dim
            )));
        }
        if sh.kv_heads == 0 || !sh.heads.is_multiple_of(sh.kv_heads) {
            return Err(Error::invalid(format!(
                "attention: {} heads are not groups of {} kv heads",
                sh.heads, sh.kv_heads
            )));
        }
        if sh.window == Some(0) {
            return Err(Error::invalid("attention: a window of 0 keys"));
        }
        int(
            sh.seqs * sh.heads.max(sh.kv_heads) * sh.tokens * 32,
            "attention threads",
        )?;
        Ok((
            int(sh.seqs, "seqs")?,
            int(sh.tokens, "tokens")?,
            int(sh.heads, "heads")?,
            int(sh.kv_heads, "kv_heads")?,
            int(sh.head_dim, "head_dim")?,
            // A window of at least `tokens` masks nothing: 0 (none), so that the kernels' `j + window`
            // cannot overflow an int.
            int(sh.window.filter(|&w| w < sh.tokens).unwrap_or(0), "window")?,
            sh.scale(),
            match sh.softcap {
                Some(c) if c > 0.0 && c.is_finite() => c,
                None => 0.0,
                Some(c) => {
                    return Err(Error::invalid(format!(
                        "attention: soft-cap {c} is not a positive number"
                    )))
                }
            },
            sh.alibi.map_or(0.0, |a| a.max_bias),
            sh.alibi.map_or(0.0, |a| a.factor),
        ))
    }
}

fn check_attn(sh: &AttnShape, q: usize, k: usize, v: usize, out: usize, lse: usize) -> Result<()> {
    let rows = sh.seqs * sh.tokens;
    check_len(q, rows * sh.heads * sh.head_dim, "attention q")?;
    check_len(k, rows * sh.kv_heads * sh.head_dim, "attention k")?;
    check_len(v, rows * sh.kv_heads * sh.head_dim, "attention v")?;
    check_len(out, rows * sh.heads * sh.head_dim, "attention output")?;
    check_len(lse, sh.seqs * sh.heads * sh.tokens, "attention lse")
}

impl Device for CudaDevice {
    type Slice = CudaSlice<f32>;
    type Buf = Buf;
    type Param<'s> = Arc<CudaSlice<f32>>;
    type Weight<'s> = CudaWeight;
    type Ids = Ids;

    fn name(&self) -> String {
        self.inner.name.clone()
    }
    fn matmul(&self) -> Matmul {
        if self.inner.bf16_matmul.load(Ordering::Relaxed) {
            Matmul::Bf16
        } else {
            Matmul::F32
        }
    }
    fn alloc_zeroed(&self, len: usize) -> Result<Buf> {
        Ok(Buf(self
            .s()
            .alloc_zeros::<f32>(len)
            .cu("allocating a device buffer")?))
    }
    fn zero(&self, buf: &mut Buf) -> Result<()> {
        self.s()
            .memset_zeros(&mut buf.0)
            .cu("zeroing a device buffer")
    }
    fn buf_len(&self, buf: &Buf) -> usize {
        buf.0.len()
    }
    fn upload(&self, host: &[f32], dst: &mut CudaSlice<f32>) -> Result<()> {
        check_len(host.len(), dst.len(), "upload")?;
        self.s().memcpy_htod(host, dst).cu("uploading")
    }
    fn download(&self, src: &CudaSlice<f32>, host: &mut Vec<f32>) -> Result<()> {
        host.clear();
        host.resize(src.len(), 0.0);
        self.s()
            .memcpy_dtoh(src, host.as_mut_slice())
            .cu("downloading")?;
        self.s().synchronize().cu("synchronize")
    }
    fn ids(&self, ids: &[i64]) -> Result<Ids> {
        let dev = if ids.is_empty() {
            self.s().alloc_zeros::<i64>(1)
        } else {
            self.s().clone_htod(ids)
        }
        .cu("uploading ids")?;
        Ok(Ids {
            dev,
            host: ids.to_vec(),
        })
    }
    fn param(&self, store: &dyn ParamStore, name: &str, len: usize) -> Result<Arc<CudaSlice<f32>>> {
        match self.fetch(store, name, len, Repr::F32)? {
            CudaWeight::F32(p) => Ok(p),
            CudaWeight::Bf16(_) => Err(Error::cuda(format!("{name}: cached as bf16, read as f32"))),
        }
    }
    fn weight(&self, store: &dyn ParamStore, name: &str, len: usize) -> Result<CudaWeight> {
        self.fetch(store, name, len, self.repr(ParamUse::Weight))
    }
    fn weight_from(&self, w: &CudaSlice<f32>) -> Result<CudaWeight> {
        match self.repr(ParamUse::Weight) {
            Repr::F32 => Ok(CudaWeight::F32(Arc::new(
                w.try_clone().cu("copying a weight")?,
            ))),
            Repr::Bf16 => {
                let mut host = Vec::new();
                self.download(w, &mut host)?;
                let mut bits = vec![0u16; host.len()];
                to_bf16_bits(&host, &mut bits);
                Ok(CudaWeight::Bf16(Arc::new(
                    self.s().clone_htod(&bits).cu("uploading a weight")?,
                )))
            }
        }
    }
    fn prefetch(&self, store: &dyn ParamStore, params: &[(&str, ParamUse)]) -> Result<()> {
        let wanted: Vec<(String, &str, Repr)> = params
            .iter()
            .map(|&(name, u)| {
                let r = self.repr(u);
                (cache_key(name, r), name, r)
            })
            .collect();
        let keys: Vec<&str> = wanted.iter().map(|(k, _, _)| k.as_str()).collect();
        let mut w = self.weights_for(store)?;
        for key in w.window.announce(&keys) {
            if let Some((_, name, r)) = wanted.iter().find(|(k, _, _)| *k == key) {
                self.load_weight(&mut w, store, name, *r)?;
            }
        }
        Ok(())
    }
    fn copy(&self, src: &CudaSlice<f32>, dst: &mut CudaSlice<f32>) -> Result<()> {
        check_len(dst.len(), src.len(), "copy")?;
        self.s().memcpy_dtod(src, dst).cu("copying on the device")
    }
    fn synchronize(&self) -> Result<()> {
        CudaDevice::synchronize(self)
    }
    fn cuda_ordinal(&self) -> Option<usize> {
        Some(self.inner.ordinal)
    }
    fn device_addr(&self, s: &CudaSlice<f32>) -> Result<u64> {
        use cudarc::driver::DevicePtr;
        let (ptr, _read) = s.device_ptr(self.s());
        Ok(ptr)
    }
    fn sum_sq(&self, g: &CudaSlice<f32>) -> Result<f64> {
        if g.is_empty() {
            return Ok(0.0);
        }
        let nb = blocks(g.len(), THREADS as usize).min(1024);
        let mut partials = self
            .s()
            .alloc_zeros::<f64>(nb)
            .cu("allocating partial sums")?;
        let c = cfg((nb, 1), THREADS)?;
        // SAFETY: writes one partial per block (nb).
        unsafe {
            self.k()
                .sum_sq_partials
                .launch(self.s(), c, g, g.len() as u64, &mut partials)?;
        }
        let host = self
            .s()
            .clone_dtoh(&partials)
            .cu("downloading partial sums")?;
        self.s().synchronize().cu("synchronize")?;
        Ok(host.iter().sum())
    }

    fn embedding_forward(
        &self,
        ids: &Ids,
        table: &CudaSlice<f32>,
        dim: usize,
        scale: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        embedding_checks(ids, table.len(), dim, out.len())?;
        if ids.is_empty() {
            return Ok(());
        }
        let (d, r) = (int(dim, "dim")?, int(ids.len(), "rows")?);
        let c = cfg((ids.len(), 1), THREADS)?;
        // SAFETY: ids < vocab and the table and rows hold vocab·dim and rows·dim values (embedding_checks).
        unsafe {
            self.k()
                .embedding_forward
                .launch(self.s(), c, &ids.dev, table, d, scale, out, r)
        }
    }
    fn embedding_backward(
        &self,
        ids: &Ids,
        dout: &CudaSlice<f32>,
        dim: usize,
        scale: f32,
        padding: Option<usize>,
        dtable: &mut CudaSlice<f32>,
    ) -> Result<()> {
        embedding_checks(ids, dtable.len(), dim, dout.len())?;
        if ids.is_empty() {
            return Ok(());
        }
        let (d, r) = (int(dim, "dim")?, int(ids.len(), "rows")?);
        // Ids are below the vocabulary (embedding_checks), itself below 2^31.
        let skip = padding.map_or(Ok(-1), |p| int(p, "padding id"))?;
        let c = cfg((ids.len(), 1), THREADS)?;
        // SAFETY: ids < vocab and the table and rows hold vocab·dim and rows·dim values (embedding_checks).
        unsafe {
            self.k().embedding_backward.launch(
                self.s(),
                c,
                &ids.dev,
                dout,
                d,
                scale,
                dtable,
                r,
                skip,
            )
        }
    }
    fn linear_forward(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaWeight,
        b: Option<&CudaSlice<f32>>,
        n: usize,
        k: usize,
        m: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        check_len(x.len(), n * k, "linear x")?;
        check_len(w.len(), m * k, "linear weight")?;
        check_len(y.len(), n * m, "linear output")?;
        if let Some(b) = b {
            check_len(b.len(), m, "linear bias")?;
        }
        if n == 0 || m == 0 {
            return Ok(());
        }
        if let Some(w16) = self.wgmma_weight(w, k, m) {
            let mut slots = self.bf16_scratch([n * k, 0, 0, 0])?;
            let xb = &mut slots[0];
            self.to_bf16(Bf16Source::F32(x), n, k, Some(&mut *xb), None, n)?;
            return self.linear_wgmma(xb, w16, b, y, n, m, k, false);
        }
        let (ni, ki, mi) = (int(n, "n")?, int(k, "k")?, int(m, "m")?);
        let tile = Self::linear_tile(w);
        let c = cfg((blocks(m, tile), blocks(n, tile)), THREADS)?;
        let (s, kern) = (self.s(), self.k());
        // SAFETY: x holds n·k, w m·k, the bias m (or is null), y n·m values.
        unsafe {
            match w {
                CudaWeight::F32(w) => kern.linear_forward.launch(s, c, x, &**w, b, y, ni, ki, mi),
                CudaWeight::Bf16(w) => kern
                    .linear_forward_bf16
                    .launch(s, c, x, &**w, b, y, ni, ki, mi),
            }
        }
    }
    fn linear_backward(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaWeight,
        dy: &CudaSlice<f32>,
        n: usize,
        k: usize,
        m: usize,
        dx: Option<&mut CudaSlice<f32>>,
        dw: &mut CudaSlice<f32>,
        db: Option<&mut CudaSlice<f32>>,
    ) -> Result<()> {
        check_len(x.len(), n * k, "linear x")?;
        check_len(w.len(), m * k, "linear weight")?;
        check_len(dy.len(), n * m, "linear output gradient")?;
        check_len(dw.len(), m * k, "linear weight gradient")?;
        if n == 0 {
            return Ok(());
        }
        if let Some(dx) = dx.as_deref() {
            check_len(dx.len(), n * k, "linear input gradient")?;
        }
        let (ni, ki, mi) = (int(n, "n")?, int(k, "k")?, int(m, "m")?);
        let tile = Self::linear_tile(w);
        let (s, kern) = (self.s(), self.k());
        if let Some(w16) = self.wgmma_weight(w, k, m) {
            // kernels/runtime_linear.cu's table: dx += bf16(dy)·(Wᵀ)ᵀ, dw += bf16(dy)ᵀ·(bf16(x)ᵀ)ᵀ, the
            // transposes' rows padded to n8 with zeros. Without dx, no bf16(dy) and no Wᵀ.
            let n8 = n.next_multiple_of(8);
            let with_dx = dx.is_some() as usize;
            let mut slots =
                self.bf16_scratch([with_dx * n * m, m * n8, k * n8, with_dx * k * m])?;
            let [dyb, dyt, xt, wt] = &mut slots[..4] else {
                unreachable!("bf16_scratch keeps 4 slots")
            };
            let dyb_wanted = dx.is_some().then_some(&mut *dyb);
            self.to_bf16(Bf16Source::F32(dy), n, m, dyb_wanted, Some(&mut *dyt), n8)?;
            if let Some(dx) = dx {
                self.to_bf16(Bf16Source::Bf16(w16), m, k, None, Some(&mut *wt), m)?;
                self.linear_wgmma(dyb, wt, None, dx, n, k, m, true)?;
            }
            self.to_bf16(Bf16Source::F32(x), n, k, None, Some(&mut *xt), n8)?;
            self.linear_wgmma(dyt, xt, None, dw, m, k, n8, true)?;
        } else {
            if let Some(dx) = dx {
                if k > 0 && m > 0 {
                    let c = cfg((blocks(k, tile), blocks(n, tile)), THREADS)?;
                    // SAFETY: dy holds n·m, w m·k, dx n·k values.
                    unsafe {
                        match w {
                            CudaWeight::F32(w) => kern
                                .linear_backward_input
                                .launch(s, c, dy, &**w, dx, ni, ki, mi),
                            CudaWeight::Bf16(w) => kern
                                .linear_backward_input_bf16
                                .launch(s, c, dy, &**w, dx, ni, ki, mi),
                        }?;
                    }
                }
            }
            if k > 0 && m > 0 {
                let f = match w {
                    CudaWeight::F32(_) => &kern.linear_backward_weight,
                    CudaWeight::Bf16(_) => &kern.linear_backward_weight_bf16,
                };
                let c = cfg((blocks(k, tile), blocks(m, tile)), THREADS)?;
                // SAFETY: dy holds n·m, x n·k, dw m·k values.
                unsafe { f.launch(s, c, dy, x, &mut *dw, ni, ki, mi)? };
            }
        }
        if let Some(db) = db {
            check_len(db.len(), m, "linear bias gradient")?;
            if m > 0 {
                let c = cfg((blocks(m, THREADS as usize), 1), THREADS)?;
                // SAFETY: dy holds n·m, db m values.
                unsafe { kern.linear_backward_bias.launch(s, c, dy, db, ni, mi)? };
            }
        }
        Ok(())
    }
    fn norm_forward(
        &self,
        x: &CudaSlice<f32>,
        w: Option<&CudaSlice<f32>>,
        b: Option<&CudaSlice<f32>>,
        norm: NormShape,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let d = norm.d;
        let rows = norm_rows(x.len(), w.map(|w| w.len()), norm)?;
        check_len(y.len(), x.len(), "norm output")?;
        if let Some(b) = b {
            check_len(b.len(), norm.groups * d, "norm bias")?;
        }
        if rows == 0 {
            return Ok(());
        }
        let (di, gi, ri) = (
            int(d, "d")?,
            int(norm.groups, "groups")?,
            int(rows, "rows")?,
        );
        let c = cfg((rows, 1), THREADS)?;
        let (offset, eps, centre) = (norm.offset, norm.eps, norm.centre as i32);
        // SAFETY: x and y hold rows·d values, w and b (each or null) groups·d.
        unsafe {
            self.k()
                .norm_forward
                .launch(self.s(), c, x, w, b, offset, di, gi, eps, centre, y, ri)
        }
    }
    fn norm_backward(
        &self,
        x: &CudaSlice<f32>,
        w: Option<&CudaSlice<f32>>,
        norm: NormShape,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        dw: Option<&mut CudaSlice<f32>>,
        db: Option<&mut CudaSlice<f32>>,
    ) -> Result<()> {
        let (d, groups) = (norm.d, norm.groups);
        let rows = norm_rows(x.len(), w.map(|w| w.len()), norm)?;
        check_len(dy.len(), x.len(), "norm output gradient")?;
        check_len(dx.len(), x.len(), "norm input gradient")?;
        // The weight's values: rows of x sharing a weight row are summed over wide rows of wd.
        let (wd, wide) = (groups * d, rows / groups);
        if let Some(dw) = &dw {
            check_len(dw.len(), wd, "norm weight gradient")?;
        }
        if let Some(db) = &db {
            check_len(db.len(), wd, "norm bias gradient")?;
        }
        if rows == 0 {
            return Ok(());
        }
        let (di, gi, ri) = (int(d, "d")?, int(groups, "groups")?, int(rows, "rows")?);
        let (wdi, widei) = (int(wd, "weight length")?, int(wide, "wide rows")?);
        let (offset, eps, centre) = (norm.offset, norm.eps, norm.centre as i32);
        // Chunks of at least RMS_ROWS_PER_CHUNK wide rows, and few enough for the grid's y dimension
        // (per-head norms, Qwen3's q_norm / k_norm, have tokens × heads rows).
        let per = RMS_ROWS_PER_CHUNK.max(wide.div_ceil(65_535));
        let chunks = blocks(wide, per);
        let (ci, per) = (int(chunks, "chunks")?, int(per, "rows per chunk")?);
        let s = self.s();
        let mut mean = s.alloc_zeros::<f64>(rows).cu("allocating row means")?;
        let mut inv = s.alloc_zeros::<f64>(rows).cu("allocating row scales")?;
        let mut partials = s
            .alloc_zeros::<f64>(chunks * wd)
            .cu("allocating partial sums")?;
        let kern = self.k();
        let per_row = cfg((rows, 1), THREADS)?;
        let per_chunk = cfg((blocks(wd, THREADS as usize), chunks), THREADS)?;
        let per_feature = cfg((blocks(wd, THREADS as usize), 1), THREADS)?;
        // SAFETY: x, dy, dx hold rows·d values (wide·wd), w, dw and db wd; mean and inv rows, partials
        // chunks·wd.
        unsafe {
            kern.norm_backward.launch(
                s, per_row, x, w, offset, dy, di, gi, eps, centre, dx, &mut mean, &mut inv, ri,
            )?;
            if let Some(dw) = dw {
                kern.norm_backward_weight.launch(
                    s,
                    per_chunk,
                    x,
                    dy,
                    &mean,
                    &inv,
                    di,
                    gi,
                    widei,
                    per,
                    &mut partials,
                )?;
                kern.norm_reduce_weight
                    .launch(s, per_feature, &partials, wdi, ci, dw)?;
            }
            if let Some(db) = db {
                kern.linear_backward_bias
                    .launch(s, per_feature, dy, db, widei, wdi)?;
            }
        }
        Ok(())
    }
    fn rope_forward(
        &self,
        x: &CudaSlice<f32>,
        heads: usize,
        table: &RopeTable,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.rope_apply(x, heads, table, 1.0, false, y)
    }
    fn rope_backward(
        &self,
        dy: &CudaSlice<f32>,
        heads: usize,
        table: &RopeTable,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.rope_apply(dy, heads, table, -1.0, true, dx)
    }
    fn attention_forward(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        shape: AttnShape,
        out: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (seqs, tokens, heads, kv, hd, window, scale, softcap, alibi_bias, alibi_factor) =
            self.attn_args(&shape)?;
        check_attn(&shape, q.len(), k.len(), v.len(), out.len(), lse.len())?;
        let warps = shape.seqs * shape.heads * shape.tokens;
        if warps == 0 {
            return Ok(());
        }
        // bf16 mode, head dimension 64 or 128: the tensor-core kernel (runtime_attention_mma.cu).
        let mma = match (self.matmul(), shape.head_dim) {
            (Matmul::Bf16, 64) => Some(&self.k().attention_forward_mma64),
            (Matmul::Bf16, 128) => Some(&self.k().attention_forward_mma128),
            _ => None,
        };
        if let Some(f) = mma {
            let c = cfg3(
                (blocks(shape.tokens, FA_QUERIES), shape.heads, shape.seqs),
                FA_THREADS,
            )?;
            // SAFETY: sizes checked above; the kernel's head dimension is the shape's.
            return unsafe {
                f.launch(
                    self.s(),
                    c,
                    q,
                    k,
                    v,
                    out,
                    lse,
                    tokens,
                    heads,
                    kv,
                    window,
                    scale,
                    softcap,
                    alibi_bias,
                    alibi_factor,
                )
            };
        }
        let c = cfg((blocks(warps, ATT_WARPS), 1), (ATT_WARPS * 32) as u32)?;
        // SAFETY: sizes checked above.
        unsafe {
            self.k().attention_forward.launch(
                self.s(),
                c,
                q,
                k,
                v,
                out,
                lse,
                seqs,
                tokens,
                heads,
                kv,
                hd,
                window,
                scale,
                softcap,
                alibi_bias,
                alibi_factor,
            )
        }
    }
    fn attention_backward(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        lse: &CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        shape: AttnShape,
        dq: &mut CudaSlice<f32>,
        dk: &mut CudaSlice<f32>,
        dv: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (seqs, tokens, heads, kv, hd, window, scale, softcap, alibi_bias, alibi_factor) =
            self.attn_args(&shape)?;
        check_attn(&shape, q.len(), k.len(), v.len(), dout.len(), lse.len())?;
        check_len(dq.len(), q.len(), "attention dq")?;
        check_len(dk.len(), k.len(), "attention dk")?;
        check_len(dv.len(), v.len(), "attention dv")?;
        let q_warps = shape.seqs * shape.heads * shape.tokens;
        let kv_warps = shape.seqs * shape.kv_heads * shape.tokens;
        if q_warps == 0 {
            return Ok(());
        }
        let s = self.s();
        let mut delta = s
            .alloc_zeros::<f32>(lse.len())
            .cu("allocating attention deltas")?;
        // bf16 mode, head dimension 64 or 128: the tensor-core kernels (runtime_attention_mma.cu).
        let kern = self.k();
        let mma = match (self.matmul(), shape.head_dim) {
            (Matmul::Bf16, 64) => Some((
                &kern.attention_backward_dq_mma64,
                &kern.attention_backward_dkv_mma64,
            )),
            (Matmul::Bf16, 128) => Some((
                &kern.attention_backward_dq_mma128,
                &kern.attention_backward_dkv_mma128,
            )),
            _ => None,
        };
        if let Some((fdq, fdkv)) = mma {
            let qblocks = blocks(shape.tokens, FA_QUERIES);
            let slices = shape.head_dim / FA_BACKWARD_DIMS;
            let dq_cfg = cfg3((qblocks, shape.heads, shape.seqs), FA_THREADS)?;
            let dkv_cfg = cfg3((qblocks * slices, shape.kv_heads, shape.seqs), FA_THREADS)?;
            // SAFETY: sizes checked above, delta as lse; the kernels' head dimension is the shape's.
            return unsafe {
                fdq.launch(
                    s,
                    dq_cfg,
                    q,
                    k,
                    v,
                    lse,
                    dout,
                    dq,
                    &mut delta,
                    tokens,
                    heads,
                    kv,
                    window,
                    scale,
                    softcap,
                    alibi_bias,
                    alibi_factor,
                )?;
                fdkv.launch(
                    s,
                    dkv_cfg,
                    q,
                    k,
                    v,
                    lse,
                    dout,
                    &delta,
                    dk,
                    dv,
                    tokens,
                    heads,
                    kv,
                    window,
                    scale,
                    softcap,
                    alibi_bias,
                    alibi_factor,
                )
            };
        }
        let threads = (ATT_WARPS * 32) as u32;
        let dq_cfg = cfg((blocks(q_warps, ATT_WARPS), 1), threads)?;
        let dkv_cfg = cfg((blocks(kv_warps, ATT_WARPS), 1), threads)?;
        // SAFETY: sizes checked above, delta as lse.
        unsafe {
            kern.attention_backward_dq.launch(
                s,
                dq_cfg,
                q,
                k,
                v,
                lse,
                dout,
                dq,
                &mut delta,
                seqs,
                tokens,
                heads,
                kv,
                hd,
                window,
                scale,
                softcap,
                alibi_bias,
                alibi_factor,
            )?;
            kern.attention_backward_dkv.launch(
                s,
                dkv_cfg,
                q,
                k,
                v,
                lse,
                dout,
                &delta,
                dk,
                dv,
                seqs,
                tokens,
                heads,
                kv,
                hd,
                window,
                scale,
                softcap,
                alibi_bias,
                alibi_factor,
            )
        }
    }
    fn attention_sinks_forward(
        &self,
        sinks: &CudaSlice<f32>,
        shape: AttnShape,
        out: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
    ) -> Result<()> {
        super::cpu::check_sinks(shape, sinks.len(), out.len(), lse.len())?;
        let (seqs, tokens, heads, _, hd, ..) = self.attn_args(&shape)?;
        let warps = shape.seqs * shape.heads * shape.tokens;
        if warps == 0 {
            return Ok(());
        }
        let threads = (ATT_WARPS * 32) as u32;
        let c = cfg((blocks(warps, ATT_WARPS), 1), threads)?;
        // SAFETY: sinks holds heads values, out seqs·tokens·heads·head_dim, lse seqs·heads·tokens (checked).
        unsafe {
            (self.k().attention_sinks_forward).launch(
                self.s(),
                c,
                sinks,
                out,
                lse,
                seqs,
                tokens,
                heads,
                hd,
            )
        }
    }
    fn attention_sinks_backward(
        &self,
        out: &CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        lse: &CudaSlice<f32>,
        sinks: &CudaSlice<f32>,
        shape: AttnShape,
        dsinks: &mut CudaSlice<f32>,
    ) -> Result<()> {
        super::cpu::check_sinks(shape, sinks.len(), out.len(), lse.len())?;
        super::cpu::check_sinks(shape, dsinks.len(), dout.len(), lse.len())?;
        let (seqs, tokens, heads, _, hd, ..) = self.attn_args(&shape)?;
        if shape.seqs * shape.tokens * shape.heads == 0 {
            return Ok(());
        }
        let c = cfg((shape.heads, 1), THREADS)?;
        // SAFETY: as attention_sinks_forward; dsinks holds heads values (checked).
        unsafe {
            (self.k().attention_sinks_backward).launch(
                self.s(),
                c,
                out,
                dout,
                lse,
                sinks,
                dsinks,
                seqs,
                tokens,
                heads,
                hd,
            )
        }
    }
    fn activation_forward(
        &self,
        act: Activation,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        check_len(y.len(), x.len(), "activation output")?;
        let (c, n, s) = (self.ew_cfg(x.len())?, x.len() as u64, self.s());
        let kern = self.k();
        // SAFETY: x and y hold n values.
        unsafe {
            match act {
                Activation::Silu => kern.silu_forward.launch(s, c, x, y, n),
                Activation::GeluTanh => kern.gelu_tanh_forward.launch(s, c, x, y, n),
                Activation::Softcap(cap) => kern.softcap_forward.launch(s, c, x, y, n, cap),
                Activation::Gelu => kern.gelu_forward.launch(s, c, x, y, n),
                Activation::Scale(f) => kern.scale_forward.launch(s, c, x, y, n, f),
                Activation::Sigmoid => kern.sigmoid_forward.launch(s, c, x, y, n),
                Activation::Relu => kern.relu_forward.launch(s, c, x, y, n),
                Activation::Relu2 => kern.relu2_forward.launch(s, c, x, y, n),
                Activation::Clamp(cap) => kern.clamp_forward.launch(s, c, x, y, n, cap),
                Activation::ClampPlusOne(cap) => {
                    kern.clamp_plus_one_forward.launch(s, c, x, y, n, cap)
                }
                Activation::OssGate { alpha, limit } => {
                    kern.oss_gate_forward.launch(s, c, x, y, n, alpha, limit)
                }
            }
        }
    }
    fn activation_backward(
        &self,
        act: Activation,
        x: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let kern = self.k();
        match act {
            Activation::Silu => self.binary(&kern.silu_backward, x, dy, dx),
            Activation::GeluTanh => self.binary(&kern.gelu_tanh_backward, x, dy, dx),
            Activation::Gelu => self.binary(&kern.gelu_backward, x, dy, dx),
            Activation::Sigmoid => self.binary(&kern.sigmoid_backward, x, dy, dx),
            Activation::Relu => self.binary(&kern.relu_backward, x, dy, dx),
            Activation::Relu2 => self.binary(&kern.relu2_backward, x, dy, dx),
            Activation::Softcap(f)
            | Activation::Scale(f)
            | Activation::Clamp(f)
            | Activation::ClampPlusOne(f) => {
                let kernel = match act {
                    Activation::Softcap(_) => &kern.softcap_backward,
                    Activation::Clamp(_) | Activation::ClampPlusOne(_) => &kern.clamp_backward,
                    _ => &kern.scale_backward,
                };
                check_len(dy.len(), x.len(), "activation output gradient")?;
                check_len(dx.len(), x.len(), "activation input gradient")?;
                let c = self.ew_cfg(x.len())?;
                // SAFETY: x, dy and dx hold n values.
                unsafe { kernel.launch(self.s(), c, x, dy, dx, x.len() as u64, f) }
            }
            Activation::OssGate { alpha, limit } => {
                check_len(dy.len(), x.len(), "activation output gradient")?;
                check_len(dx.len(), x.len(), "activation input gradient")?;
                let (c, n) = (self.ew_cfg(x.len())?, x.len() as u64);
                // SAFETY: x, dy and dx hold n values.
                unsafe { (kern.oss_gate_backward).launch(self.s(), c, x, dy, dx, n, alpha, limit) }
            }
        }
    }
    fn xielu_forward(
        &self,
        x: &CudaSlice<f32>,
        [ap, an]: [&CudaSlice<f32>; 2],
        k: Xielu,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        check_len(y.len(), x.len(), "xIELU output")?;
        check_len(ap.len(), 1, "xIELU alpha_p")?;
        check_len(an.len(), 1, "xIELU alpha_n")?;
        let (c, n) = (self.ew_cfg(x.len())?, x.len() as u64);
        // SAFETY: x and y hold n values, ap and an one each (checked).
        unsafe { (self.k().xielu_forward).launch(self.s(), c, x, ap, an, y, n, k.beta, k.eps) }
    }
    fn xielu_backward(
        &self,
        x: &CudaSlice<f32>,
        [ap, an]: [&CudaSlice<f32>; 2],
        k: Xielu,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        dap: &mut CudaSlice<f32>,
        dan: &mut CudaSlice<f32>,
    ) -> Result<()> {
        check_len(dy.len(), x.len(), "xIELU output gradient")?;
        check_len(dx.len(), x.len(), "xIELU input gradient")?;
        check_len(ap.len(), 1, "xIELU alpha_p")?;
        check_len(an.len(), 1, "xIELU alpha_n")?;
        check_len(dap.len(), 1, "xIELU alpha_p gradient")?;
        check_len(dan.len(), 1, "xIELU alpha_n gradient")?;
        if x.is_empty() {
            return Ok(());
        }
        // Few enough blocks that one thread adds their partial sums in order.
        let nb = blocks(x.len(), THREADS as usize).min(1024);
        let s = self.s();
        let mut partials = s.alloc_zeros::<f64>(2 * nb).cu("allocating partial sums")?;
        let (n, nbi) = (x.len() as u64, int(nb, "blocks")?);
        // SAFETY: x, dy and dx hold n values, ap, an, dap and dan one each (checked), partials two per
        // block.
        unsafe {
            let kern = self.k();
            kern.xielu_backward.launch(
                s,
                cfg((nb, 1), THREADS)?,
                x,
                ap,
                an,
                dy,
                dx,
                n,
                k.beta,
                k.eps,
                &mut partials,
            )?;
            kern.xielu_reduce_params
                .launch(s, cfg((1, 1), 32)?, &partials, nbi, ap, an, dap, dan)
        }
    }
    fn mul_forward(
        &self,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.binary(&self.k().mul_forward, a, b, y)
    }
    fn mul_backward(
        &self,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        da: &mut CudaSlice<f32>,
        db: &mut CudaSlice<f32>,
    ) -> Result<()> {
        for (len, what) in [
            (b.len(), "mul b"),
            (dy.len(), "mul output gradient"),
            (da.len(), "mul a gradient"),
            (db.len(), "mul b gradient"),
        ] {
            check_len(len, a.len(), what)?;
        }
        let c = self.ew_cfg(a.len())?;
        // SAFETY: all hold n values.
        unsafe {
            self.k()
                .mul_backward
                .launch(self.s(), c, a, b, dy, da, db, a.len() as u64)
        }
    }
    fn add_forward(
        &self,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.binary(&self.k().add_forward, a, b, y)
    }
    fn row_scale_forward(
        &self,
        x: &CudaSlice<f32>,
        s: &CudaSlice<f32>,
        d: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let rows = row_scale_rows(s.len(), d, &[(x.len(), "x"), (y.len(), "output")], &[])?;
        let n = rows * d;
        if n == 0 {
            return Ok(());
        }
        let c = self.ew_cfg(n)?;
        // SAFETY: x and y hold n = rows·d values, s rows.
        unsafe {
            self.k()
                .row_scale_forward
                .launch(self.s(), c, x, s, y, d as u64, n as u64)
        }
    }
    fn row_scale_backward(
        &self,
        x: &CudaSlice<f32>,
        s: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        d: usize,
        dx: &mut CudaSlice<f32>,
        ds: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let rows = row_scale_rows(
            s.len(),
            d,
            &[
                (x.len(), "x"),
                (dy.len(), "output gradient"),
                (dx.len(), "input gradient"),
            ],
            &[(ds.len(), "scale gradient")],
        )?;
        if rows * d == 0 {
            return Ok(());
        }
        let (di, ri) = (int(d, "d")?, int(rows, "rows")?);
        let c = cfg((rows, 1), THREADS)?;
        // SAFETY: x, dy and dx hold rows·d values, s and ds rows.
        unsafe {
            self.k()
                .row_scale_backward
                .launch(self.s(), c, x, s, dy, dx, ds, di, ri)
        }
    }
    fn column_blocks_forward(
        &self,
        x: &CudaSlice<f32>,
        width: usize,
        cb: ColumnBlocks,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let rows = cb.rows(x.len(), width, y.len())?;
        self.column_blocks(&self.k().column_blocks_forward, x, rows, width, cb, y)
    }
    fn column_blocks_backward(
        &self,
        dy: &CudaSlice<f32>,
        width: usize,
        cb: ColumnBlocks,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let rows = cb.rows(dx.len(), width, dy.len())?;
        self.column_blocks(&self.k().column_blocks_backward, dy, rows, width, cb, dx)
    }
    fn accumulate(&self, dst: &mut CudaSlice<f32>, src: &CudaSlice<f32>) -> Result<()> {
        check_len(src.len(), dst.len(), "accumulate")?;
        let n = dst.len() as u64;
        let c = self.ew_cfg(dst.len())?;
        // SAFETY: both hold n values.
        unsafe { self.k().accumulate.launch(self.s(), c, dst, src, n) }
    }
    fn cross_entropy_forward(
        &self,
        logits: &CudaSlice<f32>,
        vocab: usize,
        targets: &Ids,
        lse: &mut CudaSlice<f32>,
    ) -> Result<(f64, usize)> {
        self.cross_entropy(Logits::Read(logits), vocab, targets, lse)
    }
    fn cross_entropy_forward_grad(
        &self,
        logits: &mut CudaSlice<f32>,
        vocab: usize,
        targets: &Ids,
        lse: &mut CudaSlice<f32>,
    ) -> Result<(f64, usize)> {
        self.cross_entropy(Logits::Grad(logits), vocab, targets, lse)
    }
}

fn embedding_checks(ids: &Ids, table: usize, dim: usize, out: usize) -> Result<()> {
    if dim == 0 || !table.is_multiple_of(dim) {
        return Err(Error::invalid(format!(
            "embedding: a table of {table} values is not rows of {dim}"
        )));
    }
    check_len(out, ids.len() * dim, "embedding output")?;
    let vocab = (table / dim) as i64;
    if let Some(&id) = ids.host.iter().find(|&&i| i < 0 || i >= vocab) {
        return Err(Error::invalid(format!(
            "token id {id} outside the vocabulary of {vocab}"
        )));
    }
    Ok(())
}

/// The rows of a norm of `x` values (`w` the weight's length): an error unless they are whole rows of
/// `norm.d`, in whole groups of `norm.groups` rows, and the weight is `groups · d` long.
fn norm_rows(x: usize, w: Option<usize>, norm: NormShape) -> Result<usize> {
    let (d, groups) = (norm.d, norm.groups);
    if let Some(w) = w {
        check_len(w, groups * d, "norm weight")?;
    }
    if d == 0 || groups == 0 || !x.is_multiple_of(d * groups) {
        return Err(Error::invalid(format!(
            "norm: {x} values are not rows of {d} in groups of {groups}"
        )));
    }
    Ok(x / d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_fits_nothing_is_evicted() {
        let mut w = WeightWindow::new(1000);
        assert_eq!(w.announce(&["a", "b"]), vec!["a", "b"]);
        assert!(w.admit("a", 100).is_empty());
        assert!(w.admit("b", 100).is_empty());
        assert_eq!(w.announce(&["c", "a"]), vec!["c"], "a is resident");
        assert!(w.admit("c", 100).is_empty());
        assert_eq!((w.len(), w.used()), (3, 300));
        // A second pass over the same groups uploads nothing.
        for g in [&["a", "b"][..], &["c", "a"]] {
            assert!(w.announce(g).is_empty());
        }
    }

    #[test]
    fn a_window_of_two_groups_slides_and_evicts_the_oldest() {
        // Groups of two 100-byte weights, budget for two groups: the current and the announced one.
        let groups: Vec<[String; 2]> = (0..6)
            .map(|g| [format!("l{g}.w1"), format!("l{g}.w2")])
            .collect();
        let mut w = WeightWindow::new(400);
        let mut uploads = 0;
        for pass in 0..2 {
            for (g, names) in groups.iter().enumerate() {
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                let load = w.announce(&names);
                for n in &load {
                    let evicted = w.admit(n, 100);
                    uploads += 1;
                    // Never the group being computed (g − 1) nor the announced one (g).
                    for e in &evicted {
                        assert!(
                            !names.contains(&e.as_str()),
                            "evicted {e} of the next group"
                        );
                        if g > 0 {
                            assert!(
                                !groups[g - 1].contains(e),
                                "evicted {e} of the current group"
                            );
                        }
                    }
                }
                // The ops of the current group read it: all resident.
                if g > 0 {
                    for n in &groups[g - 1] {
                        assert!(
                            w.contains(n),
                            "pass {pass}: {n} of the current group not resident"
                        );
                        w.touch(n);
                    }
                }
                assert!(w.used() <= 400, "over budget: {}", w.used());
            }
        }
        // Nothing fits across passes with a window of 2 of 6 groups: every weight uploaded each pass.
        assert_eq!(uploads, 2 * 12);
    }

    #[test]
    fn the_window_is_admitted_even_over_budget_and_budget_cuts_evict() {
        let mut w = WeightWindow::new(150);
        w.announce(&["a", "b"]);
        assert!(w.admit("a", 100).is_empty());
        // b does not fit but both are the announced group: admitted over budget, nothing evicted.
        assert!(w.admit("b", 100).is_empty());
        assert_eq!(w.used(), 200);
        w.announce(&["c"]); // a, b are now the current group
        assert!(w.admit("c", 100).is_empty(), "the window is protected");
        w.announce(&["d"]); // current: c; a and b may go, least recently used first
        w.touch("b");
        let evicted = w.admit("d", 100);
        assert_eq!(evicted, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(w.used(), 200);
        // Re-admitting a resident name replaces its size, it does not double count.
        w.admit("d", 50);
        assert_eq!(w.used(), 150);
        let evicted = w.set_budget(0);
        assert!(evicted.is_empty(), "c and d are the window: {evicted:?}");
    }

    #[test]
    fn opening_fails_cleanly_without_a_gpu() {
        // Opening fails cleanly (an error, not a panic) on a machine without a usable GPU.
        if let Err(e) = CudaDevice::open(usize::MAX) {
            assert!(!e.to_string().is_empty());
        }
    }
}
