//! The benchmark's figures: one run's sample from wrk's JSON line and /proc, the median of
//! several runs, the printed table with kakehi's ratios, and the same as JSON. Latency is
//! wrk's: from writing a request to reading its whole response (a connection's TCP and TLS
//! handshakes are not in it). A scenario where kakehi's p99 is over [`P99_LIMIT`] times
//! nginx's is flagged.

use super::procfs::CpuTicks;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// kakehi's p99 latency over this many times nginx's is flagged (issue 19).
pub const P99_LIMIT: f64 = 1.2;

/// One measured run of one proxy in one scenario.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub requests: u64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// Proxy-tree CPU time per request, in microseconds.
    pub cpu_us_per_req: f64,
    /// The part of it in user space (utime).
    pub user_us_per_req: f64,
    /// The part of it in the kernel (stime).
    pub kernel_us_per_req: f64,
    /// Peak resident set of the proxy tree, KiB.
    pub peak_rss_kib: u64,
    /// Socket errors, timeouts and non-2xx/3xx answers, as wrk counts them.
    pub errors: u64,
    /// Resident memory per idle keep-alive connection, in bytes (scenarios that hold some).
    pub idle_bytes_per_conn: Option<f64>,
}

/// From h2load's `requests: N total, N started, N done, N succeeded, N failed, N errored, N
/// timeout` line: the requests done and those of them that did not succeed (h2load's
/// `failed` counts the errored and timed-out ones too).
fn h2load_counts(output: &str) -> Option<(u64, u64)> {
    let line = output.lines().find_map(|l| l.strip_prefix("requests: "))?;
    let (mut done, mut succeeded) = (None, None);
    for part in line.split(", ") {
        let mut words = part.split_whitespace();
        let n: u64 = words.next()?.parse().ok()?;
        match words.next()? {
            "done" => done = Some(n),
            "succeeded" => succeeded = Some(n),
            _ => {}
        }
    }
    let done = done?;
    Some((done, done.saturating_sub(succeeded?)))
}

impl Sample {
    /// Builds a sample from wrk's `WRK_JSON` line and the proxy's CPU ticks over the run.
    pub fn from_wrk(
        output: &str,
        cpu: CpuTicks,
        ticks_per_second: u64,
        peak_rss_kib: u64,
    ) -> Result<Self> {
        let line = output
            .lines()
            .find_map(|line| line.strip_prefix("WRK_JSON "))
            .context("wrk printed no WRK_JSON line (see target/bench/logs/wrk.log)")?;
        let wrk: Value = serde_json::from_str(line).context("parsing wrk's JSON line")?;
        let field = |name: &str| wrk[name].as_f64().unwrap_or(0.0);
        let requests = wrk["requests"].as_u64().unwrap_or(0);
        if requests == 0 {
            bail!("wrk completed no request");
        }
        let seconds = field("duration_us") / 1e6;
        let per_request =
            |ticks: u64| ticks as f64 / ticks_per_second as f64 * 1e6 / requests as f64;
        let errors = [
            "connect_errors",
            "read_errors",
            "write_errors",
            "status_errors",
            "timeouts",
        ]
        .iter()
        .map(|name| wrk[name].as_u64().unwrap_or(0))
        .sum();
        Ok(Self {
            requests,
            rps: if seconds > 0.0 {
                requests as f64 / seconds
            } else {
                0.0
            },
            p50_ms: field("p50_us") / 1e3,
            p99_ms: field("p99_us") / 1e3,
            p999_ms: field("p999_us") / 1e3,
            cpu_us_per_req: per_request(cpu.total()),
            user_us_per_req: per_request(cpu.user),
            kernel_us_per_req: per_request(cpu.kernel),
            peak_rss_kib,
            errors,
            idle_bytes_per_conn: None,
        })
    }

