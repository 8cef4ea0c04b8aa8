//! Every CUDA kernel's parameter list, declared once, and typed launches generated from it.
//!
//! A kernel launched with the wrong arguments (one too few, a `usize` where the kernel reads an `int`, an
//! f32 where it reads a double, an output passed as an input) does not fail to compile: it reads garbage
//! or writes out of bounds on the GPU. Here each parameter list is written once (`signatures!`) as Rust
//! types, each kernel is a [`Kernel`] of one signature, and its only way to launch is
//! [`Kernel::launch`] with exactly those arguments, so rustc checks every launch against the table.
//! Two tests hold the table to the kernels themselves: `declared_parameters_match_the_kernel_sources`
//! (below; reads the `.cu` signatures: parameter count, pointer element types, `const` = [`In`], else
//! [`Out`]) and `tests/kernels_compile.rs` (with NVRTC, in CI: the compiled PTX entry's parameter sizes
//! and kinds, and that every kernel in a file is declared).
//!
//! [`In`] is a buffer the kernel reads, [`Out`] one it writes: the distinction matters beyond
//! documentation, because cudarc records a read or a write event per buffer and another stream waits on
//! the right one only if a written buffer is passed as written.

use super::{load_modules, CuResult, Modules};
use crate::error::Result;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, LaunchArgs,
    LaunchConfig, PushKernelArg,
};
use std::marker::PhantomData;
use std::sync::Arc;

/// A device buffer a kernel reads (`const T*`): a slice or a view of `T`, or `None` for a null pointer.
pub trait In<'a, T> {
    /// Push this pointer onto `args`.
    fn push<'b>(self, args: &mut LaunchArgs<'b>)
    where
        'a: 'b;
}

/// A device buffer a kernel writes (`T*`): a mutable slice or view of `T`, or `None` for a null pointer.
pub trait Out<'a, T> {
    /// Push this pointer onto `args`.
    fn push<'b>(self, args: &mut LaunchArgs<'b>)
    where
        'a: 'b;
}

/// The value a null pointer argument points at (cudarc keeps a pointer to each argument until launch).
static NULL: u64 = 0;

impl<'a, T> In<'a, T> for &'a CudaSlice<T> {
    fn push<'b>(self, args: &mut LaunchArgs<'b>)
    where
        'a: 'b,
    {
        args.arg(self);
    }
}
impl<'a, T> In<'a, T> for &'a mut CudaSlice<T> {
    fn push<'b>(self, args: &mut LaunchArgs<'b>)
    where
        'a: 'b,
    {
        args.arg(&*self);
    }
}
impl<'a, 'c: 'a, T> In<'a, T> for &'a CudaView<'c, T> {
    fn push<'b>(self, args: &mut LaunchArgs<'b>)
    where
        'a: 'b,
    {
        args.arg(self);
    }
}
/// `Option<P>` for a pointer argument of either kind: `None` passes a null pointer.
macro_rules! nullable {
    ($kind:ident) => {
        impl<'a, T, P: $kind<'a, T>> $kind<'a, T> for Option<P> {
            fn push<'b>(self, args: &mut LaunchArgs<'b>)
            where
                'a: 'b,
            {
                match self {
                    Some(p) => p.push(args),
                    None => {
                        args.arg(&NULL);
                    }
                }
            }
        }
    };
}
nullable!(In);
nullable!(Out);
impl<'a, T> Out<'a, T> for &'a mut CudaSlice<T> {
    fn push<'b>(self, args: &mut LaunchArgs<'b>)
    where
        'a: 'b,
    {
        args.arg(self);
    }
}
impl<'a, 'c: 'a, T> Out<'a, T> for &'a mut CudaViewMut<'c, T> {
    fn push<'b>(self, args: &mut LaunchArgs<'b>)
    where
        'a: 'b,
    {
        args.arg(self);
    }
}

/// One parameter of a kernel as declared: a pointer read or written (its element type's Rust name), or a
/// scalar passed by value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Param {
    In(&'static str),
    Out(&'static str),
    I32,
    U32,
    U64,
    F32,
    F64,
}

impl Param {
    /// How the parameter appears in a PTX `.entry`: `.u64` for pointers and u64, `.u32` for 32-bit
    /// integers, `.f32`, `.f64`.
    pub fn ptx_type(self) -> &'static str {
        match self {
            Param::In(_) | Param::Out(_) | Param::U64 => ".u64",
            Param::I32 | Param::U32 => ".u32",
            Param::F32 => ".f32",
            Param::F64 => ".f64",
        }
    }
}

/// A parameter list (`signatures!` declares one type per list).
pub trait Signature {
    const PARAMS: &'static [Param];
}

/// A loaded kernel whose parameters are `S`.
pub struct Kernel<S> {
    function: CudaFunction,
    name: &'static str,
    _signature: PhantomData<S>,
}

impl<S> Kernel<S> {
    fn load(modules: &Modules, file: &str, name: &'static str) -> Result<Self> {
        Ok(Kernel {
            function: modules.function(file, name)?,
            name,
            _signature: PhantomData,
        })
    }

