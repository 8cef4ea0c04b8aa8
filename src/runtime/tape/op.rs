//! The tape's ops. Each is a type with its buffers and parameters, and one [`TapeOp`] impl holding all
//! the tape needs of it side by side: what it reads, writes and keeps for the backward ([`OpIo`]), its
//! forward and its backward. A new op is one more type here (the kernels it calls live in
//! [`crate::runtime::ops`]).
//!
//! Every op here is written once for every [`Device`]: the arithmetic is the device's
//! (`t.dev.linear_forward(..)`, ...). Outputs and gradients are written through `Tape::write_output` /
//! `Tape::write_grad`, which take the written buffer out of the tape while the others are read. A backward
//! returns at once when nothing downstream gave its output a gradient.

use super::{BufId, Device, OpIo, ParamGrads, ParamId, ParamStore, Tape, TapeOp};
use crate::error::Result;
use crate::runtime::ops::{
    Activation, AttnShape, ColumnBlocks, NormShape, RopeTable, Xielu as XieluConsts,
};
use std::sync::Arc;

/// `out[r] = scale · table[ids[r]]` (ids: the tape's token ids; `scale` 1, or √hidden for Gemma).
/// `padding`: the table row that takes no gradient (the config's `pad_token_id`, nn.Embedding's
/// `padding_idx`).
#[derive(Clone, Debug)]
pub struct Embedding {
    pub table: ParamId,
    pub scale: f32,
    pub padding: Option<usize>,
    pub out: BufId,
}

impl<D: Device> TapeOp<D> for Embedding {
    fn io(&self) -> OpIo {
        OpIo {
            kind: "embedding",
            inputs: vec![],
            outputs: vec![self.out],
            saved: vec![],
            params: vec![self.table],
        }
    }
    fn forward(&self, t: &mut Tape<D>, store: &dyn ParamStore) -> Result<()> {
        let table = t.p(store, self.table)?;
        t.write_output(self.out, |t, y| {
            let ids = &t.dev_ids().0;
            t.dev
                .embedding_forward(ids, &table, t.bufs[self.out].cols, self.scale, y)
        })
    }
    fn backward(&self, t: &mut Tape<D>, _: &dyn ParamStore, pg: &mut ParamGrads<D>) -> Result<()> {
        if t.has_grad(self.out) {
            let (ids, dy, dim) = (&t.dev_ids().0, t.grad(self.out), t.bufs[self.out].cols);
            t.dev.embedding_backward(
                ids,
                dy,
                dim,
                self.scale,
                self.padding,
                pg.get_mut(self.table),
            )?;
        }
        Ok(())
    }
}

/// `out[r] = table[r mod tokens + offset]`: the learned embedding of each row's position in its sequence
/// (GPT-2's `wpe`; OPT's `embed_positions`, offset 2; rows are sequences of `tokens` one after the
/// other).
#[derive(Clone, Debug)]
pub struct Positions {
    pub table: ParamId,
    pub tokens: usize,
    pub offset: usize,
    pub out: BufId,
}

impl Positions {
    fn ids<D: Device>(&self, t: &Tape<D>) -> Result<D::Ids> {
        let rows = t.bufs[self.out].rows;
        let pos: Vec<i64> = (0..rows)
            .map(|r| (r % self.tokens + self.offset) as i64)
            .collect();
        t.dev.ids(&pos)
    }
}

impl<D: Device> TapeOp<D> for Positions {
    fn io(&self) -> OpIo {
        OpIo {
            kind: "positions",
            inputs: vec![],
            outputs: vec![self.out],
            saved: vec![],
            params: vec![self.table],
        }
    }
    fn forward(&self, t: &mut Tape<D>, store: &dyn ParamStore) -> Result<()> {
        let table = t.p(store, self.table)?;
        let ids = self.ids(t)?;
        t.write_output(self.out, |t, y| {
            t.dev
                .embedding_forward(&ids, &table, t.bufs[self.out].cols, 1.0, y)
        })
    }
    fn backward(&self, t: &mut Tape<D>, _: &dyn ParamStore, pg: &mut ParamGrads<D>) -> Result<()> {
        if t.has_grad(self.out) {
            let ids = self.ids(t)?;
            let (dy, dim) = (t.grad(self.out), t.bufs[self.out].cols);
            t.dev
                .embedding_backward(&ids, dy, dim, 1.0, None, pg.get_mut(self.table))?;
        }
        Ok(())
    }
}

