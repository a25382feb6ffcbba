//! `vlp plot RUN_DIR`: the loss parts and the learning rate of `RUN_DIR/metrics.jsonl`
//! against the step, one panel each, stacked top to bottom, in `RUN_DIR/curves.png`.
//!
//! plotters is built without font support (no system font libraries), so the panels carry
//! no text: the command prints which panel is which and each panel's value range.

use std::path::PathBuf;

use anyhow::Context;
use plotters::prelude::*;

#[derive(clap::Args)]
pub struct PlotArgs {
    /// A run folder (holding metrics.jsonl).
    pub run_dir: PathBuf,
    /// Image width in pixels.
    #[arg(long, default_value_t = 1000)]
    pub width: u32,
}

/// Line colours, in panel order.
const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

pub fn run(args: PlotArgs) -> anyhow::Result<()> {
    let records = vlp_train::metrics::read(&args.run_dir)?;
    anyhow::ensure!(
        !records.is_empty(),
        "{}: no metrics yet",
        args.run_dir.display()
    );
    // Panels: every `loss_*` key in first-seen order, then `lr`.
    let mut keys: Vec<String> = Vec::new();
    for r in &records {
        for k in r.as_object().expect("records are objects").keys() {
            if k.starts_with("loss_") && !keys.contains(k) {
                keys.push(k.clone());
            }
        }
    }
    keys.push("lr".into());
    let series: Vec<Vec<(f64, f64)>> = keys
        .iter()
        .map(|k| {
            records
                .iter()
                .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(k)?.as_f64()?)))
                .filter(|(_, y)| y.is_finite())
                .collect()
        })
        .collect();

    let out = args.run_dir.join("curves.png");
    let panel_h = 220u32;
    let root =
        BitMapBackend::new(&out, (args.width, panel_h * keys.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((keys.len(), 1));
    for (i, ((key, points), panel)) in keys.iter().zip(&series).zip(&panels).enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let (x0, x1) = range(points.iter().map(|p| p.0));
        let (y0, y1) = range(points.iter().map(|p| p.1));
        println!(
            "panel {} (top = 1): {key}, steps {x0}..{x1}, values {y0:.4e}..{y1:.4e}",
            i + 1
        );
        let panel = panel.margin(10, 10, 10, 10);
        let mut chart = ChartBuilder::on(&panel).build_cartesian_2d(x0..x1, y0..y1)?;
        chart.draw_series(LineSeries::new(
            points.iter().copied(),
            colour.stroke_width(2),
        ))?;
        // A frame in place of the (text) axes.
        panel.draw(&Rectangle::new(
            [
                (0, 0),
                (
                    panel.dim_in_pixel().0 as i32 - 1,
                    panel.dim_in_pixel().1 as i32 - 1,
                ),
            ],
            BLACK.mix(0.3),
        ))?;
    }
    root.present()
        .with_context(|| format!("writing {}", out.display()))?;
    println!("wrote {}", out.display());
    Ok(())
}

/// The range of the values, widened a little (and made non-empty) for drawing.
fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(hi.abs().max(1e-12) * 1e-3);
    (lo - pad, hi + pad)
}
