//! Architectures by name, and the structure of a checkpoint read from its keys and shapes: the units (residual
//! blocks or VGG convs), the stem and the head, every tensor checked on the way (a missing key, a wrong
//! shape or a key the architecture does not have is a one-line error naming it).

use crate::error::{Error, Result};
use crate::runtime::weights::Weights;
use std::collections::BTreeSet;
use std::path::Path;

/// The network families the runtime builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// He et al.'s CIFAR ResNets: 3 stages of basic blocks after a 3×3 stem.
    CifarResnet,
    /// torchvision's ImageNet ResNets.
    Resnet,
    /// VGG, torchvision's `features` layout (classifier torchvision's or a CIFAR one).
    Vgg,
}

/// A parsed `--arch` name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchName {
    pub name: String,
    pub family: Family,
    /// Blocks per stage (ResNets).
    pub blocks: Vec<usize>,
    /// ResNets: bottleneck blocks (torchvision 50/101/152).
    pub bottleneck: bool,
    /// VGG: the torchvision configuration (channels, 0 = max pool).
    pub vgg_cfg: Vec<usize>,
    /// VGG: batch norm after each conv (`_bn`).
    pub batch_norm: bool,
}

/// The names `--arch` accepts.
pub const ARCH_NAMES: &str = "cifar-resnet{20,32,44,56,110}, resnet{18,34,50,101,152}, \
                              vgg{11,13,16,19}[_bn]";

impl ArchName {
    pub fn parse(name: &str) -> Result<ArchName> {
        let bad = || Error::invalid(format!("--arch '{name}' is not one of {ARCH_NAMES}"));
        let base = ArchName {
            name: name.to_string(),
            family: Family::Vgg,
            blocks: vec![],
            bottleneck: false,
            vgg_cfg: vec![],
            batch_norm: false,
        };
        if let Some(d) = name.strip_prefix("cifar-resnet") {
            let n = match d {
                "20" => 3,
                "32" => 5,
                "44" => 7,
                "56" => 9,
                "110" => 18,
                _ => return Err(bad()),
            };
            return Ok(ArchName {
                family: Family::CifarResnet,
                blocks: vec![n; 3],
                ..base
            });
        }
        if let Some(d) = name.strip_prefix("resnet") {
            let (blocks, bottleneck) = match d {
                "18" => (vec![2, 2, 2, 2], false),
                "34" => (vec![3, 4, 6, 3], false),
                "50" => (vec![3, 4, 6, 3], true),
                "101" => (vec![3, 4, 23, 3], true),
                "152" => (vec![3, 8, 36, 3], true),
                _ => return Err(bad()),
            };
            return Ok(ArchName {
                family: Family::Resnet,
                blocks,
                bottleneck,
                ..base
            });
        }
        if let Some(rest) = name.strip_prefix("vgg") {
            let (d, bn) = match rest.strip_suffix("_bn") {
                Some(d) => (d, true),
                None => (rest, false),
            };
            // Channels per conv, 0 = max pool (torchvision's configurations A, B, D, E).
            let cfg: Vec<usize> = match d {
                "11" => vec![64, 0, 128, 0, 256, 256, 0, 512, 512, 0, 512, 512, 0],
                "13" => vec![
                    64, 64, 0, 128, 128, 0, 256, 256, 0, 512, 512, 0, 512, 512, 0,
                ],
                "16" => vec![
                    64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0,
                ],
                "19" => vec![
                    64, 64, 0, 128, 128, 0, 256, 256, 256, 256, 0, 512, 512, 512, 512, 0, 512, 512,
                    512, 512, 0,
                ],
                _ => return Err(bad()),
            };
            return Ok(ArchName {
                vgg_cfg: cfg,
                batch_norm: bn,
                ..base
            });
        }
        Err(bad())
    }
}

/// The skip path of a residual block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Shortcut {
    Identity,
    /// Option A: subsample by the block's stride, `pad` zero channels on each side.
    ZeroPad {
        pad: usize,
    },
    /// Option B / torchvision `downsample`: 1×1 conv (with the block's stride) + BN.
    Projection {
        conv: String,
        bn: String,
    },
}

/// What a unit computes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnitKind {
    /// relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), 3×3 convs, stride on conv1.
    Basic { shortcut: Shortcut },
    /// relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x)), 1×1, 3×3 (stride), 1×1.
    Bottleneck { shortcut: Shortcut },
    /// VGG: relu([bn](conv(x))), 3×3 padding 1; then a 2×2 max pool when `pool_after` (the pool stays when
    /// the conv is removed).
    Conv {
        conv: String,
        bn: Option<String>,
        pool_after: bool,
    },
}