/// out = a given hidden state: the start of a forward that resumes at a decoder layer, the layers before
/// it having run already (the loss of a network with layers skipped, from the shared prefix). Forward
/// only: nothing upstream takes a gradient.
#[derive(Clone, Debug)]
pub struct HiddenInput {
    pub data: Arc<Vec<f32>>,
    pub out: BufId,
}

impl<D: Device> TapeOp<D> for HiddenInput {
    fn io(&self) -> OpIo {
        OpIo {
            kind: "hidden_input",
            inputs: vec![],
            outputs: vec![self.out],
            saved: vec![],
            params: vec![],
        }
    }
    fn forward(&self, t: &mut Tape<D>, _: &dyn ParamStore) -> Result<()> {
        t.write_output(self.out, |t, y| t.dev.upload(&self.data, y))
    }
    fn backward(&self, _: &mut Tape<D>, _: &dyn ParamStore, _: &mut ParamGrads<D>) -> Result<()> {
        Ok(())
    }
}

/// out = x Wᵀ (+ b).
#[derive(Clone, Debug)]
pub struct Linear {
    pub x: BufId,
    pub w: ParamId,
    pub b: Option<ParamId>,
    pub out: BufId,
}

impl<D: Device> TapeOp<D> for Linear {
    fn io(&self) -> OpIo {
        OpIo {
            kind: "linear",
            inputs: vec![self.x],
            outputs: vec![self.out],
            saved: vec![self.x],
            params: std::iter::once(self.w).chain(self.b).collect(),
        }
    }
    fn weights(&self) -> Vec<ParamId> {
        vec![self.w]
    }
    fn forward(&self, t: &mut Tape<D>, store: &dyn ParamStore) -> Result<()> {
        let Linear { x, w, b, out } = *self;
        let (wv, bv) = (t.w(store, w)?, b.map(|b| t.p(store, b)).transpose()?);
        t.write_output(out, |t, y| {
            let (n, k, m) = (t.bufs[x].rows, t.bufs[x].cols, t.bufs[out].cols);
            t.dev
                .linear_forward(t.data(x), &wv, bv.as_deref(), n, k, m, y)
        })
    }
    fn backward(
        &self,
        t: &mut Tape<D>,
        store: &dyn ParamStore,
        pg: &mut ParamGrads<D>,
    ) -> Result<()> {
        let Linear { x, w, b, out } = *self;
        if !t.has_grad(out) {
            return Ok(());
        }
        let wv = t.w(store, w)?;
        let mut dw = pg.take(w);
        let mut db = b.map(|b| pg.take(b));
        let r = t.write_grad(x, |t, dx| {
            let (n, k, m) = (t.bufs[x].rows, t.bufs[x].cols, t.bufs[out].cols);
            let (xv, dy, db) = (t.data(x), t.grad(out), db.as_deref_mut());
            t.dev
                .linear_backward(xv, &wv, dy, n, k, m, Some(dx), &mut dw, db)
        });
        pg.put(w, dw);
        if let (Some(b), Some(db)) = (b, db) {
            pg.put(b, db);
        }
        r
    }
}

/// out = (offset + w) ⊙ x̂ (+ b), per row of `shape.d` values (without `w`, OLMo's LayerNorms: offset ⊙ x̂):
/// RMSNorm (x̂ = x / sqrt(mean(x²) + eps)) or
/// LayerNorm (`shape.centre`: x̂ = (x − mean) / sqrt(var + eps), GPT-NeoX's, with a bias). A row is a buffer
/// row when `d` is its width, each head of a row when `d` is the head size (Qwen3's q_norm / k_norm; `w`
/// is `d` long either way).
#[derive(Clone, Debug)]
pub struct Norm {
    pub x: BufId,
    pub w: Option<ParamId>,
    pub b: Option<ParamId>,
    pub shape: NormShape,
    pub out: BufId,
}

