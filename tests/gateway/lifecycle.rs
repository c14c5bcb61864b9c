//! The CLI (`-t`, `--version`), graceful shutdown on SIGTERM and the zero-downtime upgrade.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::*;

fn tollgate(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .output()
        .expect("run tollgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A listen address another process holds: a readable error and exit 1, never a process that
/// serves its admin port and not its proxy port.
#[test]
fn a_taken_port_ends_the_start_with_a_readable_error() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = held.local_addr().expect("addr");
    let dir = tempfile::tempdir().expect("tmp");
    let conf = dir.path().join("taken.yaml");
    std::fs::write(
        &conf,
        format!(
            "server:\n  listen: [\"{taken}\"]\n  admin_listen: \"127.0.0.1:0\"\n  pid_file: \"{}\"\n  upgrade_sock: \"{}\"\nupstreams:\n  u:\n    backends: [{{ addr: \"127.0.0.1:1\" }}]\nroutes:\n  - {{ name: r, upstream: u }}\n",
            dir.path().join("pid").display(),
            dir.path().join("sock").display()
        ),
    )
    .expect("write");
    let (code, _, stderr) = tollgate(&["-c", conf.to_str().expect("utf8")]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!("tollgate: cannot listen on {taken}: "))
            && stderr.contains("in use"),
        "{stderr}"
    );
}

#[test]
fn check_mode_exit_codes_and_every_error_located() {
    let dir = tempfile::tempdir().expect("tmp");
    let good = dir.path().join("good.yaml");
    std::fs::write(
        &good,
        "server:\n  listen: [\"127.0.0.1:1\"]\nupstreams:\n  u:\n    backends: [{ addr: \"127.0.0.1:2\" }]\nroutes:\n  - { name: r, upstream: u }\n",
    )
    .expect("write");
    let (code, stdout, _) = tollgate(&["-t", "-c", good.to_str().expect("utf8")]);
    assert_eq!(code, 0);
    assert!(stdout.contains("configuration is valid"));

    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "server:\n  listen: [\"127.0.0.1:1\", \"not-an-address\"]\nupstreams:\n  u:\n    backends:\n      - { addr: \"127.0.0.1:2\", weight: 0 }\n      - { addr: \"nohostport\" }\nroutes:\n  - { name: r, upstream: missing }\n  - { name: r, upstream: u, match: { path_regex: \"(\" } }\n",
    )
    .expect("write");
    let p = bad.to_str().expect("utf8");
    let (code, _, stderr) = tollgate(&["-t", "-c", p]);
    assert_eq!(code, 1);
    let expect = [
        format!("{p}:2:27: server.listen[1]: invalid address \"not-an-address\""),
        format!("{p}:6:32: upstreams.u.backends[0].weight: must be between 1 and 1000, got 0"),
        format!("{p}:7:11: upstreams.u.backends[1].addr: invalid address \"nohostport\""),
        format!("{p}:9:16: routes[0].upstream: unknown upstream \"missing\""),
        format!("{p}:10:7: routes[1].name: duplicate route name \"r\""),
        format!("{p}:10:38: routes[1].match.path_regex: invalid regex"),
    ];
    for e in &expect {
        assert!(
            stderr.lines().any(|l| l.starts_with(e.as_str())),
            "missing {e:?} in:\n{stderr}"
        );
    }

    // Unknown keys are errors with their location and full field path.
    std::fs::write(&bad, "server:\n  listen: [\"127.0.0.1:1\"]\nroutes:\n  - name: r\n    upstream: u\n    match: { pathprefix: /a }\n").expect("write");
    let (code, _, stderr) = tollgate(&["-t", "-c", p]);
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with(&format!(
            "{p}:6:14: routes[0].match.pathprefix: unknown field `pathprefix`"
        )),
        "{stderr}"
    );

    // A missing file is an error too, never a panic.
    let (code, _, stderr) = tollgate(&["-t", "-c", "/nonexistent/tollgate.yaml"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("cannot read file"), "{stderr}");

    let (code, stdout, _) = tollgate(&["--version"]);
    assert_eq!(code, 0);
    assert!(stdout.contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn shipped_configs_are_valid() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut files = vec![format!("{root}/conf/tollgate.yaml")];
    for e in std::fs::read_dir(format!("{root}/conf/examples")).expect("examples") {
        let path = e.expect("entry").path();
        if path.extension().is_some_and(|x| x == "yaml") {
            files.push(path.display().to_string());
        }
    }
    // Certificates are not shipped (they would expire): a config that needs them is checked
    // as a copy next to certificates made now (as scripts/test.sh does with scripts/dev-cert.sh).
    let pki = crate::tls::Pki::new();
    pki.leaf("example", &["example.test", "api.example.test"]);
    let copies = tempfile::tempdir().expect("dir");
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read");
        let f = if text.contains("\n  listen_tls:") {
            let copy = copies
                .path()
                .join(std::path::Path::new(&f).file_name().expect("name"));
            std::fs::write(&copy, &text).expect("copy");
            let certs = copies.path().join("certs");
            std::fs::create_dir_all(&certs).expect("certs dir");
            for name in ["ca.pem", "example.pem", "example.key"] {
                std::fs::copy(pki.dir.path().join(name), certs.join(name)).expect("cert");
            }
            copy.display().to_string()
        } else {
            f
        };
        let (code, _, stderr) = tollgate(&["-t", "-c", &f]);
        assert_eq!(code, 0, "{f}: {stderr}");
    }
}