    /// The kernel's name (its `extern "C"` symbol).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Let launches of this kernel ask for `bytes` of dynamic shared memory (over 48 KiB needs this).
    pub(crate) fn allow_dynamic_shared(&self, bytes: usize) -> Result<()> {
        self.function
            .set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
            .cu(&format!("raising {}'s dynamic shared memory", self.name))
    }

    /// The launch builder of this kernel on `stream` (the generated `launch` methods push the arguments
    /// and call [`Kernel::finish`]).
    fn builder<'s>(&'s self, stream: &'s CudaStream) -> LaunchArgs<'s> {
        stream.launch_builder(&self.function)
    }

    /// Launch the built arguments (between two timing events while [`kernel_times`] records on this
    /// thread).
    ///
    /// # Safety
    /// `args` holds exactly the kernel's parameters, and the buffers hold what the kernel reads and
    /// writes for the sizes passed.
    unsafe fn finish(
        &self,
        stream: &CudaStream,
        mut args: LaunchArgs<'_>,
        cfg: LaunchConfig,
    ) -> Result<()> {
        let start = kernel_times::start(stream)?;
        args.launch(cfg).cu(&format!("launching {}", self.name))?;
        kernel_times::end(self.name, stream, start)
    }
}

/// Device time per kernel: while [`kernel_times::record`] runs a closure, every launch the closure makes
/// on its thread (any kernel table: CKA and runtime) is bracketed by two CUDA events, and the times are
/// summed per kernel name when it returns. Off (one thread-local check per launch) otherwise.
pub mod kernel_times {
    use super::*;
    use cudarc::driver::{sys, CudaEvent};
    use std::cell::RefCell;

    /// One kernel's launches during a [`record`]: how many, and their device time.
    #[derive(Clone, Debug, PartialEq, serde::Serialize)]
    pub struct KernelTime {
        pub kernel: &'static str,
        pub launches: usize,
        pub total_ms: f64,
    }

