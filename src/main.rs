//! tandem: highly available storage for a pair of machines.
//!
//! The command line: one function per subcommand; each loads the config it needs and hands
//! over to the module that owns the job.

mod backend;
mod config;
mod daemon;
mod demo;
mod exit;
mod host;
mod logging;
mod nbd_client;
mod ocf;
mod status;
mod switch;
#[cfg(target_os = "linux")]
mod watch;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::exit::Usage;

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "Highly available storage for a pair of machines",
    max_term_width = 100
)]
struct Cli {
    /// Configuration file.
    #[arg(short, long, global = true, env = "TANDEM_CONFIG", default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    /// Act as this node instead of the `node` key or the hostname.
    #[arg(long, global = true, env = "TANDEM_NODE")]
    node: Option<String>,
    /// More output on stderr (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only warnings and errors on stderr.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone, Copy, Default)]
pub struct StepOpts {
    /// Print every step that would run, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Promote even data known to be stale or in split-brain.
    #[arg(long)]
    pub force: bool,
}

#[derive(Subcommand)]
enum Command {
    /// devd/udev/keepalived/ucarp entry point: promote or demote on a state word.
    Switch {
        #[command(flatten)]
        opts: StepOpts,
        /// The caller's arguments; the first state word (master, BACKUP, LINK_UP, …) decides.
        #[arg(required = true, num_args = 1.., value_name = "EVENT")]
        event: Vec<String>,
    },
    /// Make this node primary: role, wait for device, fsck, mount, start services.
    Promote {
        #[command(flatten)]
        opts: StepOpts,
        resources: Vec<String>,
    },
    /// Stop services, unmount (killing holders if needed), role secondary.
    Demote {
        #[command(flatten)]
        opts: StepOpts,
        resources: Vec<String>,
    },
    /// Role, connection, sync state, device, mount and services.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        resources: Vec<String>,
    },
    /// Parse and validate the config; print the effective config for this node.
    CheckConfig,
    /// Run the replication daemon in the foreground.
    Daemon,
    /// Write fresh replication metadata on the local disk of RES.
    Create {
        resource: String,
        /// Extent size of the dirty map (default 2M).
        #[arg(long, value_parser = parse_size_arg)]
        extent_size: Option<u64>,
        /// Overwrite existing metadata.
        #[arg(long)]
        force: bool,
    },
    /// Change the replication role through the daemon (like hastctl role).
    Role {
        #[arg(value_parser = ["init", "primary", "secondary"])]
        role: String,
        #[arg(required = true)]
        resources: Vec<String>,
        /// Become primary even on stale or split-brain data.
        #[arg(long)]
        force: bool,
    },
    /// Wait until the resources are in sync.
    WaitSync {
        resources: Vec<String>,
        /// Give up after this long (e.g. 10m).
        #[arg(long, value_parser = parse_duration_arg, default_value = "1h")]
        timeout: Duration,
    },
    /// End a split-brain on this node: discard its data and resync from the peer.
    Resolve {
        resource: String,
        #[arg(long, required = true)]
        discard_local: bool,
    },
    /// Compare the two replicas extent by extent while serving (DRBD's online verify).
    Verify {
        resource: String,
        /// Resync the extents that differ from this node (the primary).
        #[arg(long)]
        repair: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Hash at most this many bytes per second on each node (default 100M; 0: no limit).
        #[arg(long, value_parser = parse_size_arg, value_name = "SIZE")]
        rate: Option<u64>,
    },
    /// Watch rtnetlink for the VIP and run `switch` when it comes or goes (Linux).
    Watch {
        /// Also be slave while this link has no carrier.
        #[arg(long, value_name = "IFACE")]
        carrier: Option<String>,
    },
    /// OCF resource agent for Pacemaker (ocf/tandem runs this): start, stop, promote,
    /// demote, monitor, notify, meta-data, validate-all, reload-agent; parameters from
    /// OCF_RESKEY_resource and OCF_RESKEY_config. Also the daemon.exec hook for fencing.
    Ocf {
        action: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// A complete two-node pair on loopback: sync, writes, failover, resync.
    Demo,
    /// Inject a fault into the local disk of RES in the running daemon. Only in builds with
    /// the `faults` feature (the test suite), hidden: not a command for users.
    #[cfg(feature = "faults")]
    #[command(hide = true)]
    Fault {
        resource: String,
        #[command(subcommand)]
        action: daemon::faultdisk::Action,
    },
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    config::parse_duration(s)
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    config::parse_size(s)
}

fn load(cli: &Cli) -> Result<Config> {
    config::load(&cli.config, cli.node.as_deref())
}

fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Demo => {
            logging::init(None, cli.verbose, cli.quiet);
            return demo::run();
        }
        Command::Ocf { action, args } => {
            std::process::exit(ocf::run(action, args, &cli.config, cli.node.as_deref()));
        }
        Command::CheckConfig => {
            let cfg = load(&cli)?;
            let text = config::to_toml(&cfg)
                .map_err(|e| anyhow::anyhow!("cannot print the configuration: {e}"))?;
            println!(
                "# {} as resolved for node {:?}",
                cfg.file.display(),
                cfg.node
            );
            print!("{text}");
            return Ok(());
        }
        _ => {}
    }
    let cfg = load(&cli)?;
    logging::init(Some(&cfg.log), cli.verbose, cli.quiet);
    match cli.command {
        Command::Switch { opts, event } => switch::cmd_switch(&cfg, &event, opts),
        Command::Promote { opts, resources } => switch::cmd_promote(&cfg, &resources, opts),
        Command::Demote { opts, resources } => switch::cmd_demote(&cfg, &resources, opts),
        Command::Status { json, resources } => status::cmd_status(&cfg, &resources, json),
        Command::Daemon => daemon::run(cfg, cli.config.clone()),
        Command::Create {
            resource,
            extent_size,
            force,
        } => cmd_create(&cfg, &resource, extent_size, force),
        Command::Role {
            role,
            resources,
            force,
        } => daemon::control::cmd_role(&cfg, &role, &resources, force),
        Command::WaitSync { resources, timeout } => {
            daemon::control::cmd_wait_sync(&cfg, &resources, timeout)
        }
        Command::Resolve { resource, .. } => daemon::control::cmd_resolve(&cfg, &resource),
        Command::Verify {
            resource,
            repair,
            json,
            rate,
        } => daemon::control::cmd_verify(&cfg, &resource, repair, json, rate),
        #[cfg(target_os = "linux")]
        Command::Watch { carrier } => watch::cmd_watch(&cfg, carrier.as_deref()),
        #[cfg(not(target_os = "linux"))]
        Command::Watch { .. } => Err(Usage(
            "tandem watch is for Linux; on FreeBSD devd calls tandem switch".into(),
        )
        .into()),
        #[cfg(feature = "faults")]
        Command::Fault { resource, action } => daemon::control::cmd_fault(&cfg, &resource, action),
        Command::CheckConfig | Command::Demo | Command::Ocf { .. } => {
            Err(Usage("unreachable".into()).into())
        }
    }
}

