//! Runs the [`Step`]s of `rules` with the node's iptables, or prints them.
//!
//! **Which iptables.** A node has one of two kernel back ends in use:
//! nf_tables (`iptables-nft`) or the legacy xtables (`iptables-legacy`).
//! Rules written with the other one would be ignored by (or fight with)
//! the node's own, so the flavour is detected like kube-proxy's wrapper
//! does it: the flavour that already holds rules wins (Kubernetes and
//! CNI plugins always install some); when neither holds any, the one
//! `iptables --version` names (`nf_tables` or `legacy`). `--iptables
//! legacy|nft` overrides the guess. The flavoured binaries
//! (`iptables-nft`, ...) are used when present, else plain `iptables`.
//!
//! Each step becomes one shell line (`--dry-run` prints exactly what a run
//! executes, as a script): creating a chain that exists falls back to
//! flushing it, a jump is added after a failed check (`-C`), a removal
//! repeats until nothing is left to remove.

use std::process::Command;

use super::rules::{Family, Rule, Step};

/// The iptables back end in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Flavour {
    Legacy,
    Nft,
}

impl Flavour {
    fn suffix(self) -> &'static str {
        match self {
            Flavour::Legacy => "-legacy",
            Flavour::Nft => "-nft",
        }
    }
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("cannot run {program}: {source} (is iptables installed?)")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// The chosen flavour: the one holding rules, else what the default
/// binary says it is (`None`: unknown, use plain `iptables`).
pub fn choose(
    legacy_rules: usize,
    nft_rules: usize,
    default_says: Option<Flavour>,
) -> Option<Flavour> {
    match legacy_rules.cmp(&nft_rules) {
        std::cmp::Ordering::Greater => Some(Flavour::Legacy),
        std::cmp::Ordering::Less => Some(Flavour::Nft),
        std::cmp::Ordering::Equal => default_says,
    }
}

/// What `iptables --version` output names: `iptables v1.8.9 (nf_tables)`.
pub fn flavour_of_version(output: &str) -> Option<Flavour> {
    if output.contains("nf_tables") {
        Some(Flavour::Nft)
    } else if output.contains("legacy") {
        Some(Flavour::Legacy)
    } else {
        None
    }
}

/// Rules (`-A` lines) that `PROGRAM-save` lists; 0 when it cannot run.
fn rule_count(program: &str) -> usize {
    Command::new(program)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or(0, |o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.starts_with("-A "))
                .count()
        })
}

fn exists(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Detects the node's flavour (see the module docs).
pub fn detect() -> Option<Flavour> {
    let version = Command::new("iptables")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let default_says = version.as_deref().and_then(flavour_of_version);
    if !(exists("iptables-legacy-save") && exists("iptables-nft-save")) {
        return default_says;
    }
    choose(
        rule_count("iptables-legacy-save"),
        rule_count("iptables-nft-save"),
        default_says,
    )
}

/// The program for `family` in `flavour`: `ip6tables-nft`, or the plain
/// name when the flavoured binary is not installed.
pub fn program(family: Family, flavour: Option<Flavour>) -> String {
    let base = match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    };
    match flavour {
        Some(flavour) if exists(&format!("{base}{}", flavour.suffix())) => {
            format!("{base}{}", flavour.suffix())
        }
        _ => base.to_owned(),
    }
}

/// The arguments of `PROGRAM -t nat ACTION CHAIN SPEC...`.
fn args(action: &str, chain: &str, spec: &[String]) -> Vec<String> {
    let mut args = vec![
        "-t".to_owned(),
        "nat".to_owned(),
        action.to_owned(),
        chain.to_owned(),
    ];
    args.extend(spec.iter().cloned());
    args
}

fn rule_args(action: &str, rule: &Rule) -> Vec<String> {
    args(action, rule.chain, &rule.spec)
}

/// A step as commands: the first is tried, and what follows depends on
/// [`Attempt`].
enum Attempt {
    /// Run; on failure run the fallback.
    OrElse(Vec<String>, Vec<String>),
    /// Run only if the check fails.
    Unless(Vec<String>, Vec<String>),
    /// Must succeed.
    Must(Vec<String>),
    /// Failure is fine (nothing to remove).
    May(Vec<String>),
    /// Repeat until it fails.
    WhileOk(Vec<String>),
}

fn attempt(step: &Step) -> Attempt {
    match step {
        Step::ResetChain(c) => Attempt::OrElse(args("-N", c, &[]), args("-F", c, &[])),
        Step::Append(rule) => Attempt::Must(rule_args("-A", rule)),
        Step::Ensure(rule) => Attempt::Unless(rule_args("-C", rule), rule_args("-A", rule)),
        Step::DeleteAll(rule) => Attempt::WhileOk(rule_args("-D", rule)),
        Step::Flush(c) => Attempt::May(args("-F", c, &[])),
        Step::DeleteChain(c) => Attempt::May(args("-X", c, &[])),
    }
}

