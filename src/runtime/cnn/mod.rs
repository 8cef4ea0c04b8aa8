//! Convolutional classifiers on the tape: He et al.'s CIFAR ResNets, torchvision's ResNets and VGG, read
//! from a PyTorch `state_dict` saved as safetensors plus an architecture name ([`arch`]), run on NCHW
//! images ([`images`]): forward with every unit's output captured, loss and top-1 accuracy, forward +
//! backward with one gradient norm per unit, and any set of removable units skipped (replaced by the
//! identity).
//!
//! Batch norm runs with the running statistics (inference mode), in the forward and in the backward: the
//! statistics are constants, γ and β get gradients. Parameter groups of the gradient norms: unit u → u, the
//! stem → U, the head → U + 1.

pub mod arch;
pub mod images;

pub use arch::{ArchName, Family, Stem, Structure, Unit, UnitKind};
pub use images::Images;

use super::ops::cnn::{ConvShape, Planes, PoolShape, ShortcutA};
use super::tape::{cnn as op, op as common, BufId, Pool, Tape};
use super::weights::Weights;
use crate::error::{Error, Result};
use arch::Shortcut;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// BN's ε (PyTorch's default, which every supported layout uses).
pub const BN_EPS: f64 = 1e-5;

pub struct CnnModel {
    pub structure: Structure,
    pub path: PathBuf,
    weights: Weights,
    pool: Mutex<Pool>,
}

/// Loss and accuracy of one forward.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Outcome {
    /// Mean cross-entropy over the images.
    pub loss: f64,
    /// Images whose arg-max logit is their label.
    pub correct: usize,
    pub images: usize,
}

/// The result of one forward + backward.
#[derive(Clone, Debug, PartialEq)]
pub struct CnnGradNorms {
    pub outcome: Outcome,
    /// ‖∂loss/∂θ_u‖ over the parameters of unit u (0 for skipped units).
    pub per_unit: Vec<f64>,
    pub stem: f64,
    pub head: f64,
}

/// An activation on the tape: a buffer of `n` images of `c × h × w`.
#[derive(Clone, Copy, Debug)]
struct Act {
    buf: BufId,
    c: usize,
    h: usize,
    w: usize,
}

impl CnnModel {
    /// Open the state_dict at `path` and read its structure as `arch` (every tensor checked).
    pub fn load(path: &Path, arch: &str) -> Result<CnnModel> {
        let arch = ArchName::parse(arch)?;
        let weights = Weights::open_file(path)?;
        let structure = Structure::read(&weights, path, arch)?;
        Ok(CnnModel {
            structure,
            path: path.to_path_buf(),
            weights,
            pool: Mutex::new(Pool::default()),
        })
    }

    pub fn units(&self) -> &[Unit] {
        &self.structure.units
    }

    pub fn num_units(&self) -> usize {
        self.structure.units.len()
    }

    pub fn unit_names(&self) -> Vec<String> {
        self.units().iter().map(|u| u.name.clone()).collect()
    }

    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// Check that `images` fit the model: channels, labels inside the classes, spatial size the head
    /// accepts.
    pub fn check_images(&self, images: &Images, path: &Path) -> Result<()> {
        let s = &self.structure;
        if images.c != s.in_channels {
            return Err(Error::format(
                path,
                format!(
                    "images have {} channels, the model's first conv reads {}",
                    images.c, s.in_channels
                ),
            ));
        }
        if let Some(i) = images
            .labels
            .iter()
            .position(|&l| l as u64 >= s.num_classes as u64)
        {
            return Err(Error::format(
                path,
                format!(
                    "label {} of image {i} is outside the model's {} classes",
                    images.labels[i], s.num_classes
                ),
            ));
        }
        self.head_pool(self.feature_size(images.h, images.w)?)?;
        Ok(())
    }

