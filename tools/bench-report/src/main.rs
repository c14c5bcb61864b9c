//! bench-report: the arithmetic, statistics and markdown reports of `scripts/bench.sh`.
//!
//! bench.sh keeps the orchestration (tools, builds, ports, servers, pinning, wrk and valgrind
//! runs) and writes one tab-separated row per measured run to its results file (see
//! [`results::Run`] for the columns); this program turns counters into per-request figures while
//! it runs, and the results file into the report at the end. Plain std, no dependencies.

mod idle;
mod report;
mod results;

use std::net::TcpListener;
use std::process::ExitCode;

use report::{uses_redis, Facts};

const USAGE: &str = "\
usage:
  bench-report report RESULTS --proxies 'NAME...' --date D --commit C --warmup D --connections N
               --duration D --rounds N --cores N --cpu-model M --proxy-cpu N --load-cpu N
               --upstream-cpu N --redis-cpu N --wrk-threads N --rl-limit N --nginx V
               --haproxy V --wrk V [--redis V] [--redis-losses NAME=COUNT]...
      the COUNT=cpu report (markdown on stdout); --redis and one --redis-losses (the losses its
      log shows over the whole benchmark) per Redis-backed run are needed when there is one
  bench-report report-instructions RESULTS --proxies 'NAME...' --date D --commit C --warmup D
               --connections N --duration D --rounds N
      the COUNT=instructions report
  bench-report cpu-per-request TICKS HZ REQUESTS        CPU µs per request (2 decimals)
  bench-report steal-percent STEAL_TICKS TOTAL_TICKS    steal % of the machine's time (1 decimal)
  bench-report instructions-per-request INSTRUCTIONS IDLE_INSTRUCTIONS REQUESTS
      instructions per request net of the idle count over as long (whole number)
  bench-report free-ports N     N distinct free TCP ports on 127.0.0.1, chosen by the kernel
  bench-report target-dir       the cargo target directory this program was built into
  bench-report idle-connections ADDR N [HEADER...]
      open N keep-alive connections to ADDR, one GET / each (with the given header lines), print
      `ready N`, hold them until standard input ends
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench-report: {e}\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// One command: what it prints, or why it cannot.
fn run(args: &[String]) -> Result<String, String> {
    let (command, rest) = args.split_first().ok_or("no command")?;
    let numbers = |want: usize| -> Result<Vec<f64>, String> {
        if rest.len() != want {
            return Err(format!("{command}: {want} argument(s), got {}", rest.len()));
        }
        rest.iter()
            .map(|a| {
                a.parse::<f64>()
                    .map_err(|_| format!("{command}: not a number: {a:?}"))
            })
            .collect()
    };
    match command.as_str() {
        "report" | "report-instructions" => {
            let (path, options) = rest.split_first().ok_or("no results file")?;
            let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
            let runs = results::parse(&text)?;
            let lines = if command == "report" {
                report::report(&runs, &facts(options, true)?)
            } else {
                report::report_instructions(&runs, &facts(options, false)?)
            };
            Ok(report::text(&lines))
        }
        "cpu-per-request" => {
            let v = numbers(3)?;
            Ok(format!("{}\n", cpu_per_request(v[0], v[1], v[2])))
        }
        "steal-percent" => {
            let v = numbers(2)?;
            Ok(format!("{}\n", steal_percent(v[0], v[1])))
        }
        "instructions-per-request" => {
            let v = numbers(3)?;
            Ok(format!("{}\n", instructions_per_request(v[0], v[1], v[2])))
        }
        "free-ports" => {
            let n = match rest {
                [n] => n
                    .parse()
                    .map_err(|_| format!("free-ports: not a count: {n:?}"))?,
                _ => return Err("free-ports: one argument".into()),
            };
            let ports = free_ports(n).map_err(|e| format!("free-ports: {e}"))?;
            let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
            Ok(format!("{}\n", ports.join(" ")))
        }
        "idle-connections" => match rest {
            [addr, n, headers @ ..] => {
                let n = n
                    .parse()
                    .map_err(|_| format!("idle-connections: not a count: {n:?}"))?;
                idle::run(addr, n, headers)
            }
            _ => Err("idle-connections: ADDR N [HEADER...]".into()),
        },
        "target-dir" => {
            // This program is TARGET/PROFILE/bench-report: cargo put it where it puts every
            // binary of the workspace (CARGO_TARGET_DIR, a config's build.target-dir, ./target).
            let exe = std::env::current_exe().map_err(|e| format!("target-dir: {e}"))?;
            let dir = exe
                .parent()
                .and_then(|profile| profile.parent())
                .ok_or("target-dir: no parent")?;
            Ok(format!("{}\n", dir.display()))
        }
        _ => Err(format!("unknown command: {command}")),
    }
}

