//! The `tollgate` command: run the gateway (`-c PATH`), check a config (`-t`), start as a
//! graceful upgrade of a running instance (`-u`), daemonize (`-d`).
//!
//! ```text
//! tollgate -c conf/tollgate.yaml            # run
//! tollgate -t -c conf/tollgate.yaml         # validate: exit 0, or 1 with every error
//! kill -HUP $(cat /tmp/tollgate.pid)        # reload the file
//! tollgate -u -c conf/tollgate.yaml & kill -QUIT <old pid>   # zero-downtime binary upgrade
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::Parser;
use pingora_core::apps::HttpServerOptions;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_core::services::background::background_service;
use pingora_core::services::listening::Service;

use tollgate::admin::Admin;
use tollgate::config::{self, GatewayConfig};
use tollgate::control::{Control, ControlService};
use tollgate::front::Front;
use tollgate::proxy::Gateway;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "tollgate", version, about = "An edge API gateway on Pingora")]
struct Cli {
    /// The configuration file.
    #[arg(short = 'c', long = "conf", default_value = "conf/tollgate.yaml")]
    conf: PathBuf,
    /// Check the configuration and exit: 0 when valid, 1 after printing every error.
    #[arg(short = 't', long = "test")]
    test: bool,
    /// Start as a graceful upgrade: take the listening sockets over from the running instance
    /// (then send it SIGQUIT).
    #[arg(short = 'u', long = "upgrade")]
    upgrade: bool,
    /// Run in the background.
    #[arg(short = 'd', long = "daemon")]
    daemon: bool,
    /// Reload when the configuration file (or the symlink it is reached through, as a
    /// Kubernetes ConfigMap swaps it) changes; the same as `server.watch_config: true`.
    #[arg(long = "watch")]
    watch: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// API key helpers.
    #[command(subcommand)]
    Key(KeyCommand),
}

#[derive(clap::Subcommand, Debug)]
enum KeyCommand {
    /// Print a fresh random key and the hash to put in `consumers[].api_keys`.
    New,
    /// Print the hash of KEY (or of the first line of standard input).
    Hash { key: Option<String> },
}

