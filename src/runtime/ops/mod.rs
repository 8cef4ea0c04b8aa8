//! The runtime's operators and the devices that run them. Every op is a pair of functions over flat `f32`
//! buffers with explicit shapes: `*_forward` writes its output, `*_backward` **accumulates** (`+=`) into the
//! gradients of its inputs and parameters (a buffer read by several ops sums their contributions, and the
//! caller zeroes a gradient once, when it allocates it).
//!
//! [`Device`] is the seam: its storage, how it fetches a parameter, and every op the decoder's tape runs.
//! [`cpu::Cpu`] implements it with the free functions of [`cpu`] (rayon, the `gemm` crate); a CUDA device
//! implements the same trait over device buffers. The tape ([`super::tape::Tape`]) is generic over the
//! device and is the only caller; the tape's op types ([`super::tape::op`]) are written once, for every
//! device. The CNN ops ([`cnn`]) are CPU-only (the convolutional classifiers' tape is a `Tape<Cpu>`).

pub mod cnn;
pub mod cpu;
pub mod cuda;
pub mod vmath;

use crate::error::Result;
use crate::runtime::tape::ParamStore;
pub use cpu::{Alibi, AttnShape};

/// Which values of a head's rotated part turn together: Hugging Face's `rotate_half` layout (LLaMA and
/// most others) pairs `(i, i + rot_dim / 2)`; Cohere's (and GLM's, GPT-J's) `rotate_every_two` pairs
/// `(2i, 2i + 1)`. Frequency i turns pair i either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RopePairs {
    Halves,
    Interleaved,
}

impl RopePairs {
    /// The two values (of a head) frequency `i` turns, with `rot_dim` values rotated.
    pub fn pair(self, i: usize, rot_dim: usize) -> [usize; 2] {
        match self {
            RopePairs::Halves => [i, i + rot_dim / 2],
            RopePairs::Interleaved => [2 * i, 2 * i + 1],
        }
    }

    /// Value `i`'s partner in its pair and the sign it enters `rotate_half(x)[i]` with (y = x cos +
    /// rotate_half(x) sin): the first of a pair reads −(second), the second +(first); `None` past
    /// `rot_dim` (partial rotary: the value passes through).
    pub fn partner(self, i: usize, rot_dim: usize) -> Option<(usize, f32)> {
        let half = rot_dim / 2;
        match self {
            _ if i >= rot_dim => None,
            RopePairs::Halves if i < half => Some((i + half, -1.0)),
            RopePairs::Halves => Some((i - half, 1.0)),
            RopePairs::Interleaved if i.is_multiple_of(2) => Some((i + 1, -1.0)),
            RopePairs::Interleaved => Some((i - 1, 1.0)),
        }
    }
}

/// Precomputed rotary tables for one sequence length: `cos`/`sin` are `[tokens, head_dim]` row-major,
/// each frequency at both values of its pair ([`RopePairs`]). Partial rotary (Phi-3's
/// `partial_rotary_factor`): only the first `rot_dim` values of a head rotate; the others pass through
/// (their table entries are cos 1, sin 0).
#[derive(Clone, Debug)]
pub struct RopeTable {
    pub tokens: usize,
    pub head_dim: usize,
    /// The rotated values of a head (`2 · inv_freq.len()`, even, ≤ `head_dim`).
    pub rot_dim: usize,
    pub pairs: RopePairs,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl RopeTable {
    /// Tables for positions `0..tokens` of heads of `head_dim` from the inverse frequencies (`rot_dim / 2`
    /// of them), computed in f64 and rounded once, in the `rotate_half` layout. `scale` multiplies cos
    /// and sin of the rotated part (HF's `attention_scaling`: 1 but for LongRoPE and YaRN).
    pub fn new(inv_freq: &[f64], head_dim: usize, tokens: usize, scale: f64) -> Self {
        Self::with_pairs(inv_freq, head_dim, tokens, scale, RopePairs::Halves)
    }

    /// [`RopeTable::new`] with the given pairing.
    pub fn with_pairs(
        inv_freq: &[f64],
        head_dim: usize,
        tokens: usize,
        scale: f64,
        pairs: RopePairs,
    ) -> Self {
        let half = inv_freq.len();
        let rot_dim = 2 * half;
        assert!(
            rot_dim <= head_dim,
            "{half} rotary frequencies for heads of {head_dim}"
        );
        let mut cos = vec![1f32; tokens * head_dim];
        let mut sin = vec![0f32; tokens * head_dim];
        for t in 0..tokens {
            for (i, &f) in inv_freq.iter().enumerate() {
                // HF computes the angle in f32 (position * inv_freq); round the same way so the tables match.
                let angle = (t as f32 * f as f32) as f64;
                let (s, c) = angle.sin_cos();
                for j in pairs.pair(i, rot_dim) {
                    cos[t * head_dim + j] = (c * scale) as f32;
                    sin[t * head_dim + j] = (s * scale) as f32;
                }
            }
        }
        RopeTable {
            tokens,
            head_dim,
            rot_dim,
            pairs,
            cos,
            sin,
        }
    }
}

/// xIELU's constants (its `beta` and `eps` buffers; the two learned parameters are the device's).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Xielu {
    pub beta: f32,
    pub eps: f32,
}

