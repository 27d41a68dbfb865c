//! meshctl's flags ([`Args`]) and what each command runs ([`run`]): the
//! offline commands (`validate`, `inject`) directly, the others on a
//! one-thread runtime against the control plane, each in a small function
//! that turns flags into a call of [`crate::services`],
//! [`crate::resources`] or [`crate::traceview`]. Every failure is printed
//! here as one line, `meshctl: error: ...`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::client::{self, ControlPlane, Credentials};
use crate::error::CommandError;
use crate::output::{emit, Format};
use crate::resources::{self, KindArg};
use crate::services::{self, Broadcast, ServiceRef};
use crate::tokens::{self, CreateArgs, Role};
use crate::traceview::{self, TraceFilter};
use crate::validate::{read_files, validate_path};
use meshlet_api::inject::{self, InjectOptions, Outcome};

#[derive(Debug, Parser)]
#[command(name = "meshctl", version, about = "meshlet command-line client")]
pub struct Args {
    /// The control plane's API: https://HOST[:PORT], or several replicas
    /// separated by commas (tried in order when one cannot be reached).
    #[arg(
        long,
        global = true,
        env = "MESHLET_SERVER",
        default_value = client::DEFAULT_SERVER
    )]
    server: String,
    /// The bearer token sent to the control plane (an admin's is in its
    /// DATA_DIR/admin.token).
    #[arg(long, global = true, env = "MESHLET_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the token (used when --token is not set).
    #[arg(long, global = true, env = "MESHLET_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The mesh CA (PEM) the control plane's certificate is verified with:
    /// the control plane's DATA_DIR/ca.crt.
    #[arg(long, global = true, env = "MESHLET_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Say on stderr which server and replica answered.
    #[arg(short = 'v', long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check resource files (YAML) offline: syntax, unknown fields, values.
    Validate {
        /// A file, a directory of *.yaml files, or - for stdin.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Add meshlet (iptables init container, sidecar, annotations) to the
    /// Deployments, StatefulSets, DaemonSets, Jobs, CronJobs and Pods of
    /// Kubernetes YAML; other documents pass through unchanged, and so does
    /// a workload that cannot be injected (with a warning on stderr).
    /// Offline: `kubectl apply -f <(meshctl inject -f deploy.yaml)`.
    Inject {
        /// A file, a directory of *.yaml files, or - for stdin.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Image of the sidecar and its init container.
        #[arg(long, default_value_t = inject::default_image())]
        image: String,
        /// The control plane as the sidecars reach it.
        #[arg(long, default_value = inject::DEFAULT_CONTROL_PLANE)]
        control_plane: String,
        /// Add the sidecar as a plain container instead of a native sidecar
        /// (for Kubernetes < 1.29; the app may start before the sidecar is
        /// ready, and Job pods do not complete on their own: see README).
        #[arg(long)]
        no_native_sidecar: bool,
    },
    /// List services, a service's endpoints, or applied resources of a kind.
    ///
    /// KIND: services (svc), endpoints (ep), replicas, healthcheckpolicies (hcp),
    /// ratelimitpolicies (rlp), circuitbreakerpolicies (cbp), retrypolicies
    /// (rp), timeoutpolicies (tp), trafficsplits (ts); any case, singular or
    /// plural.
    Get {
        kind: String,
        /// `name` or `name.namespace` (required for endpoints).
        name: Option<String>,
        /// Only this namespace (default: all when no NAME is given).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Format,
    },
    /// Show a service (instances, health, policies) or a resource (its
    /// YAML and the revision that last changed it).
    Describe {
        kind: String,
        /// `name` or `name.namespace`.
        name: String,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Format,
    },
    /// Apply resource files (YAML) to the control plane, all or nothing.
    Apply {
        /// A file, a directory of *.yaml files, or - for stdin.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Delete resources (those of files, or KIND NAME...) in one revision;
    /// nothing is deleted if any does not exist.
    Delete {
        /// A file, a directory of *.yaml files, or - for stdin.
        #[arg(short = 'f', long = "filename", conflicts_with_all = ["kind", "names"])]
        file: Option<PathBuf>,
        kind: Option<String>,
        /// `name` or `name.namespace`.
        names: Vec<String>,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Skip resources that do not exist instead of failing.
        #[arg(long)]
        ignore_not_found: bool,
    },
    /// Show what an apply would change; exit 0 if nothing, 1 if something,
    /// 2 on error.
    Diff {
        /// A file, a directory of *.yaml files, or - for stdin.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Revisions, newest first: when, who, what changed.
    History {
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Leave out the registry's revisions (registrations, health, expiry).
        #[arg(long)]
        resources_only: bool,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Format,
    },
    /// Make the applied resources what they were right after REVISION, as
    /// a new revision (registered instances are not touched).
    Rollback { revision: u64 },
    /// Recent traces, newest first (from the control plane's trace store).
    Traces {
        /// Only traces with a span of this service.
        #[arg(long)]
        service: Option<String>,
        /// Only traces at least this long (`10ms`, `1s`).
        #[arg(long, value_parser = humantime::parse_duration)]
        min_duration: Option<Duration>,
        /// At most this many traces (default 20, at most 1000).
        #[arg(long)]
        limit: Option<usize>,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Format,
    },
    /// One trace as a waterfall: spans as a tree with their timing.
    Trace {
        /// The trace id (32 hex digits).
        id: String,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Format,
    },
    /// Tokens of the control plane (admin only): create, list, revoke.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// The mesh CA: its workload roots (status) and a rotation (rotate, admin).
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Check the mesh's health: control plane, store, CA and certificates,
    /// every sidecar connected and on the latest revision, version and
    /// clock skew, policies whose target has no instances. Each check ✔,
    /// ⚠ or ✖ with a hint; exit 1 if any is ✖.
    Check {
        /// Warn when the CA's signing root expires sooner than this.
        #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
        ca_expiry_warning: Duration,
        /// Warn when a sidecar's clock is this far from the control plane's.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        clock_skew_warning: Duration,
        /// Fail when a sidecar's clock is this far from the control plane's.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        clock_skew_error: Duration,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Format,
    },
    /// Stream live requests seen by the sidecars of a service or a
    /// workload (direction, peer, method, path, status, latency, reason,
    /// trace id), through the control plane. Viewer tokens see header
    /// values redacted.
    Tap {
        /// `service` (svc) or `deploy` (deployment: the pods' `app`,
        /// `app.kubernetes.io/name` or `meshlet.dev/workload` label).
        #[arg(value_enum)]
        kind: TapKind,
        name: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// Only requests whose path starts with this.
        #[arg(long)]
        path: Option<String>,
        /// Only requests with this method.
        #[arg(long)]
        method: Option<String>,
        /// Only responses with this status (503) or class (5xx).
        #[arg(long)]
        status: Option<String>,
        /// Stop after this many requests.
        #[arg(long)]
        max: Option<u64>,
        /// `json`: one JSON object per line.
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Format,
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

/// What `meshctl tap` selects sidecars by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TapKind {
    #[value(alias = "svc")]
    Service,
    #[value(alias = "deployment")]
    Deploy,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// The roots in trust-bundle order (the first signs), their live leaves
    /// and the rotation in progress.
    Status {
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Format,
    },
    /// Start a rotation (admin): a new root is trusted by every sidecar,
    /// then signs, then the old one is retired once no live leaf needs it.
    /// Prints the new status.
    Rotate {
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Format,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it alone on stdout (it is shown only once):
    /// `meshctl token create --role sidecar --service orders > orders.token`.
    Create {
        #[arg(long, value_enum)]
        role: Role,
        /// The service a sidecar token is bound to (required for sidecar).
        #[arg(long)]
        service: Option<String>,
        /// The namespace a sidecar token is bound to (default: default).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Lifetime (`30m`, `1h`, `7d`); default: until revoked.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Unique name, recorded as the actor of what the token changes
        /// (default: sidecar-NAMESPACE-SERVICE, or ROLE-RANDOM).
        #[arg(long)]
        name: Option<String>,
    },
    /// List tokens (never their secrets).
    List {
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Format,
    },
    /// Revoke the token NAME; it stops working at once.
    Revoke { name: String },
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

/// `meshctl inject`: injected YAML on stdout (files joined by `---`), a
/// line per workload on stderr, and a warning for each document that could
/// not be injected (it is on stdout unchanged). Exit 0 unless a file cannot
/// be read: one workload never refuses the file.
fn inject_files(file: PathBuf, options: &InjectOptions) -> ExitCode {
    let files = match read_files(&file) {
        Ok(files) => files,
        Err(err) => {
            eprintln!("meshctl: error: {err}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = String::new();
    let mut reports = Vec::new();
    for source in files {
        let done = inject::inject_text(&source.name, &source.text, options);
        if !out.is_empty() && !done.text.is_empty() {
            out.push_str(if out.ends_with('\n') {
                "---\n"
            } else {
                "\n---\n"
            });
        }
        out.push_str(&done.text);
        reports.extend(done.reports);
    }
    emit(&out);
    for report in &reports {
        match &report.outcome {
            Outcome::NotInjected(problem) => {
                eprintln!("meshctl: warning: {problem}; passed through unchanged")
            }
            outcome => eprintln!("{} {}", report.workload, outcome.describe()),
        }
    }
    ExitCode::SUCCESS
}

/// Runs one parsed command line to its exit code.
pub fn run(args: Args) -> ExitCode {
    match args.command {
        Command::Validate { file } => validate(file),
        Command::Inject {
            file,
            image,
            control_plane,
            no_native_sidecar,
        } => {
            let options = InjectOptions {
                image,
                control_plane,
                native_sidecar: !no_native_sidecar,
            };
            inject_files(file, &options)
        }
        command => {
            let credentials = Credentials {
                token: args.token,
                token_file: args.token_file,
                ca_file: args.ca_file,
            };
            run_online(&args.server, &credentials, command, args.verbose)
        }
    }
}

/// A command that talks to the control plane, on a one-thread runtime.
fn run_online(
    server: &str,
    credentials: &Credentials,
    command: Command,
    verbose: bool,
) -> ExitCode {
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
    let is_diff = matches!(command, Command::Diff { .. });
    let result = runtime.block_on(online(server, credentials, command, verbose));
    if is_diff {
        diff_exit_code(result)
    } else {
        exit_code(result)
    }
}

/// 0 when the command fully succeeded, 1 otherwise.
fn exit_code(result: Result<bool, CommandError>) -> ExitCode {
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("meshctl: error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// `diff` follows kubectl: 0 nothing would change, 1 something would,
/// 2 the diff itself failed.
fn diff_exit_code(result: Result<bool, CommandError>) -> ExitCode {
    match result {
        Ok(false) => ExitCode::SUCCESS,
        Ok(true) => ExitCode::from(1),
        Err(err) => {
            eprintln!("meshctl: error: {err}");
            ExitCode::from(2)
        }
    }
}

async fn online(
    server: &str,
    credentials: &Credentials,
    command: Command,
    verbose: bool,
) -> Result<bool, CommandError> {
    let cp = ControlPlane::new(server, credentials)?;
    let result = dispatch(&cp, command).await;
    for line in answered_lines(&cp.answered(), verbose) {
        eprintln!("{line}");
    }
    result
}

/// What meshctl says on stderr about who answered: a skipped server
/// always (a replica is down), a mesh-wide read that lacks some replicas'
/// part always, the answering server and replica with `-v`. Never stdout,
/// which stays the command's output.
fn answered_lines(answered: &client::Answered, verbose: bool) -> Vec<String> {
    let mut lines = Vec::new();
    if !answered.partial.is_empty() {
        lines.push(format!(
            "meshctl: warning: partial answer: replica {} did not answer in time; \
             the traces and statistics only it holds are missing",
            answered.partial.join(", ")
        ));
    }
    if let Some(server) = &answered.server {
        for (skipped, cause) in &answered.skipped {
            lines.push(format!(
                "meshctl: note: {skipped} could not be reached ({cause}); {server} answered"
            ));
        }
        if verbose {
            lines.push(match &answered.replica {
                Some(replica) => format!("meshctl: answered by {server} (replica {replica})"),
                None => format!("meshctl: answered by {server}"),
            });
        }
    }
    lines
}

/// Runs an online command against `cp`.
async fn dispatch(cp: &ControlPlane, command: Command) -> Result<bool, CommandError> {
    match command {
        Command::Validate { .. } | Command::Inject { .. } => Ok(true),
        Command::Get {
            kind,
            name,
            namespace,
            output,
        } => get(cp, &kind, name.as_deref(), namespace.as_deref(), output).await,
        Command::Describe {
            kind,
            name,
            namespace,
            output,
        } => describe(cp, &kind, &name, namespace.as_deref(), output).await,
        Command::Apply { file } => resources::apply(cp, &file).await,
        Command::Delete {
            file,
            kind,
            names,
            namespace,
            ignore_not_found,
        } => {
            delete(
                cp,
                file.as_deref(),
                kind.as_deref(),
                &names,
                namespace.as_deref(),
                ignore_not_found,
            )
            .await
        }
        Command::Diff { file } => resources::diff(cp, &file).await,
        Command::History {
            limit,
            resources_only,
            output,
        } => resources::history(cp, limit, resources_only, output).await,
        Command::Rollback { revision } => resources::rollback(cp, revision).await,
        Command::Traces {
            service,
            min_duration,
            limit,
            output,
        } => {
            let filter = TraceFilter {
                service,
                min_duration,
                limit,
            };
            traceview::traces(cp, &filter, output).await
        }
        Command::Trace { id, output } => traceview::trace(cp, &id, output).await,
        Command::Token { command } => token(cp, command).await,
        Command::Ca { command } => match command {
            CaCommand::Status { output } => crate::ca::status(cp, output).await,
            CaCommand::Rotate { output } => crate::ca::rotate(cp, output).await,
        },
        Command::Check {
            ca_expiry_warning,
            clock_skew_warning,
            clock_skew_error,
            output,
        } => {
            let thresholds = crate::check::Thresholds {
                ca_expiry_warning,
                clock_skew_warning,
                clock_skew_error,
            };
            crate::check::run(cp, thresholds, output).await
        }
        Command::Tap {
            kind,
            name,
            namespace,
            path,
            method,
            status,
            max,
            output,
        } => {
            let (service, deploy) = match kind {
                TapKind::Service => (Some(name), None),
                TapKind::Deploy => (None, Some(name)),
            };
            let query = meshlet_api::tap::TapQuery {
                namespace: Some(namespace),
                service,
                deploy,
                path,
                method,
                status,
                max,
            };
            crate::tap::run(
                cp,
                crate::tap::TapRequest {
                    query,
                    format: output,
                },
            )
            .await
        }
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
            services::broadcast(cp, &opts).await
        }
    }
}

/// `meshctl token create|list|revoke`.
async fn token(cp: &ControlPlane, command: TokenCommand) -> Result<bool, CommandError> {
    match command {
        TokenCommand::Create {
            role,
            service,
            namespace,
            ttl,
            name,
        } => {
            let args = CreateArgs {
                role,
                service,
                namespace,
                ttl,
                name,
            };
            tokens::create(cp, &args).await
        }
        TokenCommand::List { output } => tokens::list(cp, output).await,
        TokenCommand::Revoke { name } => tokens::revoke(cp, &name).await,
    }
}

/// `meshctl get KIND [NAME]`.
async fn get(
    cp: &ControlPlane,
    kind: &str,
    name: Option<&str>,
    namespace: Option<&str>,
    output: Format,
) -> Result<bool, CommandError> {
    match resources::resolve_kind(kind)? {
        KindArg::Services => services::get_services(cp, name, namespace, output).await,
        KindArg::Endpoints => {
            let name = name
                .ok_or_else(|| CommandError::Usage("get endpoints needs a service name".into()))?;
            let service = ServiceRef::parse(name, namespace);
            services::get_endpoints(cp, &service, output).await
        }
        KindArg::Replicas => crate::replicas::get_replicas(cp, output).await,
        KindArg::Resource(kind) => {
            resources::get_resources(cp, kind, name, namespace, output).await
        }
    }
}

/// `meshctl describe KIND NAME`.
async fn describe(
    cp: &ControlPlane,
    kind: &str,
    name: &str,
    namespace: Option<&str>,
    output: Format,
) -> Result<bool, CommandError> {
    match resources::resolve_kind(kind)? {
        KindArg::Services => {
            let service = ServiceRef::parse(name, namespace);
            services::describe_service(cp, &service, output).await
        }
        KindArg::Endpoints => Err(CommandError::Usage(
            "describe endpoints: use describe service NAME".into(),
        )),
        KindArg::Replicas => Err(CommandError::Usage(
            "describe replicas: use get replicas".into(),
        )),
        KindArg::Resource(kind) => {
            resources::describe_resource(cp, kind, name, namespace, output).await
        }
    }
}

/// `meshctl delete -f FILE` or `meshctl delete KIND NAME...`.
async fn delete(
    cp: &ControlPlane,
    file: Option<&Path>,
    kind: Option<&str>,
    names: &[String],
    namespace: Option<&str>,
    ignore_not_found: bool,
) -> Result<bool, CommandError> {
    match (file, kind) {
        (Some(file), _) => resources::delete_files(cp, file, ignore_not_found).await,
        (None, Some(kind)) if !names.is_empty() => match resources::resolve_kind(kind)? {
            KindArg::Resource(kind) => {
                resources::delete_names(cp, kind, names, namespace, ignore_not_found).await
            }
            _ => Err(CommandError::Usage(
                "services and endpoints come from registration; delete a Service resource with delete -f".into(),
            )),
        },
        _ => Err(CommandError::Usage(
            "delete needs -f FILE or KIND NAME...".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("meshctl").chain(args.iter().copied()))
    }

    #[test]
    fn who_answered_goes_to_stderr_a_skipped_server_always() {
        let mut answered = client::Answered {
            server: Some("https://b:1".into()),
            replica: Some("cp-1".into()),
            skipped: Vec::new(),
            partial: Vec::new(),
        };
        assert!(
            answered_lines(&answered, false).is_empty(),
            "quiet by default"
        );
        assert_eq!(
            answered_lines(&answered, true),
            ["meshctl: answered by https://b:1 (replica cp-1)"]
        );
        answered
            .skipped
            .push(("https://a:1".into(), "connection refused".into()));
        answered.replica = None;
        assert_eq!(
            answered_lines(&answered, false),
            ["meshctl: note: https://a:1 could not be reached (connection refused); https://b:1 answered"]
        );
        assert_eq!(
            answered_lines(&answered, true)[1],
            "meshctl: answered by https://b:1"
        );
        // A mesh-wide read that left a replica out says so, -v or not.
        answered.skipped.clear();
        answered.partial = vec!["cp-2".into(), "cp-3".into()];
        assert_eq!(
            answered_lines(&answered, false),
            [
                "meshctl: warning: partial answer: replica cp-2, cp-3 did not answer in time; \
              the traces and statistics only it holds are missing"
            ]
        );
        assert!(parse(&["-v", "get", "services"]).unwrap().verbose);
        assert!(parse(&["get", "services", "--verbose"]).unwrap().verbose);
    }

    #[test]
    fn credentials_are_global_before_or_after_the_command() {
        let a = parse(&["--token", "t", "--ca-file", "/ca", "get", "services"]).unwrap();
        assert_eq!(a.token.as_deref(), Some("t"));
        assert_eq!(a.ca_file.as_deref(), Some(Path::new("/ca")));
        let a = parse(&[
            "get",
            "services",
            "--token-file",
            "/t",
            "--server",
            "https://cp:1",
        ])
        .unwrap();
        assert_eq!(a.token_file.as_deref(), Some(Path::new("/t")));
        assert_eq!(a.server, "https://cp:1");
    }

    #[test]
    fn token_create_takes_roles_and_durations() {
        let a = parse(&[
            "token",
            "create",
            "--role",
            "sidecar",
            "--service",
            "orders",
            "-n",
            "shop",
            "--ttl",
            "7d",
        ])
        .unwrap();
        let Command::Token {
            command:
                TokenCommand::Create {
                    role,
                    service,
                    namespace,
                    ttl,
                    name,
                },
        } = a.command
        else {
            panic!("not token create: {:?}", a.command);
        };
        assert_eq!(role, Role::Sidecar);
        assert_eq!(service.as_deref(), Some("orders"));
        assert_eq!(namespace.as_deref(), Some("shop"));
        assert_eq!(ttl, Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(name, None);
        assert!(parse(&["token", "create", "--role", "root"]).is_err());
        assert!(parse(&["token", "create", "--role", "admin", "--ttl", "soon"]).is_err());
        assert!(parse(&["token", "revoke"]).is_err());
        assert!(matches!(
            parse(&["token", "list", "-o", "json"]).unwrap().command,
            Command::Token {
                command: TokenCommand::List {
                    output: Format::Json
                }
            }
        ));
    }
}