fn key_command(cmd: KeyCommand) -> ExitCode {
    use tollgate::identity::keys;
    match cmd {
        KeyCommand::New => {
            let key = keys::generate();
            println!("key:  {key}");
            println!("hash: {}", keys::format_hash(&keys::hash(&key)));
        }
        KeyCommand::Hash { key } => {
            let key = match key {
                Some(k) => k,
                None => {
                    let mut line = String::new();
                    if std::io::stdin().read_line(&mut line).is_err() {
                        eprintln!("tollgate: cannot read the key from standard input");
                        return ExitCode::FAILURE;
                    }
                    line
                }
            };
            match keys::clean(key.trim_end_matches(['\r', '\n']).as_bytes()) {
                Some(k) => println!("{}", keys::format_hash(&keys::hash(k))),
                None => {
                    eprintln!("tollgate: not a usable key (8-512 visible ASCII characters)");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    // Release builds abort on a panic (`panic = "abort"` in Cargo.toml). Debug builds do the same
    // here: pingora runs each service as a task, and an unwinding panic there (a listener that
    // cannot bind, say) would leave a process that answers on one port and not on another.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
    // SIGHUP's default action kills the process. Until the control plane listens for it, a
    // SIGHUP only sets this flag (the control plane then reloads once).
    let early_hup = Arc::new(AtomicBool::new(false));
    if let Err(e) = signal_hook::flag::register(signal_hook::consts::SIGHUP, early_hup.clone()) {
        eprintln!("tollgate: cannot install the SIGHUP handler: {e}");
        return ExitCode::FAILURE;
    }
    let mut cli = Cli::parse();
    if let Some(Command::Key(cmd)) = cli.command.take() {
        return key_command(cmd);
    }
    let config = match config::load(&cli.conf) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            eprintln!(
                "{}: configuration has {} error(s)",
                cli.conf.display(),
                errors.len()
            );
            return ExitCode::FAILURE;
        }
    };
    if cli.test {
        println!("{}: configuration is valid", cli.conf.display());
        return ExitCode::SUCCESS;
    }
    run(cli, config, early_hup)
}

/// A public listener. No L4 read buffer: pingora's default keeps 64 KiB per connection for
/// its whole life, idle or not, while the front end reads request heads into a buffer of its
/// own (allocated only while a request arrives) and pingora reads bodies into its own buffers.
/// The write buffer (one segment) stays: it joins a response's head and body into one write.
fn listener(addr: &std::net::SocketAddr) -> pingora_core::listeners::ListenerConfig {
    pingora_core::listeners::ListenerConfig::tcp(addr.to_string())
        .l4_buffer(pingora_core::listeners::L4BufferSettings::default().read(0))
}

fn run(cli: Cli, config: GatewayConfig, early_hup: Arc<AtomicBool>) -> ExitCode {
    let s = &config.server;
    let conf = ServerConf {
        threads: s.threads,
        daemon: cli.daemon,
        grace_period_seconds: Some(s.grace_period.as_millis().div_ceil(1000) as u64),
        graceful_shutdown_timeout_seconds: Some(5),
        pid_file: s
            .pid_file
            .clone()
            .unwrap_or_else(|| "/tmp/tollgate.pid".into()),
        upgrade_sock: s
            .upgrade_sock
            .clone()
            .unwrap_or_else(|| "/tmp/tollgate_upgrade.sock".into()),
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade: cli.upgrade,
        daemon: cli.daemon,
        ..Opt::default()
    };
    // A port another process holds is an error an operator can read, before anything starts
    // (pingora itself would fail the listener's service with a panic). Not on an upgrade: the
    // sockets come from the running instance, which still holds them.
    if !cli.upgrade {
        for addr in s.listen.iter().chain(&s.listen_tls).chain(&s.admin_listen) {
            if let Err(e) = std::net::TcpListener::bind(addr) {
                eprintln!("tollgate: cannot listen on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let control = Control::new(
        // Absolute, symlinks kept: a reload re-reads the path as given (a ConfigMap's symlink
        // swap points it at the new file), and relative paths in it are from its directory.
        std::path::absolute(&cli.conf).unwrap_or(cli.conf.clone()),
        config.clone(),
        early_hup,
    );
    control
        .watch_flag
        .store(cli.watch, std::sync::atomic::Ordering::Relaxed);

    control.watch_phases(server.watch_execution_phase());
    let control_handle = server.add_service(background_service(
        "tollgate control",
        ControlService(control.clone()),
    ));

    let mut app = pingora_proxy::HttpProxy::new(
        Gateway {
            grpc_web: config.routes.iter().any(|r| r.grpc_web),
            current: control.current.clone(),
            draining: control.draining.clone(),
            limiter: control.limiter.clone(),
            cache: control.cache.clone(),
            acme: control.acme.clone(),
        },
        server.configuration.clone(),
    );
    app.handle_init_modules();
    if config.server.h2c {
        let mut options = HttpServerOptions::default();
        options.h2c = true;
        app.server_options = Some(options);
    }
    let app = Arc::new(app);
    // Request heads are read (under a deadline: slow-header defence) and checked before
    // pingora parses them.
    let mut proxy = Service::new(
        "tollgate proxy".to_string(),
        Front::new(
            app.clone(),
            config.server.header_timeout,
            control.front.clone(),
        ),
    );
    for addr in &config.server.listen {
        proxy.add_listener(listener(addr));
    }
    // Listeners open only after the first snapshot (and its health pass) is published.
    let proxy_handle = server.add_service(proxy);
    proxy_handle.add_dependency(&control_handle);
    // Each TLS listener: the front does the handshake with the acceptor of the moment.
    for addr in &config.server.listen_tls {
        let Some(slot) = control.tls.slot(*addr) else {
            continue;
        };
        let mut tls = Service::new(
            format!("tollgate tls {addr}"),
            Front::new(
                app.clone(),
                config.server.header_timeout,
                control.front.clone(),
            )
            .with_tls(slot),
        );
        tls.add_listener(listener(addr));
        let tls_handle = server.add_service(tls);
        tls_handle.add_dependency(&control_handle);
    }

    if let Some(admin_addr) = config.server.admin_listen {
        let mut admin = Service::new(
            "tollgate admin".to_string(),
            Admin {
                control: control.clone(),
            },
        );
        admin.add_tcp(&admin_addr.to_string());
        let admin_handle = server.add_service(admin);
        admin_handle.add_dependency(&control_handle);
    }
    // The request path's clock calibrates here, not on the first request.
    tollgate::clock::init();
    server.run_forever()
}
