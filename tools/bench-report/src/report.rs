//! The markdown reports: `report` (COUNT=cpu: medians per proxy, ratios, the rate limiter's
//! cost) and `report_instructions` (COUNT=instructions). Whatever they state besides the
//! results — settings, the machine, tools' versions, Redis losses from the logs — comes from
//! bench.sh as [`Facts`].

use crate::results::{cpu_with_redis, max_steal, median_of, paired, total, Pair, Run};

/// What bench.sh knows that the results file does not. Printed as given.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Facts {
    /// The runs, in table order.
    pub proxies: Vec<String>,
    /// `date -u '+%Y-%m-%d %H:%M UTC'`.
    pub date: String,
    /// The short commit, with " (dirty)" when the work tree differs from it.
    pub commit: String,
    pub warmup: String,
    pub connections: String,
    pub duration: String,
    pub rounds: String,
    // The rest: COUNT=cpu only.
    /// `nproc`.
    pub cores: String,
    pub cpu_model: String,
    pub proxy_cpu: String,
    pub load_cpu: String,
    pub upstream_cpu: String,
    pub redis_cpu: String,
    pub wrk_threads: String,
    /// The rate-limiter runs' tier limit (never reached).
    pub rl_limit: String,
    /// `nginx -v` without its "nginx version: " (e.g. `nginx/1.22.1`).
    pub nginx: String,
    /// HAProxy's version number.
    pub haproxy: String,
    /// `wrk -v`'s first two words (e.g. `wrk 4.1.0`).
    pub wrk: String,
    /// redis-server's version number; asked only when a run uses Redis.
    pub redis: String,
    /// Per Redis-backed run: how many times its log says it lost Redis over the whole benchmark
    /// (measured runs and idle time alike).
    pub redis_losses_logged: Vec<(String, i64)>,
}

/// The runs that talk to Redis.
pub fn uses_redis(proxy: &str) -> bool {
    proxy == "tollgate-rl-exact" || proxy == "tollgate-rl-batched"
}

impl Facts {
    fn needs_redis(&self) -> bool {
        self.proxies.iter().any(|p| uses_redis(p))
    }

    fn redis_losses_logged(&self, proxy: &str) -> Option<i64> {
        self.redis_losses_logged
            .iter()
            .find(|(p, _)| p == proxy)
            .map(|&(_, n)| n)
    }
}

/// A ratio column: `1.23×`, or `n/a` when there is nothing to compare with.
fn ratio(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.2}×"))
}