/// An elementwise function of the tape ([`crate::runtime::tape::op::Activate`]): the gate activation of a
/// gated MLP (`act(gate) ⊙ up`, the config's `hidden_act` / `hidden_activation`), an MLP's activation
/// (GPT-NeoX's GELU, OPT's ReLU), Gemma 2's soft-capping of the logits, a constant factor (Granite), or
/// the logistic function of Qwen2-MoE's shared-expert gate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// `x σ(x)` (LLaMA's SwiGLU).
    Silu,
    /// `x/2 (1 + tanh(√(2/π) (x + 0.044715 x³)))` (PyTorch's `gelu(approximate="tanh")`, Gemma's
    /// GeGLU).
    GeluTanh,
    /// `c · tanh(x / c)` (Gemma 2's `final_logit_softcapping`).
    Softcap(f32),
    /// `x Φ(x) = x/2 (1 + erf(x / √2))` (PyTorch's exact `gelu`, GPT-NeoX's MLP).
    Gelu,
    /// `s · x` (Granite's `residual_multiplier` on each block's branches, 1 / `logits_scaling` on the
    /// logits).
    Scale(f32),
    /// `σ(x) = 1 / (1 + e^{−x})` (Qwen2-MoE's shared-expert gate, `sigmoid(shared_expert_gate(x))`).
    Sigmoid,
    /// `max(x, 0)` (OPT's MLP, fc1 → ReLU → fc2); its slope is 1 where x > 0, else 0 (0 at x = 0 as in
    /// PyTorch).
    Relu,
    /// `max(x, 0)²` (Arcee's MLP, up → ReLU² → down; transformers' "relu2"); its slope is 2 max(x, 0).
    Relu2,
    /// `clamp(x, −c, c)` (OLMo's `clip_qkv` on q, k and v); its slope is 1 where |x| ≤ c, else 0 (as
    /// PyTorch's clamp: the bounds themselves pass the gradient).
    Clamp(f32),
    /// `clamp(x, −c, c) + 1` (GPT-OSS's expert up projection, `swiglu_limit` c); its slope is
    /// [`Activation::Clamp`]'s.
    ClampPlusOne(f32),
    /// `m σ(alpha m)` with `m = min(x, limit)` (GPT-OSS's expert gate, `swiglu_alpha`, `swiglu_limit`);
    /// its slope is σ(αx) (1 + αx (1 − σ(αx))) where x ≤ limit, else 0.
    OssGate { alpha: f32, limit: f32 },
}

/// A normalisation of rows of `d` values ([`Device::norm_forward`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NormShape {
    pub d: usize,
    pub eps: f64,
    /// Added to the weight to make the gain: 0, or 1 for Gemma's norms (`x̂ (1 + w)`).
    pub offset: f32,
    /// LayerNorm: subtract each row's mean first (and divide by the standard deviation); else RMSNorm.
    pub centre: bool,
    /// The weight (and bias) hold `groups` rows of `d` values, and row r of the input takes row
    /// `r mod groups`: 1 for one row shared by all (every norm but one), the heads for per-head norms
    /// with weights of their own (Cohere's q/k norms, `[heads, head_dim]`).
    pub groups: usize,
}

