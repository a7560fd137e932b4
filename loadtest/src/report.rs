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
///
/// `latency` describes the requests that succeeded plus, at their lower bound, the requests an
/// open loop never got to send (see `not_sent`): a request that was due and never went out is a
/// user who waited at least that long. Error answers keep their own histogram, so a fast `503`
/// does not pull the success percentiles down.
#[derive(Default)]
pub struct Series {
    pub ok: u64,
    pub errors: u64,
    /// Open loop: requests that fell due but were never sent (a stall that outlasted the run).
    pub not_sent: u64,
    pub latency: Option<Histogram<u64>>,
    pub error_latency: Option<Histogram<u64>>,
}

fn add(h: &mut Option<Histogram<u64>>, micros: u64) {
    h.get_or_insert_with(histogram)
        .saturating_record(micros.max(1));
}

fn merge_into(mine: &mut Option<Histogram<u64>>, other: Option<Histogram<u64>>) {
    if let Some(h) = other {
        mine.get_or_insert_with(histogram)
            .add(h)
            .expect("same bounds");
    }
}

impl Series {
    pub fn record(&mut self, ok: bool, micros: u64) {
        if ok {
            self.ok += 1;
            add(&mut self.latency, micros);
        } else {
            self.errors += 1;
            add(&mut self.error_latency, micros);
        }
    }

    /// A request that was due but never sent; `waited` is how long it had been due when the
    /// run gave up on it (`None` if it was not due yet, e.g. its connection had failed).
    pub fn record_not_sent(&mut self, waited: Option<u64>) {
        self.not_sent += 1;
        if let Some(micros) = waited {
            add(&mut self.latency, micros);
        }
    }

    pub fn merge(&mut self, other: Series) {
        self.ok += other.ok;
        self.errors += other.errors;
        self.not_sent += other.not_sent;
        merge_into(&mut self.latency, other.latency);
        merge_into(&mut self.error_latency, other.error_latency);
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
    pub not_sent: u64,
    /// Answers (ok and errors) per second of the sending window.
    pub per_sec: f64,
    /// Percentiles of the successes (and, at their lower bound, of the requests not sent).
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// Percentiles of the error answers, apart.
    pub error_p50_us: u64,
    pub error_p99_us: u64,
    pub error_max_us: u64,
}

/// Prints the table and returns its rows (for JSON). `window` is the time the requests were
/// sent over (the per-second rates divide by it).
pub fn table(series: &BTreeMap<String, Series>, window: Duration) -> Vec<Row> {
    let secs = window.as_secs_f64().max(1e-3);
    let mut rows = Vec::new();
    let mut all = Series::default();
    for (label, s) in series {
        rows.push(row(label, s, secs));
        all.merge(Series {
            ok: s.ok,
            errors: s.errors,
            not_sent: s.not_sent,
            latency: s.latency.clone(),
            error_latency: s.error_latency.clone(),
        });
    }
    if series.len() > 1 {
        rows.push(row("all", &all, secs));
    }
    println!(
        "{:<10} {:>10} {:>7} {:>8} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>11}",
        "endpoint",
        "ok",
        "errors",
        "not sent",
        "per sec",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "err p99 ms"
    );
    for r in &rows {
        let ms = |us: u64| us as f64 / 1000.0;
        println!(
            "{:<10} {:>10} {:>7} {:>8} {:>10.0} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>11.3}",
            r.label,
            r.ok,
            r.errors,
            r.not_sent,
            r.per_sec,
            ms(r.p50_us),
            ms(r.p90_us),
            ms(r.p99_us),
            ms(r.p999_us),
            ms(r.max_us),
            ms(r.error_p99_us)
        );
    }
    if rows.iter().any(|r| r.not_sent > 0) {
        println!(
            "(percentiles include the requests not sent, at the time they had waited when the run gave up: a lower bound)"
        );
    }
    rows
}

fn quantile(h: &Option<Histogram<u64>>, p: f64) -> u64 {
    h.as_ref().map_or(0, |h| h.value_at_quantile(p))
}

fn row(label: &str, s: &Series, secs: f64) -> Row {
    Row {
        label: label.to_string(),
        ok: s.ok,
        errors: s.errors,
        not_sent: s.not_sent,
        per_sec: (s.ok + s.errors) as f64 / secs,
        p50_us: quantile(&s.latency, 0.5),
        p90_us: quantile(&s.latency, 0.9),
        p99_us: quantile(&s.latency, 0.99),
        p999_us: quantile(&s.latency, 0.999),
        max_us: s.latency.as_ref().map_or(0, |h| h.max()),
        error_p50_us: quantile(&s.error_latency, 0.5),
        error_p99_us: quantile(&s.error_latency, 0.99),
        error_max_us: s.error_latency.as_ref().map_or(0, |h| h.max()),
    }
}

pub fn write_json(path: &Path, value: &impl Serialize) -> Result<(), String> {
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_and_requests_not_sent_stay_apart_from_the_successes() {
        let mut s = Series::default();
        for us in [100, 200, 300] {
            s.record(true, us);
        }
        s.record(false, 5);
        s.record_not_sent(Some(9_000_000));
        s.record_not_sent(None);
        let r = row("x", &s, 1.0);
        assert_eq!((r.ok, r.errors, r.not_sent), (3, 1, 2));
        // The fast error does not pull the percentiles down; the request not sent, at its lower
        // bound, pulls the tail up.
        assert_eq!(r.p50_us, 200);
        assert!(r.max_us >= 8_990_000, "{}", r.max_us);
        assert_eq!(r.error_p99_us, 5);
        let mut all = Series::default();
        all.merge(s);
        all.merge(Series::default());
        assert_eq!(row("all", &all, 2.0).per_sec, 2.0);
    }
}