/// A removable-or-not unit of the network: a residual block or a VGG conv layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unit {
    /// The key prefix of its tensors (`layer2.3`, `features.7`).
    pub name: String,
    /// Whether the network still runs with it replaced by the identity: its input and output have the
    /// same shape (never a downsampling block, never a VGG conv that changes the channel count).
    pub removable: bool,
    pub c_in: usize,
    pub c_out: usize,
    pub stride: usize,
    pub kind: UnitKind,
    /// Stage (ResNets) or block between pools (VGG), from 0.
    pub stage: usize,
    /// Key prefixes of its tensors (the unit's own and its BN's).
    pub prefixes: Vec<String>,
    /// Parameters (weights, biases and BN affine; not the running statistics).
    pub params: usize,
}

/// The stem before the first unit (ResNets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stem {
    None,
    /// conv1 (k×k, stride, padding k/2) + bn1 + ReLU, then a 3×3/2 max pool (padding 1) when `pool`.
    Conv {
        kernel: usize,
        stride: usize,
        pool: bool,
    },
}

/// The structure of a checkpoint.
#[derive(Clone, Debug)]
pub struct Structure {
    pub arch: ArchName,
    pub in_channels: usize,
    pub stem: Stem,
    pub units: Vec<Unit>,
    /// The classifier's linear layers in order (prefixes), ReLU between them.
    pub head: Vec<String>,
    /// Input features of the first linear.
    pub head_in: usize,
    pub num_classes: usize,
    /// Stem parameters and head parameters.
    pub stem_params: usize,
    pub head_params: usize,
}

/// Reads and checks the tensors of a structure, remembering every key it consumed.
struct Reader<'a> {
    w: &'a Weights,
    path: &'a Path,
    arch: &'a str,
    used: BTreeSet<String>,
}

impl Reader<'_> {
    fn shape(&mut self, key: &str) -> Result<Vec<usize>> {
        let s = self.w.shape(key).ok_or_else(|| {
            Error::Model(format!(
                "{}: no tensor '{key}' (expected by --arch {})",
                self.path.display(),
                self.arch
            ))
        })?;
        self.used.insert(key.to_string());
        Ok(s.to_vec())
    }

    fn expect(&mut self, key: &str, want: &[usize]) -> Result<()> {
        let s = self.shape(key)?;
        if s != want {
            return Err(Error::layer(
                self.path,
                key,
                format!("shape {s:?}, --arch {} implies {want:?}", self.arch),
            ));
        }
        self.w.expect(key, want)
    }

    /// A conv `{name}.weight` `[?, c_in, k, k]` (and `{name}.bias` when `bias`): its output channels.
    fn conv(&mut self, name: &str, c_in: usize, k: usize, bias: bool) -> Result<usize> {
        let key = format!("{name}.weight");
        let s = self.shape(&key)?;
        if s.len() != 4 || s[1] != c_in || s[2] != k || s[3] != k || s[0] == 0 {
            return Err(Error::layer(
                self.path,
                &key,
                format!(
                    "shape {s:?}, --arch {} implies [out, {c_in}, {k}, {k}]",
                    self.arch
                ),
            ));
        }
        self.w.expect(&key, &s)?;
        if bias {
            self.expect(&format!("{name}.bias"), &[s[0]])?;
        }
        Ok(s[0])
    }

    fn bn(&mut self, name: &str, c: usize) -> Result<()> {
        for t in ["weight", "bias", "running_mean", "running_var"] {
            self.expect(&format!("{name}.{t}"), &[c])?;
        }
        let nbt = format!("{name}.num_batches_tracked");
        if self.w.contains(&nbt) {
            self.used.insert(nbt);
        }
        Ok(())
    }

    /// A linear `{name}.weight` `[?, inp]` + `{name}.bias`: its output features. `inp = None`: any.
    fn linear(&mut self, name: &str, inp: Option<usize>) -> Result<(usize, usize)> {
        let key = format!("{name}.weight");
        let s = self.shape(&key)?;
        if s.len() != 2 || inp.is_some_and(|i| s[1] != i) || s[0] == 0 {
            return Err(Error::layer(
                self.path,
                &key,
                format!(
                    "shape {s:?}, --arch {} implies [out, {}]",
                    self.arch,
                    inp.map_or("in".into(), |i| i.to_string())
                ),
            ));
        }
        self.w.expect(&key, &s)?;
        self.expect(&format!("{name}.bias"), &[s[0]])?;
        Ok((s[1], s[0]))
    }
}

/// Parameters of a conv (+ bias) and BN affine, by shape.
fn conv_params(c_out: usize, c_in: usize, k: usize) -> usize {
    c_out * c_in * k * k
}

