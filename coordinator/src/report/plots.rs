//! SVG charts for the HTML report, drawn with plotters' SVG backend only (no font or bitmap
//! libraries: plotters writes `<text>` elements and the browser sets the type).
//!
//! Two kinds: loss curves of the trials of one method family overlaid on one set of axes
//! (training loss per step faded with a moving average on top, validation loss as dots joined by
//! a dashed line, one colour per trial), and a horizontal bar chart of final perplexity with the
//! baseline drawn as a vertical rule. Every function returns the SVG document as a string.

use plotters::prelude::*;

/// Colour-blind-safe qualitative palette (Okabe–Ito, then Tableau for more series).
const COLOURS: [RGBColor; 12] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(0, 0, 0),
    RGBColor(140, 86, 75),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(148, 103, 189),
    RGBColor(214, 39, 40),
];

/// The colour of series `i` (cycles after twelve).
pub fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()]
}

/// `#rrggbb` of series `i`, for HTML legends next to a chart.
pub fn colour_hex(i: usize) -> String {
    let RGBColor(r, g, b) = colour(i);
    format!("#{r:02x}{g:02x}{b:02x}")
}

/// One trial's curves.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Curve {
    pub label: String,
    /// (step, training loss), ascending steps.
    pub train: Vec<(f64, f64)>,
    /// (step, validation loss), ascending steps.
    pub valid: Vec<(f64, f64)>,
}

/// Centred moving average over `w` points (ends use the points available).
pub fn smooth(points: &[(f64, f64)], w: usize) -> Vec<(f64, f64)> {
    if w <= 1 || points.len() < 3 {
        return points.to_vec();
    }
    let half = w / 2;
    (0..points.len())
        .map(|i| {
            let lo = i.saturating_sub(half);
            let hi = (i + half + 1).min(points.len());
            let ys = &points[lo..hi];
            (
                points[i].0,
                ys.iter().map(|p| p.1).sum::<f64>() / ys.len() as f64,
            )
        })
        .collect()
}

fn finite(points: &[(f64, f64)]) -> impl Iterator<Item = &(f64, f64)> {
    points
        .iter()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
}

/// y range for loss curves: the validation points and the smoothed training loss, ignoring the
/// first steps' spike when it would squash everything else (its raw line is clipped at the top).
fn loss_range(curves: &[Curve], smoothed: &[Vec<(f64, f64)>]) -> (f64, f64) {
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for (c, s) in curves.iter().zip(smoothed) {
        for &(_, y) in finite(&c.valid).chain(finite(s)) {
            lo = lo.min(y);
            hi = hi.max(y);
        }
    }
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.08).max(0.05);
    ((lo - pad).max(0.0), hi + pad)
}

fn svg_error<E: std::fmt::Debug>(e: E) -> String {
    format!("plot error: {e:?}")
}

/// Loss curves of several trials on one chart (width × height pixels).
pub fn loss_chart(
    title: &str,
    curves: &[Curve],
    width: u32,
    height: u32,
) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(svg_error)?;
        let max_step = curves
            .iter()
            .flat_map(|c| finite(&c.train).chain(finite(&c.valid)))
            .map(|p| p.0)
            .fold(1.0_f64, f64::max);
        let smoothed: Vec<Vec<(f64, f64)>> = curves
            .iter()
            .map(|c| smooth(&c.train, (c.train.len() / 15).clamp(1, 25) | 1))
            .collect();
        let (y0, y1) = loss_range(curves, &smoothed);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18).into_font())
            .margin(12)
            .x_label_area_size(42)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..max_step * 1.02, y0..y1)
            .map_err(svg_error)?;
        chart
            .configure_mesh()
            .x_desc("optimizer step")
            .y_desc("loss (nats / token)")
            .axis_desc_style(("sans-serif", 14))
            .label_style(("sans-serif", 12))
            .light_line_style(RGBColor(235, 235, 235))
            .bold_line_style(RGBColor(210, 210, 210))
            .x_labels(8)
            .y_labels(8)
            .y_label_formatter(&|y| format!("{y:.2}"))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()
            .map_err(svg_error)?;
        for (i, (c, s)) in curves.iter().zip(&smoothed).enumerate() {
            let col = colour(i);
            let clip = |p: &(f64, f64)| (p.0, p.1.min(y1));
            if c.train.len() > 1 {
                chart
                    .draw_series(LineSeries::new(
                        finite(&c.train).map(clip),
                        col.mix(0.25).stroke_width(1),
                    ))
                    .map_err(svg_error)?;
            }
            let train_label = chart
                .draw_series(LineSeries::new(finite(s).map(clip), col.stroke_width(2)))
                .map_err(svg_error)?;
            train_label.label(c.label.clone()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], col.stroke_width(3))
            });
            if !c.valid.is_empty() {
                chart
                    .draw_series(DashedLineSeries::new(
                        finite(&c.valid).map(clip).collect::<Vec<_>>(),
                        6,
                        4,
                        col.stroke_width(2),
                    ))
                    .map_err(svg_error)?;
                chart
                    .draw_series(finite(&c.valid).map(|&p| Circle::new(clip(&p), 4, col.filled())))
                    .map_err(svg_error)?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(svg_error)?;
        root.present().map_err(svg_error)?;
    }
    Ok(svg)
}