/// The report of a COUNT=cpu benchmark, one line per element.
pub fn report(runs: &[Run], facts: &Facts) -> Vec<String> {
    let f = facts;
    let redis_cpu = if f.needs_redis() {
        format!(", Redis on CPU {}", f.redis_cpu)
    } else {
        String::new()
    };
    let redis_version = if f.needs_redis() {
        format!(", Redis {}", f.redis)
    } else {
        String::new()
    };
    let mut out = vec![
        "# Tollgate whole-gateway benchmark".to_string(),
        String::new(),
        format!("- {}, tollgate {}", f.date, f.commit),
        format!(
            "- {} cores ({}); proxy on CPU {}, wrk on CPU {}, upstream on CPU {}{redis_cpu}",
            f.cores, f.cpu_model, f.proxy_cpu, f.load_cpu, f.upstream_cpu
        ),
        format!(
            "- wrk -t{} -c{} -d{} (after a {} warm-up), {} interleaved round(s); medians shown",
            f.wrk_threads, f.connections, f.duration, f.warmup, f.rounds
        ),
        format!("- {}, HAProxy {}, {}, pingora 0.9.1{redis_version}", f.nginx, f.haproxy, f.wrk),
        "- CPU/req = utime+stime of all the proxy's processes over the run / requests completed".to_string(),
        "- the ratio columns are medians over rounds of the ratio within each round (see `paired` in tools/bench-report)"
            .to_string(),
        String::new(),
        "| proxy | req/s | p50 ms | p99 ms | CPU µs/req | CPU vs NGINX | CPU vs reference | p99 vs reference | steal % (max) | socket errors | non-2xx |".to_string(),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|".to_string(),
    ];
    for name in &f.proxies {
        let m = |value: fn(&Run) -> f64| median_of(runs, name, value).unwrap_or(0.0);
        out.push(format!(
            "| {name} | {:.0} | {:.3} | {:.3} | {:.2} | {} | {} | {} | {:.1} | {} | {} |",
            m(|r| r.rps),
            m(|r| r.p50_us) / 1000.0,
            m(|r| r.p99_us) / 1000.0,
            m(|r| r.cost),
            ratio(paired(runs, Pair::Ratio, name, "nginx", |r| r.cost)),
            ratio(paired(runs, Pair::Ratio, name, "reference", |r| r.cost)),
            ratio(paired(runs, Pair::Ratio, name, "reference", |r| r.p99_us)),
            max_steal(runs, Some(name)),
            total(runs, name, |r| r.socket_errors),
            total(runs, name, |r| r.non_2xx),
        ));
    }

    if f.proxies.iter().any(|p| p == "tollgate-gateway")
        && f.proxies.iter().any(|p| p == "nginx-gateway")
    {
        out.extend([
            String::new(),
            format!(
                "Gateway work on both sides (API key, a limit never reached, JSON access log to a file): tollgate-gateway uses {} the CPU per request of nginx-gateway (target ≤ 1.25×).",
                ratio(paired(runs, Pair::Ratio, "tollgate-gateway", "nginx-gateway", |r| r.cost))
            ),
        ]);
    }

    let worst = max_steal(runs, None);
    if worst > 5.0 {
        out.extend([
            String::new(),
            // `{worst}` prints 7 for 7.0 and 25.3 for 25.3, as awk printed the number.
            format!("**The hypervisor took up to {worst}% of the machine's CPU time during some runs** (steal): those runs"),
            "measured a slower machine, and CPU/req there is inflated by cache and scheduling effects. Compare".to_string(),
            "within a round, or count instructions instead (`COUNT=instructions`), which steal does not change.".to_string(),
        ]);
    }

    if !f.proxies.iter().any(|p| p.starts_with("tollgate-rl-")) {
        return out;
    }
    out.extend([
        String::new(),
        "## Rate limiter cost (vs plain Tollgate)".to_string(),
        String::new(),
        format!("- Each run is plain Tollgate plus `tiers: {{ anonymous: {{ limit: {}, window: 1m }} }}`, a limit never reached: every request is counted (one counter: anonymous callers are keyed by client IP, and wrk is one client) and allowed. local: no `redis:` section; exact: `redis: {{ timeout: 50ms }}`, `rate_limit: {{ mode: exact }}`; batched: `rate_limit: {{ mode: batched, sync_interval: 100ms }}`.", f.rl_limit),
        "- Redis CPU/req = utime+stime of the private redis-server over the run / requests completed. It is not in the proxy's CPU/req; \"CPU+Redis\" adds it. It includes the idle chores of the other Redis-backed Tollgate (1 s heartbeat, 100 ms batched sync), a few calls per second.".to_string(),
        "- Targets (issue): local CPU/req ≤ 1.1× plain Tollgate, batched ≤ 1.2×, exact p99 within 1 ms of plain Tollgate.".to_string(),
        String::new(),
        "| run | CPU µs/req | Redis CPU µs/req | CPU vs tollgate | CPU+Redis vs tollgate | p99 ms | p99 vs tollgate | target |".to_string(),
        "|---|---:|---:|---:|---:|---:|---:|---|".to_string(),
    ]);
    for name in f.proxies.iter().filter(|p| p.starts_with("tollgate-rl-")) {
        let p99 = median_of(runs, name, |r| r.p99_us).unwrap_or(0.0);
        let cpu = median_of(runs, name, |r| r.cost).unwrap_or(0.0);
        let redis = if uses_redis(name) {
            format!(
                "{:.2}",
                median_of(runs, name, |r| r.redis_cpu_us.unwrap_or(0.0)).unwrap_or(0.0)
            )
        } else {
            "—".to_string()
        };
        let vs_tollgate = paired(runs, Pair::Ratio, name, "tollgate", |r| r.cost);
        let with_redis = paired(runs, Pair::Ratio, name, "tollgate", cpu_with_redis);
        let p99_diff_ms =
            paired(runs, Pair::Diff, name, "tollgate", |r| r.p99_us).map(|d| d / 1000.0);
        let (target, met) = match name.as_str() {
            "tollgate-rl-local" => ("CPU ≤ 1.1×: ", vs_tollgate.map(|v| v <= 1.1)),
            "tollgate-rl-batched" => ("CPU ≤ 1.2×: ", vs_tollgate.map(|v| v <= 1.2)),
            "tollgate-rl-exact" => ("p99 ≤ +1 ms: ", p99_diff_ms.map(|d| d <= 1.0)),
            _ => ("", None),
        };
        // A verdict needs both comparisons (as the p99 column does).
        let have = vs_tollgate.is_some() && p99_diff_ms.is_some();
        let verdict = match met {
            _ if target.is_empty() => "",
            Some(true) if have => "met",
            Some(false) if have => "**missed**",
            _ => "n/a",
        };
        out.push(format!(
            "| {name} | {cpu:.2} | {redis} | {} | {} | {:.3} | {} | {target}{verdict} |",
            ratio(vs_tollgate),
            ratio(with_redis),
            p99 / 1000.0,
            match p99_diff_ms {
                Some(d) if have => format!("{d:+.3} ms"),
                _ => "n/a".to_string(),
            },
        ));
    }

    // A Redis-backed run that lost Redis counted locally for a while: say so next to its numbers.
    // Losses while another run had the cores are told apart: they do not touch this run's numbers.
    if f.needs_redis() {
        out.push(String::new());
    }
    for name in f.proxies.iter().filter(|p| uses_redis(p)) {
        let measured = total(runs, name, |r| r.redis_losses.unwrap_or(0));
        let measured = i64::try_from(measured).unwrap_or(i64::MAX);
        let idle = f.redis_losses_logged(name).unwrap_or(measured) - measured;
        if measured != 0 {
            out.push(format!("- **WARNING: {name} lost Redis {measured} time(s) during its measured runs**: it counted locally for a while, so its numbers are partly local mode."));
        } else {
            out.push(format!(
                "- {name}: Redis answered throughout its measured runs."
            ));
        }
        if idle != 0 {
            out.push(format!("- {name} lost Redis {idle} time(s) outside its measured runs (idle, while other runs loaded the cores; `timeout: 50ms`)."));
        }
    }
    out
}