/// Which columns [`Device::column_blocks_forward`] gathers: in each group of `stride` columns, the `block`
/// starting at `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColumnBlocks {
    pub block: usize,
    pub stride: usize,
    pub offset: usize,
}

impl ColumnBlocks {
    /// The rows of a gather from `x_len` values in rows `width` wide into `y_len` values; an error unless
    /// the rows hold whole groups, the block lies inside its group and the lengths agree.
    pub fn rows(self, x_len: usize, width: usize, y_len: usize) -> Result<usize> {
        let ColumnBlocks {
            block,
            stride,
            offset,
        } = self;
        if block == 0 || offset + block > stride || width == 0 || !width.is_multiple_of(stride) {
            return Err(crate::Error::invalid(format!(
                "column blocks: block {block} at {offset} of groups of {stride} in rows of {width}"
            )));
        }
        let rows = x_len / width;
        if x_len != rows * width || y_len != rows * (width / stride) * block {
            return Err(crate::Error::invalid(format!(
                "column blocks: {x_len} values in rows of {width} do not give {y_len}"
            )));
        }
        Ok(rows)
    }
}

/// The rows of a [`Device::row_scale_forward`] or [`Device::row_scale_backward`], `s_len` (one scale per
/// row): an error unless each buffer of `values` (its length and its name) holds rows·d values and each
/// of `per_row` one per row.
pub fn row_scale_rows(
    s_len: usize,
    d: usize,
    values: &[(usize, &str)],
    per_row: &[(usize, &str)],
) -> Result<usize> {
    let n = s_len.checked_mul(d).ok_or_else(|| {
        crate::Error::invalid(format!("row scale: {s_len} rows of {d} values overflow"))
    })?;
    let wanted = values
        .iter()
        .map(|&v| (v, n))
        .chain(per_row.iter().map(|&v| (v, s_len)));
    for ((len, what), want) in wanted {
        if len != want {
            return Err(crate::Error::invalid(format!(
                "row scale: {what} holds {len} values where {want} are expected ({s_len} rows of {d})"
            )));
        }
    }
    Ok(s_len)
}

/// How a device computes the linear layers' matrix products (`--matmul`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Matmul {
    /// Operands rounded to bf16, f32 accumulation: tensor cores on a GPU (what PyTorch's bf16 matmuls
    /// compute; the CUDA default). Gradient norms differ from the f32 ones by about 2⁻⁹ relative.
    #[default]
    Bf16,
    /// f32 throughout (the CPU; on a GPU the exact mode that checks against the CPU at 1e-4).
    F32,
}

/// How an op reads a parameter: as f32 values (norm weights, biases, an embedding table), or as a linear
/// layer's weight, which a device keeps in the precision of its matrix products ([`Device::weight`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamUse {
    Values,
    Weight,
}

