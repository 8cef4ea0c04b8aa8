//! The report's pictures, as PNG files (plotters' bitmap backend; text drawn with the bundled DejaVu Sans,
//! registered once, since the `ab_glyph` text path knows no system fonts).

use crate::error::{Error, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::Path;
use std::sync::Once;

const FONT: &str = "sans-serif";
static FONT_BYTES: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

fn register_font() {
    REGISTER.call_once(|| {
        // The font is compiled in and known to parse; a failure would leave text undrawn, not crash.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES);
    });
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::format(path, format!("drawing the plot: {e}"))
}

/// Viridis, linearly interpolated between five of its stops; `t` in [0, 1].
fn viridis(t: f64) -> RGBColor {
    const STOPS: [(f64, f64, f64); 5] = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (253.0, 231.0, 37.0),
    ];
    let t = t.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let i = (t.floor() as usize).min(STOPS.len() - 2);
    let f = t - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let mix = |x: f64, y: f64| (x + (y - x) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Alternating colours for segments.
const SEGMENT_COLOURS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(23, 190, 207),
];
const REMOVED: RGBColor = RGBColor(214, 39, 40);

fn segment_of(layer: usize, segments: &[(usize, usize)]) -> usize {
    segments
        .iter()
        .position(|&(s, e)| (s..=e).contains(&layer))
        .unwrap_or(0)
}

/// Tick step so that about `max_ticks` labels fit.
fn tick_step(n: usize, max_ticks: usize) -> usize {
    n.div_ceil(max_ticks.max(1)).max(1)
}

/// The colour scale of a CKA heatmap: from the smallest finite entry (not from 0, so the near-1
/// matrices of LLM hidden states still show contrast) to 1.
fn cka_colour_range(cka: &[Vec<f64>]) -> (f64, f64) {
    let lo = cka
        .iter()
        .flatten()
        .copied()
        .filter(|v| v.is_finite())
        .fold(1.0f64, f64::min)
        .max(-1.0);
    // A constant matrix still gets a non-empty range.
    (lo.min(1.0 - 1e-3), 1.0)
}

/// The CKA matrix as a heatmap (layer 0 top-left; colour scale from the smallest entry to 1, NaN grey),
/// each segment's diagonal block outlined in black, removed layers crossed in red on the diagonal and
/// marked along both axes.
pub fn cka_heatmap(
    path: &Path,
    cka: &[Vec<f64>],
    segments: &[(usize, usize)],
    removed: &[usize],
) -> Result<()> {
    register_font();
    let l = cka.len();
    let (lo, hi) = cka_colour_range(cka);
    let root = BitMapBackend::new(path, (780, 680)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let (main, bar) = root.split_horizontally(660);
    let mut chart = ChartBuilder::on(&main)
        .caption(
            "CKA between layer outputs (segments outlined, removed layers in red)",
            (FONT, 15),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(45)
        .build_cartesian_2d(-0.5f64..l as f64 - 0.5, l as f64 - 0.5..-0.5f64)
        .map_err(|e| plot_err(path, e))?;
    let step = tick_step(l, 16);
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(l.div_ceil(step) + 1)
        .y_labels(l.div_ceil(step) + 1)
        .x_label_formatter(&|v| format!("{}", v.round() as i64))
        .y_label_formatter(&|v| format!("{}", v.round() as i64))
        .x_desc("layer")
        .y_desc("layer")
        .label_style((FONT, 12))
        .axis_desc_style((FONT, 13))
        .draw()
        .map_err(|e| plot_err(path, e))?;
    let cells = (0..l)
        .flat_map(|i| (0..l).map(move |j| (i, j)))
        .map(|(i, j)| {
            let v = cka[i][j];
            let colour = if v.is_finite() {
                viridis((v - lo) / (hi - lo))
            } else {
                RGBColor(160, 160, 160)
            };
            Rectangle::new(
                [
                    (j as f64 - 0.5, i as f64 - 0.5),
                    (j as f64 + 0.5, i as f64 + 0.5),
                ],
                colour.filled(),
            )
        });
    chart.draw_series(cells).map_err(|e| plot_err(path, e))?;
    let outlines = segments.iter().map(|&(s, e)| {
        Rectangle::new(
            [
                (s as f64 - 0.5, s as f64 - 0.5),
                (e as f64 + 0.5, e as f64 + 0.5),
            ],
            BLACK.stroke_width(2),
        )
    });
    chart.draw_series(outlines).map_err(|e| plot_err(path, e))?;
    for &r in removed {
        let (a, b) = (r as f64 - 0.35, r as f64 + 0.35);
        for line in [[(a, a), (b, b)], [(a, b), (b, a)]] {
            chart
                .draw_series(std::iter::once(PathElement::new(
                    line.to_vec(),
                    REMOVED.stroke_width(3),
                )))
                .map_err(|e| plot_err(path, e))?;
        }
        // A red tick just inside each axis.
        let edge = l as f64 * 0.012 + 0.08;
        let (lo, hi, end) = (r as f64 - 0.5, r as f64 + 0.5, l as f64 - 0.5);
        for rect in [
            [(lo, end - edge), (hi, end)],
            [(-0.5, lo), (-0.5 + edge, hi)],
        ] {
            chart
                .draw_series(std::iter::once(Rectangle::new(rect, REMOVED.filled())))
                .map_err(|e| plot_err(path, e))?;
        }
    }
    draw_colour_bar(path, &bar, lo, hi)?;
    root.present().map_err(|e| plot_err(path, e))?;
    Ok(())
}

fn draw_colour_bar(
    path: &Path,
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    lo: f64,
    hi: f64,
) -> Result<()> {
    let mut chart = ChartBuilder::on(area)
        .margin_top(45)
        .margin_bottom(50)
        .margin_right(10)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..1f64, lo..hi)
        .map_err(|e| plot_err(path, e))?;
    let digits = if hi - lo < 0.05 { 4 } else { 2 };
    chart
        .configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_labels(6)
        .y_label_formatter(&|v| format!("{v:.digits$}"))
        .label_style((FONT, 12))
        .draw()
        .map_err(|e| plot_err(path, e))?;
    let n = 100;
    chart
        .draw_series((0..n).map(|i| {
            let (a, b) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            let (ya, yb) = (lo + a * (hi - lo), lo + b * (hi - lo));
            Rectangle::new([(0.0, ya), (1.0, yb)], viridis((a + b) / 2.0).filled())
        }))
        .map_err(|e| plot_err(path, e))?;
    Ok(())
}

/// A per-layer score (gradient norm, block influence) as bars, coloured by segment, removed layers in red.
pub fn importance_bars(
    path: &Path,
    values: &[f64],
    title: &str,
    y_desc: &str,
    segments: &[(usize, usize)],
    removed: &[usize],
) -> Result<()> {
    register_font();
    let l = values.len().max(1);
    let top = values
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-12)
        * 1.1;
    let root = BitMapBackend::new(path, (760, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 15))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..l as f64 - 0.5, 0f64..top)
        .map_err(|e| plot_err(path, e))?;
    let step = tick_step(l, 20);
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(WHITE)
        .x_labels(l.div_ceil(step) + 1)
        .x_label_formatter(&|v| format!("{}", v.round() as i64))
        .y_label_formatter(&|v| format!("{v:.3}"))
        .x_desc("layer")
        .y_desc(y_desc)
        .label_style((FONT, 12))
        .axis_desc_style((FONT, 13))
        .draw()
        .map_err(|e| plot_err(path, e))?;
    chart
        .draw_series(values.iter().enumerate().map(|(i, &g)| {
            let colour = if removed.contains(&i) {
                REMOVED
            } else {
                SEGMENT_COLOURS[segment_of(i, segments) % SEGMENT_COLOURS.len()]
            };
            let g = if g.is_finite() { g } else { 0.0 };
            Rectangle::new(
                [(i as f64 - 0.4, 0.0), (i as f64 + 0.4, g)],
                colour.filled(),
            )
        }))
        .map_err(|e| plot_err(path, e))?;
    root.present().map_err(|e| plot_err(path, e))?;
    Ok(())
}