    /// Channels, height and width after the last unit (and its pool) for `h × w` inputs.
    fn feature_size(&self, h: usize, w: usize) -> Result<(usize, usize, usize)> {
        let shapes = self.hidden_shapes(h, w)?;
        let (c, mut h, mut w) = *shapes.last().expect("hidden state 0 at least");
        if let Some(Unit {
            kind: UnitKind::Conv {
                pool_after: true, ..
            },
            ..
        }) = self.structure.units.last()
        {
            if h < 2 || w < 2 {
                return Err(Error::invalid(format!(
                    "images are too small for --arch {}",
                    self.structure.arch.name
                )));
            }
            (h, w) = (h / 2, w / 2);
        }
        Ok((c, h, w))
    }

    /// The shape (channels, height, width) of hidden states `0..=U` for `h × w` inputs: 0 the first unit's
    /// input, u + 1 unit u's output (before a VGG pool). A map too small for a conv or pool: an error.
    pub fn hidden_shapes(&self, mut h: usize, mut w: usize) -> Result<Vec<(usize, usize, usize)>> {
        let s = &self.structure;
        let down = |v: usize, k: usize, st: usize, p: usize| -> Result<usize> {
            if v + 2 * p < k {
                return Err(Error::invalid(format!(
                    "images are too small for --arch {}",
                    s.arch.name
                )));
            }
            Ok((v + 2 * p - k) / st + 1)
        };
        let mut c = s.in_channels;
        if let Stem::Conv {
            kernel,
            stride,
            pool,
        } = s.stem
        {
            (h, w) = (
                down(h, kernel, stride, kernel / 2)?,
                down(w, kernel, stride, kernel / 2)?,
            );
            if pool {
                (h, w) = (down(h, 3, 2, 1)?, down(w, 3, 2, 1)?);
            }
            c = s.units.first().map_or(c, |u| u.c_in);
        }
        let mut shapes = vec![(c, h, w)];
        let mut pool_before = false;
        for u in &s.units {
            if pool_before {
                (h, w) = (down(h, 2, 2, 0)?, down(w, 2, 2, 0)?);
            }
            (h, w) = (down(h, 3, u.stride, 1)?, down(w, 3, u.stride, 1)?);
            shapes.push((u.c_out, h, w));
            pool_before = matches!(
                u.kind,
                UnitKind::Conv {
                    pool_after: true,
                    ..
                }
            );
        }
        Ok(shapes)
    }

    /// The pooling before the classifier for a `c × h × w` feature map: ResNets pool globally; VGG flattens
    /// when the first linear reads c·h·w features, else pools adaptively to 7×7 (torchvision) or 1×1 to
    /// match it. `None`: flatten.
    pub fn head_pool(&self, (c, h, w): (usize, usize, usize)) -> Result<Option<(usize, usize)>> {
        let s = &self.structure;
        if s.arch.family != Family::Vgg {
            return Ok(Some((1, 1)));
        }
        if s.head_in == c * h * w {
            Ok(None)
        } else if s.head_in == c * 49 {
            Ok(Some((7, 7)))
        } else if s.head_in == c {
            Ok(Some((1, 1)))
        } else {
            Err(Error::Model(format!(
                "{}: '{}.weight' reads {} features; the {h}×{w}×{c} feature map gives {} (or {} / {} pooled)",
                self.path.display(),
                s.head[0],
                s.head_in,
                c * h * w,
                c * 49,
                c
            )))
        }
    }

    /// The feature-map pooling the head uses on `h × w` inputs (for `sglp-arch.json`).
    pub fn head_pool_for(&self, h: usize, w: usize) -> Result<Option<(usize, usize)>> {
        self.head_pool(self.feature_size(h, w)?)
    }

    /// Forward only. `skip`: removable units bypassed. Calls `on_hidden(i, x)` with i = 0 for the input of
    /// the first unit (the stem's output; the images for VGG) and i = u + 1 for the output of unit u (a
    /// skipped unit reports its input), x = `[n, c·h·w]`.
    pub fn forward(
        &self,
        images: &Images,
        skip: &[usize],
        on_hidden: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<Outcome> {
        let mut tape = self.build_tape(images, skip)?;
        let r = self.run(&mut tape, images, false, on_hidden);
        self.return_pool(tape);
        r
    }

    /// The logits `[n, classes]` of a forward with `skip` bypassed.
    pub fn logits(&self, images: &Images, skip: &[usize]) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        let mut tape = self.build_tape(images, skip)?;
        let logits_mark = self.num_units() + 1;
        let r = tape.forward(&self.weights, false, &mut |i, x| {
            if i == logits_mark {
                out = x.to_vec();
            }
        });
        self.return_pool(tape);
        r?;
        Ok(out)
    }