impl<D: Device> TapeOp<D> for Norm {
    fn io(&self) -> OpIo {
        OpIo {
            kind: if self.shape.centre {
                "layernorm"
            } else {
                "rmsnorm"
            },
            inputs: vec![self.x],
            outputs: vec![self.out],
            saved: vec![self.x],
            params: self.w.into_iter().chain(self.b).collect(),
        }
    }
    fn forward(&self, t: &mut Tape<D>, store: &dyn ParamStore) -> Result<()> {
        let Norm {
            x,
            w,
            b,
            shape,
            out,
        } = *self;
        let wv = w.map(|w| t.p(store, w)).transpose()?;
        let bv = b.map(|b| t.p(store, b)).transpose()?;
        t.write_output(out, |t, y| {
            t.dev
                .norm_forward(t.data(x), wv.as_deref(), bv.as_deref(), shape, y)
        })
    }
    fn backward(
        &self,
        t: &mut Tape<D>,
        store: &dyn ParamStore,
        pg: &mut ParamGrads<D>,
    ) -> Result<()> {
        let Norm {
            x,
            w,
            b,
            shape,
            out,
        } = *self;
        if !t.has_grad(out) {
            return Ok(());
        }
        let wv = w.map(|w| t.p(store, w)).transpose()?;
        let mut dw = w.map(|w| pg.take(w));
        let mut db = b.map(|b| pg.take(b));
        let r = t.write_grad(x, |t, dx| {
            let (dw, db) = (dw.as_deref_mut(), db.as_deref_mut());
            t.dev
                .norm_backward(t.data(x), wv.as_deref(), shape, t.grad(out), dx, dw, db)
        });
        if let (Some(w), Some(dw)) = (w, dw) {
            pg.put(w, dw);
        }
        if let (Some(b), Some(db)) = (b, db) {
            pg.put(b, db);
        }
        r
    }
}

/// Rotary position embedding of `heads` heads per row. Linear with constant coefficients: the backward
/// keeps nothing.
#[derive(Clone, Debug)]
pub struct Rope {
    pub x: BufId,
    pub heads: usize,
    pub table: Arc<RopeTable>,
    pub out: BufId,
}

impl<D: Device> TapeOp<D> for Rope {
    fn io(&self) -> OpIo {
        OpIo {
            kind: "rope",
            inputs: vec![self.x],
            outputs: vec![self.out],
            saved: vec![],
            params: vec![],
        }
    }
    fn forward(&self, t: &mut Tape<D>, _: &dyn ParamStore) -> Result<()> {
        t.write_output(self.out, |t, y| {
            t.dev
                .rope_forward(t.data(self.x), self.heads, &self.table, y)
        })
    }
    fn backward(&self, t: &mut Tape<D>, _: &dyn ParamStore, _: &mut ParamGrads<D>) -> Result<()> {
        if !t.has_grad(self.out) {
            return Ok(());
        }
        t.write_grad(self.x, |t, dx| {
            t.dev
                .rope_backward(t.grad(self.out), self.heads, &self.table, dx)
        })
    }
}

/// Causal (optionally windowed) grouped-query attention; `lse` keeps each query row's log-sum-exp for
/// the backward. With `sinks` (`[heads]`: GPT-OSS, Granite SWA) a learned logit per head joins each
/// row's softmax ([`Device::attention_sinks_forward`]); `lse` then counts it.
#[derive(Clone, Debug)]
pub struct Attention {
    pub q: BufId,
    pub k: BufId,
    pub v: BufId,
    pub shape: AttnShape,
    pub sinks: Option<ParamId>,
    pub out: BufId,
    pub lse: BufId,
}

