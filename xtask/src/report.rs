//! `cargo xtask report DIR`: a campaign's `runs.jsonl` as `report.md` and a self-contained
//! `report.html` with SVG plots (plotters): the recovery rate of detected faults and the
//! noVMF rate with Wilson 95% intervals, per target, fault type and mode (NiLiHype's Fig. 2,
//! per component); the outcome breakdown; the detection and recovery latency distributions;
//! and every run that did not succeed with the command that replays it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

use crate::campaign::{Class, read_records, table, wilson};

/// One cell's counts.
#[derive(Default, Clone, Copy)]
struct Cell {
    runs: u64,
    detected: u64,
    recovered: u64,
    no_vmf: u64,
    classes: [u64; 6],
}

impl Cell {
    /// Counts one run's record.
    fn add(&mut self, record: &Value) {
        self.runs += 1;
        if let Some(index) = Class::ALL
            .iter()
            .position(|class| record["class"] == class.name())
        {
            self.classes[index] += 1;
        }
        let recovered = record["class"] == Class::Recovered.name();
        let detected = recovered || record["class"] == Class::DetectedFailed.name();
        self.detected += u64::from(detected);
        self.recovered += u64::from(recovered);
        self.no_vmf += u64::from(crate::campaign::no_vm_failure(record));
    }
}

/// Cells by (target, fault, mode).
fn cells(records: &[Value]) -> BTreeMap<(String, String, String), Cell> {
    let mut cells: BTreeMap<(String, String, String), Cell> = BTreeMap::new();
    for record in records {
        let key = (
            record["target"].as_str().unwrap_or("?").to_string(),
            record["fault"].as_str().unwrap_or("?").to_string(),
            crate::campaign::cell_mode(record),
        );
        cells.entry(key).or_default().add(record);
    }
    cells
}

/// The rates pooled over targets and modes, per fault type and in all, for the services and
/// for the core apart (the core is the monolithic baseline, not one more service): the
/// comparison with NiLiHype's Fig. 2, which pools Xen's whole hypervisor.
fn pooled(records: &[Value]) -> String {
    let mut out = String::from(
        "| targets | fault | runs | detected | recovered of detected (95% CI) | noVMF of detected \
         | detected by (exception / panic / hang) | non-manifested | SDC | no summary | not injected |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let faults: std::collections::BTreeSet<&str> = records
        .iter()
        .filter_map(|record| record["fault"].as_str())
        .collect();
    for (group, is_core) in [("services", false), ("core", true)] {
        let members: Vec<&Value> = records
            .iter()
            .filter(|record| (record["target"] == "core") == is_core)
            .collect();
        if members.is_empty() {
            continue;
        }
        for fault in faults.iter().copied().map(Some).chain([None]) {
            let rows: Vec<&&Value> = members
                .iter()
                .filter(|record| fault.is_none_or(|fault| record["fault"] == fault))
                .collect();
            if rows.is_empty() {
                continue;
            }
            let count = |class: Class| rows.iter().filter(|r| r["class"] == class.name()).count();
            let recovered = count(Class::Recovered) as u64;
            let detected = recovered + count(Class::DetectedFailed) as u64;
            let no_vmf = rows
                .iter()
                .filter(|record| crate::campaign::no_vm_failure(record))
                .count();
            let by = |kind: &str| {
                rows.iter()
                    .filter(|r| {
                        matches!(r["class"].as_str(), Some("recovered" | "detected-failed"))
                            && r["detection"]["kind"] == kind
                    })
                    .count()
            };
            let (rate, no_vmf) = if detected == 0 {
                ("-".to_string(), "-".to_string())
            } else {
                let (low, high) = wilson(recovered, detected);
                (
                    format!(
                        "{recovered} = {:.1}% [{:.1}, {:.1}]",
                        100.0 * recovered as f64 / detected as f64,
                        100.0 * low,
                        100.0 * high
                    ),
                    format!("{:.1}%", 100.0 * no_vmf as f64 / detected as f64),
                )
            };
            let _ = writeln!(
                out,
                "| {group} | {} | {} | {detected} | {rate} | {no_vmf} | {} / {} / {} | {} | {} | {} | {} |",
                fault.unwrap_or("all"),
                rows.len(),
                by("exception"),
                by("panic"),
                by("hang"),
                count(Class::NonManifested),
                count(Class::Sdc),
                count(Class::NoSummary),
                count(Class::NotInjected)
            );
        }
    }
    out
}

/// Colours of the series, by index.
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(127, 127, 127),
];

