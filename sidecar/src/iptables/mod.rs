//! `sidecar init-iptables`: installs (or with `--cleanup` removes) the nat
//! rules that send a pod's TCP through its sidecar in transparent mode;
//! what Istio's init container and Linkerd's proxy-init do.
//!
//! Flags (each also `MESHLET_*`) → [`rules::Options`] → the pure plan
//! ([`rules::install_plan`] / [`rules::cleanup_plan`]) → [`backend`]
//! prints it (`--dry-run`) or runs it with the detected iptables flavour,
//! for IPv4 and, with `--ipv6`, with `ip6tables` too.

pub mod backend;
pub mod rules;

use std::process::ExitCode;

use clap::Parser;

use self::backend::Flavour;
use self::rules::{Cidr, Family, InboundPorts, Options};

/// meshlet init-iptables: redirect a pod's TCP to its sidecar (run once,
/// as root or with NET_ADMIN, before the app starts).
#[derive(Debug, Parser)]
#[command(
    name = "sidecar init-iptables",
    bin_name = "sidecar init-iptables",
    version
)]
pub struct InitArgs {
    /// UID the sidecar runs as; its own traffic is never redirected.
    #[arg(long, env = "MESHLET_PROXY_UID", default_value_t = 1337)]
    pub proxy_uid: u32,
    /// The sidecar's inbound listener (REDIRECT target of incoming TCP).
    #[arg(long, env = "MESHLET_INBOUND_PORT", default_value_t = 15006)]
    pub inbound_port: u16,
    /// The sidecar's outbound listener (REDIRECT target of outgoing TCP).
    #[arg(long, env = "MESHLET_OUTBOUND_PORT", default_value_t = 15001)]
    pub outbound_port: u16,
    /// The sidecar's admin port (never redirected).
    #[arg(long, env = "MESHLET_ADMIN_PORT", default_value_t = 15020)]
    pub admin_port: u16,
    /// The control plane's port (never redirected).
    #[arg(long, env = "MESHLET_CONTROL_PLANE_PORT", default_value_t = 15010)]
    pub control_plane_port: u16,
    /// Inbound ports sent to the sidecar: `*` (all) or a list `8080,9090`.
    #[arg(long, env = "MESHLET_INCLUDE_INBOUND_PORTS", default_value = "*")]
    pub include_inbound_ports: InboundPorts,
    /// Inbound ports left alone, e.g. `22,9100`.
    #[arg(long, env = "MESHLET_EXCLUDE_INBOUND_PORTS", value_delimiter = ',')]
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports left alone, e.g. `5432`.
    #[arg(long, env = "MESHLET_EXCLUDE_OUTBOUND_PORTS", value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destination ranges left alone, e.g. `169.254.169.254/32,10.96.0.0/12`.
    #[arg(long, env = "MESHLET_EXCLUDE_OUTBOUND_CIDRS", value_delimiter = ',')]
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// Also write the IPv6 rules (ip6tables).
    #[arg(long, env = "MESHLET_IPV6")]
    pub ipv6: bool,
    /// iptables flavour [default: detected: the one already holding rules,
    /// else what `iptables --version` says].
    #[arg(long, env = "MESHLET_IPTABLES", value_enum)]
    pub iptables: Option<Flavour>,
    /// Remove every rule and chain init-iptables made, instead of adding.
    #[arg(long)]
    pub cleanup: bool,
    /// Print the commands (a shell script) instead of running them.
    #[arg(long)]
    pub dry_run: bool,
}

impl InitArgs {
    pub fn options(&self) -> Options {
        Options {
            proxy_uid: self.proxy_uid,
            inbound_port: self.inbound_port,
            outbound_port: self.outbound_port,
            admin_port: self.admin_port,
            control_plane_port: self.control_plane_port,
            include_inbound_ports: self.include_inbound_ports.clone(),
            exclude_inbound_ports: self.exclude_inbound_ports.clone(),
            exclude_outbound_ports: self.exclude_outbound_ports.clone(),
            exclude_outbound_cidrs: self.exclude_outbound_cidrs.clone(),
        }
    }
}

/// Runs `sidecar init-iptables` with `args` (argv without the program
/// name's `init-iptables`); the process exit code.
pub fn main(args: InitArgs) -> ExitCode {
    let flavour = args.iptables.or_else(backend::detect);
    let options = args.options();
    let families: &[Family] = if args.ipv6 {
        &[Family::V4, Family::V6]
    } else {
        &[Family::V4]
    };
    for &family in families {
        let program = backend::program(family, flavour);
        let steps = if args.cleanup {
            rules::cleanup_plan()
        } else {
            rules::install_plan(&options, family)
        };
        if args.dry_run {
            for step in &steps {
                println!("{}", backend::shell_line(&program, step));
            }
            continue;
        }
        if let Err(error) = backend::execute(&program, &steps) {
            eprintln!("sidecar init-iptables: error: {error}");
            return ExitCode::FAILURE;
        }
        eprintln!(
            "sidecar init-iptables: {} the meshlet nat rules with {program}",
            if args.cleanup { "removed" } else { "installed" }
        );
    }
    ExitCode::SUCCESS
}