/// The report of a COUNT=instructions benchmark: medians of instructions per request and the
/// ratios to the reference proxy and to plain Tollgate.
pub fn report_instructions(runs: &[Run], facts: &Facts) -> Vec<String> {
    let f = facts;
    let reference = median_of(runs, "reference", |r| r.cost);
    let plain = median_of(runs, "tollgate-plain", |r| r.cost);
    let ratio = |a: f64, b: Option<f64>| match b {
        Some(b) if b > 0.0 => format!("{:.3}×", a / b),
        _ => "n/a".to_string(),
    };
    let mut out = vec![
        "# Tollgate instructions per request (callgrind)".to_string(),
        String::new(),
        format!(
            "- {}, tollgate {}, pingora 0.9.1, release profile (fat LTO, 1 codegen unit, mimalloc)",
            f.date, f.commit
        ),
        format!(
            "- each proxy under `valgrind --tool=callgrind`; counters zeroed after a {} warm-up, then wrk -t1 -c{} -d{}; {} round(s), medians shown",
            f.warmup, f.connections, f.duration, f.rounds
        ),
        "- instructions/req = (instructions executed by every thread of the proxy over the run − the same over as long idle just before) / requests completed".to_string(),
        String::new(),
        "| proxy | requests | instructions/req | vs reference | vs tollgate-plain |".to_string(),
        "|---|---:|---:|---:|---:|".to_string(),
    ];
    for name in &f.proxies {
        let per = median_of(runs, name, |r| r.cost).unwrap_or(0.0);
        out.push(format!(
            "| {name} | {} | {per:.0} | {} | {} |",
            total(runs, name, |r| r.requests),
            ratio(per, reference),
            ratio(per, plain),
        ));
    }
    out
}

