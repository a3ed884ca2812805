//! tandem: highly available storage for a pair of machines.
//!
//! Minimal command line for the replication daemon (branch `engine`); the lead's main.rs
//! replaces it on merge.

#[allow(dead_code)]
mod config;
mod daemon;
#[allow(dead_code)]
mod exit;
mod logging;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

use daemon::control::{self, Request};

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "Highly available storage for a pair of machines"
)]
struct Cli {
    #[arg(short, long, global = true, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    #[arg(long, global = true)]
    node: Option<String>,
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the replication daemon in the foreground.
    Daemon,
    /// Write fresh replication metadata on the local disk of RES.
    Create {
        resource: String,
        #[arg(long, value_parser = config::parse_size)]
        extent_size: Option<u64>,
        #[arg(long)]
        force: bool,
    },
    /// Change the replication role through the daemon.
    Role {
        role: daemon::Role,
        #[arg(required = true)]
        resources: Vec<String>,
        #[arg(long)]
        force: bool,
    },
    /// Replication status as JSON.
    Status { resources: Vec<String> },
    /// Wait until the resources are in sync.
    WaitSync {
        resources: Vec<String>,
        #[arg(long, value_parser = config::parse_duration, default_value = "1h")]
        timeout: Duration,
    },
    /// End a split-brain on this node: discard its data and resync from the peer.
    Resolve {
        resource: String,
        #[arg(long, required = true)]
        discard_local: bool,
    },
}

fn run(cli: Cli) -> Result<()> {
    let cfg = config::load(&cli.config, cli.node.as_deref())?;
    logging::init(Some(&cfg.log), cli.verbose, cli.quiet);
    let sock = cfg.daemon.control.clone();
    let t = cfg.daemon.timeout.max(Duration::from_secs(30));
    match cli.command {
        Command::Daemon => daemon::run(cfg, cli.config.clone()),
        Command::Create {
            resource,
            extent_size,
            force,
        } => {
            let res = cfg
                .resource(&resource)
                .ok_or_else(|| exit::Usage(format!("{resource}: no such resource")))?;
            let local = res
                .local
                .clone()
                .ok_or_else(|| exit::Usage(format!("{resource}: no local disk")))?;
            daemon::metadata::create(
                &local,
                &resource,
                extent_size.unwrap_or(res.extent_size),
                force,
            )?;
            Ok(())
        }
        Command::Role {
            role,
            resources,
            force,
        } => {
            control::request(
                &sock,
                &Request::Role {
                    role,
                    resources,
                    force,
                },
                t,
            )?
            .into_result()?;
            Ok(())
        }
        Command::Status { resources } => {
            let r = control::request(&sock, &Request::Status { resources }, t)?.into_result()?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            Ok(())
        }
        Command::WaitSync { resources, timeout } => {
            control::wait_sync(&sock, &resources, timeout, true)
        }
        Command::Resolve {
            resource,
            discard_local: _,
        } => {
            control::request(&sock, &Request::Resolve { resource }, t)?.into_result()?;
            Ok(())
        }
    }
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            std::process::exit(if e.use_stderr() { exit::USAGE } else { 0 });
        }
    };
    if let Err(e) = run(cli) {
        eprintln!("tandem: {e:#}");
        let code = match e.downcast_ref::<control::ControlError>() {
            Some(c) => c.exit_code(),
            None => exit::code_for(&e),
        };
        std::process::exit(code);
    }
}
