//! Network namespaces for the transparent-mode tests: each namespace is a
//! "pod" with its own loopback, IP, ports and nat table, joined to another
//! by a veth pair. Everything runs inside with `ip netns exec`, so the
//! traffic never leaves the namespaces the test made.
//!
//! [`Netns`] deletes its namespace on drop (which removes its iptables
//! rules and, once its processes are gone, its veth end); [`NsProcess`]
//! kills its process on drop. Keep processes in fields declared before the
//! namespaces so that they go first, on failure too.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};

/// Whether `tool` is a file in a `PATH` directory.
pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(tool).is_file()))
}

/// Why these tests cannot run here (not root, a tool missing), or `None`.
pub fn missing_prerequisite(tools: &[&str]) -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("not running as root (network namespaces and iptables need it)".to_owned());
    }
    let missing: Vec<_> = tools.iter().filter(|t| !on_path(t)).collect();
    (!missing.is_empty()).then(|| format!("missing tools: {missing:?}"))
}

/// Whether to run: outside CI a missing prerequisite skips the test (with
/// the reason printed); under `CI` it fails it.
pub fn can_run(tools: &[&str]) -> bool {
    match missing_prerequisite(tools) {
        None => true,
        Some(reason) if std::env::var_os("CI").is_some() => {
            panic!("CI is set, so this test must run, but it cannot: {reason}")
        }
        Some(reason) => {
            eprintln!("SKIPPED: {reason}");
            false
        }
    }
}

/// A named network namespace with its loopback up; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

fn must(what: &str, output: std::io::Result<Output>) -> Output {
    let output = output.unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        output.status.success(),
        "{what}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn ip(args: &[&str]) -> Output {
    must(
        &format!("ip {}", args.join(" ")),
        std::process::Command::new("ip").args(args).output(),
    )
}

impl Netns {
    pub fn create(name: &str) -> Netns {
        // A namespace left by a crashed run of the same pid goes first.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", name]);
        let ns = Netns {
            name: name.to_owned(),
        };
        ns.must(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Joins `a` (address `a_cidr`) and `b` (`b_cidr`) with a veth pair
    /// named `a_if`/`b_if` (at most 15 characters each).
    pub fn link(a: &Netns, a_if: &str, a_cidr: &str, b: &Netns, b_if: &str, b_cidr: &str) {
        ip(&[
            "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
            &b.name,
        ]);
        for (ns, dev, cidr) in [(a, a_if, a_cidr), (b, b_if, b_cidr)] {
            ns.must(&["ip", "addr", "add", cidr, "dev", dev]);
            ns.must(&["ip", "link", "set", dev, "up"]);
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// Runs `args` inside and waits (at most 30 s).
    pub async fn exec(&self, args: &[&str]) -> Output {
        let run = self.command(args).output();
        tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .unwrap_or_else(|_| panic!("{args:?} in {} took over 30 s", self.name))
            .unwrap_or_else(|e| panic!("cannot run {args:?} in {}: {e}", self.name))
    }

    /// Runs `args` inside, synchronously; asserts success.
    pub fn must(&self, args: &[&str]) -> Output {
        must(
            &format!("{} in {}", args.join(" "), self.name),
            std::process::Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(args)
                .output(),
        )
    }

    /// Starts `args` inside with stdout and stderr to `log`; killed on drop.
    pub fn spawn(&self, args: &[&str], log: &Path) -> NsProcess {
        let file = || std::fs::File::create(log).expect("log file");
        let child = self
            .command(args)
            .stdout(file())
            .stderr(file())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {args:?} in {}: {e}", self.name));
        NsProcess {
            child,
            log: log.to_owned(),
        }
    }

    /// `curl` inside: `(status, headers and body)` of `GET url`, or `None`
    /// when nothing answered.
    pub async fn curl(&self, url: &str) -> Option<(u16, String)> {
        let out = self
            .exec(&["curl", "-s", "-i", "--max-time", "5", url])
            .await;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, text))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A process inside a namespace; killed on drop.
#[derive(Debug)]
pub struct NsProcess {
    child: Child,
    pub log: std::path::PathBuf,
}

impl NsProcess {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for NsProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
