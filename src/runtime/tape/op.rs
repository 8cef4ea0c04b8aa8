//! The tape's ops. Each is a type with its buffers and parameters, and one [`TapeOp`] impl holding all
//! the tape needs of it side by side: what it reads, writes and keeps for the backward ([`OpIo`]), its
//! forward and its backward. A new op is one more type here (the kernels it calls live in
//! [`crate::runtime::ops`]).
//!
//! Outputs and gradients are written through `Tape::write_output` / `Tape::write_grad`, which take the
//! written buffer out of the tape while the others are read. A backward returns at once when nothing
//! downstream gave its output a gradient.

use super::{BufId, OpIo, ParamId, ParamStore, Tape, TapeOp};
use crate::error::Result;
use crate::runtime::ops::{cpu, cpu::AttnShape, RopeTable};
use std::sync::Arc;

/// `out[r] = table[ids[r]]` (ids: the tape's token ids).
#[derive(Clone, Debug)]
pub struct Embedding {
    pub table: ParamId,
    pub out: BufId,
}

impl TapeOp for Embedding {
    fn io(&self) -> OpIo {
        OpIo {
            kind: "embedding",
            inputs: vec![],
            outputs: vec![self.out],
            saved: vec![],
            params: vec![self.table],
        }
    }
    fn forward(&self, t: &mut Tape, store: &dyn ParamStore) -> Result<()> {
        let table = t.p(store, self.table)?;
        t.write_output(self.out, |t, y| {
            cpu::embedding_forward(&t.ids, &table, t.bufs[self.out].cols, y)
        });
        Ok(())
    }
    fn backward(&self, t: &mut Tape, _: &dyn ParamStore, pg: &mut [Vec<f32>]) -> Result<()> {
        if t.has_grad(self.out) {
            let dy = &t.grads[self.out];
            cpu::embedding_backward(&t.ids, dy, t.bufs[self.out].cols, &mut pg[self.table]);
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

impl TapeOp for HiddenInput {
    fn io(&self) -> OpIo {
        OpIo {
            kind: "hidden_input",
            inputs: vec![],
            outputs: vec![self.out],
            saved: vec![],
            params: vec![],
        }
    }
    fn forward(&self, t: &mut Tape, _: &dyn ParamStore) -> Result<()> {
        t.write_output(self.out, |_, y| y.copy_from_slice(&self.data));
        Ok(())
    }
    fn backward(&self, _: &mut Tape, _: &dyn ParamStore, _: &mut [Vec<f32>]) -> Result<()> {
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

impl TapeOp for Linear {
    fn io(&self) -> OpIo {
        OpIo {
            kind: "linear",
            inputs: vec![self.x],
            outputs: vec![self.out],
            saved: vec![self.x],
            params: std::iter::once(self.w).chain(self.b).collect(),
        }
    }
    fn forward(&self, t: &mut Tape, store: &dyn ParamStore) -> Result<()> {
        let Linear { x, w, b, out } = *self;
        let (wv, bv) = (t.p(store, w)?, b.map(|b| t.p(store, b)).transpose()?);
        t.write_output(out, |t, y| {
            let (n, k, m) = (t.bufs[x].rows, t.bufs[x].cols, t.bufs[out].cols);
            cpu::linear_forward(&t.data[x], &wv, bv.as_deref(), n, k, m, y)
        });
        Ok(())
    }
    fn backward(&self, t: &mut Tape, store: &dyn ParamStore, pg: &mut [Vec<f32>]) -> Result<()> {
        let Linear { x, w, b, out } = *self;
        if !t.has_grad(out) {
            return Ok(());
        }
        let wv = t.p(store, w)?;
        let mut dw = std::mem::take(&mut pg[w]);
        let mut db = b.map(|b| std::mem::take(&mut pg[b]));
        t.write_grad(x, |t, dx| {
            let (n, k, m) = (t.bufs[x].rows, t.bufs[x].cols, t.bufs[out].cols);
            let dy = &t.grads[out];
            let db = db.as_deref_mut();
            cpu::linear_backward(&t.data[x], &wv, dy, n, k, m, Some(dx), &mut dw, db);
        });
        pg[w] = dw;
        if let (Some(b), Some(db)) = (b, db) {
            pg[b] = db;
        }
        Ok(())
    }
}

/// out = w ⊙ x / sqrt(mean(x²) + eps), per row.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    pub x: BufId,
    pub w: ParamId,
    pub eps: f64,
    pub out: BufId,
}

impl TapeOp for RmsNorm {
    fn io(&self) -> OpIo {
        OpIo {
            kind: "rmsnorm",
            inputs: vec![self.x],
            outputs: vec![self.out],
            saved: vec![self.x],
            params: vec![self.w],
        }
    }
    fn forward(&self, t: &mut Tape, store: &dyn ParamStore) -> Result<()> {
        let RmsNorm { x, w, eps, out } = *self;
        let wv = t.p(store, w)?;
        t.write_output(out, |t, y| {
            cpu::rmsnorm_forward(&t.data[x], &wv, t.bufs[x].cols, eps, y)
        });
        Ok(())
    }
    fn backward(&self, t: &mut Tape, store: &dyn ParamStore, pg: &mut [Vec<f32>]) -> Result<()> {
        let RmsNorm { x, w, eps, out } = *self;
        if !t.has_grad(out) {
            return Ok(());
        }
        let wv = t.p(store, w)?;
        let dw = &mut pg[w];
        t.write_grad(x, |t, dx| {
            let d = t.bufs[x].cols;
            cpu::rmsnorm_backward(&t.data[x], &wv, &t.grads[out], d, eps, dx, dw)
        });
        Ok(())
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

impl TapeOp for Rope {
    fn io(&self) -> OpIo {
        OpIo {
            kind: "rope",
            inputs: vec![self.x],
            outputs: vec![self.out],
            saved: vec![],
            params: vec![],
        }
    }
    fn forward(&self, t: &mut Tape, _: &dyn ParamStore) -> Result<()> {
        t.write_output(self.out, |t, y| {
            cpu::rope_forward(&t.data[self.x], self.heads, &self.table, y)
        });
        Ok(())
    }
    fn backward(&self, t: &mut Tape, _: &dyn ParamStore, _: &mut [Vec<f32>]) -> Result<()> {
        if t.has_grad(self.out) {
            t.write_grad(self.x, |t, dx| {
                cpu::rope_backward(&t.grads[self.out], self.heads, &self.table, dx)
            });
        }
        Ok(())
    }
}

/// Causal (optionally windowed) grouped-query attention; `lse` keeps each query row's log-sum-exp for
/// the backward.
#[derive(Clone, Debug)]
pub struct Attention {
    pub q: BufId,
    pub k: BufId,
    pub v: BufId,
    pub shape: AttnShape,
    pub out: BufId,
    pub lse: BufId,
}

impl TapeOp for Attention {
    fn io(&self) -> OpIo {
        OpIo {
            kind: "attention",
            inputs: vec![self.q, self.k, self.v],
            outputs: vec![self.out, self.lse],
            saved: vec![self.q, self.k, self.v, self.lse],
            params: vec![],
        }
    }
    fn forward(&self, t: &mut Tape, _: &dyn ParamStore) -> Result<()> {
        let Attention {
            q,
            k,
            v,
            shape,
            out,
            lse,
        } = *self;
        let mut p = std::mem::take(&mut t.data[lse]);
        t.write_output(out, |t, y| {
            cpu::attention_forward(&t.data[q], &t.data[k], &t.data[v], shape, y, &mut p)
        });
        t.data[lse] = p;
        Ok(())
    }
    fn backward(&self, t: &mut Tape, _: &dyn ParamStore, _: &mut [Vec<f32>]) -> Result<()> {
        let Attention {
            q,
            k,
            v,
            shape,
            out,
            lse,
        } = *self;
        if !t.has_grad(out) {
            return Ok(());
        }
        let (mut dq, mut dk, mut dv) = (t.take_grad(q), t.take_grad(k), t.take_grad(v));
        cpu::attention_backward(
            &t.data[q],
            &t.data[k],
            &t.data[v],
            &t.data[lse],
            &t.grads[out],
            shape,
            &mut dq,
            &mut dk,
            &mut dv,
        );
        t.grads[q] = dq;
        t.grads[k] = dk;
        t.grads[v] = dv;
        Ok(())
    }
}

/// out = x · sigmoid(x).
#[derive(Clone, Debug)]
pub struct Silu {
    pub x: BufId,
    pub out: BufId,
}

impl TapeOp for Silu {
    fn io(&self) -> OpIo {
        OpIo {
            kind: "silu",
            inputs: vec![self.x],
            outputs: vec![self.out],
            saved: vec![self.x],
            params: vec![],
        }
    }
    fn forward(&self, t: &mut Tape, _: &dyn ParamStore) -> Result<()> {
        t.write_output(self.out, |t, y| cpu::silu_forward(&t.data[self.x], y));
        Ok(())
    }
    fn backward(&self, t: &mut Tape, _: &dyn ParamStore, _: &mut [Vec<f32>]) -> Result<()> {
        if t.has_grad(self.out) {
            t.write_grad(self.x, |t, dx| {
                cpu::silu_backward(&t.data[self.x], &t.grads[self.out], dx)
            });
        }
        Ok(())
    }
}

/// out = a ⊙ b.
#[derive(Clone, Debug)]
pub struct Mul {
    pub a: BufId,
    pub b: BufId,
    pub out: BufId,
}

impl TapeOp for Mul {
    fn io(&self) -> OpIo {
        OpIo {
            kind: "mul",
            inputs: vec![self.a, self.b],
            outputs: vec![self.out],
            saved: vec![self.a, self.b],
            params: vec![],
        }
    }
    fn forward(&self, t: &mut Tape, _: &dyn ParamStore) -> Result<()> {
        let Mul { a, b, out } = *self;
        t.write_output(out, |t, y| cpu::mul_forward(&t.data[a], &t.data[b], y));
        Ok(())
    }
    fn backward(&self, t: &mut Tape, _: &dyn ParamStore, _: &mut [Vec<f32>]) -> Result<()> {
        let Mul { a, b, out } = *self;
        if !t.has_grad(out) {
            return Ok(());
        }
        let mut db = t.take_grad(b);
        t.write_grad(a, |t, da| {
            cpu::mul_backward(&t.data[a], &t.data[b], &t.grads[out], da, &mut db)
        });
        t.grads[b] = db;
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

impl TapeOp for Add {
    fn io(&self) -> OpIo {
        OpIo {
            kind: "add",
            inputs: vec![self.a, self.b],
            outputs: vec![self.out],
            saved: vec![],
            params: vec![],
        }
    }
    fn forward(&self, t: &mut Tape, _: &dyn ParamStore) -> Result<()> {
        let Add { a, b, out } = *self;
        t.write_output(out, |t, y| cpu::add_forward(&t.data[a], &t.data[b], y));
        Ok(())
    }
    fn backward(&self, t: &mut Tape, _: &dyn ParamStore, _: &mut [Vec<f32>]) -> Result<()> {
        if !t.has_grad(self.out) {
            return Ok(());
        }
        for inp in [self.a, self.b] {
            t.write_grad(inp, |t, d| cpu::accumulate(d, &t.grads[self.out]));
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

impl TapeOp for CrossEntropy {
    fn io(&self) -> OpIo {
        OpIo {
            kind: "cross_entropy",
            inputs: vec![self.logits],
            outputs: vec![self.lse],
            saved: vec![self.logits],
            params: vec![],
        }
    }
    fn forward(&self, t: &mut Tape, _: &dyn ParamStore) -> Result<()> {
        let CrossEntropy { logits, lse } = *self;
        let vocab = t.bufs[logits].cols;
        let (sum, count) = if t.keep {
            let mut d = std::mem::take(&mut t.data[logits]);
            let r = t.write_output(lse, |t, l| {
                cpu::cross_entropy_forward_grad(&mut d, vocab, &t.targets, l)
            });
            t.data[logits] = d;
            r
        } else {
            t.write_output(lse, |t, l| {
                cpu::cross_entropy_forward(&t.data[logits], vocab, &t.targets, l)
            })
        };
        if count == 0 {
            return Err(crate::Error::invalid(
                "no predicted positions in the batch (sequences need at least 2 tokens)",
            ));
        }
        t.loss = Some(sum / count as f64);
        Ok(())
    }
    fn backward(&self, t: &mut Tape, _: &dyn ParamStore, _: &mut [Vec<f32>]) -> Result<()> {
        // The forward (run with `keep`, as before every backward) left the gradient in the logits' storage.
        let d = std::mem::take(&mut t.data[self.logits]);
        let prior = std::mem::replace(&mut t.grads[self.logits], d);
        if !prior.is_empty() {
            cpu::accumulate(&mut t.grads[self.logits], &prior);
        }
        Ok(())
    }
}
