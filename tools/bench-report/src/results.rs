//! The results file bench.sh writes, one tab-separated row per measured run, and the statistics
//! over it: medians per proxy, medians of per-round paired comparisons, totals, the worst steal.

use std::collections::HashMap;

/// One measured run: a row of the results file. The columns, in order:
///
/// `proxy round rps p50_us p99_us cost requests socket_errors non_2xx redis_cpu_us redis_losses
/// steal_percent`
///
/// `cost` is CPU µs per request (`COUNT=cpu`) or instructions per request
/// (`COUNT=instructions`). The last three are `-` where they do not apply: the Redis columns for
/// the runs without Redis, all three in instruction runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub proxy: String,
    pub round: String,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub cost: f64,
    pub requests: u64,
    pub socket_errors: u64,
    pub non_2xx: u64,
    pub redis_cpu_us: Option<f64>,
    pub redis_losses: Option<u64>,
    pub steal_percent: Option<f64>,
}

const COLUMNS: usize = 12;

/// Parse the results file. Empty lines are skipped; anything else that is not a full row is an
/// error naming its line.
pub fn parse(text: &str) -> Result<Vec<Run>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| parse_row(line).map_err(|e| format!("results line {}: {e}", i + 1)))
        .collect()
}

fn parse_row(line: &str) -> Result<Run, String> {
    let f: Vec<&str> = line.split('\t').collect();
    if f.len() != COLUMNS {
        return Err(format!("{} columns, expected {COLUMNS}", f.len()));
    }
    Ok(Run {
        proxy: f[0].to_string(),
        round: f[1].to_string(),
        rps: number(f[2], "rps")?,
        p50_us: number(f[3], "p50_us")?,
        p99_us: number(f[4], "p99_us")?,
        cost: number(f[5], "cost")?,
        requests: count(f[6], "requests")?,
        socket_errors: count(f[7], "socket_errors")?,
        non_2xx: count(f[8], "non_2xx")?,
        redis_cpu_us: dash_or(f[9], |v| number(v, "redis_cpu_us"))?,
        redis_losses: dash_or(f[10], |v| count(v, "redis_losses"))?,
        steal_percent: dash_or(f[11], |v| number(v, "steal_percent"))?,
    })
}

fn number(v: &str, what: &str) -> Result<f64, String> {
    v.parse()
        .map_err(|_| format!("{what}: not a number: {v:?}"))
}

fn count(v: &str, what: &str) -> Result<u64, String> {
    v.parse().map_err(|_| format!("{what}: not a count: {v:?}"))
}

fn dash_or<T>(v: &str, parse: impl Fn(&str) -> Result<T, String>) -> Result<Option<T>, String> {
    if v == "-" {
        Ok(None)
    } else {
        parse(v).map(Some)
    }
}

/// The proxy's CPU per request plus Redis's (bench.sh's "6+10" column): what a Redis-backed run
/// costs in all. Runs without Redis add nothing.
pub fn cpu_with_redis(run: &Run) -> f64 {
    run.cost + run.redis_cpu_us.unwrap_or(0.0)
}

/// The median of some values: the middle one, or the mean of the two middle ones for an even
/// count; `None` for none.
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

/// Median over the rounds of one proxy's value; `None` when the proxy did not run.
pub fn median_of(runs: &[Run], proxy: &str, value: impl Fn(&Run) -> f64) -> Option<f64> {
    median(
        runs.iter()
            .filter(|r| r.proxy == proxy)
            .map(value)
            .collect(),
    )
}

/// How `paired` compares A with B within a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pair {
    /// A / B (rounds where B is 0 are left out).
    Ratio,
    /// A - B.
    Diff,
}

/// Median over rounds of a per-round comparison of proxy A with proxy B. Both ran in the same
/// round, minutes apart at most, so drift in the machine's speed between rounds (tens of percent
/// from one minute to the next on a shared VM) hits both alike: the median of these paired
/// figures is steadier than a ratio of medians. Only the rounds both ran in count; `None` when
/// there is none.
pub fn paired(
    runs: &[Run],
    mode: Pair,
    a: &str,
    b: &str,
    value: impl Fn(&Run) -> f64,
) -> Option<f64> {
    let of = |proxy: &str| -> HashMap<&str, f64> {
        runs.iter()
            .filter(|r| r.proxy == proxy)
            .map(|r| (r.round.as_str(), value(r)))
            .collect()
    };
    let (x, y) = (of(a), of(b));
    let figures = x
        .iter()
        .filter_map(|(round, &xv)| {
            let yv = *y.get(round)?;
            match mode {
                Pair::Ratio => (yv > 0.0).then(|| xv / yv),
                Pair::Diff => Some(xv - yv),
            }
        })
        .collect();
    median(figures)
}

