//! meshctl's output: aligned text tables (the default), or the API types
//! as JSON or YAML (`-o json|yaml`), plus small formatters (ages, span
//! durations, labels).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

/// Serializes `value` as JSON or YAML; `None` for `Table` (the caller
/// prints its own table).
pub fn structured<T: Serialize>(format: Format, value: &T) -> Option<String> {
    let text = match format {
        Format::Table => return None,
        Format::Json => serde_json::to_string_pretty(value).map(|mut s| {
            s.push('\n');
            s
        }),
        Format::Yaml => {
            return Some(serde_yaml::to_string(value).unwrap_or_else(|e| format!("error: {e}\n")))
        }
    };
    Some(text.unwrap_or_else(|e| format!("error: {e}\n")))
}

/// An aligned table: columns separated by three spaces, the last one not
/// padded, every line ending with a newline.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = widths[i].saturating_sub(cell.chars().count());
                line.push_str(cell);
                line.push_str(&" ".repeat(pad + 3));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `850ms`, `12s`, `3m4s`, `2h5m`, `3d4h`.
pub fn age(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0 => format!("{}ms", d.as_millis()),
        1..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{}s", secs / 60, secs % 60),
        3600..=86_399 => format!("{}h{}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{}h", secs / 86_400, secs % 86_400 / 3600),
    }
}

/// A span's duration: `850µs`, `1.23ms`, `4.50s`, then as [`age`].
pub fn duration_us(micros: f64) -> String {
    match micros {
        m if m < 1_000.0 => format!("{m:.0}µs"),
        m if m < 1_000_000.0 => format!("{:.2}ms", m / 1_000.0),
        m if m < 60_000_000.0 => format!("{:.2}s", m / 1_000_000.0),
        m => age(Duration::from_secs_f64(m / 1_000_000.0)),
    }
}

/// The wall clock in Unix milliseconds, what ages are measured from.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Writes to stdout. A closed stdout (`meshctl get services | head -1`)
/// is not an error worth a panic; the rest of the output is dropped.
pub fn emit(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use meshlet_api::display::labels;

    use super::*;

    #[test]
    fn table_aligns_columns() {
        let rows = vec![
            vec!["default".into(), "orders".into(), "3".into()],
            vec!["shop".into(), "payments-long".into(), "10".into()],
        ];
        let text = table(&["NAMESPACE", "NAME", "INSTANCES"], &rows);
        assert_eq!(
            text,
            "NAMESPACE   NAME            INSTANCES\n\
             default     orders          3\n\
             shop        payments-long   10\n"
        );
        assert_eq!(table(&["A", "B"], &[]), "A   B\n");
        // An empty last cell leaves no trailing spaces.
        assert_eq!(
            table(&["A", "B"], &[vec!["x".into(), String::new()]]),
            "A   B\nx\n"
        );
    }

    #[test]
    fn ages_and_labels() {
        assert_eq!(age(Duration::from_millis(850)), "850ms");
        assert_eq!(age(Duration::from_secs(12)), "12s");
        assert_eq!(age(Duration::from_secs(184)), "3m4s");
        assert_eq!(age(Duration::from_secs(7500)), "2h5m");
        assert_eq!(age(Duration::from_secs(3 * 86_400 + 3600)), "3d1h");
        assert_eq!(duration_us(850.4), "850µs");
        assert_eq!(duration_us(1_234.0), "1.23ms");
        assert_eq!(duration_us(4_500_000.0), "4.50s");
        assert_eq!(duration_us(125_000_000.0), "2m5s");
        assert_eq!(labels(&BTreeMap::new()), "<none>");
        let l = BTreeMap::from([("a".into(), "1".into()), ("b".into(), "2".into())]);
        assert_eq!(labels(&l), "a=1,b=2");
    }

    #[test]
    fn structured_output() {
        assert_eq!(structured(Format::Table, &1), None);
        assert_eq!(structured(Format::Json, &vec![1]).unwrap(), "[\n  1\n]\n");
        assert_eq!(structured(Format::Yaml, &vec![1]).unwrap(), "- 1\n");
    }
}