impl Structure {
    /// Read the structure of `arch` from the weights at `path`, checking every tensor.
    pub fn read(w: &Weights, path: &Path, arch: ArchName) -> Result<Structure> {
        let mut r = Reader {
            w,
            path,
            arch: &arch.name,
            used: BTreeSet::new(),
        };
        let s = match arch.family {
            Family::CifarResnet | Family::Resnet => Self::read_resnet(&mut r, &arch)?,
            Family::Vgg => Self::read_vgg(&mut r, &arch)?,
        };
        let mut extra: Vec<&str> = w.names().filter(|n| !r.used.contains(*n)).collect();
        extra.sort_unstable();
        if let Some(k) = extra.first() {
            return Err(Error::Model(format!(
                "{}: tensor '{k}' is not part of --arch {} ({} unexpected keys; wrong depth or family?)",
                path.display(),
                arch.name,
                extra.len()
            )));
        }
        Ok(s)
    }

    fn read_resnet(r: &mut Reader<'_>, arch: &ArchName) -> Result<Structure> {
        let cifar = arch.family == Family::CifarResnet;
        let k_stem = if cifar { 3 } else { 7 };
        let s = r.shape("conv1.weight")?;
        let in_channels = *s.get(1).unwrap_or(&0);
        let stem_c = r.conv("conv1", in_channels, k_stem, false)?;
        r.bn("bn1", stem_c)?;
        let stem_params = conv_params(stem_c, in_channels, k_stem) + 2 * stem_c;
        let mut units = Vec::new();
        let mut c = stem_c;
        for (stage, &n) in arch.blocks.iter().enumerate() {
            for i in 0..n {
                let name = format!("layer{}.{i}", stage + 1);
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                let p = |s: &str| format!("{name}.{s}");
                let mut params = 0;
                let (c_out, kind) = if arch.bottleneck {
                    let mid = r.conv(&p("conv1"), c, 1, false)?;
                    r.bn(&p("bn1"), mid)?;
                    r.conv(&p("conv2"), mid, 3, false).and_then(|o| {
                        if o == mid {
                            Ok(())
                        } else {
                            Err(Error::layer(
                                r.path,
                                p("conv2.weight"),
                                format!("{o} output channels, conv1 has {mid}"),
                            ))
                        }
                    })?;
                    r.bn(&p("bn2"), mid)?;
                    let out = r.conv(&p("conv3"), mid, 1, false)?;
                    r.bn(&p("bn3"), out)?;
                    params += conv_params(mid, c, 1) + conv_params(mid, mid, 3);
                    params += conv_params(out, mid, 1) + 4 * mid + 2 * out;
                    let sc = Self::read_shortcut(r, &name, c, out, stride, cifar)?;
                    (out, UnitKind::Bottleneck { shortcut: sc })
                } else {
                    let out = r.conv(&p("conv1"), c, 3, false)?;
                    r.bn(&p("bn1"), out)?;
                    let out2 = r.conv(&p("conv2"), out, 3, false)?;
                    if out2 != out {
                        return Err(Error::layer(
                            r.path,
                            p("conv2.weight"),
                            format!("{out2} output channels, conv1 has {out}"),
                        ));
                    }
                    r.bn(&p("bn2"), out)?;
                    params += conv_params(out, c, 3) + conv_params(out, out, 3) + 4 * out;
                    let sc = Self::read_shortcut(r, &name, c, out, stride, cifar)?;
                    (out, UnitKind::Basic { shortcut: sc })
                };
                let shortcut = match &kind {
                    UnitKind::Basic { shortcut } | UnitKind::Bottleneck { shortcut } => shortcut,
                    UnitKind::Conv { .. } => unreachable!(),
                };
                if let Shortcut::Projection { .. } = shortcut {
                    params += conv_params(c_out, c, 1) + 2 * c_out;
                }
                units.push(Unit {
                    removable: *shortcut == Shortcut::Identity,
                    prefixes: vec![name.clone()],
                    name,
                    c_in: c,
                    c_out,
                    stride,
                    kind,
                    stage,
                    params,
                });
                c = c_out;
            }
        }
        let fc = if cifar && r.w.contains("linear.weight") {
            "linear"
        } else {
            "fc"
        };
        let (_, classes) = r.linear(fc, Some(c))?;
        let head_params = c * classes + classes;
        Ok(Structure {
            arch: arch.clone(),
            in_channels,
            stem: Stem::Conv {
                kernel: k_stem,
                stride: if cifar { 1 } else { 2 },
                pool: !cifar,
            },
            units,
            head: vec![fc.to_string()],
            head_in: c,
            num_classes: classes,
            stem_params,
            head_params,
        })
    }