impl<D: Device> TapeOp<D> for Attention {
    fn io(&self) -> OpIo {
        OpIo {
            kind: "attention",
            inputs: vec![self.q, self.k, self.v],
            outputs: vec![self.out, self.lse],
            // The sinks' gradient reads the output.
            saved: [self.q, self.k, self.v, self.lse]
                .into_iter()
                .chain(self.sinks.map(|_| self.out))
                .collect(),
            params: self.sinks.into_iter().collect(),
        }
    }
    fn forward(&self, t: &mut Tape<D>, store: &dyn ParamStore) -> Result<()> {
        let Attention {
            q,
            k,
            v,
            shape,
            sinks,
            out,
            lse,
        } = *self;
        let sinks = sinks.map(|s| t.p(store, s)).transpose()?;
        let mut p = t.data[lse]
            .take()
            .expect("the tape allocates an op's outputs");
        let r = t.write_output(out, |t, y| {
            let (q, k, v) = (t.data(q), t.data(k), t.data(v));
            t.dev.attention_forward(q, k, v, shape, y, &mut p)?;
            match &sinks {
                Some(s) => t.dev.attention_sinks_forward(s, shape, y, &mut p),
                None => Ok(()),
            }
        });
        t.data[lse] = Some(p);
        r
    }
    fn backward(
        &self,
        t: &mut Tape<D>,
        store: &dyn ParamStore,
        pg: &mut ParamGrads<D>,
    ) -> Result<()> {
        let Attention {
            q,
            k,
            v,
            shape,
            sinks,
            out,
            lse,
        } = *self;
        if !t.has_grad(out) {
            return Ok(());
        }
        if let Some(s) = sinks {
            let sv = t.p(store, s)?;
            let mut ds = pg.take(s);
            let r = (t.dev).attention_sinks_backward(
                t.data(out),
                t.grad(out),
                t.data(lse),
                &sv,
                shape,
                &mut ds,
            );
            pg.put(s, ds);
            r?;
        }
        let (mut dq, mut dk, mut dv) = (t.take_grad(q)?, t.take_grad(k)?, t.take_grad(v)?);
        let r = t.dev.attention_backward(
            t.data(q),
            t.data(k),
            t.data(v),
            t.data(lse),
            t.grad(out),
            shape,
            &mut dq,
            &mut dk,
            &mut dv,
        );
        t.put_grad(q, dq);
        t.put_grad(k, dk);
        t.put_grad(v, dv);
        r
    }
}

/// out = act(x): the gate of a gated MLP (SiLU, or Gemma's tanh-approximated GELU), or Gemma 2's
/// soft-capped logits.
#[derive(Clone, Debug)]
pub struct Activate {
    pub x: BufId,
    pub act: Activation,
    pub out: BufId,
}

impl<D: Device> TapeOp<D> for Activate {
    fn io(&self) -> OpIo {
        OpIo {
            kind: match self.act {
                Activation::Silu => "silu",
                Activation::GeluTanh => "gelu_tanh",
                Activation::Softcap(_) => "softcap",
                Activation::Gelu => "gelu",
                Activation::Scale(_) => "scale",
                Activation::Sigmoid => "sigmoid",
                Activation::Relu => "relu",
                Activation::Relu2 => "relu2",
                Activation::Clamp(_) => "clamp",
                Activation::ClampPlusOne(_) => "clamp_plus_one",
                Activation::OssGate { .. } => "oss_gate",
            },
            inputs: vec![self.x],
            outputs: vec![self.out],
            // A constant factor's backward does not read x.
            saved: match self.act {
                Activation::Scale(_) => vec![],
                _ => vec![self.x],
            },
            params: vec![],
        }
    }
    fn forward(&self, t: &mut Tape<D>, _: &dyn ParamStore) -> Result<()> {
        t.write_output(self.out, |t, y| {
            t.dev.activation_forward(self.act, t.data(self.x), y)
        })
    }
    fn backward(&self, t: &mut Tape<D>, _: &dyn ParamStore, _: &mut ParamGrads<D>) -> Result<()> {
        if !t.has_grad(self.out) {
            return Ok(());
        }
        t.write_grad(self.x, |t, dx| {
            let dy = t.grad(self.out);
            // A constant factor's x was not kept (and is not read): dy stands in for it.
            let x = match self.act {
                Activation::Scale(_) => dy,
                _ => t.data(self.x),
            };
            t.dev.activation_backward(self.act, x, dy, dx)
        })
    }
}

