//! `--plot FILE.png`: the connection ramp over time, and the latency
//! distribution (a CDF: latency on x, share of deliveries at or below it on y).

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::results::Results;

/// Fonts tried, in order, for labels (plotters draws text with ab_glyph
/// from a font file; Debian's fonts-dejavu-core provides the first).
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

fn register_font() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        for path in FONTS {
            if let Ok(bytes) = std::fs::read(path) {
                // Registered once per process and kept for its life.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return Ok(());
                }
            }
        }
        Err(format!(
            "no font for the plot's labels (tried {}); install fonts-dejavu-core",
            FONTS.join(", ")
        ))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// Draws the plot into `path` (PNG).
pub fn draw(path: &Path, res: &Results) -> Result<()> {
    register_font()?;
    let root = BitMapBackend::new(path, (1000, 820)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (top, bottom) = root.split_vertically(410);
    let font = ("sans-serif", 18);

    // The ramp.
    let tl = &res.timeline;
    let t_max = tl.last().map_or(1.0, |p| p.t).max(1.0);
    let y_max = tl
        .iter()
        .map(|p| p.up.max(p.failed))
        .max()
        .unwrap_or(0)
        .max(res.setup.connections) as f64
        * 1.05;
    let mut chart = ChartBuilder::on(&top)
        .caption(
            format!(
                "{}: connections up ({} target, {} worker{})",
                res.scenario,
                res.setup.connections,
                res.setup.workers,
                if res.setup.workers == 1 { "" } else { "s" }
            ),
            font,
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..t_max, 0f64..y_max.max(1.0))
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("seconds since start")
        .y_desc("connections")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .draw_series(LineSeries::new(
            tl.iter().map(|p| (p.t, p.up as f64)),
            BLUE.stroke_width(2),
        ))
        .map_err(|e| anyhow!("{e}"))?
        .label("up")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(LineSeries::new(
            tl.iter().map(|p| (p.t, p.failed as f64)),
            RED,
        ))
        .map_err(|e| anyhow!("{e}"))?
        .label("failed")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;

    // The latency CDF.
    match res.latency_hist.as_ref().filter(|h| !h.is_empty()) {
        Some(h) => {
            let mut qs: Vec<f64> = (0..=200).map(|i| f64::from(i) / 200.0).collect();
            qs.extend([0.991, 0.995, 0.999, 0.9995, 0.9999, 1.0]);
            qs.sort_by(f64::total_cmp);
            let pts: Vec<(f64, f64)> = qs
                .iter()
                .map(|&q| (h.value_at_quantile(q) as f64 / 1000.0, q * 100.0))
                .collect();
            let x_max = (h.max() as f64 / 1000.0 * 1.05).max(0.01);
            let x_min = (h.min() as f64 / 1000.0 * 0.95).min(x_max / 2.0);
            let caption = format!(
                "latency, send to receipt: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (n={})",
                h.value_at_quantile(0.5) as f64 / 1000.0,
                h.value_at_quantile(0.99) as f64 / 1000.0,
                h.max() as f64 / 1000.0,
                h.len()
            );
            let mut chart = ChartBuilder::on(&bottom)
                .caption(caption, font)
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d(x_min..x_max, 0f64..100.0)
                .map_err(|e| anyhow!("{e}"))?;
            chart
                .configure_mesh()
                .x_desc("latency (ms)")
                .y_desc("% of deliveries at or below")
                .draw()
                .map_err(|e| anyhow!("{e}"))?;
            chart
                .draw_series(LineSeries::new(pts, GREEN.stroke_width(2)))
                .map_err(|e| anyhow!("{e}"))?;
        }
        None => {
            bottom
                .titled("latency: no deliveries in this scenario", font)
                .map_err(|e| anyhow!("{e}"))?;
        }
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    if !path.exists() {
        bail!("the plot was not written to {}", path.display());
    }
    Ok(())
}