    /// Forward + backward: loss, accuracy and one gradient norm per unit (skipped: 0), the stem's and the
    /// head's; `on_hidden` as in [`CnnModel::forward`].
    pub fn grad_norms(
        &self,
        images: &Images,
        skip: &[usize],
        on_hidden: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<CnnGradNorms> {
        let u = self.num_units();
        let mut tape = self.build_tape(images, skip)?;
        let mut run = |tape: &mut Tape| -> Result<(Outcome, Vec<f64>)> {
            let outcome = self.run(tape, images, true, on_hidden)?;
            Ok((outcome, tape.backward(&self.weights, u + 2)?))
        };
        let r = run(&mut tape);
        self.return_pool(tape);
        let (outcome, sumsq) = r?;
        Ok(CnnGradNorms {
            outcome,
            per_unit: sumsq[..u].iter().map(|s| s.sqrt()).collect(),
            stem: sumsq[u].sqrt(),
            head: sumsq[u + 1].sqrt(),
        })
    }

    /// Run the tape's forward, counting correct top-1 predictions from the marked logits.
    fn run(
        &self,
        tape: &mut Tape,
        images: &Images,
        keep: bool,
        on_hidden: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<Outcome> {
        let logits_mark = self.num_units() + 1;
        let classes = self.structure.num_classes;
        let mut correct = 0;
        let loss = tape.forward(&self.weights, keep, &mut |i, x| {
            if i == logits_mark {
                correct = x
                    .chunks(classes)
                    .zip(&images.labels)
                    .filter(|(row, &l)| argmax(row) == l as usize)
                    .count();
            } else {
                on_hidden(i, x)
            }
        })?;
        Ok(Outcome {
            loss,
            correct,
            images: images.n,
        })
    }

    fn take_pool(&self) -> Pool {
        std::mem::take(&mut *self.pool.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn return_pool(&self, tape: Tape) {
        *self.pool.lock().unwrap_or_else(|e| e.into_inner()) = tape.into_pool();
    }

    /// The tape of one batch with `skip` bypassed. Marks: 0 = the first unit's input, u + 1 = unit u's
    /// output, U + 1 = the logits.
    fn build_tape(&self, images: &Images, skip: &[usize]) -> Result<Tape> {
        let s = &self.structure;
        let nu = self.num_units();
        if images.n == 0 {
            return Err(Error::invalid("a batch needs at least one image"));
        }
        for &u in skip {
            let unit = s.units.get(u).ok_or_else(|| {
                Error::invalid(format!(
                    "skip: unit {u} does not exist (the model has {nu} units)"
                ))
            })?;
            if !unit.removable {
                return Err(Error::invalid(format!(
                    "skip: unit {u} ({}) changes the shape of its input and cannot be removed",
                    unit.name
                )));
            }
        }
        let mut b = Builder {
            tape: Tape::with_pool(vec![], images.labels.clone(), self.take_pool()),
            weights: &self.weights,
            n: images.n,
        };
        let input = b.tape.buffer("images", images.n, images.image_len());
        b.tape.push(common::HiddenInput {
            data: images.data.clone(),
            out: input,
        });
        let mut x = Act {
            buf: input,
            c: images.c,
            h: images.h,
            w: images.w,
        };
        let (g_stem, g_head) = (nu, nu + 1);
        let mut first_conv = true;
        if let Stem::Conv {
            kernel,
            stride,
            pool,
        } = s.stem
        {
            debug_assert_eq!(
                self.weights.shape("conv1.weight").map(|s| s[2]),
                Some(kernel)
            );
            x = b.conv(x, "conv1", g_stem, (stride, false), &mut first_conv);
            x = b.bn(x, "bn1", g_stem);
            x = b.relu(x);
            if pool {
                x = b.max_pool(x, 3, 2, 1);
            }
        }
        b.tape.mark(0, x.buf);
        for (u, unit) in s.units.iter().enumerate() {
            if !skip.contains(&u) {
                x = b.unit(x, unit, u, &mut first_conv);
            }
            b.tape.mark(u + 1, x.buf);
            if let UnitKind::Conv {
                pool_after: true, ..
            } = unit.kind
            {
                x = b.max_pool(x, 2, 2, 0);
            }
        }
        if let Some(out_hw) = self.head_pool((x.c, x.h, x.w))? {
            let y = b.tape.buffer("head.pool", b.n, x.c * out_hw.0 * out_hw.1);
            b.tape.push(op::AdaptiveAvgPool2d {
                x: x.buf,
                planes: b.n * x.c,
                hw: (x.h, x.w),
                out_hw,
                out: y,
            });
            x = Act {
                buf: y,
                c: x.c,
                h: out_hw.0,
                w: out_hw.1,
            };
        }
        let mut feat = (x.buf, x.c * x.h * x.w);
        for (i, name) in s.head.iter().enumerate() {
            let shape = self
                .weights
                .shape(&format!("{name}.weight"))
                .expect("checked");
            let (out_f, in_f) = (shape[0], shape[1]);
            debug_assert_eq!(in_f, feat.1);
            let w = b.tape.param(format!("{name}.weight"), g_head, out_f * in_f);
            let bias = b.tape.param(format!("{name}.bias"), g_head, out_f);
            let y = b.tape.buffer(name.clone(), b.n, out_f);
            b.tape.push(common::Linear {
                x: feat.0,
                w,
                b: Some(bias),
                out: y,
            });
            feat = (y, out_f);
            if i + 1 < s.head.len() {
                let r = b.tape.buffer(format!("{name}.relu"), b.n, out_f);
                b.tape.push(op::Relu { x: y, out: r });
                feat.0 = r;
            }
        }
        b.tape.mark(nu + 1, feat.0);
        let lse = b.tape.buffer("logits_lse", b.n, 1);
        b.tape.push(common::CrossEntropy {
            logits: feat.0,
            lse,
        });
        Ok(b.tape)
    }
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// Pushes ops onto a tape, tracking activation shapes (convs read their channel counts from the checked
/// weights).
struct Builder<'w> {
    tape: Tape,
    weights: &'w Weights,
    n: usize,
}

impl Builder<'_> {
    /// Conv `name` reading `x`: kernel from its weight, `stride`, padding k/2, with `{name}.bias` when
    /// `bias`. The first conv of the network (reading the images) computes no input gradient.
    fn conv(
        &mut self,
        x: Act,
        name: &str,
        group: usize,
        (stride, bias): (usize, bool),
        first_conv: &mut bool,
    ) -> Act {
        let ws = self
            .weights
            .shape(&format!("{name}.weight"))
            .expect("checked when the structure was read");
        let (o, k) = (ws[0], ws[2]);
        let shape = ConvShape {
            n: self.n,
            c: x.c,
            h: x.h,
            w: x.w,
            o,
            kh: k,
            kw: k,
            stride,
            pad: k / 2,
        };
        let w = self
            .tape
            .param(format!("{name}.weight"), group, o * x.c * k * k);
        let b = bias.then(|| self.tape.param(format!("{name}.bias"), group, o));
        let (h, wd) = (shape.ho(), shape.wo());
        let y = self.tape.buffer(name.to_string(), self.n, o * h * wd);
        self.tape.push(op::Conv2d {
            x: x.buf,
            w,
            b,
            shape,
            input_grad: !std::mem::replace(first_conv, false),
            out: y,
        });
        Act {
            buf: y,
            c: o,
            h,
            w: wd,
        }
    }

    fn bn(&mut self, x: Act, name: &str, group: usize) -> Act {
        let gamma = self.tape.param(format!("{name}.weight"), group, x.c);
        let beta = self.tape.param(format!("{name}.bias"), group, x.c);
        let y = self.tape.buffer(name.to_string(), self.n, x.c * x.h * x.w);
        self.tape.push(op::BatchNorm {
            x: x.buf,
            gamma,
            beta,
            running_mean: format!("{name}.running_mean"),
            running_var: format!("{name}.running_var"),
            eps: BN_EPS,
            planes: Planes {
                n: self.n,
                c: x.c,
                hw: x.h * x.w,
            },
            out: y,
        });
        Act { buf: y, ..x }
    }

    fn relu(&mut self, x: Act) -> Act {
        let name = format!("{}.relu", self.tape.bufs[x.buf].name);
        let y = self.tape.buffer(name, self.n, x.c * x.h * x.w);
        self.tape.push(op::Relu { x: x.buf, out: y });
        Act { buf: y, ..x }
    }

    fn add(&mut self, a: Act, b: Act, name: String) -> Act {
        let y = self.tape.buffer(name, self.n, a.c * a.h * a.w);
        self.tape.push(common::Add {
            a: a.buf,
            b: b.buf,
            out: y,
        });
        Act { buf: y, ..a }
    }

    fn max_pool(&mut self, x: Act, k: usize, stride: usize, pad: usize) -> Act {
        let shape = PoolShape {
            planes: self.n * x.c,
            h: x.h,
            w: x.w,
            k,
            stride,
            pad,
        };
        let (h, w) = (shape.ho(), shape.wo());
        let name = format!("{}.maxpool", self.tape.bufs[x.buf].name);
        let y = self.tape.buffer(name, self.n, x.c * h * w);
        self.tape.push(op::MaxPool2d {
            x: x.buf,
            shape,
            out: y,
        });
        Act {
            buf: y,
            c: x.c,
            h,
            w,
        }
    }

    /// Unit `u` reading `x`; returns its output.
    fn unit(&mut self, x: Act, unit: &Unit, u: usize, first_conv: &mut bool) -> Act {
        let p = |s: &str| format!("{}.{s}", unit.name);
        let shortcut = match &unit.kind {
            UnitKind::Conv { conv, bn, .. } => {
                let mut y = self.conv(x, conv, u, (1, true), first_conv);
                if let Some(bn) = bn {
                    y = self.bn(y, bn, u);
                }
                return self.relu(y);
            }
            UnitKind::Basic { shortcut } | UnitKind::Bottleneck { shortcut } => shortcut,
        };
        let mut y = x;
        // The stride sits on the 3×3 conv: conv1 of a basic block, conv2 of a bottleneck (torchvision).
        let convs: &[(&str, &str, bool)] = match unit.kind {
            UnitKind::Bottleneck { .. } => &[
                ("conv1", "bn1", false),
                ("conv2", "bn2", true),
                ("conv3", "bn3", false),
            ],
            _ => &[("conv1", "bn1", true), ("conv2", "bn2", false)],
        };
        for (i, &(conv, bn, strided)) in convs.iter().enumerate() {
            let stride = if strided { unit.stride } else { 1 };
            y = self.conv(y, &p(conv), u, (stride, false), first_conv);
            y = self.bn(y, &p(bn), u);
            if i + 1 < convs.len() {
                y = self.relu(y);
            }
        }
        let skip = match shortcut {
            Shortcut::Identity => x,
            Shortcut::ZeroPad { pad } => {
                let shape = ShortcutA {
                    n: self.n,
                    c: x.c,
                    h: x.h,
                    w: x.w,
                    stride: unit.stride,
                    pad: *pad,
                };
                let out = self.tape.buffer(
                    p("shortcut"),
                    self.n,
                    shape.out_channels() * shape.ho() * shape.wo(),
                );
                self.tape.push(op::Shortcut {
                    x: x.buf,
                    shape,
                    out,
                });
                Act {
                    buf: out,
                    c: shape.out_channels(),
                    h: shape.ho(),
                    w: shape.wo(),
                }
            }
            Shortcut::Projection { conv, bn } => {
                let s = self.conv(x, conv, u, (unit.stride, false), first_conv);
                self.bn(s, bn, u)
            }
        };
        debug_assert_eq!((skip.c, skip.h, skip.w), (y.c, y.h, y.w));
        let sum = self.add(y, skip, p("add"));
        self.relu(sum)
    }
}
