//! The convolutional networks' tape ops (kernels in [`crate::runtime::ops::cnn`]). A buffer holds a batch
//! of NCHW tensors as `[n, c·h·w]`, so flatten is no op and the decoder's `Linear`, `Add` and
//! `CrossEntropy` ([`super::op`]) serve the classifier head, the residual adds and the loss. These ops run
//! on the CPU only (a `Tape<Cpu>`): their kernels are free functions over host slices.

use super::{BufId, OpIo, ParamGrads, ParamId, ParamStore, Tape, TapeOp};
use crate::error::Result;
use crate::runtime::ops::cnn::{self, ConvShape, Planes, PoolShape, ShortcutA};

/// out = conv2d(x, w) (+ b). `input_grad`: whether x needs a gradient (not for the network's input).
#[derive(Clone, Debug)]
pub struct Conv2d {
    pub x: BufId,
    pub w: ParamId,
    pub b: Option<ParamId>,
    pub shape: ConvShape,
    pub input_grad: bool,
    pub out: BufId,
}

impl TapeOp for Conv2d {
    fn io(&self) -> OpIo {
        OpIo {
            kind: "conv2d",
            inputs: vec![self.x],
            outputs: vec![self.out],
            saved: vec![self.x],
            params: std::iter::once(self.w).chain(self.b).collect(),
        }
    }
    fn forward(&self, t: &mut Tape, store: &dyn ParamStore) -> Result<()> {
        let (wv, bv) = (
            t.p(store, self.w)?,
            self.b.map(|b| t.p(store, b)).transpose()?,
        );
        t.write_output(self.out, |t, y| {
            cnn::conv2d_forward(t.data(self.x), &wv, bv.as_deref(), self.shape, y);
            Ok(())
        })
    }
    fn backward(
        &self,
        t: &mut Tape,
        store: &dyn ParamStore,
        pg: &mut ParamGrads<super::Cpu>,
    ) -> Result<()> {
        if !t.has_grad(self.out) {
            return Ok(());
        }
        let wv = t.p(store, self.w)?;
        let mut dw = pg.take(self.w);
        let mut db = self.b.map(|b| pg.take(b));
        let run = |t: &Tape, dx: Option<&mut [f32]>, dw: &mut [f32], db: Option<&mut [f32]>| {
            let (x, dy) = (t.data(self.x), t.grad(self.out));
            cnn::conv2d_backward(x, &wv, dy, self.shape, dx, dw, db);
            Ok(())
        };
        let r = if self.input_grad {
            t.write_grad(self.x, |t, dx| run(t, Some(dx), &mut dw, db.as_deref_mut()))
        } else {
            run(t, None, &mut dw, db.as_deref_mut())
        };
        pg.put(self.w, dw);
        if let (Some(b), Some(db)) = (self.b, db) {
            pg.put(b, db);
        }
        r
    }
}

/// Batch norm with the running statistics (inference mode, as the model is deployed): out = γ (x − μ) /
/// √(σ² + ε) + β per channel. γ and β are parameters (they get gradients); μ and σ² are read from the
/// store by name and are constants.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    pub x: BufId,
    pub gamma: ParamId,
    pub beta: ParamId,
    pub running_mean: String,
    pub running_var: String,
    pub eps: f64,
    pub planes: Planes,
    pub out: BufId,
}

impl TapeOp for BatchNorm {
    fn io(&self) -> OpIo {
        OpIo {
            kind: "batch_norm",
            inputs: vec![self.x],
            outputs: vec![self.out],
            saved: vec![self.x],
            params: vec![self.gamma, self.beta],
        }
    }
    fn forward(&self, t: &mut Tape, store: &dyn ParamStore) -> Result<()> {
        let (g, b) = (t.p(store, self.gamma)?, t.p(store, self.beta)?);
        let (m, v) = (
            store.param(&self.running_mean)?,
            store.param(&self.running_var)?,
        );
        t.write_output(self.out, |t, y| {
            cnn::batch_norm_forward(t.data(self.x), &g, &b, &m, &v, self.eps, self.planes, y);
            Ok(())
        })
    }
    fn backward(
        &self,
        t: &mut Tape,
        store: &dyn ParamStore,
        pg: &mut ParamGrads<super::Cpu>,
    ) -> Result<()> {
        if !t.has_grad(self.out) {
            return Ok(());
        }
        let g = t.p(store, self.gamma)?;
        let (m, v) = (
            store.param(&self.running_mean)?,
            store.param(&self.running_var)?,
        );
        let mut dg = pg.take(self.gamma);
        let mut db = pg.take(self.beta);
        let r = t.write_grad(self.x, |t, dx| {
            let (x, dy) = (t.data(self.x), t.grad(self.out));
            cnn::batch_norm_backward(
                x,
                &g,
                &m,
                &v,
                self.eps,
                dy,
                self.planes,
                Some(dx),
                &mut dg,
                &mut db,
            );
            Ok(())
        });
        pg.put(self.gamma, dg);
        pg.put(self.beta, db);
        r
    }
}