    /// Builds a sample from h2load's summary (`output`) and its per-request log (`log`:
    /// start time, status, microseconds to the end of the response, tab-separated), and the
    /// proxy's CPU ticks over the run.
    pub fn from_h2load(
        output: &str,
        log: &std::path::Path,
        cpu: CpuTicks,
        ticks_per_second: u64,
        peak_rss_kib: u64,
    ) -> Result<Self> {
        let (requests, failed) = h2load_counts(output)
            .context("h2load printed no `requests:` line (see target/bench/logs/wrk.log)")?;
        if requests == 0 {
            bail!("h2load completed no request");
        }
        let seconds = output
            .lines()
            .find_map(|l| l.strip_prefix("finished in "))
            .and_then(|rest| rest.split('s').next())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .context("h2load printed no `finished in` line")?;
        let text = std::fs::read_to_string(log)
            .with_context(|| format!("reading h2load's log {}", log.display()))?;
        let mut durations: Vec<u64> = Vec::new();
        let mut bad_status = 0u64;
        for line in text.lines() {
            let mut cols = line.split('\t');
            let (_, status, us) = (cols.next(), cols.next(), cols.next());
            let status: u16 = status.and_then(|s| s.trim().parse().ok()).unwrap_or(0);
            if !(200..400).contains(&status) {
                bad_status += 1;
            }
            if let Some(us) = us.and_then(|u| u.trim().parse::<u64>().ok()) {
                durations.push(us);
            }
        }
        durations.sort_unstable();
        let pick = |q: f64| -> f64 {
            if durations.is_empty() {
                return 0.0;
            }
            let i = ((durations.len() as f64 - 1.0) * q).round() as usize;
            durations.get(i).copied().unwrap_or(0) as f64 / 1e3
        };
        let per_request =
            |ticks: u64| ticks as f64 / ticks_per_second as f64 * 1e6 / requests as f64;
        Ok(Self {
            requests,
            rps: if seconds > 0.0 {
                requests as f64 / seconds
            } else {
                0.0
            },
            p50_ms: pick(0.5),
            p99_ms: pick(0.99),
            p999_ms: pick(0.999),
            cpu_us_per_req: per_request(cpu.total()),
            user_us_per_req: per_request(cpu.user),
            kernel_us_per_req: per_request(cpu.kernel),
            peak_rss_kib,
            errors: failed.max(bad_status),
            idle_bytes_per_conn: None,
        })
    }

    /// CPU-seconds spent by the proxy per 10,000 requests.
    pub fn cpu_s_per_10k(&self) -> f64 {
        self.cpu_us_per_req * 1e4 / 1e6
    }

    pub fn to_json(self) -> Value {
        json!({
            "requests": self.requests,
            "rps": round(self.rps, 1),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "p999_ms": round(self.p999_ms, 3),
            "cpu_us_per_req": round(self.cpu_us_per_req, 2),
            "cpu_s_per_10k_req": round(self.cpu_s_per_10k(), 4),
            "user_us_per_req": round(self.user_us_per_req, 2),
            "kernel_us_per_req": round(self.kernel_us_per_req, 2),
            "peak_rss_kib": self.peak_rss_kib,
            "errors": self.errors,
            "idle_bytes_per_conn": self.idle_bytes_per_conn.map(|b| round(b, 0)),
        })
    }
}

/// The median of each figure on its own (not the sample of the median run).
pub fn median(samples: &[Sample]) -> Option<Sample> {
    if samples.is_empty() {
        return None;
    }
    let of = |get: &dyn Fn(&Sample) -> f64| {
        let mut values: Vec<f64> = samples.iter().map(get).collect();
        values.sort_by(f64::total_cmp);
        let mid = values.len() / 2;
        if mid * 2 == values.len() {
            (values[mid - 1] + values[mid]) / 2.0
        } else {
            values[mid]
        }
    };
    Some(Sample {
        requests: of(&|s| s.requests as f64) as u64,
        rps: of(&|s| s.rps),
        p50_ms: of(&|s| s.p50_ms),
        p99_ms: of(&|s| s.p99_ms),
        p999_ms: of(&|s| s.p999_ms),
        cpu_us_per_req: of(&|s| s.cpu_us_per_req),
        user_us_per_req: of(&|s| s.user_us_per_req),
        kernel_us_per_req: of(&|s| s.kernel_us_per_req),
        peak_rss_kib: of(&|s| s.peak_rss_kib as f64) as u64,
        errors: samples.iter().map(|s| s.errors).sum(),
        // The first run's: later runs find the memory the first grew still there.
        idle_bytes_per_conn: samples.iter().find_map(|s| s.idle_bytes_per_conn),
    })
}

