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
    /// Print traffic and counters from a running agent's pinned maps.
    Stats {
        /// The agent's `[dataplane] pin_dir`.
        #[arg(long, value_name = "DIR", default_value = config::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Ask the running agent how it is: election, VIPs, backends' health,
    /// traffic.
    Status {
        /// The agent's `[admin] socket`.
        #[arg(long, value_name = "PATH", default_value = config::DEFAULT_ADMIN_SOCKET)]
        socket: PathBuf,
        /// Print the agent's JSON document as it sent it.
        #[arg(long)]
        json: bool,
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
        Command::Stats { pin_dir } => Snapshot::read(&pin_dir)
            .map(|snapshot| print!("{}", snapshot.render()))
            .map_err(Into::into),
        Command::Status { socket, json } => status(&socket, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("balancer: {error:#}");
            ExitCode::FAILURE
        }
    }
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