    /// The shortcut of block `name` from `c` to `out` channels with `stride`: the identity when nothing
    /// changes, else a projection when its keys are there (`shortcut.0/1`, `downsample.0/1`), else
    /// (CIFAR only) option A.
    fn read_shortcut(
        r: &mut Reader<'_>,
        name: &str,
        c: usize,
        out: usize,
        stride: usize,
        cifar: bool,
    ) -> Result<Shortcut> {
        for sub in ["shortcut", "downsample"] {
            let conv = format!("{name}.{sub}.0");
            if r.w.contains(&format!("{conv}.weight")) {
                r.expect(&format!("{conv}.weight"), &[out, c, 1, 1])?;
                let bn = format!("{name}.{sub}.1");
                r.bn(&bn, out)?;
                return Ok(Shortcut::Projection { conv, bn });
            }
        }
        if stride == 1 && c == out {
            return Ok(Shortcut::Identity);
        }
        if cifar && out >= c && (out - c).is_multiple_of(2) && stride == 2 {
            return Ok(Shortcut::ZeroPad { pad: (out - c) / 2 });
        }
        Err(Error::Model(format!(
            "{}: no tensor '{name}.downsample.0.weight' (block {name} goes from {c} to {out} channels \
             with stride {stride}, so it needs a projection shortcut)",
            r.path.display()
        )))
    }

    fn read_vgg(r: &mut Reader<'_>, arch: &ArchName) -> Result<Structure> {
        let s = r.shape("features.0.weight")?;
        let in_channels = *s.get(1).unwrap_or(&0);
        let mut units: Vec<Unit> = Vec::new();
        let (mut c, mut idx, mut stage) = (in_channels, 0usize, 0usize);
        for &v in &arch.vgg_cfg {
            if v == 0 {
                if let Some(UnitKind::Conv { pool_after, .. }) =
                    units.last_mut().map(|u| &mut u.kind)
                {
                    *pool_after = true;
                }
                idx += 1;
                stage += 1;
                continue;
            }
            let conv = format!("features.{idx}");
            let out = r.conv(&conv, c, 3, true)?;
            let bn = arch.batch_norm.then(|| format!("features.{}", idx + 1));
            if let Some(bn) = &bn {
                r.bn(bn, out)?;
            }
            let mut prefixes = vec![conv.clone()];
            prefixes.extend(bn.clone());
            units.push(Unit {
                name: conv.clone(),
                removable: c == out,
                c_in: c,
                c_out: out,
                stride: 1,
                kind: UnitKind::Conv {
                    conv,
                    bn,
                    pool_after: false,
                },
                stage,
                prefixes,
                params: conv_params(out, c, 3) + out + if arch.batch_norm { 2 * out } else { 0 },
            });
            c = out;
            idx += if arch.batch_norm { 3 } else { 2 };
        }
        // The classifier: `classifier` (one linear, the CIFAR layout) or `classifier.{i}` linears.
        let mut head = Vec::new();
        if r.w.contains("classifier.weight") {
            head.push("classifier".to_string());
        } else {
            let mut idx: Vec<usize> =
                r.w.names()
                    .filter_map(|n| {
                        n.strip_prefix("classifier.")?
                            .strip_suffix(".weight")?
                            .parse()
                            .ok()
                    })
                    .collect();
            idx.sort_unstable();
            head.extend(idx.into_iter().map(|i| format!("classifier.{i}")));
        }
        if head.is_empty() {
            return Err(Error::Model(format!(
                "{}: no tensor 'classifier.weight' or 'classifier.0.weight' (expected by --arch {})",
                r.path.display(),
                arch.name
            )));
        }
        let (head_in, mut width) = r.linear(&head[0], None)?;
        let mut head_params = head_in * width + width;
        for name in &head[1..] {
            let (_, o) = r.linear(name, Some(width))?;
            head_params += width * o + o;
            width = o;
        }
        if head_in % c != 0 {
            return Err(Error::layer(
                r.path,
                format!("{}.weight", head[0]),
                format!(
                    "{head_in} input features is not a multiple of the last conv's {c} channels"
                ),
            ));
        }
        Ok(Structure {
            arch: arch.clone(),
            in_channels,
            stem: Stem::None,
            units,
            head,
            head_in,
            num_classes: width,
            stem_params: 0,
            head_params,
        })
    }

    /// Channels out of the last unit.
    pub fn last_channels(&self) -> usize {
        self.units.last().map_or(self.in_channels, |u| u.c_out)
    }
}
