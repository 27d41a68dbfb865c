//! `meshctl`: the command-line client of meshlet. Flags and dispatch only;
//! the commands live in the library (`validate`, `commands`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use meshlet_control_plane::client::ControlPlane;
use meshlet_control_plane::commands::{self, emit, Broadcast, CommandError, ServiceRef};
use meshlet_control_plane::output::Format;
use meshlet_control_plane::validate::validate_path;

#[derive(Debug, Parser)]
#[command(name = "meshctl", version, about = "meshlet command-line client")]
struct Args {
    /// The control plane's API.
    #[arg(
        long,
        global = true,
        env = "MESHLET_SERVER",
        default_value = "http://127.0.0.1:15010"
    )]
    server: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check resource files (YAML) offline: syntax, unknown fields, values.
    Validate {
        /// A file, a directory of *.yaml files, or - for stdin.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// List services or a service's endpoints.
    Get {
        #[command(subcommand)]
        what: Get,
    },
    /// Show a service in detail: instances, health, heartbeats, policies.
    Describe {
        #[command(subcommand)]
        what: Describe,
    },
    /// Apply resource files (YAML) to the control plane, all or nothing.
    Apply {
        /// A file, a directory of *.yaml files, or - for stdin.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Send one request to every healthy instance (through its sidecar).
    Broadcast {
        /// The request path.
        #[arg(long)]
        path: String,
        /// The JSON body, or @FILE (@- for stdin).
        #[arg(long, default_value = "{}")]
        data: String,
        /// Only this service (`name` or `name.namespace`).
        #[arg(long)]
        service: Option<String>,
        #[arg(long, default_value = "POST")]
        method: http::Method,
        /// Per-instance request timeout.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

#[derive(Debug, Subcommand)]
enum Get {
    /// All services with their instance counts.
    #[command(alias = "service", alias = "svc")]
    Services {
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Format,
    },
    /// The endpoints of one service.
    #[command(alias = "endpoint", alias = "ep")]
    Endpoints {
        /// `name` or `name.namespace`.
        service: String,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Format,
    },
}

#[derive(Debug, Subcommand)]
enum Describe {
    #[command(alias = "services", alias = "svc")]
    Service {
        /// `name` or `name.namespace`.
        name: String,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Format,
    },
}

fn validate(file: PathBuf) -> ExitCode {
    match validate_path(&file) {
        Ok(resources) => {
            for r in resources {
                emit(&format!(
                    "{}/{} valid\n",
                    r.kind().to_ascii_lowercase(),
                    r.metadata().name
                ));
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("meshctl: error: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn online(server: &str, command: Command) -> Result<bool, CommandError> {
    let cp = ControlPlane::new(server)?;
    match command {
        Command::Validate { .. } => Ok(true),
        Command::Get { what } => match what {
            Get::Services { output } => commands::get_services(&cp, output).await,
            Get::Endpoints {
                service,
                namespace,
                output,
            } => {
                let service = ServiceRef::parse(&service, namespace.as_deref());
                commands::get_endpoints(&cp, &service, output).await
            }
        },
        Command::Describe {
            what:
                Describe::Service {
                    name,
                    namespace,
                    output,
                },
        } => {
            let service = ServiceRef::parse(&name, namespace.as_deref());
            commands::describe_service(&cp, &service, output).await
        }
        Command::Apply { file } => commands::apply(&cp, &file).await,
        Command::Broadcast {
            path,
            data,
            service,
            method,
            timeout,
        } => {
            let opts = Broadcast {
                path,
                data,
                service: service.map(|s| ServiceRef::parse(&s, None)),
                method,
                timeout,
            };
            commands::broadcast(&cp, &opts).await
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Command::Validate { file } = args.command {
        return validate(file);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("meshctl: error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(online(&args.server, args.command)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("meshctl: error: {err}");
            ExitCode::FAILURE
        }
    }
}
