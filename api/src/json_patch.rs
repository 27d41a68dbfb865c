//! JSON Patch (RFC 6902) from a "before" and an "after" document: the
//! operations that turn one into the other, as the admission webhook
//! returns them for a Pod it injected.
//!
//! Objects are compared key by key (`remove`, `add`, or recurse into a
//! changed value); a list whose old items all remain, in order, gets one
//! `add` per new item at its final index (so the containers a pod already
//! had are not rewritten); a list of the same length is compared item by
//! item; any other change to a list, or a change of type, is one
//! `replace`. Applying the operations in order to `before` gives `after`
//! (checked by an independent applier in the e2e test).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One operation (`{"op": "add", "path": "/spec/volumes/-", ...}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum PatchOp {
    Add { path: String, value: Value },
    Remove { path: String },
    Replace { path: String, value: Value },
}

/// The operations that turn `before` into `after`.
pub fn diff(before: &Value, after: &Value) -> Vec<PatchOp> {
    let mut ops = Vec::new();
    diff_at(&mut String::new(), before, after, &mut ops);
    ops
}

/// Appends a reference token to a JSON Pointer (`~` → `~0`, `/` → `~1`).
fn push_token(pointer: &mut String, token: &str) {
    pointer.push('/');
    for c in token.chars() {
        match c {
            '~' => pointer.push_str("~0"),
            '/' => pointer.push_str("~1"),
            c => pointer.push(c),
        }
    }
}

fn child(pointer: &str, token: &str) -> String {
    let mut path = pointer.to_owned();
    push_token(&mut path, token);
    path
}

fn diff_at(pointer: &mut String, before: &Value, after: &Value, ops: &mut Vec<PatchOp>) {
    if before == after {
        return;
    }
    match (before, after) {
        (Value::Object(old), Value::Object(new)) => {
            for key in old.keys().filter(|k| !new.contains_key(*k)) {
                ops.push(PatchOp::Remove {
                    path: child(pointer, key),
                });
            }
            for (key, value) in new {
                match old.get(key) {
                    None => ops.push(PatchOp::Add {
                        path: child(pointer, key),
                        value: value.clone(),
                    }),
                    Some(previous) => {
                        let len = pointer.len();
                        push_token(pointer, key);
                        diff_at(pointer, previous, value, ops);
                        pointer.truncate(len);
                    }
                }
            }
        }
        (Value::Array(old), Value::Array(new)) => {
            if let Some(inserted) = insertions(old, new) {
                for index in inserted {
                    ops.push(PatchOp::Add {
                        path: child(pointer, &index.to_string()),
                        value: new[index].clone(),
                    });
                }
            } else if old.len() == new.len() {
                for (index, (previous, value)) in old.iter().zip(new).enumerate() {
                    let len = pointer.len();
                    push_token(pointer, &index.to_string());
                    diff_at(pointer, previous, value, ops);
                    pointer.truncate(len);
                }
            } else {
                ops.push(PatchOp::Replace {
                    path: pointer.clone(),
                    value: after.clone(),
                });
            }
        }
        _ => ops.push(PatchOp::Replace {
            path: pointer.clone(),
            value: after.clone(),
        }),
    }
}

/// The indexes in `new` of the items added to `old`, when `old` is `new`
/// with those items removed (every old item kept, in order); `None`
/// otherwise. Added in increasing order, each index is already its final
/// one.
fn insertions(old: &[Value], new: &[Value]) -> Option<Vec<usize>> {
    if new.len() <= old.len() {
        return None;
    }
    let mut kept = old.iter().peekable();
    let mut added = Vec::new();
    for (index, item) in new.iter().enumerate() {
        if kept.peek() == Some(&item) {
            kept.next();
        } else {
            added.push(index);
        }
    }
    kept.peek().is_none().then_some(added)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn objects_key_by_key_with_escaped_pointers() {
        let before = json!({"a": 1, "gone": true, "m": {"x": 1}});
        let after = json!({"a": 2, "m": {"x": 1, "prometheus.io/port": "15020", "a~b": 0}});
        let ops = diff(&before, &after);
        assert!(ops.contains(&PatchOp::Remove {
            path: "/gone".into()
        }));
        assert!(ops.contains(&PatchOp::Replace {
            path: "/a".into(),
            value: json!(2)
        }));
        assert!(ops.contains(&PatchOp::Add {
            path: "/m/prometheus.io~1port".into(),
            value: json!("15020")
        }));
        assert!(ops.contains(&PatchOp::Add {
            path: "/m/a~0b".into(),
            value: json!(0)
        }));
        assert_eq!(ops.len(), 4);
    }

    #[test]
    fn lists_get_insertions_at_final_indexes() {
        let before = json!({"l": ["app", "x"]});
        let after = json!({"l": ["init", "proxy", "app", "x", "vol"]});
        assert_eq!(
            diff(&before, &after),
            [
                PatchOp::Add {
                    path: "/l/0".into(),
                    value: json!("init")
                },
                PatchOp::Add {
                    path: "/l/1".into(),
                    value: json!("proxy")
                },
                PatchOp::Add {
                    path: "/l/4".into(),
                    value: json!("vol")
                },
            ]
        );
        // Reordered: one replace; same length: item by item.
        assert_eq!(
            diff(&json!([1, 2]), &json!([2, 1, 3])),
            [PatchOp::Replace {
                path: String::new(),
                value: json!([2, 1, 3])
            }]
        );
        assert_eq!(
            diff(&json!([{"a": 1}]), &json!([{"a": 2}])),
            [PatchOp::Replace {
                path: "/0/a".into(),
                value: json!(2)
            }]
        );
        assert!(diff(&json!({"a": [1]}), &json!({"a": [1]})).is_empty());
    }

    #[test]
    fn serialized_as_rfc_6902() {
        let op = PatchOp::Add {
            path: "/a".into(),
            value: json!(1),
        };
        assert_eq!(
            serde_json::to_value(&op).unwrap(),
            json!({"op": "add", "path": "/a", "value": 1})
        );
    }
}