/// The segmentation loss against the number of segments, the chosen k circled in red. When the losses
/// span more than two decades the axis is logarithmic (zero losses drawn at the bottom edge).
pub fn loss_curve(path: &Path, curve: &[(usize, f64)], chosen_k: usize) -> Result<()> {
    register_font();
    let kmax = curve.iter().map(|p| p.0).max().unwrap_or(1).max(2);
    let finite = || curve.iter().map(|p| p.1).filter(|v| v.is_finite());
    let max = finite().fold(0.0f64, f64::max).max(1e-300);
    let min_pos = finite().filter(|&v| v > 0.0).fold(max, f64::min);
    let log = max / min_pos > 100.0;
    // On the log axis y = log10(loss); the floor sits half a decade under the smallest positive loss.
    let floor = min_pos.log10() - 0.5;
    let y_of = |v: f64| if log { v.log10().max(floor) } else { v };
    let (bottom, top) = if log {
        (floor, max.log10() + 0.2)
    } else {
        (0.0, max * 1.1)
    };
    let root = BitMapBackend::new(path, (560, 380)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Segmentation loss by number of segments", (FONT, 15))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.5f64..kmax as f64 + 0.5, bottom..top)
        .map_err(|e| plot_err(path, e))?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_labels(kmax.min(20))
        .x_label_formatter(&|v| format!("{}", v.round() as usize))
        .y_label_formatter(&|v| {
            if log {
                format!("{:.0e}", 10f64.powf(*v))
            } else {
                format!("{v:.3}")
            }
        })
        .x_desc("k (segments)")
        .y_desc(if log {
            "within-segment sum of squares (log)"
        } else {
            "within-segment sum of squares"
        })
        .label_style((FONT, 12))
        .axis_desc_style((FONT, 13))
        .draw()
        .map_err(|e| plot_err(path, e))?;
    let pts: Vec<(f64, f64)> = curve
        .iter()
        .filter(|p| p.1.is_finite())
        .map(|&(k, v)| (k as f64, y_of(v)))
        .collect();
    chart
        .draw_series(LineSeries::new(
            pts.clone(),
            SEGMENT_COLOURS[0].stroke_width(2),
        ))
        .map_err(|e| plot_err(path, e))?;
    chart
        .draw_series(
            pts.iter()
                .map(|&p| Circle::new(p, 3, SEGMENT_COLOURS[0].filled())),
        )
        .map_err(|e| plot_err(path, e))?;
    chart
        .draw_series(
            pts.iter()
                .filter(|p| p.0 as usize == chosen_k)
                .map(|&p| Circle::new(p, 8, REMOVED.stroke_width(2))),
        )
        .map_err(|e| plot_err(path, e))?;
    root.present().map_err(|e| plot_err(path, e))?;
    Ok(())
}

/// Colours of the quality curves, one per criterion.
const CURVE_COLOURS: [RGBColor; 8] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(0, 0, 0),
    RGBColor(227, 119, 194),
];