/// CPU microseconds per request from a clock-tick count (ticks of `HZ` per second).
fn cpu_per_request(ticks: f64, hz: f64, requests: f64) -> String {
    format!("{:.2}", ticks * 1_000_000.0 / hz / requests)
}

/// The share of the machine's time the hypervisor gave to someone else, in percent.
fn steal_percent(steal: f64, total: f64) -> String {
    format!(
        "{:.1}",
        if total > 0.0 {
            100.0 * steal / total
        } else {
            0.0
        }
    )
}

/// Instructions per request: what the run executed less what the idle proxy executes over as
/// long.
fn instructions_per_request(instructions: f64, idle: f64, requests: f64) -> String {
    format!("{:.0}", (instructions - idle) / requests)
}

/// N distinct free ports: all N sockets stay bound until every port is known.
fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind(("127.0.0.1", 0)))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

/// The options of the report commands become [`Facts`]; every option is required except those
/// that only a Redis-backed run needs.
fn facts(options: &[String], cpu: bool) -> Result<Facts, String> {
    const COMMON: [&str; 7] = [
        "proxies",
        "date",
        "commit",
        "warmup",
        "connections",
        "duration",
        "rounds",
    ];
    const CPU: [&str; 11] = [
        "cores",
        "cpu-model",
        "proxy-cpu",
        "load-cpu",
        "upstream-cpu",
        "redis-cpu",
        "wrk-threads",
        "rl-limit",
        "nginx",
        "haproxy",
        "wrk",
    ];
    let mut f = Facts::default();
    let mut given: Vec<&str> = Vec::new();
    let mut it = options.iter();
    while let Some(option) = it.next() {
        let name = option
            .strip_prefix("--")
            .ok_or_else(|| format!("not an option: {option:?}"))?;
        let value = it.next().ok_or_else(|| format!("--{name}: no value"))?;
        let known = COMMON.contains(&name)
            || (cpu && (CPU.contains(&name) || name == "redis" || name == "redis-losses"));
        if !known {
            return Err(format!("unknown option --{name}"));
        }
        if name == "redis-losses" {
            let (proxy, n) = value
                .split_once('=')
                .and_then(|(p, n)| Some((p, n.parse::<i64>().ok()?)))
                .ok_or_else(|| format!("--redis-losses: NAME=COUNT, not {value:?}"))?;
            f.redis_losses_logged.push((proxy.to_string(), n));
            continue;
        }
        if given.contains(&name) {
            return Err(format!("--{name} given twice"));
        }
        given.push(name);
        let v = value.clone();
        match name {
            "proxies" => f.proxies = value.split_whitespace().map(str::to_string).collect(),
            "date" => f.date = v,
            "commit" => f.commit = v,
            "warmup" => f.warmup = v,
            "connections" => f.connections = v,
            "duration" => f.duration = v,
            "rounds" => f.rounds = v,
            "cores" => f.cores = v,
            "cpu-model" => f.cpu_model = v,
            "proxy-cpu" => f.proxy_cpu = v,
            "load-cpu" => f.load_cpu = v,
            "upstream-cpu" => f.upstream_cpu = v,
            "redis-cpu" => f.redis_cpu = v,
            "wrk-threads" => f.wrk_threads = v,
            "rl-limit" => f.rl_limit = v,
            "nginx" => f.nginx = v,
            "haproxy" => f.haproxy = v,
            "wrk" => f.wrk = v,
            _ => f.redis = v, // "redis", the only other known name
        }
    }
    let required = COMMON.iter().chain(if cpu { CPU.as_slice() } else { &[] });
    if let Some(missing) = required.copied().find(|n| !given.contains(n)) {
        return Err(format!("--{missing} is missing"));
    }
    if cpu {
        for proxy in f.proxies.iter().filter(|p| uses_redis(p)) {
            if !given.contains(&"redis") {
                return Err(format!("--redis is missing (needed for {proxy})"));
            }
            if !f.redis_losses_logged.iter().any(|(p, _)| p == proxy) {
                return Err(format!("--redis-losses {proxy}=COUNT is missing"));
            }
        }
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn per_request_arithmetic_as_the_shell_did() {
        // 250 ticks of 100 Hz = 2.5 s of CPU over 100000 requests: 25 µs each.
        assert_eq!(cpu_per_request(250.0, 100.0, 100_000.0), "25.00");
        assert_eq!(cpu_per_request(1.0, 100.0, 3.0), "3333.33");
        assert_eq!(steal_percent(5.0, 200.0), "2.5");
        assert_eq!(steal_percent(1.0, 3.0), "33.3");
        assert_eq!(steal_percent(0.0, 0.0), "0.0");
        // (9_000_000 - 1_000_000) / 128 = 62500.
        assert_eq!(
            instructions_per_request(9_000_000.0, 1_000_000.0, 128.0),
            "62500"
        );
        assert_eq!(instructions_per_request(1000.0, 0.0, 3.0), "333");
    }

    #[test]
    fn commands_check_their_arguments() {
        assert_eq!(
            run(&strings(&["cpu-per-request", "250", "100", "100000"])),
            Ok("25.00\n".into())
        );
        assert!(run(&strings(&["cpu-per-request", "250", "100"])).is_err());
        assert!(run(&strings(&["steal-percent", "x", "1"])).is_err());
        assert!(run(&strings(&["nonsense"])).is_err());
        assert!(run(&[]).is_err());
    }

    #[test]
    fn free_ports_are_distinct() {
        let ports = match free_ports(5) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(ports.len(), 5);
        assert!(ports.iter().all(|&p| p != 0));
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), 5, "{ports:?}");
    }

    const INSTRUCTION_OPTIONS: [&str; 14] = [
        "--proxies",
        "reference  tollgate",
        "--date",
        "2025-01-02 03:04 UTC",
        "--commit",
        "abc1234",
        "--warmup",
        "1s",
        "--connections",
        "4",
        "--duration",
        "5s",
        "--rounds",
        "3",
    ];

    #[test]
    fn options_become_facts() {
        let f = facts(&strings(&INSTRUCTION_OPTIONS), false);
        let f = match f {
            Ok(f) => f,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(f.proxies, ["reference", "tollgate"]);
        assert_eq!(
            (f.date.as_str(), f.connections.as_str()),
            ("2025-01-02 03:04 UTC", "4")
        );
        // The instruction report takes no machine facts, and every common one is required.
        let mut extra = strings(&INSTRUCTION_OPTIONS);
        extra.extend(strings(&["--cores", "2"]));
        assert_eq!(facts(&extra, false), Err("unknown option --cores".into()));
        assert_eq!(
            facts(&strings(&INSTRUCTION_OPTIONS[2..]), false),
            Err("--proxies is missing".into())
        );
        // The CPU report needs the machine facts, and Redis's when a run uses it.
        let mut cpu = strings(&INSTRUCTION_OPTIONS);
        assert_eq!(facts(&cpu, true), Err("--cores is missing".into()));
        for (k, v) in [
            ("cores", "2"),
            ("cpu-model", "m"),
            ("proxy-cpu", "1"),
            ("load-cpu", "0"),
            ("upstream-cpu", "0"),
            ("redis-cpu", "0"),
            ("wrk-threads", "1"),
            ("rl-limit", "1000"),
            ("nginx", "nginx/1"),
            ("haproxy", "2"),
            ("wrk", "wrk 4"),
        ] {
            cpu.extend([format!("--{k}"), v.to_string()]);
        }
        assert!(facts(&cpu, true).is_ok());
        cpu[1] = "tollgate tollgate-rl-exact".into();
        assert_eq!(
            facts(&cpu, true),
            Err("--redis is missing (needed for tollgate-rl-exact)".into())
        );
        cpu.extend(strings(&["--redis", "7.0.15"]));
        assert_eq!(
            facts(&cpu, true),
            Err("--redis-losses tollgate-rl-exact=COUNT is missing".into())
        );
        cpu.extend(strings(&["--redis-losses", "tollgate-rl-exact=2"]));
        let f = facts(&cpu, true);
        assert_eq!(
            f.map(|f| f.redis_losses_logged),
            Ok(vec![("tollgate-rl-exact".to_string(), 2)])
        );
    }
}