/// kakehi's figures divided by another proxy's.
pub fn ratios(kakehi: &Sample, other: &Sample) -> Value {
    let ratio = |a: f64, b: f64| {
        if b > 0.0 {
            json!(round(a / b, 3))
        } else {
            Value::Null
        }
    };
    json!({
        "rps": ratio(kakehi.rps, other.rps),
        "p50_ms": ratio(kakehi.p50_ms, other.p50_ms),
        "p99_ms": ratio(kakehi.p99_ms, other.p99_ms),
        "p999_ms": ratio(kakehi.p999_ms, other.p999_ms),
        "cpu_us_per_req": ratio(kakehi.cpu_us_per_req, other.cpu_us_per_req),
        "user_us_per_req": ratio(kakehi.user_us_per_req, other.user_us_per_req),
        "kernel_us_per_req": ratio(kakehi.kernel_us_per_req, other.kernel_us_per_req),
        "peak_rss_kib": ratio(kakehi.peak_rss_kib as f64, other.peak_rss_kib as f64),
    })
}

fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

/// The table's header line.
pub fn header() -> String {
    format!(
        "  {:<9} {:>10} {:>8} {:>8} {:>9} {:>8} {:>7} {:>7} {:>10} {:>9} {:>7}",
        "proxy",
        "req/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "µs/req",
        "user",
        "kernel",
        "CPU-s/10k",
        "RSS MiB",
        "errors"
    )
}

/// One proxy's line of the table.
pub fn row(proxy: &str, sample: &Sample) -> String {
    format!(
        "  {:<9} {:>10.0} {:>8.2} {:>8.2} {:>9.2} {:>8.1} {:>7.1} {:>7.1} {:>10.3} {:>9.1} {:>7}",
        proxy,
        sample.rps,
        sample.p50_ms,
        sample.p99_ms,
        sample.p999_ms,
        sample.cpu_us_per_req,
        sample.user_us_per_req,
        sample.kernel_us_per_req,
        sample.cpu_s_per_10k(),
        sample.peak_rss_kib as f64 / 1024.0,
        sample.errors
    )
}

/// "kakehi/nginx: req/s 1.10×, µs/req 0.80× (goal ≤ 0.90×: met), p50 0.9×, p99 0.90×,
/// p99.9 1.00×, RSS 0.50×"; the goal (`goal`: the scenario's CPU ratio to nginx's) is shown
/// against nginx only.
pub fn ratio_line(other: &str, kakehi: &Sample, theirs: &Sample, goal: f64) -> String {
    let r = |a: f64, b: f64| {
        if b > 0.0 {
            format!("{:.2}×", a / b)
        } else {
            "n/a".into()
        }
    };
    let goal = if other == "nginx" && theirs.cpu_us_per_req > 0.0 {
        let met = kakehi.cpu_us_per_req / theirs.cpu_us_per_req <= goal;
        format!(
            " (goal ≤ {goal:.2}×: {})",
            if met { "met" } else { "short" }
        )
    } else {
        String::new()
    };
    format!(
        "  kakehi/{other}: req/s {}, µs/req {}{goal} (user {}, kernel {}), p50 {}, p99 {}, \
         p99.9 {}, RSS {}",
        r(kakehi.rps, theirs.rps),
        r(kakehi.cpu_us_per_req, theirs.cpu_us_per_req),
        r(kakehi.user_us_per_req, theirs.user_us_per_req),
        r(kakehi.kernel_us_per_req, theirs.kernel_us_per_req),
        r(kakehi.p50_ms, theirs.p50_ms),
        r(kakehi.p99_ms, theirs.p99_ms),
        r(kakehi.p999_ms, theirs.p999_ms),
        r(kakehi.peak_rss_kib as f64, theirs.peak_rss_kib as f64),
    )
}