/// A load loop that records every failure until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(url: String, workers: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let tasks = (0..workers)
            .map(|_| {
                let (stop, ok, failures, url) =
                    (stop.clone(), ok.clone(), failures.clone(), url.clone());
                tokio::spawn(async move {
                    let client = http();
                    while !stop.load(Ordering::Relaxed) {
                        match client.get(&url).send().await {
                            Ok(r) if r.status() == 200 => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(r) => failures
                                .lock()
                                .expect("lock")
                                .push(format!("status {}", r.status())),
                            Err(e) => failures.lock().expect("lock").push(format!("{e:?}")),
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            ok,
            failures,
            tasks,
        }
    }

    async fn wait_for(&self, more: usize) {
        let target = self.ok.load(Ordering::Relaxed) + more;
        eventually(Duration::from_secs(15), "load progress", || async {
            (self.ok.load(Ordering::Relaxed) >= target).then_some(())
        })
        .await;
    }

    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("worker");
        }
        let failures = self.failures.lock().expect("lock").clone();
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_upgrade_hands_over_sockets_without_failures() {
    let a = MockUpstream::start("a").await;
    let body = format!(
        "upstreams:\n{}routes:\n  - {{ name: r, upstream: u }}\n",
        upstream_yaml("u", &[&a], "")
    );
    let mut gw = Gateway::start(&body).await;
    let load = Load::start(gw.url("/x"), 4);
    load.wait_for(100).await;

    let old = gw.child.id();
    let mut new = gw.spawn(true);
    // The new process waits on the upgrade socket; SIGQUIT makes the old one hand over.
    let sock = gw.dir.path().join("upgrade.sock");
    eventually(
        Duration::from_secs(10),
        "the new process listening on the upgrade socket",
        || async { sock.exists().then_some(()) },
    )
    .await;
    gw.signal(old, "QUIT");
    let new_pid = new.id();
    eventually(
        Duration::from_secs(10),
        "the new process serving",
        || async {
            let pid: u32 = std::fs::read_to_string(gw.dir.path().join("tollgate.pid"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            (pid == new_pid).then_some(())
        },
    )
    .await;
    load.wait_for(200).await;
    gw.wait_exit(Duration::from_secs(15)).await;
    load.wait_for(100).await;
    let (ok, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} of {} requests failed across the upgrade: {:?}",
        failures.len(),
        ok + failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(alive(new_pid));
    // Let the harness clean up the new process.
    std::mem::swap(&mut gw.child, &mut new);
    let _ = new.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests() {
    let slow = MockUpstream::start("slow").await;
    let body = format!(
        "upstreams:\n{}routes:\n  - {{ name: r, upstream: u }}\n",
        upstream_yaml("u", &[&slow], "")
    );
    let mut gw = Gateway::start(&body).await;
    slow.set_delay(Duration::from_millis(700));
    let url = gw.url("/x");
    let in_flight = tokio::spawn(async move { get(&http(), &url).await });
    eventually(
        Duration::from_secs(5),
        "the request reached the backend",
        || async { (slow.hits() == 1).then_some(()) },
    )
    .await;
    let started = Instant::now();
    gw.signal(gw.child.id(), "TERM");
    assert_eq!(in_flight.await.expect("join"), Some((200, "slow".into())));
    // New connections are refused once listeners close.
    eventually(Duration::from_secs(5), "listener closed", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
            .await
            .is_err()
            .then_some(())
    })
    .await;
    let status = gw.wait_exit(Duration::from_secs(15)).await;
    assert!(status.success() || status.code().is_some(), "{status:?}");
    // grace_period is 1s in the harness; the drain must not run much past it.
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "shutdown took {:?}",
        started.elapsed()
    );
}