    /// A launch's kernel with the events recorded before and after it.
    type Span = (&'static str, CudaEvent, CudaEvent);

    thread_local! {
        static SPANS: RefCell<Option<Vec<Span>>> = const { RefCell::new(None) };
    }

    /// Whether launches on this thread are being recorded now.
    pub fn recording() -> bool {
        SPANS.with(|s| s.borrow().is_some())
    }

    /// Before a launch: the start event when recording.
    pub(super) fn start(stream: &CudaStream) -> Result<Option<CudaEvent>> {
        if !recording() {
            return Ok(None);
        }
        let e = stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .cu("timing event")?;
        Ok(Some(e))
    }

    /// After a launch: the end event, kept with the start one.
    pub(super) fn end(
        kernel: &'static str,
        stream: &CudaStream,
        start: Option<CudaEvent>,
    ) -> Result<()> {
        let Some(start) = start else { return Ok(()) };
        let end = stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .cu("timing event")?;
        SPANS.with(|s| {
            if let Some(v) = s.borrow_mut().as_mut() {
                v.push((kernel, start, end));
            }
        });
        Ok(())
    }

    /// Run `f` recording its launches; wait for them and return `f`'s value with the time of each kernel
    /// (in the order of first launch). Nested calls record into the outermost one.
    pub fn record<R>(f: impl FnOnce() -> Result<R>) -> Result<(R, Vec<KernelTime>)> {
        if recording() {
            return f().map(|v| (v, Vec::new()));
        }
        /// Recording stops when this goes, also if `f` panics.
        struct Stop;
        impl Drop for Stop {
            fn drop(&mut self) {
                SPANS.with(|s| s.borrow_mut().take());
            }
        }
        SPANS.with(|s| *s.borrow_mut() = Some(Vec::new()));
        let stop = Stop;
        let value = f();
        let spans = SPANS.with(|s| s.borrow_mut().take()).unwrap_or_default();
        drop(stop);
        let value = value?;
        let mut times = Vec::with_capacity(spans.len());
        for (kernel, a, b) in &spans {
            b.synchronize().cu(&format!("timing {kernel}"))?;
            let ms = a.elapsed_ms(b).cu(&format!("timing {kernel}"))?;
            times.push((*kernel, ms as f64));
        }
        Ok((value, summed(&times)))
    }

    /// Per-launch times summed per kernel, in the order of first launch.
    pub fn summed(launches: &[(&'static str, f64)]) -> Vec<KernelTime> {
        let mut out: Vec<KernelTime> = Vec::new();
        for &(kernel, ms) in launches {
            match out.iter_mut().find(|t| t.kernel == kernel) {
                Some(t) => {
                    t.launches += 1;
                    t.total_ms += ms;
                }
                None => out.push(KernelTime {
                    kernel,
                    launches: 1,
                    total_ms: ms,
                }),
            }
        }
        out
    }
}

/// One declared kernel, for the tests that hold the table to the sources.
#[derive(Clone, Copy, Debug)]
pub struct KernelDecl {
    pub file: &'static str,
    pub name: &'static str,
    pub params: &'static [Param],
}

macro_rules! param {
    (In $t:ty) => {
        Param::In(stringify!($t))
    };
    (Out $t:ty) => {
        Param::Out(stringify!($t))
    };
    (i32) => {
        Param::I32
    };
    (u32) => {
        Param::U32
    };
    (u64) => {
        Param::U64
    };
    (f32) => {
        Param::F32
    };
    (f64) => {
        Param::F64
    };
}

macro_rules! arg_type {
    (In $t:ty) => { impl In<'a, $t> };
    (Out $t:ty) => { impl Out<'a, $t> };
    ($s:ident) => { $s };
}

macro_rules! push_arg {
    ($args:ident, $p:ident, In) => {
        $p.push(&mut $args)
    };
    ($args:ident, $p:ident, Out) => {
        $p.push(&mut $args)
    };
    ($args:ident, $p:ident, $s:ident) => {
        $args.arg(&$p)
    };
}

/// Declare parameter lists: `Name(param: Kind, ...)`, Kind one of `In<T>`, `Out<T>`, `i32`, `u32`,
/// `u64`, `f32`, `f64`. Each becomes a type implementing [`Signature`] and a typed
/// `Kernel<Name>::launch(stream, cfg, params...)`.
macro_rules! signatures {
    ($( $(#[$doc:meta])* $sig:ident ( $($p:ident : $kind:ident $(<$t:ty>)?),* $(,)? ); )*) => {
        $(
            $(#[$doc])*
            pub enum $sig {}
            impl Signature for $sig {
                const PARAMS: &'static [Param] = &[$(param!($kind $($t)?)),*];
            }
            impl Kernel<$sig> {
                /// Launch on `stream` with `cfg`.
                ///
                /// # Safety
                /// The buffers hold what the kernel reads and writes for the sizes passed, and stay
                /// alive until the kernel has run.
                #[allow(clippy::too_many_arguments)]
                pub unsafe fn launch<'a>(
                    &self,
                    stream: &CudaStream,
                    cfg: LaunchConfig,
                    $($p: arg_type!($kind $($t)?)),*
                ) -> Result<()> {
                    let mut args = self.builder(stream);
                    $(push_arg!(args, $p, $kind);)*
                    self.finish(stream, args, cfg)
                }
            }
        )*
    };
}

/// Declare a set of kernels loaded together: `file => { kernel: Signature, ... }`. Generates the struct
/// (one [`Kernel`] field per kernel, named as the kernel), `FILES`, `KERNELS` (the declarations) and
/// `load`.
macro_rules! kernel_table {
    ($(#[$doc:meta])* pub struct $name:ident { $( $file:literal => { $($k:ident : $sig:ident),* $(,)? } )* }) => {
        $(#[$doc])*
        pub struct $name {
            $($(pub $k: Kernel<$sig>,)*)*
        }
        impl $name {
            /// The kernel files these kernels come from.
            pub const FILES: &'static [&'static str] = &[$($file),*];
            /// Every kernel of the table with its file and parameters.
            pub const KERNELS: &'static [KernelDecl] = &[
                $($(KernelDecl { file: $file, name: stringify!($k), params: <$sig as Signature>::PARAMS },)*)*
            ];
            /// Compile (or fetch from the disk cache) `FILES` for `arch`, load them, fetch the kernels.
            pub(crate) fn load(ctx: &Arc<CudaContext>, arch: &str) -> Result<Self> {
                let modules = load_modules(ctx, arch, Self::FILES.iter().copied())?;
                let modules = &modules;
                Ok($name {
                    $($($k: Kernel::load(modules, $file, stringify!($k))?,)*)*
                })
            }
        }
    };
}

/// A layer table (`const LayerDesc*` in the kernels) is passed as its little-endian u64 words, three per
/// layer (`layer_tables` in `similarity/cuda/mod.rs`, `LayerDesc` in `kernels/common.cuh`).
pub type LayerDescWords = u64;

signatures! {
    // The similarity stage (kernels/centre_columns.cu, gram_*.cu, hsic_pairs.cu, rbf.cu, feature_cross.cu).
    /// column_centre
    ColumnCentre(input: Out<u8>, layers: In<LayerDescWords>, n: i32, col_scale: Out<u32>,
                 nonfinite: Out<u64>, first_sample: u64, layer0: i32);
    /// column_to_f16
    ColumnToF16(input: Out<u8>, layers: In<LayerDescWords>, n: i32, col_scale: Out<u32>);
    /// gram_fma
    GramFma(input: In<u8>, layers: In<LayerDescWords>, n: i32, plane: u64, k: Out<f32>);
    /// gram_mma, gram_mma_pipelined, gram_wgmma
    GramMma(input: In<u8>, layers: In<LayerDescWords>, n: i32, as_f16: i32, plane: u64, k: Out<f32>);
    /// gram_wgmma_tma (maps: the launch's CUtensorMaps, 128 bytes a layer)
    GramWgmmaTma(input: In<u8>, layers: In<LayerDescWords>, n: i32, as_f16: i32, plane: u64, maps: In<u8>,
                 k: Out<f32>);
    /// gram_reduce_splits
    GramReduceSplits(k: Out<f32>, plane: u64, splits: i32);
    /// gram_row_sums
    GramRowSums(k: In<f32>, n: i32, zero_diag: i32, rowsum: Out<f64>);
    /// centre_offsets
    CentreOffsets(rowsum: In<f64>, n: i32, unbiased: i32, c: Out<f64>);
    /// centre_pack
    CentrePack(k: In<f32>, c: In<f64>, n: i32, unbiased: i32, col_scale: In<u32>, unscale: i32,
               g: Out<f32>, g_row0: u64, p: u64);
    /// hsic_pairs
    HsicPairs(ga: In<f32>, la: i32, gb: In<f32>, lb: i32, p: u64, chunk: u64, partial: Out<f64>,
              ldo: i32, row0: i32, col0: i32, tri: i32);
    /// hsic_reduce_splits
    HsicReduceSplits(partial: In<f64>, splits: i32, l: i32, out: Out<f64>);
    /// hsic_accumulate
    HsicAccumulate(out: In<f64>, l: i32, scale: f64, sum: Out<f64>);
    /// cross_f64
    CrossF64(z: In<f64>, n: i32, d: i32, c: Out<f64>);
    /// rbf_copy_diag
    RbfCopyDiag(k: In<f32>, n: i32, diag: Out<f32>);
    /// rbf_sqdist
    RbfSqdist(k: Out<f32>, diag: In<f32>, n: i32);
    /// rbf_select_init
    RbfSelectInit(state: Out<u32>, layers: i32, nn: u64);
    /// rbf_select_hist
    RbfSelectHist(k: In<f32>, nn: u64, state: In<u32>, hist: Out<u32>, shift: i32, bits: i32);
    /// rbf_select_step
    RbfSelectStep(state: Out<u32>, hist: Out<u32>, shift: i32, bits: i32);
    /// rbf_exp
    RbfExp(k: Out<f32>, nn: u64, state: In<u32>, threshold: f64);

    // The runtime (kernels/runtime_*.cu).
    /// silu_forward, sigmoid_forward, relu_forward, relu2_forward, gelu_tanh_forward, gelu_forward
    Unary(x: In<f32>, y: Out<f32>, n: u64);
    /// silu_backward, sigmoid_backward, relu_backward, relu2_backward, gelu_tanh_backward,
    /// gelu_backward, mul_forward, add_forward
    Binary(a: In<f32>, b: In<f32>, y: Out<f32>, n: u64);
    /// softcap_forward, scale_forward, clamp_forward, clamp_plus_one_forward
    SoftcapForward(x: In<f32>, y: Out<f32>, n: u64, c: f32);
    /// softcap_backward, scale_backward, clamp_backward
    SoftcapBackward(x: In<f32>, dy: In<f32>, dx: Out<f32>, n: u64, c: f32);
    /// oss_gate_forward
    OssGateForward(x: In<f32>, y: Out<f32>, n: u64, alpha: f32, limit: f32);
    /// oss_gate_backward
    OssGateBackward(x: In<f32>, dy: In<f32>, dx: Out<f32>, n: u64, alpha: f32, limit: f32);
    /// xielu_forward
    XieluForward(x: In<f32>, ap: In<f32>, an: In<f32>, y: Out<f32>, n: u64, beta: f32, eps: f32);
    /// xielu_backward (two partial sums per block)
    XieluBackward(x: In<f32>, ap: In<f32>, an: In<f32>, dy: In<f32>, dx: Out<f32>, n: u64, beta: f32,
                  eps: f32, partials: Out<f64>);
    /// xielu_reduce_params (one thread)
    XieluReduceParams(partials: In<f64>, blocks: i32, ap: In<f32>, an: In<f32>, dap: Out<f32>,
                      dan: Out<f32>);
    /// column_blocks_forward (x → y), column_blocks_backward (dy → dx, accumulated)
    ColumnBlocks(x: In<f32>, y: Out<f32>, rows: u64, width: i32, block: i32, stride: i32, offset: i32);
    /// mul_backward
    MulBackward(a: In<f32>, b: In<f32>, dy: In<f32>, da: Out<f32>, db: Out<f32>, n: u64);
    /// row_scale_forward (n = rows · d values, s one per row)
    RowScaleForward(x: In<f32>, s: In<f32>, y: Out<f32>, d: u64, n: u64);
    /// row_scale_backward (one block per row)
    RowScaleBackward(x: In<f32>, s: In<f32>, dy: In<f32>, dx: Out<f32>, ds: Out<f32>, d: i32,
                     rows: i32);
    /// accumulate
    Accumulate(dst: Out<f32>, src: In<f32>, n: u64);
    /// sum_sq_partials
    SumSqPartials(g: In<f32>, n: u64, partials: Out<f64>);
    /// embedding_forward
    Embedding(ids: In<i64>, src: In<f32>, dim: i32, scale: f32, dst: Out<f32>, rows: i32);
    /// embedding_backward
    EmbeddingBackward(ids: In<i64>, src: In<f32>, dim: i32, scale: f32, dst: Out<f32>, rows: i32,
                      skip: i32);
    /// rope_apply
    RopeApply(x: In<f32>, cos: In<f32>, sin: In<f32>, y: Out<f32>, rows: i32, heads: i32,
              head_dim: i32, rot_dim: i32, interleaved: i32, tokens: i32, sign: f32, add: i32);
    /// norm_forward (b: `None` = no bias)
    NormForward(x: In<f32>, w: In<f32>, b: In<f32>, offset: f32, d: i32, groups: i32, eps: f64,
                centre: i32, y: Out<f32>, rows: i32);
    /// norm_backward
    NormBackward(x: In<f32>, w: In<f32>, offset: f32, dy: In<f32>, d: i32, groups: i32, eps: f64,
                 centre: i32, dx: Out<f32>, mean: Out<f64>, inv: Out<f64>, rows: i32);
    /// norm_backward_weight
    NormBackwardWeight(x: In<f32>, dy: In<f32>, mean: In<f64>, inv: In<f64>, d: i32, groups: i32,
                       wide: i32, rows_per_chunk: i32, partials: Out<f64>);
    /// norm_reduce_weight
    NormReduceWeight(partials: In<f64>, d: i32, chunks: i32, dw: Out<f32>);
    /// cross_entropy_forward
    CrossEntropyForward(logits: In<f32>, vocab: i32, targets: In<i64>, rows: i32, lse: Out<f32>,
                        row_loss: Out<f64>);
    /// cross_entropy_forward_grad (the logits become their gradient in place)
    CrossEntropyForwardGrad(logits: Out<f32>, vocab: i32, targets: In<i64>, rows: i32, scale: f64,
                            lse: Out<f32>, row_loss: Out<f64>);
    /// attention_forward (SIMT, any head dimension)
    AttentionForward(q: In<f32>, k: In<f32>, v: In<f32>, out: Out<f32>, lse: Out<f32>, seqs: i32,
                     tokens: i32, heads: i32, kv_heads: i32, head_dim: i32, window: i32, scale: f32, softcap: f32,
        alibi_max_bias: f32, alibi_factor: f32);
    /// attention_backward_dq
    AttentionBackwardDq(q: In<f32>, k: In<f32>, v: In<f32>, lse: In<f32>, dout: In<f32>,
                        dq: Out<f32>, delta: Out<f32>, seqs: i32, tokens: i32, heads: i32,
                        kv_heads: i32, head_dim: i32, window: i32, scale: f32, softcap: f32,
        alibi_max_bias: f32, alibi_factor: f32);
    /// attention_sinks_forward
    AttentionSinksForward(sinks: In<f32>, out: Out<f32>, lse: Out<f32>, seqs: i32, tokens: i32,
                          heads: i32, head_dim: i32);
    /// attention_sinks_backward
    AttentionSinksBackward(out: In<f32>, dout: In<f32>, lse: In<f32>, sinks: In<f32>,
                           dsinks: Out<f32>, seqs: i32, tokens: i32, heads: i32, head_dim: i32);
    /// attention_backward_dkv
    AttentionBackwardDkv(q: In<f32>, k: In<f32>, v: In<f32>, lse: In<f32>, dout: In<f32>,
                         delta: In<f32>, dk: Out<f32>, dv: Out<f32>, seqs: i32, tokens: i32,
                         heads: i32, kv_heads: i32, head_dim: i32, window: i32, scale: f32, softcap: f32,
        alibi_max_bias: f32, alibi_factor: f32);
    /// attention_forward_mma64, attention_forward_mma128 (tensor cores; the head dimension is the kernel's)
    AttentionForwardMma(q: In<f32>, k: In<f32>, v: In<f32>, out: Out<f32>, lse: Out<f32>,
                        tokens: i32, heads: i32, kv_heads: i32, window: i32, scale: f32, softcap: f32,
        alibi_max_bias: f32, alibi_factor: f32);
    /// attention_backward_dq_mma64, attention_backward_dq_mma128
    AttentionBackwardDqMma(q: In<f32>, k: In<f32>, v: In<f32>, lse: In<f32>, dout: In<f32>,
                           dq: Out<f32>, delta: Out<f32>, tokens: i32, heads: i32, kv_heads: i32,
                           window: i32, scale: f32, softcap: f32,
        alibi_max_bias: f32, alibi_factor: f32);
    /// attention_backward_dkv_mma64, attention_backward_dkv_mma128
    AttentionBackwardDkvMma(q: In<f32>, k: In<f32>, v: In<f32>, lse: In<f32>, dout: In<f32>,
                            delta: In<f32>, dk: Out<f32>, dv: Out<f32>, tokens: i32, heads: i32,
                            kv_heads: i32, window: i32, scale: f32, softcap: f32,
        alibi_max_bias: f32, alibi_factor: f32);
    /// linear_forward: y = x wᵀ (+ b; `None` = no bias), f32 weights
    LinearForward(x: In<f32>, w: In<f32>, b: In<f32>, y: Out<f32>, n: i32, k: i32, m: i32);
    /// linear_forward_bf16: the same with bf16 weights (their bits as u16)
    LinearForwardBf16(x: In<f32>, w: In<u16>, b: In<f32>, y: Out<f32>, n: i32, k: i32, m: i32);
    /// linear_backward_input: dx = dy w, f32 weights
    LinearBackwardInput(dy: In<f32>, w: In<f32>, dx: Out<f32>, n: i32, k: i32, m: i32);
    /// linear_backward_input_bf16
    LinearBackwardInputBf16(dy: In<f32>, w: In<u16>, dx: Out<f32>, n: i32, k: i32, m: i32);
    /// linear_backward_weight, linear_backward_weight_bf16: dw += dyᵀ x
    LinearBackwardWeight(dy: In<f32>, x: In<f32>, dw: Out<f32>, n: i32, k: i32, m: i32);
    /// linear_backward_bias
    LinearBackwardBias(dy: In<f32>, db: Out<f32>, n: i32, m: i32);
    /// linear_wgmma: c (+)= a bᵀ (+ bias) on Hopper, a [m, r] and b [n, r] bf16 (K-major)
    LinearWgmma(a: In<u16>, b: In<u16>, bias: In<f32>, c: Out<f32>, m: i32, n: i32, r: i32,
                accumulate: i32);
    /// to_bf16_f32: x as bf16 (y) and its transpose (yt, ldt values a row); `None` = not wanted
    ToBf16F32(x: In<f32>, rows: i32, cols: i32, y: Out<u16>, yt: Out<u16>, ldt: i32);
    /// to_bf16_bf16: the same from bf16 bits (a transposed weight)
    ToBf16Bf16(x: In<u16>, rows: i32, cols: i32, y: Out<u16>, yt: Out<u16>, ldt: i32);
}

kernel_table! {
    /// The similarity stage's kernels.
    pub struct CkaKernels {
        "centre_columns.cu" => { column_centre: ColumnCentre, column_to_f16: ColumnToF16 }
        "gram_linear.cu" => {
            gram_fma: GramFma,
            gram_mma: GramMma,
            gram_mma_pipelined: GramMma,
            gram_wgmma: GramMma,
            gram_wgmma_tma: GramWgmmaTma,
            gram_reduce_splits: GramReduceSplits,
        }
        "gram_centre.cu" => {
            gram_row_sums: GramRowSums,
            centre_offsets: CentreOffsets,
            centre_pack: CentrePack,
        }
        "hsic_pairs.cu" => {
            hsic_pairs: HsicPairs,
            hsic_reduce_splits: HsicReduceSplits,
            hsic_accumulate: HsicAccumulate,
        }
        "feature_cross.cu" => { cross_f64: CrossF64 }
        "rbf.cu" => {
            rbf_copy_diag: RbfCopyDiag,
            rbf_sqdist: RbfSqdist,
            rbf_select_init: RbfSelectInit,
            rbf_select_hist: RbfSelectHist,
            rbf_select_step: RbfSelectStep,
            rbf_exp: RbfExp,
        }
    }
}

kernel_table! {
    /// The runtime's kernels (the CUDA device of `runtime::ops::cuda`).
    pub struct RuntimeKernels {
        "runtime_elementwise.cu" => {
            silu_forward: Unary,
            silu_backward: Binary,
            sigmoid_forward: Unary,
            sigmoid_backward: Binary,
            relu_forward: Unary,
            relu_backward: Binary,
            relu2_forward: Unary,
            relu2_backward: Binary,
            gelu_tanh_forward: Unary,
            gelu_tanh_backward: Binary,
            gelu_forward: Unary,
            gelu_backward: Binary,
            softcap_forward: SoftcapForward,
            softcap_backward: SoftcapBackward,
            scale_forward: SoftcapForward,
            scale_backward: SoftcapBackward,
            clamp_forward: SoftcapForward,
            clamp_backward: SoftcapBackward,
            clamp_plus_one_forward: SoftcapForward,
            oss_gate_forward: OssGateForward,
            oss_gate_backward: OssGateBackward,
            xielu_forward: XieluForward,
            xielu_backward: XieluBackward,
            xielu_reduce_params: XieluReduceParams,
            mul_forward: Binary,
            mul_backward: MulBackward,
            add_forward: Binary,
            accumulate: Accumulate,
            sum_sq_partials: SumSqPartials,
            column_blocks_forward: ColumnBlocks,
            column_blocks_backward: ColumnBlocks,
            row_scale_forward: RowScaleForward,
            row_scale_backward: RowScaleBackward,
        }
        "runtime_embedding.cu" => { embedding_forward: Embedding, embedding_backward: EmbeddingBackward }
        "runtime_rope.cu" => { rope_apply: RopeApply }
        "runtime_norm.cu" => {
            norm_forward: NormForward,
            norm_backward: NormBackward,
            norm_backward_weight: NormBackwardWeight,
            norm_reduce_weight: NormReduceWeight,
        }
        "runtime_cross_entropy.cu" => {
            cross_entropy_forward: CrossEntropyForward,
            cross_entropy_forward_grad: CrossEntropyForwardGrad,
        }
        "runtime_attention.cu" => {
            attention_forward: AttentionForward,
            attention_backward_dq: AttentionBackwardDq,
            attention_backward_dkv: AttentionBackwardDkv,
            attention_sinks_forward: AttentionSinksForward,
            attention_sinks_backward: AttentionSinksBackward,
        }
        "runtime_attention_mma.cu" => {
            attention_forward_mma64: AttentionForwardMma,
            attention_forward_mma128: AttentionForwardMma,
            attention_backward_dq_mma64: AttentionBackwardDqMma,
            attention_backward_dq_mma128: AttentionBackwardDqMma,
            attention_backward_dkv_mma64: AttentionBackwardDkvMma,
            attention_backward_dkv_mma128: AttentionBackwardDkvMma,
        }
        "runtime_linear.cu" => {
            linear_forward: LinearForward,
            linear_backward_input: LinearBackwardInput,
            linear_backward_weight: LinearBackwardWeight,
            linear_backward_bias: LinearBackwardBias,
            linear_forward_bf16: LinearForwardBf16,
            linear_backward_input_bf16: LinearBackwardInputBf16,
            linear_backward_weight_bf16: LinearBackwardWeight,
            linear_wgmma: LinearWgmma,
            to_bf16_f32: ToBf16F32,
            to_bf16_bf16: ToBf16Bf16,
        }
    }
}

/// Every declared kernel, both tables.
pub fn all_kernels() -> impl Iterator<Item = &'static KernelDecl> {
    CkaKernels::KERNELS.iter().chain(RuntimeKernels::KERNELS)
}

/// The `extern "C" __global__` kernels of one CUDA source as written: (name, parameters), each parameter
/// as (C type without `const`/`__restrict__`, whether `const`). A kernel defined inside a macro keeps
/// its name as written (`attention_backward_dq_mma##HD`). For the tests that hold the table to the
/// sources.
pub fn source_kernels(src: &str) -> Vec<(String, Vec<(String, bool)>)> {
    let src = src.replace("\\\n", "\n");
    let mut out = Vec::new();
    let marker = "extern \"C\" __global__ void";
    let mut rest = src.as_str();
    while let Some(i) = rest.find(marker) {
        rest = &rest[i + marker.len()..];
        let mut head = rest.trim_start();
        if let Some(after) = head.strip_prefix("__launch_bounds__(") {
            head = after.split_once(')').map_or("", |(_, r)| r).trim_start();
        }
        let Some((name, params)) = head.split_once('(') else {
            break;
        };
        let params = params.split_once(')').map_or("", |(p, _)| p);
        let parsed = params
            .split(',')
            .map(|p| p.split_whitespace().collect::<Vec<_>>())
            .filter(|words| !words.is_empty())
            .map(|words| {
                let is_const = words.contains(&"const");
                // Drop the qualifiers and the parameter's name; what is left is the type.
                let ty: Vec<&str> = words[..words.len() - 1]
                    .iter()
                    .copied()
                    .filter(|w| *w != "const" && *w != "__restrict__")
                    .collect();
                (ty.join(" "), is_const)
            })
            .collect();
        out.push((name.trim().to_string(), parsed));
    }
    out
}

/// The Rust name a declared parameter uses for a C type (`float` → `f32`, `const LayerDesc*` → its
/// u64 words, ...), or `None` for a type no declaration uses.
pub fn rust_type_of_c(c: &str) -> Option<&'static str> {
    Some(match c.trim_end_matches('*').trim() {
        "float" => "f32",
        "double" => "f64",
        "int" => "i32",
        "long long" => "i64",
        "unsigned char" => "u8",
        "u16" => "u16",
        "u32" | "unsigned" | "unsigned int" => "u32",
        "u64" => "u64",
        "LayerDesc" => "LayerDescWords",
        _ => return None,
    })
}

/// The parameter a C parameter (type, const) should be declared as.
pub fn param_of_c(ty: &str, is_const: bool) -> Option<Param> {
    let rust = rust_type_of_c(ty)?;
    Some(if ty.ends_with('*') {
        if is_const {
            Param::In(rust)
        } else {
            Param::Out(rust)
        }
    } else {
        match rust {
            "i32" => Param::I32,
            "u32" => Param::U32,
            "u64" => Param::U64,
            "f32" => Param::F32,
            "f64" => Param::F64,
            _ => return None,
        }
    })
}

/// The kernels of the PTX text `ptx`: (entry name, each parameter's PTX type such as `.u64`).
pub fn ptx_entries(ptx: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut rest = ptx;
    while let Some(i) = rest.find(".entry ") {
        rest = &rest[i + ".entry ".len()..];
        let Some((name, params)) = rest.split_once('(') else {
            break;
        };
        let params = params.split_once(')').map_or("", |(p, _)| p);
        let types = params
            .split(',')
            .filter_map(|p| {
                // `.param .u64 name_param_0` (pointers may carry `.ptr .align N` after the type).
                let mut words = p.split_whitespace();
                (words.next() == Some(".param")).then(|| words.next().unwrap_or("").to_string())
            })
            .collect();
        out.push((name.trim().to_string(), types));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::nvrtc;
    use super::*;
    use crate::error::Error;

    #[test]
    fn kernel_times_sum_per_kernel_in_the_order_of_first_launch() {
        let t = kernel_times::summed(&[
            ("gram_mma", 1.5),
            ("centre_pack", 0.25),
            ("gram_mma", 2.0),
            ("hsic_pairs", 0.5),
            ("centre_pack", 0.25),
        ]);
        let got: Vec<(&str, usize, f64)> = t
            .iter()
            .map(|k| (k.kernel, k.launches, k.total_ms))
            .collect();
        assert_eq!(
            got,
            [
                ("gram_mma", 2, 3.5),
                ("centre_pack", 2, 0.5),
                ("hsic_pairs", 1, 0.5)
            ]
        );
        // Recording with no launch (no GPU needed): the closure's value, no times.
        let (v, times) = kernel_times::record(|| Ok(7)).unwrap();
        assert_eq!((v, times.len()), (7, 0));
        // An error inside is returned, and recording is off again afterwards; after a panic too.
        assert!(kernel_times::record(|| -> Result<()> {
            assert!(kernel_times::recording());
            Err(Error::invalid("x"))
        })
        .is_err());
        assert!(!kernel_times::recording());
        let panicked =
            std::panic::catch_unwind(|| kernel_times::record(|| -> Result<()> { panic!("in f") }));
        assert!(panicked.is_err());
        assert!(!kernel_times::recording());
    }

    /// The declared name `name` is the source's kernel `source_name`, which may be a macro's
    /// `prefix##HD` instantiated as `prefix64`, `prefix128`, ....
    fn names_match(source_name: &str, name: &str) -> bool {
        match source_name.split_once("##") {
            Some((prefix, _)) => name
                .strip_prefix(prefix)
                .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())),
            None => source_name == name,
        }
    }

    #[test]
    fn declared_parameters_match_the_kernel_sources() {
        let mut checked = 0;
        for file in nvrtc::kernel_files() {
            let src = nvrtc::kernel_source(file).unwrap();
            let in_source = source_kernels(src);
            assert!(!in_source.is_empty(), "{file}: no kernels found");
            let declared: Vec<&KernelDecl> = all_kernels().filter(|d| d.file == file).collect();
            // Every kernel of the source is declared, with the same parameters.
            for (name, params) in &in_source {
                let decls: Vec<_> = declared
                    .iter()
                    .filter(|d| names_match(name, d.name))
                    .collect();
                assert!(
                    !decls.is_empty(),
                    "{file}: kernel {name} is not declared in kernels.rs"
                );
                let expected: Vec<Param> = params
                    .iter()
                    .map(|(ty, c)| {
                        param_of_c(ty, *c)
                            .unwrap_or_else(|| panic!("{file} {name}: no Rust type for `{ty}`"))
                    })
                    .collect();
                for d in decls {
                    assert_eq!(
                        d.params,
                        expected.as_slice(),
                        "{file}: {} parameters",
                        d.name
                    );
                    checked += 1;
                }
            }
            // Every declared kernel is in the source.
            for d in &declared {
                assert!(
                    in_source.iter().any(|(n, _)| names_match(n, d.name)),
                    "{} declared in {file} but not found there",
                    d.name
                );
            }
        }
        assert_eq!(checked, all_kernels().count());
    }

    #[test]
    fn the_source_parser_reads_qualifiers_launch_bounds_and_macros() {
        let src = "extern \"C\" __global__ void __launch_bounds__(256)\nk1(const float* __restrict__ x, \
                   int n, u64* __restrict__ out) {}\n#define K(HD) \\\n    extern \"C\" __global__ void \
                   k2_##HD(double s) {}\n";
        let k = source_kernels(src);
        assert_eq!(k.len(), 2);
        assert_eq!(k[0].0, "k1");
        assert_eq!(
            k[0].1,
            vec![
                ("float*".to_string(), true),
                ("int".to_string(), false),
                ("u64*".to_string(), false)
            ]
        );
        assert_eq!(k[1].0, "k2_##HD");
        assert!(names_match("k2_##HD", "k2_64"));
        assert!(!names_match("k2_##HD", "k2_"));
        assert_eq!(param_of_c("float*", true), Some(Param::In("f32")));
        assert_eq!(param_of_c("u64*", false), Some(Param::Out("u64")));
        assert_eq!(param_of_c("double", false), Some(Param::F64));
        assert_eq!(param_of_c("float2*", true), None);
    }

    #[test]
    fn ptx_entries_are_read_with_their_parameter_types() {
        let ptx = ".visible .entry k(\n\t.param .u64 .ptr .align 1 k_param_0,\n\t.param .u32 k_param_1,\n\
                   \t.param .f64 k_param_2\n)\n{\n}\n.visible .entry z()\n{\n}\n";
        assert_eq!(
            ptx_entries(ptx),
            vec![
                (
                    "k".to_string(),
                    vec![".u64".into(), ".u32".into(), ".f64".into()]
                ),
                ("z".to_string(), vec![])
            ]
        );
    }
}
