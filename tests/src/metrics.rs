//! Reading a sidecar's `/metrics`: a small parser of the Prometheus text
//! format (samples with their labels; comments skipped), waiting for a
//! value with a deadline, and `promtool check metrics`.
//!
//! ```text
//! let scrape = Scrape::wait_for(admin, "request_total", &[("endpoint", "/api")], 3.0).await;
//! assert_eq!(scrape.sum("response_time_seconds_count", &[("endpoint", "/api")]), 3.0);
//! ```

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{client, wait};

/// One line of the exposition: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// One `/metrics` answer, parsed.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub text: String,
    pub samples: Vec<Sample>,
}

impl Scrape {
    /// Parses exposition text; panics on a line it cannot read.
    pub fn parse(text: &str) -> Scrape {
        let samples = text
            .lines()
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(|line| parse_sample(line).unwrap_or_else(|| panic!("unreadable line {line:?}")))
            .collect();
        Scrape {
            text: text.to_owned(),
            samples,
        }
    }

    /// `GET /metrics` on `admin`.
    pub async fn of(admin: SocketAddr) -> Scrape {
        let reply = client::get(admin, "/metrics")
            .await
            .expect("/metrics answers");
        assert_eq!(reply.status, 200, "{}", reply.text());
        Scrape::parse(&reply.text())
    }

    /// Polls `/metrics` until the samples named `name` with `labels` sum to
    /// `expected` (a request is counted when its response has ended, which
    /// the server may notice just after the client).
    pub async fn wait_for(
        admin: SocketAddr,
        name: &str,
        labels: &[(&str, &str)],
        expected: f64,
    ) -> Scrape {
        let found = wait::within(Duration::from_secs(5), || async move {
            let scrape = Scrape::of(admin).await;
            (scrape.sum(name, labels) == expected).then_some(scrape)
        })
        .await;
        if let Some(scrape) = found {
            return scrape;
        }
        let scrape = Scrape::of(admin).await;
        panic!(
            "{name}{labels:?} is {} (expected {expected}) after 5s:\n{}",
            scrape.sum(name, labels),
            scrape.text
        )
    }

    /// The samples named `name` whose labels include all of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a Sample> {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The sum of [`Scrape::matching`] samples (0 when there are none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }
}

/// `name{k="v",...} value` or `name value` (an optional timestamp after
/// the value is ignored).
fn parse_sample(line: &str) -> Option<Sample> {
    let (name, mut rest) = line.split_at(line.find(['{', ' '])?);
    let mut labels = BTreeMap::new();
    if let Some(mut body) = rest.strip_prefix('{') {
        loop {
            body = body.trim_start_matches(',');
            if let Some(after) = body.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, quoted) = body.split_once("=\"")?;
            let (value, after) = read_quoted(quoted)?;
            labels.insert(key.to_owned(), value);
            body = after;
        }
    }
    let value = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().ok()?,
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// An escaped label value up to its closing quote, and the text after it.
fn read_quoted(text: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &text[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => value.push('\n'),
                other => value.push(other),
            },
            c => value.push(c),
        }
    }
    None
}

/// Runs `promtool check metrics` on `text`: `Err` with its output when it
/// reports anything. Without promtool the check fails, saying how to
/// install it, unless `MESHLET_SKIP_PROMTOOL=1` (then it is skipped).
pub fn promtool_check(text: &str) -> Result<(), String> {
    let said = promtool(&["check", "metrics"], text)?;
    if said.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("promtool check metrics:\n{said}"))
    }
}

/// Runs `promtool check rules FILE` (PromQL syntax of every rule's
/// expression); same rules for a missing promtool.
pub fn promtool_check_rules(file: &std::path::Path) -> Result<(), String> {
    promtool(&["check", "rules", &file.to_string_lossy()], "").map(drop)
}

/// Runs `promtool ARGS` with `input` on stdin: what it said when it exits
/// 0, else `Err` with its output.
fn promtool(args: &[&str], input: &str) -> Result<String, String> {
    let spawned = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            if std::env::var("MESHLET_SKIP_PROMTOOL").as_deref() == Ok("1") {
                eprintln!("promtool not found; check skipped (MESHLET_SKIP_PROMTOOL=1)");
                return Ok(String::new());
            }
            panic!(
                "promtool not found: install it with `apt-get install prometheus` \
                 (or set MESHLET_SKIP_PROMTOOL=1 to skip this check)"
            );
        }
        Err(error) => panic!("cannot run promtool: {error}"),
    };
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())
        .expect("input written to promtool");
    let output = child.wait_with_output().expect("promtool finishes");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(said)
    } else {
        Err(format!(
            "promtool {} ({}):\n{said}",
            args.join(" "),
            output.status
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_samples_with_escaped_labels() {
        let scrape = Scrape::parse(
            "# HELP x help\n# TYPE x counter\nx{a=\"1\",b=\"q\\\"x,}\"} 3\nup 1\nh_bucket{le=\"+Inf\"} 2\n",
        );
        assert_eq!(scrape.samples.len(), 3);
        assert_eq!(scrape.samples[0].labels["b"], "q\"x,}");
        assert_eq!(scrape.sum("x", &[("a", "1")]), 3.0);
        assert_eq!(scrape.sum("up", &[]), 1.0);
        assert_eq!(scrape.sum("h_bucket", &[("le", "+Inf")]), 2.0);
        assert_eq!(scrape.sum("x", &[("a", "2")]), 0.0);
    }
}