/// Sum of a count over one proxy's runs.
pub fn total(runs: &[Run], proxy: &str, value: impl Fn(&Run) -> u64) -> u64 {
    runs.iter().filter(|r| r.proxy == proxy).map(value).sum()
}

/// The highest steal percentage of the runs (of one proxy, or of all with `None`); 0 when none
/// was recorded.
pub fn max_steal(runs: &[Run], proxy: Option<&str>) -> f64 {
    runs.iter()
        .filter(|r| proxy.is_none_or(|p| r.proxy == p))
        .filter_map(|r| r.steal_percent)
        .fold(0.0, f64::max)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A row as bench.sh's `run_one` writes it (CPU mode).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn cpu_row(
        proxy: &str,
        round: u32,
        rps: &str,
        p50: u32,
        p99: u32,
        cpu: &str,
        requests: u64,
        redis: &str,
        losses: &str,
        steal: &str,
    ) -> String {
        format!("{proxy}\t{round}\t{rps}\t{p50}\t{p99}\t{cpu}\t{requests}\t0\t0\t{redis}\t{losses}\t{steal}\n")
    }

    fn runs(text: &str) -> Vec<Run> {
        match parse(text) {
            Ok(runs) => runs,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn median_of_odd_even_and_no_values() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![5.0]), Some(5.0));
        // Even: the mean of the two middle values, after sorting numerically (10 > 9).
        assert_eq!(median(vec![10.0, 1.0, 9.0, 2.0]), Some(5.5));
        assert_eq!(median(vec![4.0, 3.0]), Some(3.5));
        assert_eq!(median(vec![]), None);
    }

    #[test]
    fn median_per_proxy_and_missing_proxy() {
        let text = [
            cpu_row(
                "nginx", 1, "100.5", 900, 2000, "15.00", 1000, "-", "-", "0.0",
            ),
            cpu_row(
                "nginx", 2, "300.5", 950, 2100, "17.00", 3000, "-", "-", "0.0",
            ),
            cpu_row("haproxy", 1, "50", 800, 1500, "16.00", 500, "-", "-", "0.0"),
            cpu_row(
                "nginx", 3, "200.5", 1000, 2200, "16.00", 2000, "-", "-", "0.0",
            ),
        ]
        .concat();
        let runs = runs(&text);
        assert_eq!(median_of(&runs, "nginx", |r| r.rps), Some(200.5));
        assert_eq!(median_of(&runs, "nginx", |r| r.cost), Some(16.0));
        assert_eq!(median_of(&runs, "haproxy", |r| r.p99_us), Some(1500.0));
        assert_eq!(median_of(&runs, "reference", |r| r.rps), None);
        assert_eq!(total(&runs, "nginx", |r| r.requests), 6000);
        assert_eq!(total(&runs, "reference", |r| r.requests), 0);
    }

    #[test]
    fn paired_ratio_and_diff_skip_a_round_one_side_lacks() {
        // Round 2 of B is missing: only rounds 1 and 3 pair up.
        let text = [
            cpu_row("a", 1, "1", 1, 1200, "30", 1, "-", "-", "0.0"),
            cpu_row("a", 2, "1", 1, 9999, "99", 1, "-", "-", "0.0"),
            cpu_row("a", 3, "1", 1, 1500, "24", 1, "-", "-", "0.0"),
            cpu_row("b", 1, "1", 1, 1000, "20", 1, "-", "-", "0.0"),
            cpu_row("b", 3, "1", 1, 1000, "16", 1, "-", "-", "0.0"),
        ]
        .concat();
        let runs = runs(&text);
        // Ratios 30/20 = 1.5 and 24/16 = 1.5 (round 2's 99 would pull it anywhere else).
        assert_eq!(paired(&runs, Pair::Ratio, "a", "b", |r| r.cost), Some(1.5));
        // p99 differences 200 and 500: median of two = 350.
        assert_eq!(
            paired(&runs, Pair::Diff, "a", "b", |r| r.p99_us),
            Some(350.0)
        );
        // B over A pairs the same rounds.
        assert_eq!(
            paired(&runs, Pair::Diff, "b", "a", |r| r.p99_us),
            Some(-350.0)
        );
        // Against a proxy that never ran, or itself.
        assert_eq!(paired(&runs, Pair::Ratio, "a", "c", |r| r.cost), None);
        assert_eq!(paired(&runs, Pair::Ratio, "a", "a", |r| r.cost), Some(1.0));
    }

    #[test]
    fn paired_ratio_leaves_out_rounds_where_b_is_zero() {
        let text = [
            cpu_row("a", 1, "1", 1, 1, "30", 1, "-", "-", "0.0"),
            cpu_row("a", 2, "1", 1, 1, "10", 1, "-", "-", "0.0"),
            cpu_row("b", 1, "1", 1, 1, "0", 1, "-", "-", "0.0"),
            cpu_row("b", 2, "1", 1, 1, "4", 1, "-", "-", "0.0"),
        ]
        .concat();
        assert_eq!(
            paired(&runs(&text), Pair::Ratio, "a", "b", |r| r.cost),
            Some(2.5)
        );
    }

    #[test]
    fn cpu_with_redis_adds_redis_where_there_is_one() {
        let text = [
            cpu_row("tollgate", 1, "1", 1, 1, "20.00", 1, "-", "-", "0.0"),
            cpu_row("tollgate", 2, "1", 1, 1, "25.00", 1, "-", "-", "0.0"),
            cpu_row("tollgate", 3, "1", 1, 1, "20.00", 1, "-", "-", "0.0"),
            cpu_row(
                "tollgate-rl-exact",
                1,
                "1",
                1,
                1,
                "22.00",
                1,
                "2.00",
                "0",
                "0.0",
            ),
            cpu_row(
                "tollgate-rl-exact",
                2,
                "1",
                1,
                1,
                "30.00",
                1,
                "5.00",
                "0",
                "0.0",
            ),
            cpu_row(
                "tollgate-rl-exact",
                3,
                "1",
                1,
                1,
                "24.00",
                1,
                "3.00",
                "0",
                "0.0",
            ),
        ]
        .concat();
        let runs = runs(&text);
        assert_eq!(runs[0].redis_cpu_us, None);
        assert_eq!(runs[3].redis_cpu_us, Some(2.0));
        // Per round: 22/20 = 1.1, 30/25 = 1.2, 24/20 = 1.2 -> median 1.2.
        let cpu = paired(&runs, Pair::Ratio, "tollgate-rl-exact", "tollgate", |r| {
            r.cost
        });
        assert!(cpu.is_some_and(|v| (v - 1.2).abs() < 1e-12), "{cpu:?}");
        // With Redis: 24/20 = 1.2, 35/25 = 1.4, 27/20 = 1.35 -> median 1.35; tollgate's "-" adds 0.
        let all = paired(
            &runs,
            Pair::Ratio,
            "tollgate-rl-exact",
            "tollgate",
            cpu_with_redis,
        );
        assert!(all.is_some_and(|v| (v - 1.35).abs() < 1e-12), "{all:?}");
        assert_eq!(cpu_with_redis(&runs[0]), 20.0);
        assert_eq!(cpu_with_redis(&runs[4]), 35.0);
    }

    #[test]
    fn worst_steal_per_proxy_and_overall() {
        let text = [
            cpu_row("a", 1, "1", 1, 1, "1", 1, "-", "-", "0.0"),
            cpu_row("a", 2, "1", 1, 1, "1", 1, "-", "-", "12.5"),
            cpu_row("b", 1, "1", 1, 1, "1", 1, "-", "-", "3.0"),
        ]
        .concat();
        let runs = runs(&text);
        assert_eq!(max_steal(&runs, Some("a")), 12.5);
        assert_eq!(max_steal(&runs, Some("b")), 3.0);
        assert_eq!(max_steal(&runs, Some("c")), 0.0);
        assert_eq!(max_steal(&runs, None), 12.5);
    }

    #[test]
    fn parse_rows_and_reject_bad_ones() {
        let runs = runs("reference\t1\t9000.5\t400\t900\t60255\t36000\t0\t0\t-\t-\t-\n\n");
        assert_eq!(
            runs,
            vec![Run {
                proxy: "reference".into(),
                round: "1".into(),
                rps: 9000.5,
                p50_us: 400.0,
                p99_us: 900.0,
                cost: 60255.0,
                requests: 36000,
                socket_errors: 0,
                non_2xx: 0,
                redis_cpu_us: None,
                redis_losses: None,
                steal_percent: None,
            }]
        );
        let short = parse("a\t1\t2\n");
        assert_eq!(short, Err("results line 1: 3 columns, expected 12".into()));
        let bad = parse("\na\t1\tfast\t1\t1\t1\t1\t0\t0\t-\t-\t0.0\n");
        assert_eq!(
            bad,
            Err("results line 2: rps: not a number: \"fast\"".into())
        );
    }
}