/// out = max(x, 0). The backward reads the output.
#[derive(Clone, Debug)]
pub struct Relu {
    pub x: BufId,
    pub out: BufId,
}

impl TapeOp for Relu {
    fn io(&self) -> OpIo {
        OpIo {
            kind: "relu",
            inputs: vec![self.x],
            outputs: vec![self.out],
            saved: vec![self.out],
            params: vec![],
        }
    }
    fn forward(&self, t: &mut Tape, _: &dyn ParamStore) -> Result<()> {
        t.write_output(self.out, |t, y| {
            cnn::relu_forward(t.data(self.x), y);
            Ok(())
        })
    }
    fn backward(
        &self,
        t: &mut Tape,
        _: &dyn ParamStore,
        _: &mut ParamGrads<super::Cpu>,
    ) -> Result<()> {
        if t.has_grad(self.out) {
            t.write_grad(self.x, |t, dx| {
                cnn::relu_backward(t.data(self.out), t.grad(self.out), dx);
                Ok(())
            })?;
        }
        Ok(())
    }
}

/// Max pooling; the backward recomputes each window's argmax from the kept input.
#[derive(Clone, Debug)]
pub struct MaxPool2d {
    pub x: BufId,
    pub shape: PoolShape,
    pub out: BufId,
}

impl TapeOp for MaxPool2d {
    fn io(&self) -> OpIo {
        OpIo {
            kind: "max_pool2d",
            inputs: vec![self.x],
            outputs: vec![self.out],
            saved: vec![self.x],
            params: vec![],
        }
    }
    fn forward(&self, t: &mut Tape, _: &dyn ParamStore) -> Result<()> {
        t.write_output(self.out, |t, y| {
            cnn::max_pool2d_forward(t.data(self.x), self.shape, y);
            Ok(())
        })
    }
    fn backward(
        &self,
        t: &mut Tape,
        _: &dyn ParamStore,
        _: &mut ParamGrads<super::Cpu>,
    ) -> Result<()> {
        if t.has_grad(self.out) {
            t.write_grad(self.x, |t, dx| {
                cnn::max_pool2d_backward(t.data(self.x), t.grad(self.out), self.shape, dx);
                Ok(())
            })?;
        }
        Ok(())
    }
}

/// Adaptive average pooling of `planes` planes of `hw` to `out_hw`. Linear: the backward keeps nothing.
#[derive(Clone, Debug)]
pub struct AdaptiveAvgPool2d {
    pub x: BufId,
    pub planes: usize,
    pub hw: (usize, usize),
    pub out_hw: (usize, usize),
    pub out: BufId,
}

impl TapeOp for AdaptiveAvgPool2d {
    fn io(&self) -> OpIo {
        OpIo {
            kind: "adaptive_avg_pool2d",
            inputs: vec![self.x],
            outputs: vec![self.out],
            saved: vec![],
            params: vec![],
        }
    }
    fn forward(&self, t: &mut Tape, _: &dyn ParamStore) -> Result<()> {
        t.write_output(self.out, |t, y| {
            let x = t.data(self.x);
            cnn::adaptive_avg_pool2d_forward(x, self.planes, self.hw, self.out_hw, y);
            Ok(())
        })
    }
    fn backward(
        &self,
        t: &mut Tape,
        _: &dyn ParamStore,
        _: &mut ParamGrads<super::Cpu>,
    ) -> Result<()> {
        if t.has_grad(self.out) {
            t.write_grad(self.x, |t, dx| {
                let dy = t.grad(self.out);
                cnn::adaptive_avg_pool2d_backward(dy, self.planes, self.hw, self.out_hw, dx);
                Ok(())
            })?;
        }
        Ok(())
    }
}

/// The option-A shortcut of a downsampling CIFAR ResNet block (subsample, zero-pad channels). Linear: the
/// backward keeps nothing.
#[derive(Clone, Debug)]
pub struct Shortcut {
    pub x: BufId,
    pub shape: ShortcutA,
    pub out: BufId,
}

impl TapeOp for Shortcut {
    fn io(&self) -> OpIo {
        OpIo {
            kind: "shortcut_a",
            inputs: vec![self.x],
            outputs: vec![self.out],
            saved: vec![],
            params: vec![],
        }
    }
    fn forward(&self, t: &mut Tape, _: &dyn ParamStore) -> Result<()> {
        t.write_output(self.out, |t, y| {
            cnn::shortcut_a_forward(t.data(self.x), self.shape, y);
            Ok(())
        })
    }
    fn backward(
        &self,
        t: &mut Tape,
        _: &dyn ParamStore,
        _: &mut ParamGrads<super::Cpu>,
    ) -> Result<()> {
        if t.has_grad(self.out) {
            t.write_grad(self.x, |t, dx| {
                cnn::shortcut_a_backward(t.grad(self.out), self.shape, dx);
                Ok(())
            })?;
        }
        Ok(())
    }
}