/// kakehi's p99 is over [`P99_LIMIT`] times nginx's.
pub fn p99_flagged(kakehi: &Sample, nginx: &Sample) -> bool {
    nginx.p99_ms > 0.0 && kakehi.p99_ms > P99_LIMIT * nginx.p99_ms
}

/// The latency comparison printed under a scenario's table, beside the CPU one:
/// "latency kakehi vs nginx: p50 0.61 / 0.56 ms, p99 5.78 / 1.25 ms (4.62×: over 1.2×),
/// p99.9 ...; CPU 1.11×".
pub fn latency_line(kakehi: &Sample, nginx: &Sample) -> String {
    let r = |a: f64, b: f64| {
        if b > 0.0 {
            format!("{:.2}×", a / b)
        } else {
            "n/a".into()
        }
    };
    let flag = if p99_flagged(kakehi, nginx) {
        format!(": OVER {P99_LIMIT}×")
    } else {
        String::new()
    };
    format!(
        "  latency kakehi vs nginx: p50 {:.2} / {:.2} ms ({}), p99 {:.2} / {:.2} ms ({}{flag}), \
         p99.9 {:.2} / {:.2} ms ({}); CPU µs/req {:.1} / {:.1} ({})",
        kakehi.p50_ms,
        nginx.p50_ms,
        r(kakehi.p50_ms, nginx.p50_ms),
        kakehi.p99_ms,
        nginx.p99_ms,
        r(kakehi.p99_ms, nginx.p99_ms),
        kakehi.p999_ms,
        nginx.p999_ms,
        r(kakehi.p999_ms, nginx.p999_ms),
        kakehi.cpu_us_per_req,
        nginx.cpu_us_per_req,
        r(kakehi.cpu_us_per_req, nginx.cpu_us_per_req),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h2load_summary_and_log_make_a_sample() {
        let out = "finished in 2.00s, 500.00 req/s, 1.00MB/s\n\
            requests: 1000 total, 1000 started, 1000 done, 998 succeeded, 2 failed, 2 errored, 0 timeout\n";
        assert_eq!(h2load_counts(out), Some((1000, 2)));
        let dir = std::env::temp_dir().join(format!("h2load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("log.tsv");
        let lines: String = (1..=1000)
            .map(|i| format!("1700000000000000\t200\t{}\n", i * 10))
            .collect();
        std::fs::write(&log, lines).unwrap();
        let cpu = CpuTicks {
            user: 50,
            kernel: 50,
        };
        let s = Sample::from_h2load(out, &log, cpu, 100, 1234).unwrap();
        assert_eq!(s.requests, 1000);
        assert!((s.rps - 500.0).abs() < 1e-9);
        assert!((s.p50_ms - 5.0).abs() < 0.02, "{}", s.p50_ms);
        assert!((s.p99_ms - 9.9).abs() < 0.02, "{}", s.p99_ms);
        assert!((s.cpu_us_per_req - 1000.0).abs() < 1e-6);
        assert_eq!(s.errors, 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    const WRK: &str = "Running 1s test @ http://127.0.0.1:1/\n\
        WRK_JSON {\"requests\":20000,\"duration_us\":2000000,\"bytes\":1,\"connect_errors\":0,\
        \"read_errors\":1,\"write_errors\":0,\"status_errors\":2,\"timeouts\":0,\"p50_us\":1500,\
        \"p90_us\":2000,\"p99_us\":4000,\"p999_us\":6000,\"max_us\":9000,\"mean_us\":1600.0}\n";

    const TICKS: CpuTicks = CpuTicks {
        user: 40,
        kernel: 10,
    };

    #[test]
    fn a_sample_comes_from_wrk_and_proc() {
        // 50 ticks at 100 Hz = 0.5 s of CPU for 20,000 requests = 25 µs each: 20 in user
        // space, 5 in the kernel.
        let sample = Sample::from_wrk(WRK, TICKS, 100, 4096).unwrap();
        assert_eq!(sample.requests, 20000);
        assert!((sample.rps - 10000.0).abs() < 1e-6);
        assert!((sample.p50_ms - 1.5).abs() < 1e-9);
        assert!((sample.p99_ms - 4.0).abs() < 1e-9);
        assert!((sample.p999_ms - 6.0).abs() < 1e-9);
        assert!((sample.cpu_us_per_req - 25.0).abs() < 1e-9);
        assert!((sample.user_us_per_req - 20.0).abs() < 1e-9);
        assert!((sample.kernel_us_per_req - 5.0).abs() < 1e-9);
        assert!((sample.cpu_s_per_10k() - 0.25).abs() < 1e-9);
        assert_eq!(sample.errors, 3);
    }

    #[test]
    fn no_json_line_or_no_request_is_an_error() {
        assert!(Sample::from_wrk("Running 1s test\n", TICKS, 100, 1).is_err());
        let none = WRK.replace("\"requests\":20000", "\"requests\":0");
        assert!(Sample::from_wrk(&none, TICKS, 100, 1).is_err());
    }

    #[test]
    fn median_is_taken_figure_by_figure() {
        let base = Sample::from_wrk(WRK, TICKS, 100, 4096).unwrap();
        let samples = [
            Sample {
                rps: 3.0,
                p99_ms: 9.0,
                ..base
            },
            Sample {
                rps: 1.0,
                p99_ms: 1.0,
                ..base
            },
            Sample {
                rps: 2.0,
                p99_ms: 5.0,
                ..base
            },
        ];
        let m = median(&samples).unwrap();
        assert_eq!((m.rps, m.p99_ms), (2.0, 5.0));
        let even = median(&samples[..2]).unwrap();
        assert_eq!(even.rps, 2.0);
        assert!(median(&[]).is_none());
    }

    #[test]
    fn ratios_divide_kakehi_by_the_other() {
        let base = Sample::from_wrk(WRK, TICKS, 100, 4096).unwrap();
        let other = Sample {
            cpu_us_per_req: 50.0,
            ..base
        };
        let value = ratios(&base, &other);
        assert_eq!(value["cpu_us_per_req"].as_f64(), Some(0.5));
        assert_eq!(value["rps"].as_f64(), Some(1.0));
        assert!(
            ratio_line("nginx", &base, &other, 0.65).contains("µs/req 0.50× (goal ≤ 0.65×: met)")
        );
        let kernel_heavy = Sample {
            kernel_us_per_req: 10.0,
            ..base
        };
        assert_eq!(
            ratios(&kernel_heavy, &base)["kernel_us_per_req"].as_f64(),
            Some(2.0)
        );
        assert!(
            ratio_line("nginx", &kernel_heavy, &base, 0.9).contains("(user 1.00×, kernel 2.00×)")
        );
        assert!(ratio_line("nginx", &kernel_heavy, &base, 0.9).contains("(goal ≤ 0.90×: short)"));
        assert!(ratio_line("nginx", &base, &other, 0.9).contains("p99.9 1.00×"));
    }

    #[test]
    fn a_p99_over_the_limit_is_flagged_beside_the_cpu_figure() {
        let nginx = Sample::from_wrk(WRK, TICKS, 100, 4096).unwrap();
        let slow = Sample {
            p99_ms: 5.0,
            ..nginx
        };
        assert!(p99_flagged(&slow, &nginx), "5 ms against 4 ms is 1.25×");
        let line = latency_line(&slow, &nginx);
        assert!(
            line.contains("p99 5.00 / 4.00 ms (1.25×: OVER 1.2×)"),
            "{line}"
        );
        assert!(line.contains("p99.9 6.00 / 6.00 ms (1.00×)"), "{line}");
        assert!(line.contains("CPU µs/req 25.0 / 25.0 (1.00×)"), "{line}");
        let close = Sample {
            p99_ms: 4.8,
            ..nginx
        };
        assert!(!p99_flagged(&close, &nginx), "1.2× is not over 1.2×");
        assert!(!latency_line(&close, &nginx).contains("OVER"));
    }
}