/// Apertus's xIELU with its two learned scalars per layer (`alpha_p`, `alpha_n`, raw: the function
/// reads their softplus) and its constants ([`Device::xielu_forward`]).
#[derive(Clone, Debug)]
pub struct Xielu {
    pub x: BufId,
    pub alpha_p: ParamId,
    pub alpha_n: ParamId,
    pub consts: XieluConsts,
    pub out: BufId,
}

impl<D: Device> TapeOp<D> for Xielu {
    fn io(&self) -> OpIo {
        OpIo {
            kind: "xielu",
            inputs: vec![self.x],
            outputs: vec![self.out],
            saved: vec![self.x],
            params: vec![self.alpha_p, self.alpha_n],
        }
    }
    fn forward(&self, t: &mut Tape<D>, store: &dyn ParamStore) -> Result<()> {
        let (ap, an) = (t.p(store, self.alpha_p)?, t.p(store, self.alpha_n)?);
        t.write_output(self.out, |t, y| {
            (t.dev).xielu_forward(t.data(self.x), [&ap, &an], self.consts, y)
        })
    }
    fn backward(
        &self,
        t: &mut Tape<D>,
        store: &dyn ParamStore,
        pg: &mut ParamGrads<D>,
    ) -> Result<()> {
        if !t.has_grad(self.out) {
            return Ok(());
        }
        let (ap, an) = (t.p(store, self.alpha_p)?, t.p(store, self.alpha_n)?);
        let (mut dap, mut dan) = (pg.take(self.alpha_p), pg.take(self.alpha_n));
        let r = t.write_grad(self.x, |t, dx| {
            let (x, dy) = (t.data(self.x), t.grad(self.out));
            (t.dev).xielu_backward(x, [&ap, &an], self.consts, dy, dx, &mut dap, &mut dan)
        });
        pg.put(self.alpha_p, dap);
        pg.put(self.alpha_n, dan);
        r
    }
}

/// out = a ⊙ b.
#[derive(Clone, Debug)]
pub struct Mul {
    pub a: BufId,
    pub b: BufId,
    pub out: BufId,
}

impl<D: Device> TapeOp<D> for Mul {
    fn io(&self) -> OpIo {
        OpIo {
            kind: "mul",
            inputs: vec![self.a, self.b],
            outputs: vec![self.out],
            saved: vec![self.a, self.b],
            params: vec![],
        }
    }
    fn forward(&self, t: &mut Tape<D>, _: &dyn ParamStore) -> Result<()> {
        let Mul { a, b, out } = *self;
        t.write_output(out, |t, y| t.dev.mul_forward(t.data(a), t.data(b), y))
    }
    fn backward(&self, t: &mut Tape<D>, _: &dyn ParamStore, _: &mut ParamGrads<D>) -> Result<()> {
        let Mul { a, b, out } = *self;
        if !t.has_grad(out) {
            return Ok(());
        }
        let mut db = t.take_grad(b)?;
        let r = t.write_grad(a, |t, da| {
            t.dev
                .mul_backward(t.data(a), t.data(b), t.grad(out), da, &mut db)
        });
        t.put_grad(b, db);
        r
    }
}

/// `out[r] = s[r] · x[r]`, `s` one value per row (Qwen2-MoE's shared expert × its sigmoid gate).
#[derive(Clone, Debug)]
pub struct RowScale {
    pub x: BufId,
    pub s: BufId,
    pub out: BufId,
}

