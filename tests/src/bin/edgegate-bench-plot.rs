//! `edgegate-bench-plot`: renders the benchmark's results JSON as a PNG.
//!
//! Left: how each system's RSS grows with idle TLS WebSocket clients (the
//! slope is the memory per client, shown in the legend). Right: echo
//! round-trip percentiles per system, log scale.
//!
//! Text is drawn with a TrueType font read at run time (DejaVu Sans from
//! Debian's `fonts-dejavu-core` unless `--font` says otherwise), so the plot
//! needs no fontconfig.
//!
//! ```text
//! edgegate-bench-plot --input tests/bench/results/latest.json --output tests/bench/results/latest.png
//! ```

use std::path::PathBuf;

use clap::Parser;
use plotters::prelude::*;
use serde_json::Value;

const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const WIDTH: u32 = 1400;
const HEIGHT: u32 = 600;
/// Systems in plot order, with their colours.
const SYSTEMS: [(&str, RGBColor); 3] = [
    ("edgegate", RGBColor(0x1f, 0x77, 0xb4)),
    ("haproxy", RGBColor(0x2c, 0xa0, 0x2c)),
    ("nginx", RGBColor(0xd6, 0x27, 0x28)),
];

#[derive(Debug, Parser)]
struct Args {
    #[arg(long)]
    input: PathBuf,
    #[arg(long)]
    output: PathBuf,
    /// A TrueType font for the labels.
    #[arg(long, default_value = DEFAULT_FONT)]
    font: PathBuf,
}

type Error = Box<dyn std::error::Error>;

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgegate-bench-plot: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Error> {
    let font =
        std::fs::read(&args.font).map_err(|e| format!("font {}: {e}", args.font.display()))?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| format!("font {}: not a TrueType font", args.font.display()))?;
    let text = std::fs::read_to_string(&args.input)
        .map_err(|e| format!("{}: {e}", args.input.display()))?;
    let results: Value = serde_json::from_str(&text)?;
    let systems = &results["systems"];

    let root = BitMapBackend::new(&args.output, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(WIDTH / 2);
    memory_chart(&left, systems)?;
    latency_chart(&right, systems)?;
    root.present()?;
    Ok(())
}

/// (clients, RSS growth in MiB) points of one system, with (0, 0) first.
fn memory_points(system: &Value) -> Vec<(f64, f64)> {
    let mut points = vec![(0.0, 0.0)];
    let base = system["idle_memory"]["base_rss_kib"]
        .as_f64()
        .unwrap_or(0.0);
    if let Some(steps) = system["idle_memory"]["steps"].as_array() {
        for s in steps {
            if let (Some(c), Some(rss)) = (s["clients"].as_f64(), s["rss_kib"].as_f64()) {
                points.push((c, (rss - base) / 1024.0));
            }
        }
    }
    points
}

fn memory_chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    systems: &Value,
) -> Result<(), Error>
where
    DB::ErrorType: 'static,
{
    let all: Vec<(f64, f64)> = SYSTEMS
        .iter()
        .flat_map(|(n, _)| memory_points(&systems[*n]))
        .collect();
    let xmax = all.iter().map(|p| p.0).fold(1000.0, f64::max) * 1.05;
    let ymax = all.iter().map(|p| p.1).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption("Memory of idle TLS WebSocket clients", ("sans-serif", 24))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .x_desc("idle clients")
        .y_desc("RSS growth (MiB)")
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    for (name, colour) in SYSTEMS {
        let system = &systems[name];
        if system.is_null() {
            continue;
        }
        let points = memory_points(system);
        let slope = system["idle_memory"]["slope_bytes_per_client"].as_f64();
        let label = match slope {
            Some(s) => format!("{name}: {:.1} KiB/client", s / 1024.0),
            None => name.to_string(),
        };
        chart
            .draw_series(LineSeries::new(points.clone(), colour.stroke_width(3)))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(3))
            });
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 4, colour.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// One system's line: name, colour, points.
type Series = (&'static str, RGBColor, Vec<(f64, f64)>);

const PERCENTILES: [(&str, &str); 4] = [
    ("p50", "p50_ms"),
    ("p99", "p99_ms"),
    ("p99.9", "p999_ms"),
    ("max", "max_ms"),
];

fn latency_chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    systems: &Value,
) -> Result<(), Error>
where
    DB::ErrorType: 'static,
{
    let series: Vec<Series> = SYSTEMS
        .iter()
        .filter_map(|(name, colour)| {
            let echo = &systems[*name]["echo"];
            let points: Vec<(f64, f64)> = PERCENTILES
                .iter()
                .enumerate()
                .filter_map(|(i, (_, key))| echo[*key].as_f64().map(|v| (i as f64, v.max(0.001))))
                .collect();
            (!points.is_empty()).then_some((*name, *colour, points))
        })
        .collect();
    let ymax = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1))
        .fold(1.0, f64::max)
        * 2.0;
    let ymin = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1))
        .fold(ymax, f64::min)
        .max(0.001)
        / 2.0;
    let mut chart = ChartBuilder::on(area)
        .caption("Echo round trip at a fixed rate", ("sans-serif", 24))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(
            -0.3f64..(PERCENTILES.len() as f64 - 0.7),
            (ymin..ymax).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_labels(PERCENTILES.len())
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 {
                PERCENTILES
                    .get(i as usize)
                    .map_or(String::new(), |p| p.0.to_string())
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| {
            format!("{y:.3}")
                .trim_end_matches('0')
                .trim_end_matches('.')
                .to_string()
        })
        .x_desc("percentile")
        .y_desc("round trip (ms, log scale)")
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    for (name, colour, points) in series {
        chart
            .draw_series(LineSeries::new(points.clone(), colour.stroke_width(3)))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(3))
            });
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 4, colour.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