/// A device the runtime's tape runs on: where its buffers live and the ops it runs. Forwards write their
/// output (allocated and zeroed by the tape); backwards accumulate into every gradient they are given.
/// Shapes are explicit (`n` rows; `k` inputs, `m` outputs of a linear; `d` the width of a row).
///
/// Storage: `Buf` owns `len` f32 values on the device and dereferences to `Slice`, the view ops take
/// (`[f32]` on the CPU); `Param` is a parameter fetched for one op (on the CPU the memory-mapped tensor,
/// borrowed when it is stored as f32); `Weight` a linear layer's weight as the matrix products read it
/// (the CPU: the parameter itself; a GPU with bf16 products: a bf16 copy, half the memory and the
/// upload); `Ids` holds token ids or class labels on the device.
pub trait Device: Clone + Send + Sync + 'static {
    type Slice: ?Sized + Sync;
    type Buf: std::ops::DerefMut<Target = Self::Slice> + Send + Sync;
    type Param<'s>: std::ops::Deref<Target = Self::Slice>;
    type Weight<'s>;
    type Ids: Send + Sync;

    /// For messages and reports, e.g. "cpu" or "cuda:0 (NVIDIA H100)".
    fn name(&self) -> String;
    /// The precision of the linear layers' matrix products (the CPU: f32).
    fn matmul(&self) -> Matmul {
        Matmul::F32
    }
    /// A buffer of `len` zeros.
    fn alloc_zeroed(&self, len: usize) -> Result<Self::Buf>;
    /// Set every value of `buf` to zero (a recycled buffer).
    fn zero(&self, buf: &mut Self::Buf) -> Result<()>;
    fn buf_len(&self, buf: &Self::Buf) -> usize;
    /// Copy host values into a device buffer of the same length.
    fn upload(&self, host: &[f32], dst: &mut Self::Slice) -> Result<()>;
    /// Copy a device buffer to the host (a hidden state handed to a host consumer).
    fn download(&self, src: &Self::Slice, host: &mut Vec<f32>) -> Result<()>;
    /// `src` readable on the host: the slice itself where the device is the host, else downloaded into
    /// `scratch`.
    fn host_view<'a>(&self, src: &'a Self::Slice, scratch: &'a mut Vec<f32>) -> Result<&'a [f32]> {
        self.download(src, scratch)?;
        Ok(scratch)
    }
    /// Token ids or labels (−1: none) onto the device.
    fn ids(&self, ids: &[i64]) -> Result<Self::Ids>;
    /// Parameter `name` (`len` values, row-major, PyTorch layout) for one op.
    fn param<'s>(
        &self,
        store: &'s dyn ParamStore,
        name: &str,
        len: usize,
    ) -> Result<Self::Param<'s>>;
    /// Parameter `name` (`m·k` values, `[m, k]`) as a linear layer's weight.
    fn weight<'s>(
        &self,
        store: &'s dyn ParamStore,
        name: &str,
        len: usize,
    ) -> Result<Self::Weight<'s>>;
    /// A weight from values already on the device, as [`Device::weight`] would hold them (tests and
    /// the self-check).
    fn weight_from<'a>(&self, w: &'a Self::Slice) -> Result<Self::Weight<'a>>;
    /// The parameters the next ops will read and how, in the order they will read them: a device that
    /// uploads weights layer by layer starts copying them now, so the copy overlaps the current layer's
    /// compute. The CPU reads them in place and does nothing.
    fn prefetch(&self, _store: &dyn ParamStore, _params: &[(&str, ParamUse)]) -> Result<()> {
        Ok(())
    }
    /// Σ g² in f64 (a parameter's share of its layer's gradient norm).
    fn sum_sq(&self, g: &Self::Slice) -> Result<f64>;
    /// `dst = src` (same length).
    fn copy(&self, src: &Self::Slice, dst: &mut Self::Slice) -> Result<()>;
    /// Wait until everything enqueued so far has run (a device that computes asynchronously).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    /// The GPU this device computes on, `None` for the host: hidden states on a GPU can go straight
    /// to the CUDA CKA on the same GPU ([`Device::device_addr`]).
    fn cuda_ordinal(&self) -> Option<usize> {
        None
    }
    /// The device address of `s`'s first value (GPU devices only).
    fn device_addr(&self, _s: &Self::Slice) -> Result<u64> {
        Err(crate::Error::invalid(format!(
            "{} keeps its buffers in host memory",
            self.name()
        )))
    }

    /// `out[r] = scale · table[ids[r]]`; `table` is `[vocab, dim]` (Gemma scales by √hidden).
    fn embedding_forward(
        &self,
        ids: &Self::Ids,
        table: &Self::Slice,
        dim: usize,
        scale: f32,
        out: &mut Self::Slice,
    ) -> Result<()>;
    /// `dtable[ids[r]] += scale · dout[r]`, skipping the rows whose id is `padding` (nn.Embedding's
    /// `padding_idx`).
    #[allow(clippy::too_many_arguments)]
    fn embedding_backward(
        &self,
        ids: &Self::Ids,
        dout: &Self::Slice,
        dim: usize,
        scale: f32,
        padding: Option<usize>,
        dtable: &mut Self::Slice,
    ) -> Result<()>;
    /// `y = x Wᵀ (+ b)`: x `[n, k]`, W `[m, k]`, y `[n, m]`.
    #[allow(clippy::too_many_arguments)]
    fn linear_forward(
        &self,
        x: &Self::Slice,
        w: &Self::Weight<'_>,
        b: Option<&Self::Slice>,
        n: usize,
        k: usize,
        m: usize,
        y: &mut Self::Slice,
    ) -> Result<()>;
    /// `dx += dy W`, `dw += dyᵀ x`, `db += Σ_rows dy`.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        x: &Self::Slice,
        w: &Self::Weight<'_>,
        dy: &Self::Slice,
        n: usize,
        k: usize,
        m: usize,
        dx: Option<&mut Self::Slice>,
        dw: &mut Self::Slice,
        db: Option<&mut Self::Slice>,
    ) -> Result<()>;
    /// `y = (offset + w) ⊙ x̂ (+ b)` per row of `norm.d` values, x̂ = x / sqrt(mean(x²) + eps) (RMSNorm)
    /// or, `norm.centre`, (x − mean) / sqrt(var + eps) (LayerNorm); offset 1: Gemma's norms. Without `w`
    /// the gain is `offset` alone (OLMo's LayerNorms without parameters: offset 1).
    fn norm_forward(
        &self,
        x: &Self::Slice,
        w: Option<&Self::Slice>,
        b: Option<&Self::Slice>,
        norm: NormShape,
        y: &mut Self::Slice,
    ) -> Result<()>;
    /// `dx`, (with a weight) `dw` and (with a bias) `db` accumulate the gradients of
    /// [`Device::norm_forward`].
    #[allow(clippy::too_many_arguments)]
    fn norm_backward(
        &self,
        x: &Self::Slice,
        w: Option<&Self::Slice>,
        norm: NormShape,
        dy: &Self::Slice,
        dx: &mut Self::Slice,
        dw: Option<&mut Self::Slice>,
        db: Option<&mut Self::Slice>,
    ) -> Result<()>;
    /// Rotary embedding of `heads` heads per row (rows are `tokens`-long sequences, `table.tokens` each).
    fn rope_forward(
        &self,
        x: &Self::Slice,
        heads: usize,
        table: &RopeTable,
        y: &mut Self::Slice,
    ) -> Result<()>;
    fn rope_backward(
        &self,
        dy: &Self::Slice,
        heads: usize,
        table: &RopeTable,
        dx: &mut Self::Slice,
    ) -> Result<()>;
    /// Causal (optionally windowed) GQA attention; `lse` gets each query row's log-sum-exp.
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        q: &Self::Slice,
        k: &Self::Slice,
        v: &Self::Slice,
        shape: AttnShape,
        out: &mut Self::Slice,
        lse: &mut Self::Slice,
    ) -> Result<()>;
    /// Recomputes the probabilities from `lse`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        q: &Self::Slice,
        k: &Self::Slice,
        v: &Self::Slice,
        lse: &Self::Slice,
        dout: &Self::Slice,
        shape: AttnShape,
        dq: &mut Self::Slice,
        dk: &mut Self::Slice,
        dv: &mut Self::Slice,
    ) -> Result<()>;
    /// Attention sinks (GPT-OSS, Granite SWA): a learned logit `sinks[h]` (`[heads]`) joins the softmax of
    /// each of head h's query rows without a value. Applied to [`Device::attention_forward`]'s results:
    /// `out ×= σ(lse − sinks[h])` per row and head, `lse ← log(exp(lse) + exp(sinks[h]))`. With that `lse`,
    /// [`Device::attention_backward`] recomputes the probabilities the sink shares in, and its formulas
    /// hold unchanged (the sink carries no value: its dP is 0).
    fn attention_sinks_forward(
        &self,
        sinks: &Self::Slice,
        shape: AttnShape,
        out: &mut Self::Slice,
        lse: &mut Self::Slice,
    ) -> Result<()>;
    /// `dsinks[h] += −Σ_rows exp(sinks[h] − lse) (dout · out)` over head h's query rows, with `out` and
    /// `lse` as [`Device::attention_sinks_forward`] left them: the gradient of a softmax logit whose
    /// value is 0.
    #[allow(clippy::too_many_arguments)]
    fn attention_sinks_backward(
        &self,
        out: &Self::Slice,
        dout: &Self::Slice,
        lse: &Self::Slice,
        sinks: &Self::Slice,
        shape: AttnShape,
        dsinks: &mut Self::Slice,
    ) -> Result<()>;
    /// `y = act(x)`.
    fn activation_forward(
        &self,
        act: Activation,
        x: &Self::Slice,
        y: &mut Self::Slice,
    ) -> Result<()>;
    /// `dx += act'(x) ⊙ dy`.
    fn activation_backward(
        &self,
        act: Activation,
        x: &Self::Slice,
        dy: &Self::Slice,
        dx: &mut Self::Slice,
    ) -> Result<()>;
    /// xIELU (Apertus's MLP activation, [`Xielu`]): `y = αp x² + β x` for x > 0, else
    /// `αn (expm1(min(x, eps)) − x) + β x`, αp = softplus(ap), αn = β + softplus(an) from `params` =
    /// [ap, an], the layer's two learned raw parameters (one value each).
    fn xielu_forward(
        &self,
        x: &Self::Slice,
        params: [&Self::Slice; 2],
        k: Xielu,
        y: &mut Self::Slice,
    ) -> Result<()>;
    /// `dx += y'(x) dy`; `dap += σ(ap) Σ_{x>0} dy x²`, `dan += σ(an) Σ_{x≤0} dy (expm1(min(x, eps)) − x)`
    /// (softplus' = σ), with `params` = [ap, an].
    #[allow(clippy::too_many_arguments)]
    fn xielu_backward(
        &self,
        x: &Self::Slice,
        params: [&Self::Slice; 2],
        k: Xielu,
        dy: &Self::Slice,
        dx: &mut Self::Slice,
        dap: &mut Self::Slice,
        dan: &mut Self::Slice,
    ) -> Result<()>;
    fn mul_forward(&self, a: &Self::Slice, b: &Self::Slice, y: &mut Self::Slice) -> Result<()>;
    fn mul_backward(
        &self,
        a: &Self::Slice,
        b: &Self::Slice,
        dy: &Self::Slice,
        da: &mut Self::Slice,
        db: &mut Self::Slice,
    ) -> Result<()>;
    fn add_forward(&self, a: &Self::Slice, b: &Self::Slice, y: &mut Self::Slice) -> Result<()>;
    /// `y[r] = s[r] · x[r]` for rows of `d` values (`s` one value per row): a mixture-of-experts
    /// expert's output weighted by its routing weight, Qwen2-MoE's gated shared expert.
    fn row_scale_forward(
        &self,
        x: &Self::Slice,
        s: &Self::Slice,
        d: usize,
        y: &mut Self::Slice,
    ) -> Result<()>;
    /// `dx[r] += s[r] · dy[r]`, `ds[r] += dy[r] · x[r]` (a dot product per row).
    #[allow(clippy::too_many_arguments)]
    fn row_scale_backward(
        &self,
        x: &Self::Slice,
        s: &Self::Slice,
        dy: &Self::Slice,
        d: usize,
        dx: &mut Self::Slice,
        ds: &mut Self::Slice,
    ) -> Result<()>;
    /// Gather column blocks: `y[r, g·block + i] = x[r, g·stride + offset + i]` for every group g of
    /// `x`'s rows (`x` rows `width = groups · stride` wide, `y` rows `groups · block`). GPT-NeoX's fused
    /// `query_key_value` output holds q, k and v of each head side by side: each is one such gather.
    fn column_blocks_forward(
        &self,
        x: &Self::Slice,
        width: usize,
        blocks: ColumnBlocks,
        y: &mut Self::Slice,
    ) -> Result<()>;
    /// The scatter back: `dx[r, g·stride + offset + i] += dy[r, g·block + i]`.
    fn column_blocks_backward(
        &self,
        dy: &Self::Slice,
        width: usize,
        blocks: ColumnBlocks,
        dx: &mut Self::Slice,
    ) -> Result<()>;
    /// `dst += src`.
    fn accumulate(&self, dst: &mut Self::Slice, src: &Self::Slice) -> Result<()>;
    /// Per row of `vocab` logits: its log-sum-exp into `lse`; returns (Σ −log p(target), rows with a
    /// target). Targets −1 are skipped.
    fn cross_entropy_forward(
        &self,
        logits: &Self::Slice,
        vocab: usize,
        targets: &Self::Ids,
        lse: &mut Self::Slice,
    ) -> Result<(f64, usize)>;
    /// As [`Device::cross_entropy_forward`], and overwrites the logits with d(mean loss)/d(logits).
    fn cross_entropy_forward_grad(
        &self,
        logits: &mut Self::Slice,
        vocab: usize,
        targets: &Self::Ids,
        lse: &mut Self::Slice,
    ) -> Result<(f64, usize)>;
}

