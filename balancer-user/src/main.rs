//! `balancer`: the agent (`balancer run`) and its operator commands.

use std::{io::IsTerminal as _, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use balancer_user::{
    admin::{client, protocol::Request, status::render_text},
    agent, config,
    stats::Snapshot,
};
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// One agent per node: VIP election, health checks and an XDP load
/// balancer in front of KeyDB.
#[derive(Debug, Parser)]
#[command(name = "balancer", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent until SIGTERM or SIGINT.
    Run {
        /// The configuration file (TOML).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Check a configuration file and print what it sets up (like
    /// `keepalived -t` or `haproxy -c`); changes nothing. Exits non-zero,
    /// naming the field, if the file is not valid.
    Check {
        /// The configuration file (TOML).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Print traffic and counters from a running agent's pinned maps.
    Stats {
        /// The agent's `[dataplane] pin_dir`.
        #[arg(long, value_name = "DIR", default_value = config::DEFAULT_PIN_DIR, conflicts_with = "config")]
        pin_dir: PathBuf,
        /// Take `pin_dir` from the agent's configuration file.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Ask the running agent how it is: election, VIPs, backends' health,
    /// traffic.
    Status {
        /// The agent's `[admin] socket`.
        #[arg(long, value_name = "PATH", default_value = config::DEFAULT_ADMIN_SOCKET, conflicts_with = "config")]
        socket: PathBuf,
        /// Take the socket from the agent's configuration file
        /// (`[admin] socket`).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Print the agent's JSON document as it sent it.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (the Debian package installs them
    /// for bash, zsh and fish).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let result = match cli.command {
        Command::Run { config } => run(config),
        Command::Check { config } => check(&config),
        Command::Stats { pin_dir, config } => config_or(config, pin_dir, |c| c.dataplane.pin_dir)
            .and_then(|pin_dir| Snapshot::read(&pin_dir).map_err(Into::into))
            .map(|snapshot| print!("{}", snapshot.render())),
        Command::Status {
            socket,
            config,
            json,
        } => config_or(config, socket, |c| c.admin.socket).and_then(|s| status(&s, json)),
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "balancer",
                &mut std::io::stdout(),
            );
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("balancer: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `default`, or what `pick` takes from the configuration file `config`.
fn config_or(
    config: Option<PathBuf>,
    default: PathBuf,
    pick: impl FnOnce(config::Config) -> PathBuf,
) -> anyhow::Result<PathBuf> {
    Ok(match config {
        Some(path) => pick(config::load(&path)?),
        None => default,
    })
}

/// `balancer check`: validates the file and summarises it.
fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let config = config::load(path)?;
    println!("{}: valid", path.display());
    print!("{}", config::summary(&config));
    Ok(())
}

fn status(socket: &std::path::Path, json: bool) -> anyhow::Result<()> {
    if json {
        // As sent, also by an agent of another version.
        let raw = client::request(socket, Request::Status, client::DEFAULT_TIMEOUT)?;
        println!("{raw}");
        return Ok(());
    }
    let (_, status) = client::status(socket, client::DEFAULT_TIMEOUT)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    print!("{}", render_text(&status, now));
    Ok(())
}

fn run(config_path: PathBuf) -> anyhow::Result<()> {
    // Validate everything before touching the node.
    let config = config::load(&config_path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(agent::run(config))?;
    Ok(())
}
