//! `vlp plot RUN_DIR [RUN_DIR ...]`: the curves of one run, or of several overlaid for
//! comparison, from their `metrics.jsonl`, as `curves.png` in the first run's folder (or
//! `--out`). One panel per quantity — each loss part, the learning rate, the temperature,
//! the validation recalls when a run has them — with its name, the step on the x axis,
//! tick values on both axes, a smoothed line over the faint raw one, a log scale where
//! the values span more than two decades, and a legend naming the runs.
//!
//! The text is drawn with DejaVu Sans embedded in the program (`src/fonts/`), so nothing
//! depends on the system's font libraries.

use std::path::{Path, PathBuf};

use anyhow::Context;
use plotters::prelude::*;
use plotters::style::FontStyle;
use serde_json::Value;

#[derive(clap::Args)]
pub struct PlotArgs {
    /// Run folders (holding metrics.jsonl); two or more are overlaid.
    #[arg(required = true)]
    pub run_dirs: Vec<PathBuf>,
    /// The image to write [default: RUN_DIR/curves.png of the first run].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Image width in pixels.
    #[arg(long, default_value_t = 1400)]
    pub width: u32,
    /// Smoothing of the bold line, 0 (none) to below 1 (TensorBoard's exponential moving
    /// average, bias-corrected); the raw values stay as a faint line.
    #[arg(long, default_value_t = 0.6)]
    pub smooth: f64,
}

/// One colour per run.
const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

const FONT: &str = "sans-serif";

/// The embedded font, registered once for every style plotters asks for.
fn register_font() -> anyhow::Result<()> {
    static BYTES: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");
    for style in [
        FontStyle::Normal,
        FontStyle::Bold,
        FontStyle::Italic,
        FontStyle::Oblique,
    ] {
        plotters::style::register_font(FONT, style, BYTES)
            .map_err(|_| anyhow::anyhow!("the embedded font could not be read"))?;
    }
    Ok(())
}

/// A run's records and the name its lines carry.
struct Run {
    name: String,
    records: Vec<Value>,
}

/// The panels, in order: loss parts as first seen, then lr, temp, and the validation
/// mean recall (its parts, `val_tr1` etc., go to the terminal).
fn panel_keys(runs: &[Run]) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for r in runs.iter().flat_map(|r| &r.records) {
        for k in r.as_object().map(|o| o.keys()).into_iter().flatten() {
            if k.starts_with("loss_") && !keys.contains(k) {
                keys.push(k.clone());
            }
        }
    }
    for k in ["lr", "temp", "grad_norm", "val_r_mean"] {
        let present = runs
            .iter()
            .flat_map(|r| &r.records)
            .any(|r| r.get(k).and_then(Value::as_f64).is_some());
        if present {
            keys.push(k.to_string());
        }
    }
    keys
}

fn points(records: &[Value], key: &str) -> Vec<(f64, f64)> {
    records
        .iter()
        .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(key)?.as_f64()?)))
        .filter(|(_, y)| y.is_finite())
        .collect()
}

/// Largest magnitude drawn, on either axis. plotters picks its ticks from the width of
/// the axis range, and a range that reaches near `f64::MAX` (or spans more than it, from
/// values of both signs) has an infinite width, on which its tick search never ends. A
/// value this large is an overflow, not a loss, rate or step: it is left out of the chart
/// as NaN and infinities are (the terminal summary still shows it).
const MAX_DRAWN: f64 = 1e300;

/// Whether a point can be drawn: both coordinates within [`MAX_DRAWN`], so that the axis
/// ranges, padded, stay finite.
fn drawable(p: &(f64, f64)) -> bool {
    p.0.abs() <= MAX_DRAWN && p.1.abs() <= MAX_DRAWN
}

/// TensorBoard's smoothing: an exponential moving average, corrected for its start at 0.
fn smoothed(points: &[(f64, f64)], weight: f64) -> Vec<(f64, f64)> {
    let w = weight.clamp(0.0, 0.999);
    let (mut avg, mut norm) = (0.0, 0.0);
    points
        .iter()
        .map(|&(x, y)| {
            avg = w * avg + (1.0 - w) * y;
            norm = w * norm + (1.0 - w);
            (x, avg / norm)
        })
        .collect()
}

/// What a panel shows on its y axis: the values, or their log10 when all are positive and
/// span more than two decades.
fn log_scale(all: &[(f64, f64)]) -> bool {
    let lo = all.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = all.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    lo > 0.0 && hi / lo > 100.0
}

/// Whether a quantity varies from batch to batch (losses, gradient norm) and is drawn
/// smoothed over its raw line.
fn noisy(key: &str) -> bool {
    key.starts_with("loss_") || key == "grad_norm"
}

/// A readable name for a panel key.
fn title(key: &str) -> String {
    match key {
        "lr" => "learning rate".into(),
        "temp" => "ITC temperature".into(),
        "grad_norm" => "gradient norm (before clipping)".into(),
        "val_r_mean" => "validation mean recall (%)".into(),
        k => match k.strip_prefix("loss_") {
            Some("total") => "total loss".into(),
            Some(part) => format!("{} loss", part.to_uppercase()),
            None => k.into(),
        },
    }
}