/// Horizontal bars of final perplexity, one per trial (label, value), best (lowest) in a darker
/// shade, with the baseline as a dashed vertical rule when there is one.
pub fn perplexity_bars(
    title: &str,
    bars: &[(String, f64)],
    baseline: Option<f64>,
    width: u32,
) -> Result<String, String> {
    let bars: Vec<&(String, f64)> = bars.iter().filter(|(_, v)| v.is_finite()).collect();
    let height = 70 + 26 * bars.len().max(1) as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(svg_error)?;
        let max = bars
            .iter()
            .map(|b| b.1)
            .chain(baseline)
            .fold(1.0_f64, f64::max);
        let longest = bars.iter().map(|b| b.0.len()).max().unwrap_or(4) as u32;
        let n = bars.len().max(1);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18).into_font())
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size((longest * 8 + 16).clamp(60, 260))
            .build_cartesian_2d(0.0..max * 1.12, 0.0..n as f64)
            .map_err(svg_error)?;
        let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
        chart
            .configure_mesh()
            .disable_y_mesh()
            .x_desc("validation perplexity (lower is better)")
            .axis_desc_style(("sans-serif", 14))
            .label_style(("sans-serif", 12))
            .light_line_style(RGBColor(240, 240, 240))
            .bold_line_style(RGBColor(215, 215, 215))
            .y_labels(n * 2 + 1)
            .y_label_formatter(&|y| {
                // Labels sit at the bar centres (i + 0.5); other ticks stay empty.
                let i = (n as f64 - y - 0.5).round();
                if (n as f64 - y - 0.5 - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < names.len() {
                    names[i as usize].clone()
                } else {
                    String::new()
                }
            })
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()
            .map_err(svg_error)?;
        let best = bars.iter().map(|b| b.1).fold(f64::INFINITY, f64::min);
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
                let top = n as f64 - i as f64 - 0.15;
                let bottom = n as f64 - i as f64 - 0.85;
                let col = if *v == best {
                    colour(0)
                } else {
                    RGBColor(150, 180, 210)
                };
                Rectangle::new([(0.0, bottom), (*v, top)], col.filled())
            }))
            .map_err(svg_error)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
                Text::new(
                    format!("{v:.2}"),
                    (*v + max * 0.01, n as f64 - i as f64 - 0.5),
                    ("sans-serif", 12).into_font().color(&BLACK).pos(
                        plotters::style::text_anchor::Pos::new(
                            plotters::style::text_anchor::HPos::Left,
                            plotters::style::text_anchor::VPos::Center,
                        ),
                    ),
                )
            }))
            .map_err(svg_error)?;
        if let Some(b) = baseline {
            chart
                .draw_series(DashedLineSeries::new(
                    [(b, 0.0), (b, n as f64)],
                    5,
                    4,
                    colour(1).stroke_width(2),
                ))
                .map_err(svg_error)?
                .label(format!("baseline {b:.2}"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], colour(1).stroke_width(2))
                });
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(180, 180, 180))
                .label_font(("sans-serif", 13))
                .draw()
                .map_err(svg_error)?;
        }
        root.present().map_err(svg_error)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// plotters writes each `<text>` element's content on its own line.
    fn has_text(svg: &str, text: &str) -> bool {
        svg.split("<text").skip(1).any(|t| {
            t.split_once('>')
                .and_then(|(_, rest)| rest.split_once("</text>"))
                .is_some_and(|(body, _)| body.trim() == text)
        })
    }

    fn curve(label: &str, k: f64) -> Curve {
        Curve {
            label: label.into(),
            train: (1..=40)
                .map(|s| (s as f64, 5.0 - k * (s as f64).ln()))
                .collect(),
            valid: vec![(20.0, 4.0 - k), (40.0, 3.8 - k)],
        }
    }

    #[test]
    fn loss_chart_is_an_svg_with_axes_legend_and_one_path_per_series() {
        let svg = loss_chart(
            "freeze",
            &[curve("freeze-1", 0.1), curve("freeze-all", 0.3)],
            720,
            400,
        )
        .unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        assert!(svg.trim_end().ends_with("</svg>"));
        for text in [
            "freeze-1",
            "freeze-all",
            "optimizer step",
            "loss (nats / token)",
        ] {
            assert!(has_text(&svg, text), "no text {text}");
        }
        // Two validation markers per curve.
        assert_eq!(svg.matches("<circle").count(), 4, "{svg}");
        // Raw + smoothed training line per curve, plus grid and legend paths.
        assert!(svg.matches("<polyline").count() >= 4);
    }

    #[test]
    fn bars_label_every_trial_and_draw_the_baseline() {
        let svg = perplexity_bars(
            "perplexity",
            &[("freeze-1".into(), 40.5), ("inheritune-2".into(), 52.25)],
            Some(60.0),
            720,
        )
        .unwrap();
        for text in [
            "freeze-1",
            "inheritune-2",
            "40.50",
            "52.25",
            "baseline 60.00",
        ] {
            assert!(has_text(&svg, text), "no text {text}:\n{svg}");
        }
        assert!(svg.matches("<rect").count() >= 3);
    }

    #[test]
    fn smoothing_keeps_length_and_steps() {
        let pts: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, (i % 2) as f64)).collect();
        let s = smooth(&pts, 3);
        assert_eq!(s.len(), pts.len());
        assert!(s.iter().zip(&pts).all(|(a, b)| a.0 == b.0));
        // Window 4..=6 holds 0, 1, 0.
        assert!((s[5].1 - 1.0 / 3.0).abs() < 1e-12);
        assert!((s[4].1 - 2.0 / 3.0).abs() < 1e-12);
    }
}