/// Quality against layers removed: one line per criterion (`(name, [(removed, value)])`), the unpruned
/// value as a dashed grey line, and optionally a random band `[(removed, median, min, max)]` drawn as a
/// grey area with its median. Logarithmic y axis (perplexities of pruned models span decades).
pub fn quality_curves(
    path: &Path,
    y_name: &str,
    baseline: f64,
    curves: &[(String, Vec<(usize, f64)>)],
    band: Option<&[(usize, f64, f64, f64)]>,
) -> Result<()> {
    register_font();
    let xs = curves
        .iter()
        .flat_map(|c| c.1.iter().map(|p| p.0))
        .chain(band.into_iter().flatten().map(|b| b.0));
    let x_max = xs.clone().max().unwrap_or(1).max(1);
    let ys = curves
        .iter()
        .flat_map(|c| c.1.iter().map(|p| p.1))
        .chain(band.into_iter().flatten().flat_map(|b| [b.2, b.3]))
        .chain(std::iter::once(baseline))
        .filter(|v| v.is_finite() && *v > 0.0);
    let lo = ys.clone().fold(f64::INFINITY, f64::min);
    let hi = ys.fold(0.0f64, f64::max);
    if !(lo.is_finite() && hi > 0.0) {
        return Err(plot_err(path, "nothing finite to draw"));
    }
    let (bottom, top) = (lo.log10() - 0.05, hi.log10() + 0.1);
    let y = |v: f64| v.max(lo).log10();
    let root = BitMapBackend::new(path, (860, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{y_name} after removing layers (no fine-tuning)"),
            (FONT, 16),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.5f64..x_max as f64 + 0.5, bottom..top)
        .map_err(|e| plot_err(path, e))?;
    chart
        .configure_mesh()
        .light_line_style(RGBColor(235, 235, 235))
        .x_labels(x_max.min(20))
        .x_label_formatter(&|v| format!("{}", v.round() as usize))
        .y_label_formatter(&|v| format!("{:.3}", 10f64.powf(*v)))
        .x_desc("layers removed")
        .y_desc(format!("{y_name} (log scale)"))
        .label_style((FONT, 12))
        .axis_desc_style((FONT, 13))
        .draw()
        .map_err(|e| plot_err(path, e))?;
    let grey = RGBColor(150, 150, 150);
    if let Some(b) = band {
        let mut poly: Vec<(f64, f64)> = b.iter().map(|p| (p.0 as f64, y(p.3))).collect();
        poly.extend(b.iter().rev().map(|p| (p.0 as f64, y(p.2))));
        chart
            .draw_series(std::iter::once(Polygon::new(
                poly,
                RGBColor(200, 200, 200).mix(0.5).filled(),
            )))
            .map_err(|e| plot_err(path, e))?;
        chart
            .draw_series(LineSeries::new(
                b.iter().map(|p| (p.0 as f64, y(p.1))),
                grey.stroke_width(2),
            ))
            .map_err(|e| plot_err(path, e))?
            .label("random (median, range)")
            .legend(move |(x, yy)| {
                Rectangle::new(
                    [(x, yy - 5), (x + 20, yy + 5)],
                    RGBColor(200, 200, 200).filled(),
                )
            });
    }
    chart
        .draw_series(DashedLineSeries::new(
            [(0.5, y(baseline)), (x_max as f64 + 0.5, y(baseline))],
            6,
            4,
            grey.stroke_width(1),
        ))
        .map_err(|e| plot_err(path, e))?
        .label("unpruned")
        .legend(move |(x, yy)| PathElement::new([(x, yy), (x + 20, yy)], grey));
    for (i, (name, pts)) in curves.iter().enumerate() {
        let colour = CURVE_COLOURS[i % CURVE_COLOURS.len()];
        let width = if i == 0 { 3 } else { 2 };
        let xy: Vec<(f64, f64)> = pts
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|&(x, v)| (x as f64, y(v)))
            .collect();
        chart
            .draw_series(LineSeries::new(xy.clone(), colour.stroke_width(width)))
            .map_err(|e| plot_err(path, e))?
            .label(name.as_str())
            .legend(move |(x, yy)| {
                PathElement::new([(x, yy), (x + 20, yy)], colour.stroke_width(width))
            });
        chart
            .draw_series(xy.into_iter().map(|p| Circle::new(p, 3, colour.filled())))
            .map_err(|e| plot_err(path, e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .label_font((FONT, 12))
        .draw()
        .map_err(|e| plot_err(path, e))?;
    root.present().map_err(|e| plot_err(path, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_map_ends() {
        assert_eq!(viridis(0.0), RGBColor(68, 1, 84));
        assert_eq!(viridis(1.0), RGBColor(253, 231, 37));
        assert_eq!(viridis(-3.0), viridis(0.0));
    }

    #[test]
    fn plots_are_png_files() {
        let tmp = tempfile::tempdir().unwrap();
        // SGLP_PLOT_DIR keeps the pictures for a look.
        let keep = std::env::var_os("SGLP_PLOT_DIR").map(std::path::PathBuf::from);
        let dir = keep.as_deref().unwrap_or(tmp.path());
        let l = 10;
        let cka: Vec<Vec<f64>> = (0..l)
            .map(|i| {
                (0..l)
                    .map(|j| 1.0 - (i as f64 - j as f64).abs() / l as f64)
                    .collect()
            })
            .collect();
        let segs = [(0, 3), (4, 6), (7, 9)];
        let p = dir.join("cka.png");
        cka_heatmap(&p, &cka, &segs, &[2, 8]).unwrap();
        let g: Vec<f64> = (0..l).map(|i| 0.5 + (i as f64 * 0.7).sin().abs()).collect();
        let q = dir.join("g.png");
        importance_bars(&q, &g, "gradient norm", "g", &segs, &[2, 8]).unwrap();
        let c = dir.join("curves.png");
        quality_curves(
            &c,
            "held-out perplexity",
            1.5,
            &[
                ("sglp".into(), vec![(1, 1.6), (2, 1.8), (3, 2.5)]),
                ("shortgpt".into(), vec![(1, 1.7), (2, 2.0), (3, 3.5)]),
            ],
            Some(&[
                (1, 1.7, 1.9, 2.5),
                (2, 2.5, 2.1, 9.0),
                (3, 30.0, 4.0, 300.0),
            ]),
        )
        .unwrap();
        let r = dir.join("loss.png");
        loss_curve(&r, &[(1, 3.0), (2, 1.0), (3, 0.4), (4, 0.3)], 3).unwrap();
        let r2 = dir.join("loss-log.png");
        loss_curve(
            &r2,
            &[(1, 0.75), (2, 1e-2), (3, 1e-4), (4, 2e-5), (5, 0.0)],
            5,
        )
        .unwrap();
        for f in [p, q, r, r2, c] {
            let bytes = std::fs::read(&f).unwrap();
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", f.display());
        }
    }
}