/// The shell line that does `step` (what `--dry-run` prints).
pub fn shell_line(program: &str, step: &Step) -> String {
    let cmd = |args: &[String]| format!("{program} {}", args.join(" "));
    match attempt(step) {
        Attempt::OrElse(a, b) => format!("{} 2>/dev/null || {}", cmd(&a), cmd(&b)),
        Attempt::Unless(check, a) => format!("{} 2>/dev/null || {}", cmd(&check), cmd(&a)),
        Attempt::Must(a) => cmd(&a),
        Attempt::May(a) => format!("{} 2>/dev/null || true", cmd(&a)),
        Attempt::WhileOk(a) => format!("while {} 2>/dev/null; do :; done", cmd(&a)),
    }
}

/// Runs one command; `Err` carries its stderr.
fn run(program: &str, args: &[String]) -> Result<(), IptablesError> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| IptablesError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    if output.status.success() {
        return Ok(());
    }
    Err(IptablesError::Failed {
        command: format!("{program} {}", args.join(" ")),
        status: output.status,
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    })
}

/// Keeps only the "could not run at all" failures: for steps whose
/// command may fail, a failed command is an answer, a missing binary is not.
fn answered(result: Result<(), IptablesError>) -> Result<bool, IptablesError> {
    match result {
        Ok(()) => Ok(true),
        Err(IptablesError::Failed { .. }) => Ok(false),
        Err(spawn) => Err(spawn),
    }
}

/// At most this many copies of a rule are removed (a guard against a
/// command that keeps "succeeding").
const MAX_COPIES: usize = 1000;

/// Executes `steps` with `program`, stopping at the first failure.
pub fn execute(program: &str, steps: &[Step]) -> Result<(), IptablesError> {
    for step in steps {
        match attempt(step) {
            Attempt::OrElse(a, b) => {
                if !answered(run(program, &a))? {
                    run(program, &b)?;
                }
            }
            Attempt::Unless(check, a) => {
                if !answered(run(program, &check))? {
                    run(program, &a)?;
                }
            }
            Attempt::Must(a) => run(program, &a)?,
            Attempt::May(a) => {
                answered(run(program, &a))?;
            }
            Attempt::WhileOk(a) => {
                for _ in 0..MAX_COPIES {
                    if !answered(run(program, &a))? {
                        break;
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iptables::rules::{cleanup_plan, install_plan, Options};

    #[test]
    fn the_flavour_with_rules_wins_else_the_default_binary() {
        assert_eq!(choose(12, 0, Some(Flavour::Nft)), Some(Flavour::Legacy));
        assert_eq!(choose(0, 3, Some(Flavour::Legacy)), Some(Flavour::Nft));
        assert_eq!(choose(0, 0, Some(Flavour::Legacy)), Some(Flavour::Legacy));
        assert_eq!(choose(0, 0, None), None);
        assert_eq!(
            flavour_of_version("iptables v1.8.9 (nf_tables)\n"),
            Some(Flavour::Nft)
        );
        assert_eq!(
            flavour_of_version("iptables v1.8.7 (legacy)\n"),
            Some(Flavour::Legacy)
        );
        assert_eq!(flavour_of_version("iptables v1.4.21\n"), None);
    }

    #[test]
    fn dry_run_lines_are_a_script() {
        let install = install_plan(&Options::default(), Family::V4);
        let lines: Vec<_> = install.iter().map(|s| shell_line("iptables", s)).collect();
        assert_eq!(
            lines[0],
            "iptables -t nat -N MESHLET_INBOUND 2>/dev/null || iptables -t nat -F MESHLET_INBOUND"
        );
        assert_eq!(
            lines.last().unwrap(),
            "iptables -t nat -C OUTPUT -p tcp -j MESHLET_OUTPUT 2>/dev/null || iptables -t nat -A OUTPUT -p tcp -j MESHLET_OUTPUT"
        );
        let cleanup: Vec<_> = cleanup_plan()
            .iter()
            .map(|s| shell_line("ip6tables", s))
            .collect();
        assert_eq!(
            cleanup[0],
            "while ip6tables -t nat -D PREROUTING -p tcp -j MESHLET_INBOUND 2>/dev/null; do :; done"
        );
        assert_eq!(
            cleanup.last().unwrap(),
            "ip6tables -t nat -X MESHLET_REDIRECT 2>/dev/null || true"
        );
    }
}