/// The lines as the file bench.sh writes: each ends with a newline.
pub fn text(lines: &[String]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::{parse, tests::cpu_row};

    fn facts(proxies: &[&str]) -> Facts {
        Facts {
            proxies: proxies.iter().map(|p| p.to_string()).collect(),
            date: "2025-01-02 03:04 UTC".into(),
            commit: "abc1234 (dirty)".into(),
            warmup: "1s".into(),
            connections: "64".into(),
            duration: "10s".into(),
            rounds: "3".into(),
            cores: "2".into(),
            cpu_model: "AMD EPYC 7B13".into(),
            proxy_cpu: "1".into(),
            load_cpu: "0".into(),
            upstream_cpu: "0".into(),
            redis_cpu: "0".into(),
            wrk_threads: "1".into(),
            rl_limit: "1000000000".into(),
            nginx: "nginx/1.22.1".into(),
            haproxy: "2.6.12".into(),
            wrk: "wrk 4.1.0".into(),
            redis: "7.0.15".into(),
            redis_losses_logged: vec![],
        }
    }

    fn runs(text: &str) -> Vec<Run> {
        match parse(text) {
            Ok(runs) => runs,
            Err(e) => panic!("{e}"),
        }
    }

    /// Compare line by line, so a failure names the first line that differs.
    fn assert_lines(got: &[String], want: &[&str]) {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(g, w, "line {}", i + 1);
        }
        assert_eq!(
            got.len(),
            want.len(),
            "line count; got:\n{}",
            got.join("\n")
        );
    }

    const HEADER: [&str; 11] = [
        "# Tollgate whole-gateway benchmark",
        "",
        "- 2025-01-02 03:04 UTC, tollgate abc1234 (dirty)",
        "- 2 cores (AMD EPYC 7B13); proxy on CPU 1, wrk on CPU 0, upstream on CPU 0",
        "- wrk -t1 -c64 -d10s (after a 1s warm-up), 3 interleaved round(s); medians shown",
        "- nginx/1.22.1, HAProxy 2.6.12, wrk 4.1.0, pingora 0.9.1",
        "- CPU/req = utime+stime of all the proxy's processes over the run / requests completed",
        "- the ratio columns are medians over rounds of the ratio within each round (see `paired` in tools/bench-report)",
        "",
        "| proxy | req/s | p50 ms | p99 ms | CPU µs/req | CPU vs NGINX | CPU vs reference | p99 vs reference | steal % (max) | socket errors | non-2xx |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ];

    /// Three proxies over three rounds, without Redis runs; reference missed round 3.
    fn three_proxies(steal: &str) -> String {
        let mut text = [
            cpu_row(
                "nginx", 1, "60000.10", 950, 1900, "16.00", 600001, "-", "-", "0.0",
            ),
            cpu_row(
                "nginx", 2, "61000.90", 970, 1960, "15.00", 610009, "-", "-", "1.5",
            ),
            cpu_row(
                "nginx", 3, "59000.40", 990, 2020, "20.00", 590004, "-", "-", "0.2",
            ),
            cpu_row(
                "reference",
                1,
                "35000.00",
                1600,
                3000,
                "32.00",
                350000,
                "-",
                "-",
                "0.0",
            ),
            cpu_row(
                "reference",
                2,
                "36000.00",
                1700,
                3300,
                "30.00",
                360000,
                "-",
                "-",
                "0.0",
            ),
            cpu_row(
                "tollgate", 1, "36500.50", 1650, 3600, "32.00", 365005, "-", "-", "0.0",
            ),
            cpu_row(
                "tollgate", 2, "37000.25", 1690, 3300, "33.00", 370002, "-", "-", steal,
            ),
            cpu_row(
                "tollgate", 3, "36000.75", 1710, 3500, "30.00", 360007, "-", "-", "4.0",
            ),
        ]
        .concat();
        // Socket errors and non-2xx answers in one tollgate round.
        text = text.replace("370002\t0\t0", "370002\t3\t7");
        text
    }

    #[test]
    fn report_without_redis_runs() {
        let runs = runs(&three_proxies("2.5"));
        let got = report(&runs, &facts(&["nginx", "reference", "tollgate"]));
        let mut want = HEADER.to_vec();
        want.extend([
            // rps medians 60000.10, 35500 (mean of two), 36500.50 -> rounded to whole requests
            // (36500.5 is a tie: it rounds to even, as printf does). p50/p99 in ms, CPU medians
            // 16, 31 (mean of 30 and 32), 32. CPU vs NGINX per round: 32/16 = 2, 30/15 = 2 for
            // reference; 32/16 = 2, 33/15 = 2.2, 30/20 = 1.5 for tollgate -> 2.00. vs reference:
            // rounds 1 and 2 only: 16/32 = 0.5, 15/30 = 0.5; tollgate 32/32 = 1, 33/30 = 1.1
            // -> 1.05; p99 1900/3000 = 0.6333, 1960/3300 = 0.5939 -> 0.6136; tollgate
            // 3600/3000 = 1.2, 3300/3300 = 1 -> 1.1.
            "| nginx | 60000 | 0.970 | 1.960 | 16.00 | 1.00× | 0.50× | 0.61× | 1.5 | 0 | 0 |",
            "| reference | 35500 | 1.650 | 3.150 | 31.00 | 2.00× | 1.00× | 1.00× | 0.0 | 0 | 0 |",
            "| tollgate | 36500 | 1.690 | 3.500 | 32.00 | 2.00× | 1.05× | 1.10× | 4.0 | 3 | 7 |",
        ]);
        assert_lines(&got, &want);
    }

    #[test]
    fn the_gateway_pair_gets_its_ratio() {
        let text = [
            cpu_row(
                "nginx-gateway",
                1,
                "50000.00",
                900,
                1800,
                "20.00",
                500000,
                "-",
                "-",
                "0.0",
            ),
            cpu_row(
                "nginx-gateway",
                2,
                "50000.00",
                900,
                1800,
                "25.00",
                500000,
                "-",
                "-",
                "0.0",
            ),
            cpu_row(
                "tollgate-gateway",
                1,
                "40000.00",
                1000,
                2000,
                "30.00",
                400000,
                "-",
                "-",
                "0.0",
            ),
            cpu_row(
                "tollgate-gateway",
                2,
                "40000.00",
                1000,
                2000,
                "35.00",
                400000,
                "-",
                "-",
                "0.0",
            ),
        ]
        .concat();
        let got = report(&runs(&text), &facts(&["nginx-gateway", "tollgate-gateway"]));
        // Per round 30/20 = 1.5 and 35/25 = 1.4: the median of the two is 1.45.
        let line = got.last().expect("a report");
        assert!(
            line.contains("uses 1.45× the CPU per request of nginx-gateway"),
            "{line}"
        );
    }

    #[test]
    fn steal_warning_only_above_five_percent() {
        let fx = facts(&["nginx", "reference", "tollgate"]);
        let at_five = report(&runs(&three_proxies("5.0")), &fx);
        assert_eq!(at_five.len(), HEADER.len() + 3);
        assert!(!at_five.iter().any(|l| l.contains("hypervisor")));

        let above = report(&runs(&three_proxies("5.1")), &fx);
        assert_eq!(
            above[HEADER.len() + 2],
            "| tollgate | 36500 | 1.690 | 3.500 | 32.00 | 2.00× | 1.05× | 1.10× | 5.1 | 3 | 7 |"
        );
        assert_lines(
            &above[HEADER.len() + 3..],
            &[
                "",
                "**The hypervisor took up to 5.1% of the machine's CPU time during some runs** (steal): those runs",
                "measured a slower machine, and CPU/req there is inflated by cache and scheduling effects. Compare",
                "within a round, or count instructions instead (`COUNT=instructions`), which steal does not change.",
            ],
        );

        // A whole percentage prints without decimals, as the shell's awk printed it.
        let whole = report(&runs(&three_proxies("25.0")), &fx);
        assert!(whole
            .iter()
            .any(|l| l.starts_with("**The hypervisor took up to 25% of")));
    }

    #[test]
    fn report_with_rate_limiter_runs() {
        let text = [
            cpu_row(
                "tollgate", 1, "36000", 1600, 3000, "20.00", 360000, "-", "-", "0.0",
            ),
            cpu_row(
                "tollgate", 2, "37000", 1700, 3200, "25.00", 370000, "-", "-", "0.0",
            ),
            cpu_row(
                "tollgate", 3, "35000", 1650, 3100, "20.00", 350000, "-", "-", "0.0",
            ),
            cpu_row(
                "tollgate-rl-local",
                1,
                "35000",
                1620,
                3050,
                "21.00",
                350000,
                "-",
                "-",
                "0.0",
            ),
            cpu_row(
                "tollgate-rl-local",
                2,
                "36000",
                1720,
                3300,
                "26.00",
                360000,
                "-",
                "-",
                "0.0",
            ),
            cpu_row(
                "tollgate-rl-local",
                3,
                "34000",
                1660,
                3000,
                "22.00",
                340000,
                "-",
                "-",
                "0.0",
            ),
            cpu_row(
                "tollgate-rl-exact",
                1,
                "30000",
                1800,
                4500,
                "24.00",
                300000,
                "2.00",
                "0",
                "0.0",
            ),
            cpu_row(
                "tollgate-rl-exact",
                2,
                "31000",
                1900,
                4000,
                "30.00",
                310000,
                "5.00",
                "1",
                "0.0",
            ),
            cpu_row(
                "tollgate-rl-exact",
                3,
                "29000",
                1850,
                4200,
                "24.00",
                290000,
                "3.00",
                "0",
                "0.0",
            ),
        ]
        .concat();
        let mut fx = facts(&["tollgate", "tollgate-rl-local", "tollgate-rl-exact"]);
        fx.redis_losses_logged = vec![("tollgate-rl-exact".into(), 3)];
        let got = report(&runs(&text), &fx);
        let mut want = HEADER.to_vec();
        // With a Redis run: Redis's core and version join the settings.
        want[3] = "- 2 cores (AMD EPYC 7B13); proxy on CPU 1, wrk on CPU 0, upstream on CPU 0, Redis on CPU 0";
        want[5] = "- nginx/1.22.1, HAProxy 2.6.12, wrk 4.1.0, pingora 0.9.1, Redis 7.0.15";
        want.extend([
            // No nginx or reference runs: their ratios are n/a.
            "| tollgate | 36000 | 1.650 | 3.100 | 20.00 | n/a | n/a | n/a | 0.0 | 0 | 0 |",
            "| tollgate-rl-local | 35000 | 1.660 | 3.050 | 22.00 | n/a | n/a | n/a | 0.0 | 0 | 0 |",
            "| tollgate-rl-exact | 30000 | 1.850 | 4.200 | 24.00 | n/a | n/a | n/a | 0.0 | 0 | 0 |",
            "",
            "## Rate limiter cost (vs plain Tollgate)",
            "",
            "- Each run is plain Tollgate plus `tiers: { anonymous: { limit: 1000000000, window: 1m } }`, a limit never reached: every request is counted (one counter: anonymous callers are keyed by client IP, and wrk is one client) and allowed. local: no `redis:` section; exact: `redis: { timeout: 50ms }`, `rate_limit: { mode: exact }`; batched: `rate_limit: { mode: batched, sync_interval: 100ms }`.",
            "- Redis CPU/req = utime+stime of the private redis-server over the run / requests completed. It is not in the proxy's CPU/req; \"CPU+Redis\" adds it. It includes the idle chores of the other Redis-backed Tollgate (1 s heartbeat, 100 ms batched sync), a few calls per second.",
            "- Targets (issue): local CPU/req ≤ 1.1× plain Tollgate, batched ≤ 1.2×, exact p99 within 1 ms of plain Tollgate.",
            "",
            "| run | CPU µs/req | Redis CPU µs/req | CPU vs tollgate | CPU+Redis vs tollgate | p99 ms | p99 vs tollgate | target |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
            // local: CPU 21/20 = 1.05, 26/25 = 1.04, 22/20 = 1.1 -> 1.05 (met); no Redis, so
            // CPU+Redis is the same; p99 +50, +100, -100 µs -> +0.050 ms.
            "| tollgate-rl-local | 22.00 | — | 1.05× | 1.05× | 3.050 | +0.050 ms | CPU ≤ 1.1×: met |",
            // exact: CPU 24/20 = 1.2, 30/25 = 1.2, 24/20 = 1.2; with Redis 26/20 = 1.3,
            // 35/25 = 1.4, 27/20 = 1.35 -> 1.35; Redis median 3; p99 +1500, +800, +1100 µs
            // -> +1.100 ms: missed.
            "| tollgate-rl-exact | 24.00 | 3.00 | 1.20× | 1.35× | 4.200 | +1.100 ms | p99 ≤ +1 ms: **missed** |",
            "",
            // One loss in a measured run, three logged in all: two while idle.
            "- **WARNING: tollgate-rl-exact lost Redis 1 time(s) during its measured runs**: it counted locally for a while, so its numbers are partly local mode.",
            "- tollgate-rl-exact lost Redis 2 time(s) outside its measured runs (idle, while other runs loaded the cores; `timeout: 50ms`).",
        ]);
        assert_lines(&got, &want);
    }

    #[test]
    fn limiter_targets_met_missed_or_not_applicable() {
        // batched alone against tollgate, and a run without a plain tollgate to compare with.
        let text = [
            cpu_row("tollgate", 1, "1", 1000, 3000, "20.00", 1, "-", "-", "0.0"),
            cpu_row(
                "tollgate-rl-batched",
                1,
                "1",
                1000,
                2500,
                "25.00",
                1,
                "0.40",
                "0",
                "0.0",
            ),
        ]
        .concat();
        let mut fx = facts(&["tollgate", "tollgate-rl-batched"]);
        fx.redis_losses_logged = vec![("tollgate-rl-batched".into(), 0)];
        let got = report(&runs(&text), &fx);
        // 25/20 = 1.25 > 1.2; with Redis 25.4/20 = 1.27; p99 -500 µs.
        assert_lines(
            &got[got.len() - 3..],
            &[
                "| tollgate-rl-batched | 25.00 | 0.40 | 1.25× | 1.27× | 2.500 | -0.500 ms | CPU ≤ 1.2×: **missed** |",
                "",
                "- tollgate-rl-batched: Redis answered throughout its measured runs.",
            ],
        );

        let fx = facts(&["tollgate-rl-local"]);
        let alone = cpu_row(
            "tollgate-rl-local",
            1,
            "1",
            1000,
            2500,
            "25.00",
            1,
            "-",
            "-",
            "0.0",
        );
        let got = report(&runs(&alone), &fx);
        assert_eq!(
            got.last().map(String::as_str),
            Some("| tollgate-rl-local | 25.00 | — | n/a | n/a | 2.500 | n/a | CPU ≤ 1.1×: n/a |")
        );
    }

    #[test]
    fn instruction_report() {
        let row = |proxy: &str, round: u32, per: &str, requests: u64| {
            format!("{proxy}\t{round}\t1000.00\t300\t800\t{per}\t{requests}\t0\t0\t-\t-\t-\n")
        };
        let text = [
            row("reference", 1, "60000", 40000),
            row("reference", 2, "60400", 40100),
            row("tollgate-plain", 1, "63000", 39000),
            row("tollgate-plain", 2, "63100", 39500),
            row("tollgate", 1, "77823", 38000),
            row("tollgate", 2, "77821", 38001),
        ]
        .concat();
        let mut fx = facts(&["reference", "tollgate-plain", "tollgate"]);
        fx.connections = "4".into();
        fx.duration = "5s".into();
        fx.rounds = "2".into();
        let got = report_instructions(&runs(&text), &fx);
        assert_lines(
            &got,
            &[
                "# Tollgate instructions per request (callgrind)",
                "",
                "- 2025-01-02 03:04 UTC, tollgate abc1234 (dirty), pingora 0.9.1, release profile (fat LTO, 1 codegen unit, mimalloc)",
                "- each proxy under `valgrind --tool=callgrind`; counters zeroed after a 1s warm-up, then wrk -t1 -c4 -d5s; 2 round(s), medians shown",
                "- instructions/req = (instructions executed by every thread of the proxy over the run − the same over as long idle just before) / requests completed",
                "",
                "| proxy | requests | instructions/req | vs reference | vs tollgate-plain |",
                "|---|---:|---:|---:|---:|",
                // Medians: reference 60200, tollgate-plain 63050, tollgate 77822.
                // 63050/60200 = 1.04734; 77822/60200 = 1.29272, 77822/63050 = 1.23429.
                "| reference | 80100 | 60200 | 1.000× | 0.955× |",
                "| tollgate-plain | 78500 | 63050 | 1.047× | 1.000× |",
                "| tollgate | 76001 | 77822 | 1.293× | 1.234× |",
            ],
        );

        // Without reference runs in the results its column is n/a.
        let without_reference: String = text
            .lines()
            .filter(|l| !l.starts_with("reference\t"))
            .map(|l| format!("{l}\n"))
            .collect();
        let fx = facts(&["tollgate-plain"]);
        let got = report_instructions(&runs(&without_reference), &fx);
        assert_eq!(
            got.last().map(String::as_str),
            Some("| tollgate-plain | 78500 | 63050 | n/a | 1.000× |")
        );
    }

    #[test]
    fn text_ends_every_line() {
        assert_eq!(text(&["a".into(), String::new(), "b".into()]), "a\n\nb\n");
    }
}
