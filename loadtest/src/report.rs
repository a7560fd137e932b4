//! Latency histograms (HDR, microseconds), the once-a-second progress line, the final table and
//! the JSON results.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies up to 60 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// Results for one label (an endpoint, say).
#[derive(Default)]
pub struct Series {
    pub ok: u64,
    pub errors: u64,
    pub latency: Option<Histogram<u64>>,
}

impl Series {
    pub fn record(&mut self, ok: bool, micros: u64) {
        if ok {
            self.ok += 1;
        } else {
            self.errors += 1;
        }
        self.latency
            .get_or_insert_with(histogram)
            .saturating_record(micros.max(1));
    }

    pub fn merge(&mut self, other: Series) {
        self.ok += other.ok;
        self.errors += other.errors;
        if let Some(h) = other.latency {
            let mine = self.latency.get_or_insert_with(histogram);
            mine.add(h).expect("same bounds");
        }
    }
}

/// Counters the progress line reads while workers run.
#[derive(Default)]
pub struct Live {
    pub done: AtomicU64,
    pub errors: AtomicU64,
}

/// Prints a progress line every second until `stop` is set.
pub fn progress(
    live: Arc<Live>,
    stop: Arc<AtomicBool>,
    unit: &'static str,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let start = Instant::now();
        let mut last = 0;
        let mut tick = 1;
        while !stop.load(Ordering::Relaxed) {
            let due = start + Duration::from_secs(tick);
            while Instant::now() < due && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let done = live.done.load(Ordering::Relaxed);
            eprintln!(
                "t={tick:>3}s  {:>9} {unit}/s  total {done:>10}  errors {}",
                done - last,
                live.errors.load(Ordering::Relaxed)
            );
            last = done;
            tick += 1;
        }
    })
}

#[derive(Serialize)]
pub struct Row {
    pub label: String,
    pub ok: u64,
    pub errors: u64,
    pub per_sec: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

/// Prints the table and returns its rows (for JSON).
pub fn table(series: &BTreeMap<String, Series>, elapsed: Duration) -> Vec<Row> {
    let secs = elapsed.as_secs_f64();
    let mut rows = Vec::new();
    let mut all = Series::default();
    for (label, s) in series {
        rows.push(row(label, s, secs));
        all.merge(Series {
            ok: s.ok,
            errors: s.errors,
            latency: s.latency.clone(),
        });
    }
    if series.len() > 1 {
        rows.push(row("all", &all, secs));
    }
    println!(
        "{:<10} {:>10} {:>7} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "endpoint", "ok", "errors", "per sec", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
    );
    for r in &rows {
        let ms = |us: u64| us as f64 / 1000.0;
        println!(
            "{:<10} {:>10} {:>7} {:>10.0} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
            r.label,
            r.ok,
            r.errors,
            r.per_sec,
            ms(r.p50_us),
            ms(r.p90_us),
            ms(r.p99_us),
            ms(r.p999_us),
            ms(r.max_us)
        );
    }
    rows
}

fn row(label: &str, s: &Series, secs: f64) -> Row {
    let q = |p: f64| s.latency.as_ref().map_or(0, |h| h.value_at_quantile(p));
    Row {
        label: label.to_string(),
        ok: s.ok,
        errors: s.errors,
        per_sec: (s.ok + s.errors) as f64 / secs,
        p50_us: q(0.5),
        p90_us: q(0.9),
        p99_us: q(0.99),
        p999_us: q(0.999),
        max_us: s.latency.as_ref().map_or(0, |h| h.max()),
    }
}

pub fn write_json(path: &Path, value: &impl Serialize) -> Result<(), String> {
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}
