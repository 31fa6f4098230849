//! `balancer`: the agent (`balancer run`) and its operator commands.

use std::{
    io::{IsTerminal as _, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
};

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
    /// Convert a keepalived.conf and the haproxy.cfg next to it into a
    /// configuration file. Every value dropped or approximated is a warning
    /// on stderr (and a comment in the output); the output passes `check`.
    Import {
        /// keepalived.conf: the vrrp_instance, its VIPs, global_defs and
        /// vrrp_script blocks.
        #[arg(long, value_name = "FILE")]
        keepalived: PathBuf,
        /// haproxy.cfg: the frontends, backends and listen sections that
        /// bind the VIPs give the services and their backends.
        #[arg(long, value_name = "FILE")]
        haproxy: Option<PathBuf>,
        /// Write the configuration here instead of stdout; an existing file
        /// is kept unless --force.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Replace an existing --output file.
        #[arg(long, requires = "output")]
        force: bool,
        /// This node's IPv4 address ([node] address), unless keepalived.conf
        /// has unicast_src_ip.
        #[arg(long, value_name = "IPV4")]
        address: Option<std::net::Ipv4Addr>,
        /// The vrrp_instance to convert when the file has several.
        #[arg(long, value_name = "NAME")]
        instance: Option<String>,
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
    /// Stop sending new connections to BACKEND (HAProxy's drain): it
    /// leaves the READY sets of this node's agent, its established
    /// connections stay. Refused when it would leave a service without a
    /// READY backend. Run it on every node whose agent may hold the VIP.
    Drain {
        /// ADDRESS:PORT, as in the service's `backends`.
        backend: std::net::SocketAddrV4,
        #[command(flatten)]
        agent: AgentSocket,
    },
    /// Undo `balancer drain`: BACKEND takes new connections again while
    /// it is READY.
    Ready {
        /// ADDRESS:PORT, as in the service's `backends`.
        backend: std::net::SocketAddrV4,
        #[command(flatten)]
        agent: AgentSocket,
    },
    /// Print a shell completion script (the Debian package installs them
    /// for bash, zsh and fish).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Which agent to ask: its admin socket, or the config that names it.
#[derive(Debug, clap::Args)]
struct AgentSocket {
    /// The agent's `[admin] socket`.
    #[arg(long, value_name = "PATH", default_value = config::DEFAULT_ADMIN_SOCKET, conflicts_with = "config")]
    socket: PathBuf,
    /// Take the socket from the agent's configuration file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

impl AgentSocket {
    fn path(self) -> anyhow::Result<PathBuf> {
        config_or(self.config, self.socket, |c| c.admin.socket)
    }
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
        Command::Import {
            keepalived,
            haproxy,
            output,
            force,
            address,
            instance,
        } => import(
            &keepalived,
            haproxy.as_deref(),
            output.as_deref(),
            force,
            &balancer_user::import::Options { address, instance },
        ),
        Command::Stats { pin_dir, config } => config_or(config, pin_dir, |c| c.dataplane.pin_dir)
            .and_then(|pin_dir| Snapshot::read(&pin_dir).map_err(Into::into))
            .map(|snapshot| print!("{}", snapshot.render())),
        Command::Status {
            socket,
            config,
            json,
        } => config_or(config, socket, |c| c.admin.socket).and_then(|s| status(&s, json)),
        Command::Drain { backend, agent } => agent
            .path()
            .and_then(|s| set_drained(&s, Request::Drain(backend))),
        Command::Ready { backend, agent } => agent
            .path()
            .and_then(|s| set_drained(&s, Request::Ready(backend))),
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

/// `balancer drain` / `balancer ready`: prints what the agent did.
fn set_drained(socket: &std::path::Path, request: Request) -> anyhow::Result<()> {
    let raw = client::request(socket, request, client::DEFAULT_TIMEOUT)?;
    let reply: serde_json::Value = serde_json::from_str(&raw)?;
    println!("{}", reply["message"].as_str().unwrap_or(&raw));
    Ok(())
}

/// `balancer check`: validates the file and summarises it.
fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let config = config::load(path)?;
    println!("{}: valid", path.display());
    print!("{}", config::summary(&config));
    Ok(())
}

/// `balancer import`: reads the files, converts, writes the result.
fn import(
    keepalived: &Path,
    haproxy: Option<&Path>,
    output: Option<&Path>,
    force: bool,
    options: &balancer_user::import::Options,
) -> anyhow::Result<()> {
    use balancer_user::import;
    if let Some(output) = output {
        if !force && output.exists() {
            anyhow::bail!(
                "{} exists: not replaced (--force replaces it)",
                output.display()
            );
        }
    }
    let read = |path: &Path| {
        std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))
    };
    let keepalived_name = keepalived.display().to_string();
    let keepalived_text = read(keepalived)?;
    let haproxy_file = match haproxy {
        Some(path) => Some((path.display().to_string(), read(path)?)),
        None => None,
    };
    let imported = import::convert(
        import::Input {
            name: &keepalived_name,
            text: &keepalived_text,
        },
        haproxy_file
            .as_ref()
            .map(|(name, text)| import::Input { name, text }),
        options,
    )?;
    for warning in &imported.warnings {
        eprintln!("balancer import: warning: {warning}");
    }
    match output {
        None => print!("{}", imported.config),
        Some(path) => {
            let mut file = std::fs::OpenOptions::new();
            file.write(true);
            if force {
                file.create(true).truncate(true);
            } else {
                // Refuses a file created since the check above.
                file.create_new(true);
            }
            let mut file = file
                .open(path)
                .with_context(|| format!("{}: cannot create", path.display()))?;
            file.write_all(imported.config.as_bytes())
                .with_context(|| format!("{}: cannot write", path.display()))?;
            eprintln!(
                "balancer import: wrote {} ({} warnings); check it with `balancer check --config {}`",
                path.display(),
                imported.warnings.len(),
                path.display()
            );
        }
    }
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