fn plot_error(error: impl std::fmt::Display) -> String {
    format!("plot: {error}")
}

/// "TARGET FAULT MODE" for each cell.
fn cell_labels(entries: &[(&(String, String, String), &Cell)]) -> Vec<String> {
    entries
        .iter()
        .map(|((target, fault, mode), _)| format!("{target} {fault} {mode}"))
        .collect()
}

/// Cell labels, drawn turned by 90 degrees under the bars.
fn label_font() -> TextStyle<'static> {
    ("sans-serif", 11)
        .into_font()
        .transform(FontTransform::Rotate90)
        .into()
}

/// Recovery (of detected faults) and noVMF rates with Wilson intervals: a pair of bars per
/// cell (segments 2i and 2i + 1).
fn rates_svg(cells: &BTreeMap<(String, String, String), Cell>) -> Result<String, String> {
    let mut svg = String::new();
    let entries: Vec<_> = cells.iter().collect();
    let segments = (2 * entries.len()).max(1) as u32;
    let width = (120 + segments * 26).max(480);
    let labels = cell_labels(&entries);
    {
        let root = SVGBackend::with_string(&mut svg, (width, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Recovered (blue) and noVMF (orange), % of detected faults, 95% Wilson intervals",
                ("sans-serif", 15),
            )
            .margin(10)
            .x_label_area_size(170)
            .y_label_area_size(50)
            .build_cartesian_2d((0u32..segments).into_segmented(), 0f64..100f64)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(segments as usize)
            .x_label_style(label_font())
            .x_label_formatter(&|segment| match segment {
                SegmentValue::CenterOf(index) if index % 2 == 0 => {
                    labels.get(*index as usize / 2).cloned().unwrap_or_default()
                }
                _ => String::new(),
            })
            .y_desc("% of detected")
            .draw()
            .map_err(plot_error)?;
        for series in 0..2u32 {
            let colour = PALETTE[series as usize];
            let bars: Vec<(u32, f64, f64, f64)> = entries
                .iter()
                .enumerate()
                .filter(|(_, (_, cell))| cell.detected > 0)
                .map(|(index, (_, cell))| {
                    let successes = if series == 0 {
                        cell.recovered
                    } else {
                        cell.no_vmf
                    };
                    let (low, high) = wilson(successes, cell.detected);
                    (
                        2 * index as u32 + series,
                        100.0 * successes as f64 / cell.detected as f64,
                        100.0 * low,
                        100.0 * high,
                    )
                })
                .collect();
            chart
                .draw_series(bars.iter().map(|&(segment, rate, _, _)| {
                    let mut bar = Rectangle::new(
                        [
                            (SegmentValue::Exact(segment), 0.0),
                            (SegmentValue::Exact(segment + 1), rate),
                        ],
                        colour.filled(),
                    );
                    bar.set_margin(0, 0, 3, 3);
                    bar
                }))
                .map_err(plot_error)?;
            chart
                .draw_series(bars.iter().map(|&(segment, rate, low, high)| {
                    ErrorBar::new_vertical(
                        SegmentValue::CenterOf(segment),
                        low,
                        rate,
                        high,
                        BLACK.filled(),
                        8,
                    )
                }))
                .map_err(plot_error)?;
        }
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}

/// The outcome classes per cell, as stacked bars of run counts.
fn outcomes_svg(cells: &BTreeMap<(String, String, String), Cell>) -> Result<String, String> {
    let mut svg = String::new();
    let entries: Vec<_> = cells.iter().collect();
    let count = entries.len().max(1) as u32;
    let most = entries
        .iter()
        .map(|(_, cell)| cell.runs)
        .max()
        .unwrap_or(1)
        .max(1);
    let width = (160 + count * 30).max(520);
    let labels = cell_labels(&entries);
    {
        let root = SVGBackend::with_string(&mut svg, (width, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Outcome of every run", ("sans-serif", 15))
            .margin(10)
            .x_label_area_size(170)
            .y_label_area_size(50)
            .build_cartesian_2d((0u32..count).into_segmented(), 0f64..most as f64)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(count as usize)
            .x_label_style(label_font())
            .x_label_formatter(&|segment| match segment {
                SegmentValue::CenterOf(index) => {
                    labels.get(*index as usize).cloned().unwrap_or_default()
                }
                _ => String::new(),
            })
            .y_desc("runs")
            .draw()
            .map_err(plot_error)?;
        for (class_index, class) in Class::ALL.iter().enumerate() {
            let colour = PALETTE[class_index];
            chart
                .draw_series(entries.iter().enumerate().map(|(index, (_, cell))| {
                    let below: u64 = cell.classes[..class_index].iter().sum();
                    let top = below + cell.classes[class_index];
                    let mut bar = Rectangle::new(
                        [
                            (SegmentValue::Exact(index as u32), below as f64),
                            (SegmentValue::Exact(index as u32 + 1), top as f64),
                        ],
                        colour.filled(),
                    );
                    bar.set_margin(0, 0, 4, 4);
                    bar
                }))
                .map_err(plot_error)?
                .label(class.name())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled())
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}

/// A histogram of `values` over power-of-two buckets (instructions under bochs).
fn latency_svg(title: &str, values: &[u64]) -> Result<String, String> {
    let mut svg = String::new();
    let mut buckets = [0u64; 40];
    for &value in values {
        buckets[(64 - value.max(1).leading_zeros() as usize).min(39)] += 1;
    }
    let first = buckets.iter().position(|&n| n > 0).unwrap_or(0) as u32;
    let last = (buckets.iter().rposition(|&n| n > 0).unwrap_or(0) as u32).max(first);
    let most = buckets.iter().copied().max().unwrap_or(1).max(1);
    {
        let root = SVGBackend::with_string(&mut svg, (560, 320)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 15))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d((first..last + 1).into_segmented(), 0f64..most as f64)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels((last + 1 - first) as usize)
            .x_desc("TSC ticks (instructions under bochs), power-of-two buckets")
            .x_label_formatter(&|segment| match segment {
                SegmentValue::CenterOf(bucket) => format!("<2^{bucket}"),
                _ => String::new(),
            })
            .y_desc("runs")
            .draw()
            .map_err(plot_error)?;
        chart
            .draw_series((first..=last).map(|bucket| {
                let mut bar = Rectangle::new(
                    [
                        (SegmentValue::Exact(bucket), 0.0),
                        (
                            SegmentValue::Exact(bucket + 1),
                            buckets[bucket as usize] as f64,
                        ),
                    ],
                    PALETTE[0].filled(),
                );
                bar.set_margin(0, 0, 3, 3);
                bar
            }))
            .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}

/// The median and the largest of `values`.
fn median_max(values: &[u64]) -> Option<(u64, u64)> {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    Some((*sorted.get(sorted.len() / 2)?, *sorted.last()?))
}

/// The repairs sweep (`campaign --repairs-sweep`): per repair set, pooled over the services'
/// cells (the core baseline apart), the rates as repairs are added one at a time, keyed for
/// [`rates_svg`] by (step, "services", set). `None` when the records hold one set only.
fn sweep(records: &[Value]) -> Option<BTreeMap<(String, String, String), Cell>> {
    let order = crate::campaign::sweep_sets();
    let set_of = |record: &Value| record["repairs"].as_str().unwrap_or("all").to_string();
    let mut steps: BTreeMap<(String, String, String), Cell> = BTreeMap::new();
    for record in records.iter().filter(|record| record["target"] != "core") {
        let set = set_of(record);
        let step = order
            .iter()
            .position(|known| *known == set)
            .unwrap_or(order.len());
        steps
            .entry((format!("{step:02}"), "services".into(), set))
            .or_default()
            .add(record);
    }
    (steps.len() > 1).then_some(steps)
}

/// The sweep as a Markdown table.
fn sweep_table(steps: &BTreeMap<(String, String, String), Cell>) -> String {
    let mut out = String::from(
        "| step | repairs | runs | detected | recovered of detected (95% CI) | noVMF of detected |\n\
         |---|---|---|---|---|---|\n",
    );
    for ((step, _, set), cell) in steps {
        let (rate, no_vmf) = if cell.detected == 0 {
            ("-".to_string(), "-".to_string())
        } else {
            let (low, high) = wilson(cell.recovered, cell.detected);
            (
                format!(
                    "{} = {:.1}% [{:.1}, {:.1}]",
                    cell.recovered,
                    100.0 * cell.recovered as f64 / cell.detected as f64,
                    100.0 * low,
                    100.0 * high
                ),
                format!("{:.1}%", 100.0 * cell.no_vmf as f64 / cell.detected as f64),
            )
        };
        let _ = writeln!(
            out,
            "| {} | {set} | {} | {} | {rate} | {no_vmf} |",
            step.trim_start_matches('0').parse::<u32>().unwrap_or(0),
            cell.runs,
            cell.detected
        );
    }
    out
}

/// Recovery latencies of recovered runs per target and mode: detection to resumed caller
/// (`total`) and detection to the recovered domain's first completed request (`until_served`:
/// the repair and the retried request included, what a guest waits). Records from builds
/// before `until_served` existed have none.
fn latency_table(records: &[Value]) -> String {
    type Latencies = (Vec<u64>, Vec<u64>, Vec<u64>);
    let mut groups: BTreeMap<(String, String), Latencies> = BTreeMap::new();
    for record in records
        .iter()
        .filter(|record| record["class"] == Class::Recovered.name())
    {
        let key = (
            record["target"].as_str().unwrap_or("?").to_string(),
            record["mode"].as_str().unwrap_or("?").to_string(),
        );
        let (total, served, gap) = groups.entry(key).or_default();
        let tsc = &record["recovery"]["tsc"];
        total.extend(tsc["total"].as_u64());
        served.extend(tsc["until_served"].as_u64());
        // The longest gap any VM of the run measured (netbench's, between two echoes).
        gap.extend(
            record["vms"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|vm| vm["longest_gap_us"].as_u64())
                .max(),
        );
    }
    let show = |values: &[u64]| match median_max(values) {
        Some((median, max)) => format!("{median} / {max} ({} runs)", values.len()),
        None => "-".to_string(),
    };
    let mut out = String::from(
        "| target | mode | detection to resumed caller: median / worst | detection to first \
         request served: median / worst | longest gap a guest saw (µs of guest time): median / \
         worst |\n|---|---|---|---|---|\n",
    );
    for ((target, mode), (total, served, gap)) in &groups {
        let _ = writeln!(
            out,
            "| {target} | {mode} | {} | {} | {} |",
            show(total),
            show(served),
            show(gap)
        );
    }
    out
}

/// Writes `DIR/report.md`, `DIR/report.html` and the plots' SVG files.
pub fn report(dir: &Path) -> Result<(), String> {
    let records = read_records(dir)?;
    if records.is_empty() {
        return Err(format!("{}: no runs recorded yet", dir.display()));
    }
    let cells = cells(&records);
    let detection: Vec<u64> = records
        .iter()
        .filter_map(|record| record["injection"]["detection_latency"].as_u64())
        .collect();
    let recovery: Vec<u64> = records
        .iter()
        .filter(|record| record["class"] == Class::Recovered.name())
        .filter(|record| record["injection"]["detection_latency"].is_u64())
        .filter_map(|record| record["recovery"]["tsc"]["total"].as_u64())
        .collect();
    let steps = sweep(&records);
    let mut plots = vec![
        ("rates.svg", rates_svg(&cells)?),
        ("outcomes.svg", outcomes_svg(&cells)?),
        (
            "detection-latency.svg",
            latency_svg("Detection latency (injection to detection)", &detection)?,
        ),
        (
            "recovery-latency.svg",
            latency_svg("Recovery latency (detection to resumed service)", &recovery)?,
        ),
    ];
    if let Some(steps) = &steps {
        plots.push(("repairs-sweep.svg", rates_svg(steps)?));
    }
    for (name, svg) in &plots {
        fs::write(dir.join(name), svg).map_err(|e| format!("{name}: {e}"))?;
    }
    let first = &records[0];
    let builds: std::collections::BTreeSet<&str> = records
        .iter()
        .filter_map(|record| record["build"].as_str())
        .collect();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Campaign report: {}\n\n{} runs of scenario `{}` on {} CPUs; build(s): {}.\n",
        dir.display(),
        records.len(),
        first["scenario"].as_str().unwrap_or("?"),
        first["cpus"],
        builds.into_iter().collect::<Vec<_>>().join(", ")
    );
    let _ = writeln!(
        md,
        "Classes: *not injected* (the target ran fewer instructions than the trigger counted), \
         *non-manifested* (nothing detected, every VM correct), *SDC* (nothing detected, a VM \
         wrong), *recovered* (detected, and the scenario's success definition holds), \
         *detected, failed*, *no summary* (hang, core crash or emulator timeout). noVMF: \
         detected, recovered and no VM affected at all.\n\n## Pooled over targets and modes\n\n{}\n\
         ## Rates per cell\n\n{}",
        pooled(&records),
        table(&records)
    );
    for (title, values) in [
        ("Detection latency", &detection),
        ("Recovery latency", &recovery),
    ] {
        match median_max(values) {
            Some((median, max)) => {
                let _ = writeln!(
                    md,
                    "{title}: {} runs, median {median} TSC ticks, worst {max} (instructions \
                     under bochs).\n",
                    values.len()
                );
            }
            None => {
                let _ = writeln!(md, "{title}: no run yet.\n");
            }
        }
    }
    if let Some(steps) = &steps {
        let _ = writeln!(
            md,
            "## Repairs sweep\n\nThe services' cells pooled per repair set, as repairs are \
             added one at a time (`--repairs-sweep`; every set gets the same faults: the seeds \
             do not depend on it).\n\n{}",
            sweep_table(steps)
        );
    }
    let _ = writeln!(
        md,
        "## Recovery latency per target and mode\n\nTSC ticks (instructions under bochs) of \
         the recovered runs.\n\n{}",
        latency_table(&records)
    );
    md.push_str("## Plots\n\n");
    for (name, _) in &plots {
        let _ = writeln!(md, "![{name}]({name})\n");
    }
    md.push_str("## Runs that did not succeed\n\n");
    md.push_str("| run | class | fault | what was hit | replay |\n|---|---|---|---|---|\n");
    let mut failed = 0;
    for record in &records {
        let class = record["class"].as_str().unwrap_or("?");
        if matches!(class, "recovered" | "non-manifested" | "not-injected") {
            continue;
        }
        failed += 1;
        let injection = &record["injection"];
        let _ = writeln!(
            md,
            "| {} | {class} | {} {} | {} bit {} at RIP {} ({} -> {}) | `cargo xtask replay {} --out {}` |",
            record["id"].as_str().unwrap_or("?"),
            record["fault"].as_str().unwrap_or("?"),
            record["target"].as_str().unwrap_or("?"),
            injection["location"].as_str().unwrap_or("-"),
            injection["bit"],
            injection["rip"].as_str().unwrap_or("-"),
            injection["before"].as_str().unwrap_or("-"),
            injection["after"].as_str().unwrap_or("-"),
            record["id"].as_str().unwrap_or("?"),
            dir.display()
        );
    }
    if failed == 0 {
        md.push_str("| (none) | - | - | - | - |\n");
    }
    fs::write(dir.join("report.md"), &md).map_err(|e| format!("report.md: {e}"))?;
    fs::write(dir.join("report.html"), html(&md, &plots))
        .map_err(|e| format!("report.html: {e}"))?;
    println!(
        "{} and {}: {} runs",
        dir.join("report.md").display(),
        dir.join("report.html").display(),
        records.len()
    );
    Ok(())
}

/// Renders `DIR/report.html` in headless Chromium: its DOM after parsing must hold every plot
/// as an SVG element and the rates table, and a screenshot of it must be written.
pub fn check_renders(dir: &Path) -> Result<(), String> {
    let html = dir.join("report.html");
    let url = format!(
        "file://{}",
        fs::canonicalize(&html)
            .map_err(|e| format!("{}: {e}", html.display()))?
            .display()
    );
    let browser = |args: &[&str]| {
        std::process::Command::new("chromium")
            .args(["--headless", "--no-sandbox", "--disable-gpu"])
            .args(args)
            .arg(&url)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| format!("cannot run chromium: {e}"))
    };
    let dom = browser(&["--dump-dom"])?;
    let dom = String::from_utf8_lossy(&dom.stdout);
    let plots = dom.matches("<svg").count();
    if plots != 4 || !dom.contains("<table>") || !dom.contains("</html>") {
        return Err(format!(
            "chromium parsed report.html into a DOM with {plots} SVG plots (want 4) and {} \
             table",
            if dom.contains("<table>") { "a" } else { "no" }
        ));
    }
    let screenshot = dir.join("report.png");
    let arg = format!("--screenshot={}", screenshot.display());
    browser(&[&arg, "--window-size=1280,2400"])?;
    let bytes = fs::metadata(&screenshot).map(|m| m.len()).unwrap_or(0);
    // A blank page of that size compresses to a few KiB; text and four plots do not.
    if bytes < 20_000 {
        return Err(format!(
            "chromium's screenshot of the report is {bytes} bytes: blank?"
        ));
    }
    Ok(())
}

/// Escapes text for HTML.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A self-contained HTML page from the Markdown report: its tables as HTML tables, its
/// paragraphs as paragraphs, the plots inline.
fn html(md: &str, plots: &[(&str, String)]) -> String {
    let mut out = String::from(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>Campaign report</title><style>body{font-family:sans-serif;max-width:1200px;\
         margin:2em auto}table{border-collapse:collapse}td,th{border:1px solid #999;\
         padding:2px 6px;font-size:13px}code{font-size:12px}</style></head><body>\n",
    );
    let mut in_table = false;
    for line in md.lines() {
        if let Some(cells) = line.strip_prefix('|') {
            if line.starts_with("|---") {
                continue;
            }
            if !in_table {
                out.push_str("<table>\n");
                in_table = true;
            }
            out.push_str("<tr>");
            for cell in cells.trim_end_matches('|').split(" | ") {
                let _ = write!(out, "<td>{}</td>", escape(cell.trim()));
            }
            out.push_str("</tr>\n");
            continue;
        }
        if in_table {
            out.push_str("</table>\n");
            in_table = false;
        }
        if let Some(title) = line.strip_prefix("## ") {
            let _ = writeln!(out, "<h2>{}</h2>", escape(title));
        } else if let Some(title) = line.strip_prefix("# ") {
            let _ = writeln!(out, "<h1>{}</h1>", escape(title));
        } else if let Some(name) = line
            .strip_prefix("![")
            .and_then(|rest| rest.split(']').next())
        {
            if let Some((_, svg)) = plots.iter().find(|(plot, _)| *plot == name) {
                let _ = writeln!(out, "<figure id=\"{name}\">{svg}</figure>");
            }
        } else if !line.is_empty() {
            let _ = writeln!(out, "<p>{}</p>", escape(line));
        }
    }
    if in_table {
        out.push_str("</table>\n");
    }
    out.push_str("</body></html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn records() -> Vec<Value> {
        let record = |id: &str, class: &str, no_vmf: bool, latency: Option<u64>| {
            json!({"id": id, "scenario": "3appvm", "cpus": 2, "target": "memory",
                   "fault": "register", "mode": "microreset", "class": class,
                   "no_vm_failure": no_vmf, "vms_affected": u64::from(!no_vmf),
                   "build": "abc release", "detection": {"kind": "exception"},
                   "injection": {"injected": true, "location": "rbx", "bit": 3,
                                 "rip": "0x401000", "before": "0x8", "after": "0x0",
                                 "detection_latency": latency},
                   "recovery": {"tsc": {"total": 20000}}})
        };
        vec![
            record("a", "recovered", true, Some(1500)),
            record("b", "detected-failed", false, Some(90)),
            record("c", "non-manifested", false, None),
            record("d", "sdc", false, None),
        ]
    }

    #[test]
    fn reports_are_written_with_plots_and_failed_runs() {
        let dir = std::env::temp_dir().join(format!("xtask-report-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let text: String = records().iter().map(|r| format!("{r}\n")).collect();
        fs::write(dir.join("runs.jsonl"), text).unwrap();
        report(&dir).unwrap();
        let md = fs::read_to_string(dir.join("report.md")).unwrap();
        assert!(
            md.contains("| memory | register | microreset | 4 | 0 | 1 | 1 | 1 | 1 | 0 | 50.0% ["),
            "{md}"
        );
        assert!(
            md.contains(
                "| services | register | 4 | 2 | 1 = 50.0% [9.5, 90.5] | 50.0% | 2 / 0 / 0 | 1 | 1 | 0 | 0 |"
            ),
            "pooled: {md}"
        );
        assert!(
            md.contains("| services | all | 4 | 2 |") && !md.contains("| core |"),
            "{md}"
        );
        // One recovered run, from a build before `until_served`.
        assert!(
            md.contains("| memory | microreset | 20000 / 20000 (1 runs) | - | - |"),
            "latency table: {md}"
        );
        assert!(
            md.contains("cargo xtask replay b --out"),
            "failed runs listed: {md}"
        );
        assert!(
            md.contains("cargo xtask replay d --out"),
            "SDC runs listed: {md}"
        );
        assert!(
            !md.contains("replay a --out"),
            "recovered runs are not: {md}"
        );
        assert!(
            md.contains("Detection latency: 2 runs, median 1500"),
            "{md}"
        );
        let html = fs::read_to_string(dir.join("report.html")).unwrap();
        assert!(html.starts_with("<!DOCTYPE html>") && html.trim_end().ends_with("</html>"));
        assert_eq!(html.matches("<svg").count(), 4, "every plot inline");
        assert!(html.contains("<table>") && html.contains("<td>memory</td>"));
        for svg in [
            "rates.svg",
            "outcomes.svg",
            "detection-latency.svg",
            "recovery-latency.svg",
        ] {
            assert!(fs::read_to_string(dir.join(svg)).unwrap().contains("<svg"));
        }
        assert!(!md.contains("Repairs sweep"), "one repair set: no sweep");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_repairs_sweep_gets_its_table_and_plot() {
        let dir = std::env::temp_dir().join(format!("xtask-sweep-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let record = |id: &str, repairs: &str, class: &str| {
            json!({"id": id, "scenario": "3appvm", "cpus": 2, "target": "memory",
                   "fault": "failstop", "mode": "microreset", "repairs": repairs,
                   "class": class, "no_vm_failure": class == "recovered",
                   "injection": {"injected": true, "detection_latency": 10},
                   "recovery": {"tsc": {"total": 100, "until_served": 300}},
                   "vms": [{"vm": 1, "longest_gap_us": null},
                           {"vm": 2, "longest_gap_us": if id == "e" { 9000 } else { 2000 }}]})
        };
        let records = [
            record("a", "none", "detected-failed"),
            record("b", "none", "recovered"),
            record("c", "quiesce", "recovered"),
            record("d", "all", "recovered"),
            record("e", "all", "recovered"),
        ];
        let text: String = records.iter().map(|r| format!("{r}\n")).collect();
        fs::write(dir.join("runs.jsonl"), text).unwrap();
        report(&dir).unwrap();
        let md = fs::read_to_string(dir.join("report.md")).unwrap();
        // Steps in the sweep's order, whatever the order of the records.
        let none = md.find("| 0 | none | 2 | 2 | 1 = 50.0% [").expect(&md);
        let quiesce = md.find("| 1 | quiesce | 1 | 1 | 1 = 100.0% [").expect(&md);
        let all = md.find("| 8 | all | 2 | 2 | 2 = 100.0% [").expect(&md);
        assert!(none < quiesce && quiesce < all, "{md}");
        // The per-cell table tells the sets apart.
        assert!(
            md.contains("| memory | failstop | microreset (repairs: none) |"),
            "{md}"
        );
        // Latencies per target and mode pool the sets: four recovered runs.
        assert!(
            md.contains("| memory | microreset | 100 / 100 (4 runs) | 300 / 300 (4 runs) | 2000 / 9000 (4 runs) |"),
            "{md}"
        );
        assert!(
            fs::read_to_string(dir.join("repairs-sweep.svg"))
                .unwrap()
                .contains("<svg")
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    #[ignore = "needs chromium; `cargo xtask test` checks a real campaign's report this way"]
    fn renders_in_chromium() {
        let dir = std::env::temp_dir().join(format!("xtask-render-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let text: String = records().iter().map(|r| format!("{r}\n")).collect();
        fs::write(dir.join("runs.jsonl"), text).unwrap();
        report(&dir).unwrap();
        check_renders(&dir).unwrap();
        // A page without its plots is refused.
        let html = fs::read_to_string(dir.join("report.html")).unwrap();
        fs::write(dir.join("report.html"), html.replace("<svg", "<div")).unwrap();
        assert!(check_renders(&dir).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