/// `v` rounded to the nearest bf16 (ties to even), as the bf16 matrix products round their operands.
pub fn round_to_bf16(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect()
}

/// Max relative difference between `dev` and the CPU on a few ops over fresh random inputs with awkward
/// shapes (a linear with bias, RMSNorm, rotary, causal GQA attention with a window; with bf16 products
/// also attention of head dimension 64, whose bf16-rounded output counts at 1/100 of its error): the
/// start-up check a device must pass before `--device auto` picks it. Relative to the largest CPU value
/// of each output.
pub fn self_check<D: Device>(dev: &D) -> Result<f64> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    let mut rand_vec =
        |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
    let cpu = cpu::Cpu;
    let mut worst = 0f64;
    // `weight`: 1 for f32 outputs; below 1 for outputs a bf16 device rounds internally (their error
    // counts at that fraction, so that one threshold serves both).
    let mut compare_weighted = |host: &[f32], got: &D::Slice, dev: &D, weight: f64| -> Result<()> {
        let mut back = Vec::new();
        dev.download(got, &mut back)?;
        let scale = host.iter().fold(1e-30f64, |m, &v| m.max(v.abs() as f64));
        for (&a, &b) in host.iter().zip(&back) {
            worst = worst.max(weight * (a as f64 - b as f64).abs() / scale);
        }
        Ok(())
    };
    let mut compare = |host: &[f32], got: &D::Slice, dev: &D| compare_weighted(host, got, dev, 1.0);
    let up = |host: &[f32]| -> Result<D::Buf> {
        let mut b = dev.alloc_zeroed(host.len())?;
        dev.upload(host, &mut b)?;
        Ok(b)
    };

    // A linear with bias: 37 rows, 29 → 23.
    let (n, k, m) = (37, 29, 23);
    let (x, w, b) = (rand_vec(n * k), rand_vec(m * k), rand_vec(m));
    let mut y = vec![0f32; n * m];
    // A device with bf16 matrix products is held to the product of the rounded operands.
    let (xr, wr) = match dev.matmul() {
        Matmul::F32 => (x.clone(), w.clone()),
        Matmul::Bf16 => (round_to_bf16(&x), round_to_bf16(&w)),
    };
    cpu::linear_forward(&xr, &wr, Some(&b), n, k, m, &mut y);
    let mut yd = dev.alloc_zeroed(n * m)?;
    let (xd, wd, bd) = (up(&x)?, up(&w)?, up(&b)?);
    dev.linear_forward(&xd, &dev.weight_from(&wd)?, Some(&bd), n, k, m, &mut yd)?;
    compare(&y, &yd, dev)?;

    // RMSNorm and LayerNorm (with a bias; without parameters: OLMo's) over rows of 29.
    let (g, nb) = (rand_vec(k), rand_vec(k));
    let (gd, nbd) = (up(&g)?, up(&nb)?);
    for (centre, weighted) in [(false, true), (true, true), (true, false)] {
        let norm = NormShape {
            d: k,
            eps: 1e-6,
            offset: if weighted { 0.0 } else { 1.0 },
            centre,
            groups: 1,
        };
        let b = (centre && weighted).then_some(&nb[..]);
        let mut r = vec![0f32; n * k];
        cpu.norm_forward(&x, weighted.then_some(&g[..]), b, norm, &mut r)?;
        let mut rd = dev.alloc_zeroed(n * k)?;
        let bd = (centre && weighted).then_some(&*nbd);
        dev.norm_forward(&xd, weighted.then_some(&*gd), bd, norm, &mut rd)?;
        compare(&r, &rd, dev)?;
    }

    // Attention: 2 sequences of 19 tokens, 4 heads over 2 KV heads of 8, a window of 5; rotary first.
    let shape = AttnShape {
        seqs: 2,
        tokens: 19,
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
        window: Some(5),
        scale: None,
        softcap: None,
        alibi: None,
    };
    let rows = shape.seqs * shape.tokens;
    let (qd, kvd) = (
        shape.heads * shape.head_dim,
        shape.kv_heads * shape.head_dim,
    );
    let (q, kk, v) = (
        rand_vec(rows * qd),
        rand_vec(rows * kvd),
        rand_vec(rows * kvd),
    );
    let inv_freq: Vec<f64> = (0..shape.head_dim / 2)
        .map(|i| 10000f64.powf(-(2.0 * i as f64) / shape.head_dim as f64))
        .collect();
    let table = RopeTable::new(&inv_freq, shape.head_dim, shape.tokens, 1.0);
    let mut qr = vec![0f32; rows * qd];
    cpu.rope_forward(&q, shape.heads, &table, &mut qr)?;
    let mut qrd = dev.alloc_zeroed(rows * qd)?;
    let qd_ = up(&q)?;
    dev.rope_forward(&qd_, shape.heads, &table, &mut qrd)?;
    compare(&qr, &qrd, dev)?;
    let (mut o, mut lse) = (vec![0f32; rows * qd], vec![0f32; rows * shape.heads]);
    cpu.attention_forward(&qr, &kk, &v, shape, &mut o, &mut lse)?;
    let (mut od, mut lsed) = (
        dev.alloc_zeroed(rows * qd)?,
        dev.alloc_zeroed(rows * shape.heads)?,
    );
    let (qrd, kd, vd) = (up(&qr)?, up(&kk)?, up(&v)?);
    dev.attention_forward(&qrd, &kd, &vd, shape, &mut od, &mut lsed)?;
    compare(&o, &od, dev)?;
    compare(&lse, &lsed, dev)?;

    // A device with bf16 products runs attention with head dimension 64 on its tensor cores: held to the
    // CPU on the rounded inputs, the log-sum-exp as above, the output (P rounded to bf16 before P V)
    // at 1e-2 (weighted 1e-2 into the 1e-4 budget).
    if dev.matmul() == Matmul::Bf16 {
        let shape = AttnShape {
            seqs: 1,
            tokens: 70,
            heads: 2,
            kv_heads: 1,
            head_dim: 64,
            window: None,
            scale: None,
            softcap: None,
            alibi: None,
        };
        let (qn, kn) = (70 * 2 * 64, 70 * 64);
        let (q, kk, v) = (rand_vec(qn), rand_vec(kn), rand_vec(kn));
        let (mut o, mut lse) = (vec![0f32; qn], vec![0f32; 70 * 2]);
        cpu.attention_forward(
            &round_to_bf16(&q),
            &round_to_bf16(&kk),
            &round_to_bf16(&v),
            shape,
            &mut o,
            &mut lse,
        )?;
        let (mut od, mut lsed) = (dev.alloc_zeroed(qn)?, dev.alloc_zeroed(70 * 2)?);
        let (qd, kd, vd) = (up(&q)?, up(&kk)?, up(&v)?);
        dev.attention_forward(&qd, &kd, &vd, shape, &mut od, &mut lsed)?;
        compare_weighted(&o, &od, dev, 1e-2)?;
        compare_weighted(&lse, &lsed, dev, 1.0)?;
    }
    Ok(worst)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cpu_passes_its_own_self_check_exactly() {
        assert_eq!(super::self_check(&super::cpu::Cpu).unwrap(), 0.0);
    }
}