/// `tandem create`: fresh metadata on this node's disk of a `tandem` resource.
fn cmd_create(cfg: &Config, name: &str, extent_size: Option<u64>, force: bool) -> Result<()> {
    let res = cfg.select(&[name.to_string()])?[0];
    if res.backend != config::BackendKind::Tandem {
        return Err(Usage(format!(
            "create {name}: the resource uses backend {:?}; create is for backend \"tandem\" (for hast use hastctl create)",
            res.backend.to_string()
        ))
        .into());
    }
    let local = res.local.as_ref().ok_or_else(|| {
        Usage(format!(
            "create {name}: no local disk for node {:?}",
            cfg.node
        ))
    })?;
    let extent = extent_size.unwrap_or(res.extent_size);
    let h = daemon::metadata::create(local, name, extent, force)?;
    log::info!(
        "create {name}: metadata written on {} (data {} bytes, extent {} bytes, {} extents)",
        local.display(),
        h.data_size,
        h.extent_size,
        h.data_size.div_ceil(h.extent_size)
    );
    Ok(())
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::USAGE
            } else {
                exit::SUCCESS
            };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let (verbose, quiet) = (cli.verbose, cli.quiet);
    // Before the config is read, errors still go to stderr.
    let result = run(cli);
    if let Err(e) = result {
        logging::init(None, verbose, quiet);
        eprintln!("tandem: {e:#}");
        std::process::exit(exit::code_for(&e));
    }
}