impl<D: Device> TapeOp<D> for RowScale {
    fn io(&self) -> OpIo {
        OpIo {
            kind: "row_scale",
            inputs: vec![self.x, self.s],
            outputs: vec![self.out],
            saved: vec![self.x, self.s],
            params: vec![],
        }
    }
    fn forward(&self, t: &mut Tape<D>, _: &dyn ParamStore) -> Result<()> {
        let RowScale { x, s, out } = *self;
        t.write_output(out, |t, y| {
            t.dev
                .row_scale_forward(t.data(x), t.data(s), t.bufs[x].cols, y)
        })
    }
    fn backward(&self, t: &mut Tape<D>, _: &dyn ParamStore, _: &mut ParamGrads<D>) -> Result<()> {
        let RowScale { x, s, out } = *self;
        if !t.has_grad(out) {
            return Ok(());
        }
        let mut ds = t.take_grad(s)?;
        let r = t.write_grad(x, |t, dx| {
            let d = t.bufs[x].cols;
            t.dev
                .row_scale_backward(t.data(x), t.data(s), t.grad(out), d, dx, &mut ds)
        });
        t.put_grad(s, ds);
        r
    }
}

/// out = the column blocks of x that `blocks` names ([`Device::column_blocks_forward`]): q, k or v out of
/// GPT-NeoX's fused, per-head interleaved `query_key_value` output. The backward keeps nothing.
#[derive(Clone, Debug)]
pub struct Columns {
    pub x: BufId,
    pub blocks: ColumnBlocks,
    pub out: BufId,
}

impl<D: Device> TapeOp<D> for Columns {
    fn io(&self) -> OpIo {
        OpIo {
            kind: "columns",
            inputs: vec![self.x],
            outputs: vec![self.out],
            saved: vec![],
            params: vec![],
        }
    }
    fn forward(&self, t: &mut Tape<D>, _: &dyn ParamStore) -> Result<()> {
        let Columns { x, blocks, out } = *self;
        let width = t.bufs[x].cols;
        t.write_output(out, |t, y| {
            t.dev.column_blocks_forward(t.data(x), width, blocks, y)
        })
    }
    fn backward(&self, t: &mut Tape<D>, _: &dyn ParamStore, _: &mut ParamGrads<D>) -> Result<()> {
        let Columns { x, blocks, out } = *self;
        if !t.has_grad(out) {
            return Ok(());
        }
        let width = t.bufs[x].cols;
        t.write_grad(x, |t, dx| {
            t.dev.column_blocks_backward(t.grad(out), width, blocks, dx)
        })
    }
}

/// out = the parts' column blocks placed in its rows: part `x`'s row of blocks goes, block `g` at column
/// `g · stride + offset` of out's row ([`Device::column_blocks_backward`] into the zeroed output); the
/// inverse of [`Columns`]. Columns no part covers stay zero. A part may be placed more than once (one
/// block per row, `stride` the whole row: DeepSeek's rotary key shared by every head). The backward
/// gathers each part's gradient back ([`Device::column_blocks_forward`]) and keeps nothing.
#[derive(Clone, Debug)]
pub struct Place {
    pub parts: Vec<(BufId, ColumnBlocks)>,
    pub out: BufId,
}

impl<D: Device> TapeOp<D> for Place {
    fn io(&self) -> OpIo {
        let mut inputs: Vec<BufId> = self.parts.iter().map(|p| p.0).collect();
        inputs.sort_unstable();
        inputs.dedup();
        OpIo {
            kind: "place",
            inputs,
            outputs: vec![self.out],
            saved: vec![],
            params: vec![],
        }
    }
    fn forward(&self, t: &mut Tape<D>, _: &dyn ParamStore) -> Result<()> {
        let width = t.bufs[self.out].cols;
        t.write_output(self.out, |t, y| {
            for &(x, blocks) in &self.parts {
                t.dev.column_blocks_backward(t.data(x), width, blocks, y)?;
            }
            Ok(())
        })
    }
    fn backward(&self, t: &mut Tape<D>, _: &dyn ParamStore, _: &mut ParamGrads<D>) -> Result<()> {
        if !t.has_grad(self.out) {
            return Ok(());
        }
        let width = t.bufs[self.out].cols;
        for &(x, blocks) in &self.parts {
            let mut part = t.pool.alloc(&t.dev, t.len_of(x))?;
            let r = t
                .dev
                .column_blocks_forward(t.grad(self.out), width, blocks, &mut part)
                .and_then(|()| t.write_grad(x, |t, dx| t.dev.accumulate(dx, &part)));
            t.pool.release(&t.dev, part);
            r?;
        }
        Ok(())
    }
}