pub fn run(args: PlotArgs) -> anyhow::Result<()> {
    let mut runs = Vec::new();
    for dir in &args.run_dirs {
        let records = vlp_train::metrics::read(dir)?;
        anyhow::ensure!(!records.is_empty(), "{}: no metrics yet", dir.display());
        runs.push(Run {
            name: run_name(dir),
            records,
        });
    }
    let keys = panel_keys(&runs);
    anyhow::ensure!(
        !keys.is_empty(),
        "{}: no numeric metric to plot in metrics.jsonl",
        args.run_dirs[0].display()
    );
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.run_dirs[0].join("curves.png"));
    register_font()?;
    draw(&runs, &keys, &out, args.width, args.smooth)?;
    for run in &runs {
        summarise(run, &keys);
    }
    stdoutln!("wrote {}", out.display());
    Ok(())
}

/// A run's name in the legend: its folder's name.
fn run_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

fn draw(runs: &[Run], keys: &[String], out: &Path, width: u32, smooth: f64) -> anyhow::Result<()> {
    let cols = if keys.len() > 3 { 2 } else { 1 };
    let rows = keys.len().div_ceil(cols);
    let panel_h = 300u32;
    let root = BitMapBackend::new(out, (width, panel_h * rows as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((rows, cols));
    for (key, panel) in keys.iter().zip(&panels) {
        // Each run's finite points, then those small enough to draw.
        let finite: Vec<Vec<(f64, f64)>> = runs.iter().map(|r| points(&r.records, key)).collect();
        let series: Vec<Vec<(f64, f64)>> = finite
            .iter()
            .map(|pts| pts.iter().copied().filter(drawable).collect())
            .collect();
        let all: Vec<(f64, f64)> = series.iter().flatten().copied().collect();
        let left_out = finite.iter().map(Vec::len).sum::<usize>() - all.len();
        if left_out > 0 {
            tracing::warn!(
                "{key}: {left_out} value(s) beyond ±{MAX_DRAWN:e} left out of the chart"
            );
        }
        let log = log_scale(&all);
        let y = |v: f64| if log { v.log10() } else { v };
        let (x0, x1) = range(all.iter().map(|p| p.0));
        let (y0, y1) = range(all.iter().map(|p| y(p.1)));
        let caption = if log {
            format!("{} (log scale)", title(key))
        } else {
            title(key)
        };
        let mut chart = ChartBuilder::on(panel)
            .caption(caption, (FONT, 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, y0..y1)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .x_labels(6)
            .y_labels(6)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| tick(if log { 10f64.powf(*v) } else { *v }))
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 15))
            .light_line_style(BLACK.mix(0.05))
            .bold_line_style(BLACK.mix(0.12))
            .draw()?;
        // Schedules and evaluations are exact values: smoothed are the noisy ones only.
        let smooth = if noisy(key) { smooth } else { 0.0 };
        for (i, (run, pts)) in runs.iter().zip(&series).enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let shown: Vec<(f64, f64)> = pts.iter().map(|&(x, v)| (x, y(v))).collect();
            if smooth > 0.0 && shown.len() > 2 {
                chart.draw_series(LineSeries::new(shown.iter().copied(), colour.mix(0.25)))?;
            }
            let line = if smooth > 0.0 {
                smoothed(&shown, smooth)
            } else {
                shown.clone()
            };
            let drawn = chart.draw_series(LineSeries::new(line, colour.stroke_width(2)))?;
            if runs.len() > 1 {
                drawn.label(run.name.clone()).legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 18, y)], colour.stroke_width(2))
                });
            }
            if shown.len() == 1 {
                chart.draw_series(shown.iter().map(|&p| Circle::new(p, 4, colour.filled())))?;
            }
        }
        if runs.len() > 1 {
            chart
                .configure_series_labels()
                .label_font((FONT, 14))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.3))
                .position(SeriesLabelPosition::UpperRight)
                .draw()?;
        }
    }
    root.present()
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// A tick value in few characters: 3 significant digits, exponent form when tiny or huge.
fn tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// First and last value of each panel's quantity, and the validation recalls, on the
/// terminal.
fn summarise(run: &Run, keys: &[String]) {
    let mut line = format!("{}:", run.name);
    for key in keys {
        let pts = points(&run.records, key);
        if let (Some(first), Some(last)) = (pts.first(), pts.last()) {
            line.push_str(&format!(
                " {key} {} -> {} (step {:.0});",
                tick(first.1),
                tick(last.1),
                last.0
            ));
        }
    }
    stdoutln!("{line}");
    let vals: Vec<String> = ["val_tr1", "val_ir1", "val_tr10", "val_ir10"]
        .iter()
        .filter_map(|k| {
            let pts = points(&run.records, k);
            pts.last().map(|p| format!("{k} {:.2}", p.1))
        })
        .collect();
    if !vals.is_empty() {
        stdoutln!("  last validation: {}", vals.join(", "));
    }
}

