//! Tests of the apply pipeline: a control plane (in this process; the
//! binary for kill -9) and the real `meshctl` binary (validation before any change, one revision per
//! request, diff exit codes, delete, history, rollback with a watcher,
//! kill -9 after a rollback). Harness in `common/`; waits poll against
//! deadlines, no fixed sleeps.

mod common;

use common::{free_port, ControlPlane};
use http::{Method, StatusCode};
use meshlet_api::mesh::{paths, ApiError, WatchEvent};

const LIMIT: &str = "apiVersion: meshlet.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: orders-limit}
spec:
  targetRef: {service: orders}
  tokenBucket: {capacity: 20, refillPerSecond: 10}
";
const TIMEOUT: &str = "apiVersion: meshlet.dev/v1alpha1
kind: TimeoutPolicy
metadata: {name: orders-timeout}
spec: {targetRef: {service: orders}, request: 2s}
";
const SPLIT: &str = "apiVersion: meshlet.dev/v1alpha1
kind: TrafficSplit
metadata: {name: orders-split}
spec:
  targetRef: {service: orders}
  splits: [{labels: {version: v1}, weight: 90}, {labels: {version: v2}, weight: 10}]
";
/// Document 4, `attempts` misspelled (line 25 of the joined file, column 3).
const BAD_RETRY: &str = "apiVersion: meshlet.dev/v1alpha1
kind: RetryPolicy
metadata: {name: orders-retry}
spec:
  targetRef: {service: orders}
  atempts: 3
";
const RETRY: &str = "apiVersion: meshlet.dev/v1alpha1
kind: RetryPolicy
metadata: {name: orders-retry}
spec:
  targetRef: {service: orders}
  attempts: 3
";

fn docs(parts: &[&str]) -> String {
    parts.join("---\n")
}