/// out = a + b (the residual connections). The backward keeps nothing.
#[derive(Clone, Debug)]
pub struct Add {
    pub a: BufId,
    pub b: BufId,
    pub out: BufId,
}

impl<D: Device> TapeOp<D> for Add {
    fn io(&self) -> OpIo {
        OpIo {
            kind: "add",
            inputs: vec![self.a, self.b],
            outputs: vec![self.out],
            saved: vec![],
            params: vec![],
        }
    }
    fn forward(&self, t: &mut Tape<D>, _: &dyn ParamStore) -> Result<()> {
        let Add { a, b, out } = *self;
        t.write_output(out, |t, y| t.dev.add_forward(t.data(a), t.data(b), y))
    }
    fn backward(&self, t: &mut Tape<D>, _: &dyn ParamStore, _: &mut ParamGrads<D>) -> Result<()> {
        if !t.has_grad(self.out) {
            return Ok(());
        }
        for inp in [self.a, self.b] {
            t.write_grad(inp, |t, d| t.dev.accumulate(d, t.grad(self.out)))?;
        }
        Ok(())
    }
}

/// Mean softmax cross-entropy of the rows of `logits` against the tape's targets (−1 = not predicted):
/// the tape's loss. `lse` keeps each row's log-sum-exp. When a backward follows, the forward also turns
/// the logits, which nothing else reads, into their gradient in the same pass (the loss is the root, so
/// its gradient is known then); the backward only hands that buffer on.
#[derive(Clone, Debug)]
pub struct CrossEntropy {
    pub logits: BufId,
    pub lse: BufId,
}

impl<D: Device> TapeOp<D> for CrossEntropy {
    fn io(&self) -> OpIo {
        OpIo {
            kind: "cross_entropy",
            inputs: vec![self.logits],
            outputs: vec![self.lse],
            saved: vec![self.logits],
            params: vec![],
        }
    }
    fn forward(&self, t: &mut Tape<D>, _: &dyn ParamStore) -> Result<()> {
        let CrossEntropy { logits, lse } = *self;
        let vocab = t.bufs[logits].cols;
        let (sum, count) = if t.keep {
            let mut d = t.data[logits].take().expect("the logits were written");
            let r = t.write_output(lse, |t, l| {
                let targets = &t.dev_ids().1;
                t.dev.cross_entropy_forward_grad(&mut d, vocab, targets, l)
            });
            t.data[logits] = Some(d);
            r?
        } else {
            t.write_output(lse, |t, l| {
                let targets = &t.dev_ids().1;
                t.dev
                    .cross_entropy_forward(t.data(logits), vocab, targets, l)
            })?
        };
        if count == 0 {
            return Err(crate::Error::invalid(
                "no predicted positions in the batch (sequences need at least 2 tokens)",
            ));
        }
        t.loss = Some(sum / count as f64);
        Ok(())
    }
    fn backward(&self, t: &mut Tape<D>, _: &dyn ParamStore, _: &mut ParamGrads<D>) -> Result<()> {
        // The forward (run with `keep`, as before every backward) left the gradient in the logits' storage.
        let d = t.data[self.logits]
            .take()
            .expect("a backward follows a forward that kept the logits");
        match t.grads[self.logits].replace(d) {
            Some(prior) => {
                let mut g = t.take_grad(self.logits)?;
                let r = t.dev.accumulate(&mut g, &prior);
                t.put_grad(self.logits, g);
                t.pool.release(&t.dev, prior);
                r
            }
            None => Ok(()),
        }
    }
}