/// The range of the values, widened a little (and made non-empty) for drawing.
fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    // A (nearly) constant series, such as a fixed temperature, gets a range of 10% of its
    // value either side, wide enough for its tick labels to differ.
    let size = lo.abs().max(hi.abs());
    let pad = if hi - lo > size * 1e-3 {
        (hi - lo) * 0.05
    } else if size > 0.0 {
        size * 0.1
    } else {
        1.0
    };
    (lo - pad, hi + pad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_is_bias_corrected_and_zero_weight_is_identity() {
        let p = [(1.0, 10.0), (2.0, 0.0), (3.0, 0.0)];
        assert_eq!(smoothed(&p, 0.0), p.to_vec());
        let s = smoothed(&p, 0.5);
        assert_eq!(s[0], (1.0, 10.0)); // no pull towards 0 at the start
        assert!((s[1].1 - 10.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn log_scale_only_for_positive_values_over_two_decades() {
        assert!(log_scale(&[(0.0, 1e-5), (1.0, 1e-2)]));
        assert!(!log_scale(&[(0.0, 1.0), (1.0, 50.0)]));
        assert!(!log_scale(&[(0.0, -1.0), (1.0, 1e4)]));
    }

    #[test]
    fn a_constant_series_gets_distinct_tick_labels() {
        let (lo, hi) = range([0.07, 0.07].into_iter());
        assert!(lo < 0.07 && hi > 0.07);
        assert_ne!(tick(lo), tick(hi));
        assert_eq!(range([0.0].into_iter()), (-1.0, 1.0));
        // A series that moves keeps a range close to its own.
        let (lo, hi) = range([2.0, 4.0].into_iter());
        assert!((lo - 1.9).abs() < 1e-12 && (hi - 4.1).abs() < 1e-12);
    }

    /// Draws one panel of `values` (at `steps`) on another thread; `Err` if it takes more
    /// than a minute (plotters' tick search spinning on a range it cannot divide).
    fn draw_within_a_minute(steps: &[f64], values: &[f64]) -> Result<(), String> {
        let records: Vec<Value> = steps
            .iter()
            .zip(values)
            .map(|(s, v)| serde_json::json!({"step": s, "loss_itc": v}))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("curves.png");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runs = [Run {
                name: "run".into(),
                records,
            }];
            let drawn = register_font()
                .and_then(|_| draw(&runs, &["loss_itc".to_string()], &out, 400, 0.6))
                .map_err(|e| e.to_string());
            let _ = tx.send(drawn);
        });
        match rx.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(drawn) => drawn,
            Err(_) => Err(format!(
                "still drawing after a minute: {steps:?} {values:?}"
            )),
        }
    }

    #[test]
    fn values_near_the_limits_of_f64_are_drawn_without_spinning() {
        let huge = f64::MAX;
        for (steps, values) in [
            (vec![1.0, 2.0], vec![1.0, huge]),
            (vec![1.0, 2.0], vec![-huge, huge]),
            (vec![1.0, 2.0, 3.0], vec![-1e300, 0.5, 1e300]),
            (vec![1.0], vec![huge]),
            (vec![1.0, 2.0], vec![1e-320, 1e-320]),
            (vec![1.0, 2.0], vec![5e-324, 1e-323]),
            (vec![1.0, 2.0], vec![0.0, 5e-324]),
            (vec![1.0, 2.0], vec![-1e-310, 1e-310]),
            (vec![0.0, 5e-324], vec![0.5, 0.4]),
            (vec![1.0, huge], vec![0.5, 0.4]),
            (vec![-huge, huge], vec![0.5, 0.4]),
        ] {
            draw_within_a_minute(&steps, &values).unwrap();
        }
    }

    #[test]
    fn a_metrics_line_that_is_not_utf8_does_not_stop_the_plot() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = b"{\"step\": 1, \"loss_itc\": 4.1}\n\xff\xfe\n".to_vec();
        lines.extend(b"{\"step\": 2, \"loss_itc\": 3.9}\n");
        std::fs::write(dir.path().join("metrics.jsonl"), lines).unwrap();
        run(PlotArgs {
            run_dirs: vec![dir.path().to_path_buf()],
            out: None,
            width: 400,
            smooth: 0.6,
        })
        .unwrap();
        assert!(dir.path().join("curves.png").is_file());
    }

    /// A file of lines without a number to draw failed inside plotters ("Zero height not
    /// allowed"): it is said for what it is.
    #[test]
    fn metrics_without_a_numeric_value_are_refused_as_such() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("metrics.jsonl"),
            "garbage\n{}\n{\"step\": 1}\n",
        )
        .unwrap();
        let err = run(PlotArgs {
            run_dirs: vec![dir.path().to_path_buf()],
            out: None,
            width: 400,
            smooth: 0.6,
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("no numeric metric"), "{err}");
    }

    #[test]
    fn ticks_stay_short() {
        assert_eq!(tick(0.0), "0");
        assert_eq!(tick(1e-5), "1.0e-5");
        assert_eq!(tick(0.0712), "0.071");
        assert_eq!(tick(6.7213), "6.72");
        assert_eq!(tick(348.0), "348");
    }
}