#[tokio::test]
async fn invalid_document_applies_nothing_then_one_revision_diff_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(dir.path(), &[]).await;
    cp.register("orders-1", "orders", free_port()).await;
    let file = dir.path().join("orders.yaml");
    let f = file.to_str().unwrap();

    // (a) three valid documents and an invalid one: nothing applied.
    std::fs::write(&file, docs(&[LIMIT, TIMEOUT, SPLIT, BAD_RETRY])).unwrap();
    let (code, stdout, stderr) = cp.meshctl(&["apply", "-f", f]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    for part in [
        "orders.yaml",
        "document 4",
        "line 25",
        "column 3",
        "spec.atempts",
    ] {
        assert!(stderr.contains(part), "{part} in {stderr}");
    }
    for kind in ["rlp", "timeoutpolicies", "TrafficSplit", "retrypolicy"] {
        let (code, stdout, _) = cp.meshctl(&["get", kind]);
        assert_eq!(code, 0);
        assert_eq!(stdout.lines().count(), 1, "only the header: {stdout}");
    }
    // diff and delete -f validate the same way.
    let (code, _, stderr) = cp.meshctl(&["diff", "-f", f]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("line 25, column 3"), "{stderr}");
    let (code, _, stderr) = cp.meshctl(&["delete", "-f", f]);
    assert_eq!(code, 1);
    assert!(stderr.contains("spec.atempts"), "{stderr}");
    // A syntactically invalid targetRef is refused by the API itself.
    let bad_target = LIMIT.replace("service: orders", "service: Orders_1");
    let body = serde_json::json!({"files": [{"name": "t.yaml", "text": bad_target}]});
    let (status, err): (_, ApiError) = cp
        .json(
            Method::POST,
            paths::APPLY,
            Some(serde_json::to_vec(&body).unwrap()),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        err.error.contains("spec.targetRef.service"),
        "{}",
        err.error
    );
    assert_eq!(cp.revisions().await.len(), 1, "only the registration");

    // (b) diff of the fixed file: everything would be created, exit 1.
    std::fs::write(&file, docs(&[LIMIT, TIMEOUT, SPLIT, RETRY])).unwrap();
    let (code, stdout, _) = cp.meshctl(&["diff", "-f", f]);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains("ratelimitpolicy/orders-limit created\n"),
        "{stdout}"
    );
    assert!(stdout.contains("    +     capacity: 20\n"), "{stdout}");

    // The fixed file: all four in one revision.
    let (code, stdout, stderr) = cp.meshctl(&["apply", "-f", f]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        stdout.lines().filter(|l| l.ends_with(" created")).count(),
        4
    );
    assert!(stderr.is_empty(), "orders is registered: {stderr}");
    let revisions = cp.revisions().await;
    assert_eq!(revisions.len(), 2);
    assert_eq!(revisions[0].changes.len(), 4);
    // The actor is the token name (meshctl still sends USER@HOST; ignored).
    assert_eq!(revisions[0].actor, "admin");
    // Reapplying: unchanged, no revision.
    let (code, stdout, _) = cp.meshctl(&["apply", "-f", f]);
    assert_eq!(code, 0);
    assert_eq!(
        stdout.lines().filter(|l| l.ends_with(" unchanged")).count(),
        4
    );
    assert_eq!(cp.revisions().await.len(), 2);
    let (code, stdout, _) = cp.meshctl(&["diff", "-f", f]);
    assert_eq!((code, stdout.lines().count()), (0, 4), "{stdout}");

    // get: table with a summary; -o yaml re-appliable.
    let (_, stdout, _) = cp.meshctl(&["get", "rlp"]);
    assert!(
        stdout.starts_with("NAME           NAMESPACE   TARGET   LIMIT"),
        "{stdout}"
    );
    assert!(stdout.contains("10/s burst 20"), "{stdout}");
    let (_, stdout, _) = cp.meshctl(&["get", "trafficsplits"]);
    assert!(
        stdout.contains("90% version=v1, 10% version=v2"),
        "{stdout}"
    );
    let (code, yaml, _) = cp.meshctl(&["get", "retrypolicies", "-o", "yaml"]);
    assert_eq!(code, 0);
    let again = dir.path().join("again.yaml");
    std::fs::write(&again, &yaml).unwrap();
    let (code, stdout, _) = cp.meshctl(&["apply", "-f", again.to_str().unwrap()]);
    assert_eq!(
        (code, stdout.as_str()),
        (0, "retrypolicy/orders-retry unchanged\n")
    );
    let (code, _, stderr) = cp.meshctl(&["get", "rlp", "nope"]);
    assert_eq!(
        (code, stderr.as_str()),
        (1, "meshctl: error: ratelimitpolicy/nope not found\n")
    );

    // describe service lists every policy kind targeting it.
    let (_, stdout, _) = cp.meshctl(&["describe", "service", "orders"]);
    for key in [
        "ratelimitpolicy/orders-limit",
        "timeoutpolicy/orders-timeout",
        "trafficsplit/orders-split",
        "retrypolicy/orders-retry",
    ] {
        assert!(stdout.contains(key), "{key} in {stdout}");
    }
    // describe a resource: YAML and the revision that last changed it.
    let (_, stdout, _) = cp.meshctl(&["describe", "cbp", "x"]);
    assert!(stdout.is_empty());
    let (_, stdout, _) = cp.meshctl(&["describe", "RateLimitPolicy", "orders-limit"]);
    assert!(stdout.contains("Last changed:  revision 2, "), "{stdout}");
    assert!(stdout.contains(" by admin\n"), "{stdout}");
    assert!(stdout.contains("capacity: 20"), "{stdout}");

    // (b) a change: diff shows it and exits 1, then 0 after the apply.
    std::fs::write(
        &file,
        docs(&[
            &LIMIT.replace("capacity: 20", "capacity: 40"),
            TIMEOUT,
            SPLIT,
            RETRY,
        ]),
    )
    .unwrap();
    let (code, stdout, _) = cp.meshctl(&["diff", "-f", f]);
    assert_eq!(code, 1);
    assert!(
        stdout.contains("ratelimitpolicy/orders-limit configured\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("    -     capacity: 20\n    +     capacity: 40\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("timeoutpolicy/orders-timeout unchanged\n"),
        "{stdout}"
    );
    assert_eq!(cp.revisions().await.len(), 2, "diff changes nothing");
    cp.meshctl(&["apply", "-f", f]);
    let (code, _, _) = cp.meshctl(&["diff", "-f", f]);
    assert_eq!(code, 0);

    // (c) delete KIND NAME: a missing name deletes nothing.
    let (code, stdout, stderr) = cp.meshctl(&["delete", "tp", "orders-timeout", "nope"]);
    assert_eq!(code, 1);
    assert!(stdout.is_empty());
    assert!(stderr.contains("timeoutpolicy/nope not found"), "{stderr}");
    assert_eq!(cp.revisions().await.len(), 3);
    let (code, stdout, _) = cp.meshctl(&[
        "delete",
        "tp",
        "orders-timeout",
        "nope",
        "--ignore-not-found",
    ]);
    assert_eq!(
        (code, stdout.as_str()),
        (0, "timeoutpolicy/orders-timeout deleted\n")
    );
    // delete -f: the rest, in one revision.
    let (code, stdout, _) = cp.meshctl(&["delete", "-f", f]);
    assert_eq!(code, 1, "orders-timeout is gone: {stdout}");
    let (code, stdout, _) = cp.meshctl(&["delete", "-f", f, "--ignore-not-found"]);
    assert_eq!(code, 0);
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
    let revisions = cp.revisions().await;
    assert_eq!(revisions.len(), 5);
    assert_eq!(revisions[0].changes.len(), 3);
    let (_, stdout, _) = cp.meshctl(&["get", "rlp"]);
    assert_eq!(stdout.lines().count(), 1);

    // A policy for a service nobody registered: accepted, with a warning.
    let other = dir.path().join("other.yaml");
    std::fs::write(&other, LIMIT.replace("orders", "payments")).unwrap();
    let (code, stdout, stderr) = cp.meshctl(&["apply", "-f", other.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert_eq!(stdout, "ratelimitpolicy/payments-limit created\n");
    assert_eq!(stderr, "warning: no service payments is registered yet\n");
}

#[tokio::test]
async fn rollback_history_watch_and_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::spawn(dir.path(), &[]).await;
    let file = dir.path().join("p.yaml");
    let f = file.to_str().unwrap();
    std::fs::write(&file, docs(&[LIMIT, TIMEOUT])).unwrap();
    cp.meshctl(&["apply", "-f", f]); // revision 1: v1
    let (_, v1_yaml, _) = cp.meshctl(&["get", "rlp", "orders-limit", "-o", "yaml"]);
    cp.register("orders-1", "orders", free_port()).await; // revision 2: registry
    std::fs::write(
        &file,
        docs(&[&LIMIT.replace("capacity: 20", "capacity: 40"), SPLIT]),
    )
    .unwrap();
    let (_, stdout, _) = cp.meshctl(&["apply", "-f", f]); // revision 3: v2
    assert!(
        stdout.contains("ratelimitpolicy/orders-limit configured"),
        "{stdout}"
    );
    let (_, stdout, _) = cp.meshctl(&["delete", "timeoutpolicy", "orders-timeout"]); // revision 4
    assert_eq!(stdout, "timeoutpolicy/orders-timeout deleted\n");
    assert_eq!(cp.revisions().await[0].revision, 4);

    let mut events = cp.watch(None).await;
    assert!(matches!(
        events.next().await.unwrap(),
        WatchEvent::Snapshot(_)
    ));

    // (d) rollback to v1: a new revision, v1 again, watchers told.
    let (code, stdout, stderr) = cp.meshctl(&["rollback", "1"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        stdout,
        "rolled back to revision 1 as revision 5\n  \
         configured ratelimitpolicy/orders-limit\n  \
         re-created timeoutpolicy/orders-timeout\n  \
         deleted trafficsplit/orders-split\n"
    );
    let (_, yaml, _) = cp.meshctl(&["get", "rlp", "orders-limit", "-o", "yaml"]);
    assert_eq!(yaml, v1_yaml);
    let WatchEvent::Delta(delta) = events.next().await.unwrap() else {
        panic!("expected a delta");
    };
    assert_eq!(delta.revision, 5);
    assert_eq!(delta.resources.len(), 2, "{delta:?}");
    assert_eq!(delta.removed_resources.len(), 1);
    let records = cp.revisions().await;
    assert_eq!(records[0].actor, "rollback to 1 by admin");
    let (_, services, _) = cp.meshctl(&["get", "services"]);
    assert!(
        services.contains("orders   1"),
        "instances untouched: {services}"
    );
    // Again: nothing to roll back, no revision.
    let (code, stdout, _) = cp.meshctl(&["rollback", "1"]);
    assert_eq!((code, stdout.as_str()), (0, "nothing to roll back\n"));
    assert_eq!(cp.revisions().await.len(), 5);
    // Unknown revisions: a clear error, nothing changes.
    let (code, _, stderr) = cp.meshctl(&["rollback", "99"]);
    assert_eq!(code, 1);
    assert_eq!(
        stderr,
        "meshctl: error: revision 99 does not exist (the latest is 5)\n"
    );
    assert_eq!(cp.revisions().await.len(), 5);

    // (e) history: who, when, what; --resources-only hides the registry.
    let (code, stdout, _) = cp.meshctl(&["history"]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("REVISION   WHEN"), "{stdout}");
    assert!(
        lines[0].ends_with("WHO                      WHAT CHANGED"),
        "{stdout}"
    );
    // The WHEN column is as wide as its longest age (`55ms ago` or
    // `103ms ago`), so only what follows it is compared exactly.
    let after_when = lines[1]
        .split_once(" UTC)")
        .map(|(_, rest)| rest.trim_start());
    assert!(
        lines[1].starts_with("5          ")
            && after_when.is_some_and(|rest| rest
                .starts_with("rollback to 1 by admin   configured ratelimitpolicy/orders-limit")),
        "{stdout}"
    );
    assert!(stdout.contains("registry "), "{stdout}");
    assert!(stdout.contains("registered orders/orders-1"), "{stdout}");
    let (_, stdout, _) = cp.meshctl(&["history", "--resources-only", "--limit", "2"]);
    assert!(!stdout.contains("registry"), "{stdout}");
    assert!(stdout.lines().nth(1).unwrap().starts_with("5 "), "{stdout}");
    assert!(stdout.contains("\n4 "), "{stdout}");
    assert!(!stdout.contains("\n3 "), "limited to 2: {stdout}");

    // (f) kill -9 right after a rollback; the restart has it all.
    let (code, _, _) = cp.meshctl(&["rollback", "3"]);
    assert_eq!(code, 0);
    let (_, before_yaml, _) = cp.meshctl(&["get", "rlp", "-o", "yaml"]);
    let history_before = cp.revisions().await;
    cp.kill9();
    let cp = ControlPlane::start(dir.path(), &[]).await;
    assert_eq!(cp.revisions().await, history_before);
    let (_, after_yaml, _) = cp.meshctl(&["get", "rlp", "-o", "yaml"]);
    assert_eq!(after_yaml, before_yaml);
    assert!(after_yaml.contains("capacity: 40"));
    let (_, stdout, _) = cp.meshctl(&["get", "ts"]);
    assert!(stdout.contains("orders-split"), "{stdout}");
    let (_, stdout, _) = cp.meshctl(&["describe", "rlp", "orders-limit"]);
    assert!(stdout.contains("Last changed:  revision 6, "), "{stdout}");
    // The rollback data survived too.
    let (code, stdout, _) = cp.meshctl(&["rollback", "1"]);
    assert_eq!(code, 0);
    assert!(
        stdout.starts_with("rolled back to revision 1 as revision 7\n"),
        "{stdout}"
    );
}
