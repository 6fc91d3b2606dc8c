//! The `switchboard` command: parse arguments, set up logging, load and validate the
//! config (exit 64 when it is wrong), then hand over to the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use switchboard::config::{Config, ConfigError};
use switchboard::tools;

/// Exit status for a config that cannot be used (sysexits' EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(name = "switchboard", version, about = "Instant-messaging connection gateway")]
struct Cli {
    /// Config file.
    #[arg(short, long, global = true, default_value = "config.toml", env = "SWITCHBOARD_CONFIG")]
    config: PathBuf,
    /// Log output: `human` for people, `json` for log pipelines. Filter with RUST_LOG.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve,
    /// Print a client token signed with an app's secret, and a ready WebSocket URL.
    Token {
        #[arg(long)]
        app: String,
        #[arg(long)]
        uid: String,
        /// Lifetime, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Sign and send a push through the HTTP API, and print the per-recipient result.
    Push {
        #[arg(long)]
        app: String,
        /// Recipient user ids, comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        to: Vec<String>,
        /// The message: any JSON value.
        #[arg(long)]
        message: String,
        /// Sender user id shown to recipients (default: none, the app server).
        #[arg(long)]
        from: Option<String>,
        /// API base URL (default: this config's HTTP listener on this machine).
        #[arg(long)]
        server: Option<String>,
        /// Accept any TLS certificate (development certificates only).
        #[arg(long)]
        insecure: bool,
    },
    /// Config file commands.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Plugin commands.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Write a self-signed development certificate and key (`dev.crt`, `dev.key`) for
    /// trying HTTPS and WSS locally; point `[tls]` at them. Not for production.
    Cert {
        /// Host name or IP address the certificate is for; repeat for several.
        /// `localhost` and `127.0.0.1` are always included.
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        /// Directory to write into.
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Say which world(s) a component implements, what it imports, and whether this host
    /// can load it. Exit status 0 only when it can.
    Check {
        /// The component (.wasm).
        file: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate the config and print every problem with its key.
    Check,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        match &e {
            ConfigError::Read { .. } | ConfigError::Parse(_) => eprintln!("error: {}: {e}", path.display()),
            ConfigError::Invalid(_) => eprintln!("error: {}: {e}", path.display()),
        }
        ExitCode::from(EXIT_CONFIG)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // Inspecting a component needs no config.
    if let Command::Plugin(PluginCommand::Check { file, json }) = &cli.command {
        return plugin_check(file, *json);
    }
    if let Command::Cert { hosts, out, force } = &cli.command {
        return cert(hosts, out, *force);
    }
    let config = match load(&cli.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match cli.command {
        Command::Config(ConfigCommand::Check) => {
            println!("{}: OK ({} app(s))", cli.config.display(), config.apps.len());
            ExitCode::SUCCESS
        }
        Command::Token { app, uid, ttl } => match tools::token(&config, &app, &uid, ttl) {
            Ok((token, url)) => {
                println!("{token}");
                if let Some(url) = url {
                    println!("{url}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Push { app, to, message, from, server, insecure } => {
            report(runtime().block_on(push(&config, &app, to, &message, from.as_deref(), server, insecure)))
        }
        Command::Serve => report(runtime().block_on(serve(config))),
        Command::Plugin(_) | Command::Cert { .. } => unreachable!("handled before the config is loaded"),
    }
}

fn cert(hosts: &[String], out: &std::path::Path, force: bool) -> ExitCode {
    match tools::dev_cert(hosts, out, force) {
        Ok(written) => {
            println!("certificate: {}", written.cert.display());
            println!("key:         {}", written.key.display());
            println!("Add to config.toml (relative paths resolve against the config file's directory):");
            println!("[tls]\ncert = \"{}\"\nkey = \"{}\"", written.cert.display(), written.key.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn plugin_check(file: &std::path::Path, json: bool) -> ExitCode {
    let report = match switchboard::plugin::inspect::check(file) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report).expect("report serialises"));
    } else {
        println!("{} ({} bytes)", report.path, report.size_bytes);
        let list = |v: &[String]| if v.is_empty() { "none".to_string() } else { v.join("\n         ") };
        println!("worlds:  {}", if report.worlds.is_empty() { "none".into() } else { report.worlds.join(", ") });
        println!("exports: {}", list(&report.exports));
        println!("imports: {}", list(&report.imports));
        match &report.unloadable {
            None => println!("loadable: yes"),
            Some(why) => println!("loadable: no: {why}"),
        }
    }
    if report.unloadable.is_none() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime starts")
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    // SIGHUP reloads the plugins, as POST /admin/plugins/reload does. The handler is
    // installed first, so a SIGHUP during start-up does not end the process.
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let server = switchboard::Server::bind(config).await.context("cannot start")?;
    let hub = server.hub().clone();
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            match hub.reload_plugins().await {
                Ok(generation) => tracing::info!(generation, "SIGHUP: plugins reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: plugin reload failed; the previous plugins stay in force")
                }
            }
        }
    });
    server.run(shutdown_signal()).await.context("server failed")
}

async fn push(
    config: &Config,
    app: &str,
    to: Vec<String>,
    message: &str,
    from: Option<&str>,
    server: Option<String>,
    insecure: bool,
) -> anyhow::Result<()> {
    let server = match server {
        Some(s) => s,
        None => tools::default_server(config)?,
    };
    let answer = tools::push(config, tools::PushArgs { app, to, message, from, server, insecure }).await?;
    println!("msg_id {}", answer["msg_id"].as_str().unwrap_or_default());
    for r in answer["results"].as_array().into_iter().flatten() {
        let uid = r["uid"].as_str().unwrap_or_default();
        let status = r["status"].as_str().unwrap_or_default();
        let n = r["connections"].as_u64().unwrap_or(0);
        println!("{uid}\t{status}\t{n} connection(s)");
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
