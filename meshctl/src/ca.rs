//! `meshctl ca status|rotate`: the mesh CA's workload roots
//! (`GET /api/v1/ca`, admin or viewer) and a rotation (`POST
//! /api/v1/ca/rotate`, admin), printed as a table of roots: subject,
//! serial, fingerprint prefix, expiry, whether it signs, its live leaves;
//! then the rotation in progress, if any.

use std::time::Duration;

use meshlet_api::mesh::{paths, CaStatus};

use crate::client::ControlPlane;
use crate::error::CommandError;
use crate::output::{emit, now_ms, structured, table, Format};

/// `meshctl ca status [-o json|yaml]`.
pub async fn status(cp: &ControlPlane, format: Format) -> Result<bool, CommandError> {
    let status: CaStatus = cp.get(paths::CA).await?;
    print(&status, format);
    Ok(true)
}

/// `meshctl ca rotate [-o json|yaml]`: starts a rotation, prints the new status.
pub async fn rotate(cp: &ControlPlane, format: Format) -> Result<bool, CommandError> {
    let body = serde_json::Value::Object(Default::default());
    let status: CaStatus = cp.post(paths::CA_ROTATE, &body).await?;
    print(&status, format);
    Ok(true)
}

fn print(status: &CaStatus, format: Format) {
    match structured(format, status) {
        Some(text) => emit(&text),
        None => emit(&status_text(status, now_ms())),
    }
}

/// `3d 4h`, `23h 59m`, `4m 10s`, `12s`.
pub fn span(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m {}s", secs / 60, secs % 60),
        3600..=86_399 => format!("{}h {}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d {}h", secs / 86_400, secs % 86_400 / 3600),
    }
}

/// `expires in 23h 59m` or `expired 3m 2s ago`, from Unix milliseconds.
pub fn expiry(not_after_ms: u64, now_ms: u64) -> String {
    if not_after_ms > now_ms {
        format!(
            "expires in {}",
            span(Duration::from_millis(not_after_ms - now_ms))
        )
    } else {
        format!(
            "expired {} ago",
            span(Duration::from_millis(now_ms - not_after_ms))
        )
    }
}

/// The status as text: a header, the roots' table (bundle order: the
/// signing root first) and the rotation line.
pub fn status_text(status: &CaStatus, now_ms: u64) -> String {
    let mut out = format!(
        "Trust domain:          {}\nWorkload cert TTL:     {}\n\n",
        status.trust_domain,
        span(Duration::from_millis(status.workload_cert_ttl_ms))
    );
    let rows: Vec<Vec<String>> = status
        .roots
        .iter()
        .map(|r| {
            vec![
                r.subject.clone(),
                r.serial.clone(),
                r.fingerprint.chars().take(16).collect(),
                expiry(r.not_after_ms, now_ms),
                if r.signing { "yes" } else { "no" }.to_owned(),
                r.live_leaves.to_string(),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "SUBJECT",
            "SERIAL",
            "FINGERPRINT",
            "NOT AFTER",
            "SIGNING",
            "LIVE LEAVES",
        ],
        &rows,
    ));
    out.push_str(&format!(
        "\nRotation: {}\n",
        status.rotation.as_deref().unwrap_or("none in progress")
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshlet_api::mesh::CaRoot;

    #[test]
    fn spans_and_expiries_read_like_a_person_would_say_them() {
        assert_eq!(span(Duration::from_secs(86_340)), "23h 59m");
        assert_eq!(span(Duration::from_secs(250)), "4m 10s");
        assert_eq!(span(Duration::from_secs(3 * 86_400 + 7200)), "3d 2h");
        assert_eq!(expiry(10_000 + 86_340_000, 10_000), "expires in 23h 59m");
        assert_eq!(expiry(1_000, 63_000), "expired 1m 2s ago");
    }

    #[test]
    fn the_status_table_lists_roots_signing_first() {
        let root = |fp: &str, signing, live| CaRoot {
            subject: "O=meshlet, CN=meshlet mesh CA meshlet.local".into(),
            serial: "4a".into(),
            fingerprint: fp.into(),
            not_after_ms: 2 * 86_400_000,
            signing,
            live_leaves: live,
        };
        let status = CaStatus {
            trust_domain: "meshlet.local".into(),
            workload_cert_ttl_ms: 86_400_000,
            roots: vec![
                root("00112233445566778899aabbccddeeff", true, 3),
                root("ffeeddccbbaa99887766554433221100", false, 1),
            ],
            rotation: Some("phase 2 of 3: ...".into()),
        };
        let text = status_text(&status, 86_400_000);
        assert!(text.contains("Workload cert TTL:     1d 0h"), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        let first = lines
            .iter()
            .position(|l| l.contains("0011223344556677"))
            .unwrap();
        let second = lines
            .iter()
            .position(|l| l.contains("ffeeddccbbaa9988"))
            .unwrap();
        assert!(first < second, "{text}");
        assert!(lines[first].contains("yes") && lines[first].contains("expires in 1d 0h"));
        assert!(
            !text.contains("00112233445566778"),
            "fingerprint prefix only: {text}"
        );
        assert!(text.ends_with("Rotation: phase 2 of 3: ...\n"), "{text}");
    }
}
