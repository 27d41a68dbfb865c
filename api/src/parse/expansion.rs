//! Pass zero: how big the file would be once its aliases are expanded,
//! measured before any typed value is built.
//!
//! serde_yaml keeps a document as the list of its parse events (as large as
//! the text) and replays an anchor's events each time an alias names it; it
//! bounds the number of alias *jumps*, not what they expand to, so 1000
//! aliases of a 1000-entry map become a million entries in whatever is
//! being built. Here every document is deserialized into [`Count`], a
//! visitor that builds nothing: it adds one to a budget for each node
//! (scalar, mapping, sequence; keys included) and the length of each string
//! scalar, sees alias replays like any other node, and fails the moment a
//! budget of [`crate::limits`] is exceeded. Memory stays what serde_yaml
//! needs for the events; time is bounded by the limits, not by the
//! expansion.

use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor,
};

use super::{position, strip_position, ParseError};
use crate::limits;

/// The bounds pass zero enforces; [`Limits::DEFAULT`] holds the constants of
/// [`crate::limits`] (tests use smaller ones).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub text_bytes: usize,
    pub documents: usize,
    pub document_nodes: usize,
    pub document_scalar_bytes: usize,
    pub file_nodes: usize,
    pub file_scalar_bytes: usize,
    pub scalar_bytes: usize,
}

impl Limits {
    pub(crate) const DEFAULT: Limits = Limits {
        text_bytes: limits::MAX_TEXT_BYTES,
        documents: limits::MAX_DOCUMENTS,
        document_nodes: limits::MAX_DOCUMENT_NODES,
        document_scalar_bytes: limits::MAX_DOCUMENT_SCALAR_BYTES,
        file_nodes: limits::MAX_FILE_NODES,
        file_scalar_bytes: limits::MAX_FILE_SCALAR_BYTES,
        scalar_bytes: limits::MAX_SCALAR_BYTES,
    };
}

/// Which budget ran out, for the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exceeded {
    DocumentNodes(usize),
    DocumentBytes(usize),
    FileNodes(usize),
    FileBytes(usize),
    Scalar { len: usize, max: usize },
}

impl fmt::Display for Exceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Exceeded::DocumentNodes(max) => write!(
                f,
                "document expands to more than {max} nodes (aliases expanded); limit: {max} (MAX_DOCUMENT_NODES)"
            ),
            Exceeded::DocumentBytes(max) => write!(
                f,
                "document expands to more than {max} bytes of strings (aliases expanded); limit: {max} (MAX_DOCUMENT_SCALAR_BYTES)"
            ),
            Exceeded::FileNodes(max) => write!(
                f,
                "the file expands to more than {max} nodes (aliases expanded) by this document; limit: {max} (MAX_FILE_NODES)"
            ),
            Exceeded::FileBytes(max) => write!(
                f,
                "the file expands to more than {max} bytes of strings (aliases expanded) by this document; limit: {max} (MAX_FILE_SCALAR_BYTES)"
            ),
            Exceeded::Scalar { len, max } => write!(
                f,
                "a string of {len} bytes; limit: {max} (MAX_SCALAR_BYTES)"
            ),
        }
    }
}

/// What one document may still use, and what it used.
struct Budget<'a> {
    limits: &'a Limits,
    /// Used by the documents before this one.
    file_nodes: usize,
    file_bytes: usize,
    /// Used by this document so far.
    nodes: usize,
    bytes: usize,
    /// The document is `null` (empty): the first node was a null.
    empty: bool,
    exceeded: Option<Exceeded>,
}

impl Budget<'_> {
    fn take<E: de::Error>(&mut self, bytes: usize, null: bool) -> Result<(), E> {
        if self.nodes == 0 {
            self.empty = null;
        }
        self.nodes += 1;
        self.bytes += bytes;
        let l = self.limits;
        let exceeded = if bytes > l.scalar_bytes {
            Some(Exceeded::Scalar {
                len: bytes,
                max: l.scalar_bytes,
            })
        } else if self.nodes > l.document_nodes {
            Some(Exceeded::DocumentNodes(l.document_nodes))
        } else if self.bytes > l.document_scalar_bytes {
            Some(Exceeded::DocumentBytes(l.document_scalar_bytes))
        } else if self.file_nodes + self.nodes > l.file_nodes {
            Some(Exceeded::FileNodes(l.file_nodes))
        } else if self.file_bytes + self.bytes > l.file_scalar_bytes {
            Some(Exceeded::FileBytes(l.file_scalar_bytes))
        } else {
            None
        };
        match exceeded {
            None => Ok(()),
            Some(exceeded) => {
                self.exceeded = Some(exceeded);
                Err(E::custom(exceeded))
            }
        }
    }
}

/// Deserializes any value into nothing, charging the budget for every node
/// it visits.
struct Count<'a, 'b>(&'a mut Budget<'b>);

impl<'de> DeserializeSeed<'de> for Count<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Count<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.0.take(0, false)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.0.take(0, false)
    }
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<(), E> {
        self.0.take(0, false)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.0.take(0, false)
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<(), E> {
        self.0.take(0, false)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.0.take(0, false)
    }
    fn visit_char<E: de::Error>(self, v: char) -> Result<(), E> {
        self.0.take(v.len_utf8(), false)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.0.take(v.len(), false)
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<(), E> {
        self.0.take(v.len(), false)
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.0.take(0, true)
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.0.take(0, true)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let budget = self.0;
        budget.take(0, false)?;
        while seq.next_element_seed(Count(&mut *budget))?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let budget = self.0;
        budget.take(0, false)?;
        while map.next_key_seed(Count(&mut *budget))?.is_some() {
            map.next_value_seed(Count(&mut *budget))?;
        }
        Ok(())
    }
    /// A tagged value (`!tag value`): the tag is counted as a string, the
    /// value like any other.
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        let budget = self.0;
        let ((), variant) = data.variant_seed(Count(&mut *budget))?;
        variant.newtype_variant_seed(Count(budget))
    }
}

/// Refuses `text` if it is larger than `limits` allow once its aliases are
/// expanded: its size, its number of non-empty documents, the nodes and
/// string bytes of each document and of all of them, any one string. YAML
/// syntax errors are reported too. `document_lines` gives the line each
/// document starts on, for errors without a position.
pub(crate) fn check(
    limits: &Limits,
    source_name: &str,
    text: &str,
    document_lines: &[usize],
) -> Result<(), ParseError> {
    let error = |document: usize, message: String, pos: Option<(usize, usize)>| ParseError {
        source_name: source_name.to_owned(),
        document,
        line: pos
            .map(|p| p.0)
            .or_else(|| document_lines.get(document.wrapping_sub(1)).copied()),
        column: pos.map(|p| p.1),
        field: String::new(),
        message,
    };
    if text.len() > limits.text_bytes {
        return Err(error(
            0,
            format!(
                "the file is {} bytes; limit: {} (MAX_TEXT_BYTES)",
                text.len(),
                limits.text_bytes
            ),
            None,
        ));
    }
    let (mut file_nodes, mut file_bytes, mut documents) = (0, 0, 0);
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let number = i + 1;
        let mut budget = Budget {
            limits,
            file_nodes,
            file_bytes,
            nodes: 0,
            bytes: 0,
            empty: true,
            exceeded: None,
        };
        if let Err(e) = Count(&mut budget).deserialize(doc) {
            let text = strip_position(&e);
            let (field, message) = match budget.exceeded {
                // serde_yaml puts the path where the count stopped in front
                // of the message (`spec.splits[50].labels.k7: ...`), aliases
                // followed: that is the field to name.
                Some(exceeded) => {
                    let message = exceeded.to_string();
                    let field = text
                        .strip_suffix(&message)
                        .and_then(|head| head.strip_suffix(": "))
                        .unwrap_or_default()
                        .to_owned();
                    (field, message)
                }
                None => (String::new(), text),
            };
            let mut error = error(number, message, position(&e));
            error.field = field;
            return Err(error);
        }
        if !budget.empty {
            documents += 1;
            if documents > limits.documents {
                return Err(error(
                    number,
                    format!(
                        "more than {max} documents in one file; limit: {max} (MAX_DOCUMENTS)",
                        max = limits.documents
                    ),
                    None,
                ));
            }
        }
        file_nodes += budget.nodes;
        file_bytes += budget.bytes;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: Limits = Limits {
        text_bytes: 10_000,
        documents: 3,
        document_nodes: 20,
        document_scalar_bytes: 40,
        file_nodes: 50,
        file_scalar_bytes: 100,
        scalar_bytes: 10,
    };

    fn run(text: &str) -> Result<(), ParseError> {
        check(
            &SMALL,
            "f.yaml",
            text,
            &super::super::document_start_lines(text),
        )
    }

    fn refused(text: &str) -> ParseError {
        run(text).expect_err("should be refused")
    }

    /// A flow sequence of `n` one-byte scalars: n + 1 nodes, n bytes.
    fn seq(n: usize) -> String {
        format!("[{}]", vec!["a"; n].join(", "))
    }

    #[test]
    fn document_nodes_at_the_limit_and_one_over() {
        run(&seq(19)).unwrap();
        let err = refused(&seq(20));
        assert_eq!(err.document, 1);
        assert_eq!(
            err.message,
            "document expands to more than 20 nodes (aliases expanded); limit: 20 (MAX_DOCUMENT_NODES)"
        );
        assert!(err.line.is_some(), "{err}");
    }

    #[test]
    fn aliases_count_expanded() {
        // 1 (seq) + 1 (anchored seq) + 4 + 3 aliases × 5 = 21 nodes.
        let text = "[&l [a, a, a, a], *l, *l, *l]";
        let err = refused(text);
        assert!(err.message.contains("more than 20 nodes"), "{err}");
        // One alias fewer: 16 nodes.
        run("[&l [a, a, a, a], *l, *l]").unwrap();
    }

    #[test]
    fn document_bytes_at_the_limit_and_one_over() {
        // Four 10-byte scalars (the per-scalar limit) = 40 bytes.
        let ten = "abcdefghij";
        run(&format!("[{ten}, {ten}, {ten}, {ten}]")).unwrap();
        let err = refused(&format!("[{ten}, {ten}, {ten}, {ten}, a]"));
        assert_eq!(
            err.message,
            "document expands to more than 40 bytes of strings (aliases expanded); limit: 40 (MAX_DOCUMENT_SCALAR_BYTES)"
        );
        // Keys count too.
        let err = refused(&format!("{{{ten}: {ten}, bcdefghijk: {ten}, b: c}}"));
        assert!(err.message.contains("more than 40 bytes"), "{err}");
    }

    #[test]
    fn one_scalar_at_the_limit_and_one_over() {
        run("abcdefghij").unwrap();
        let err = refused("abcdefghijk");
        assert_eq!(
            err.message,
            "a string of 11 bytes; limit: 10 (MAX_SCALAR_BYTES)"
        );
    }

    #[test]
    fn file_totals_span_documents() {
        // 3 documents of 17 nodes = 51 > 50; two are fine.
        let doc = seq(16);
        run(&format!("{doc}\n---\n{doc}\n---\n{}", seq(15))).unwrap();
        let err = refused(&format!("{doc}\n---\n{doc}\n---\n{doc}\n"));
        assert_eq!(err.document, 3);
        assert!(err.message.contains("limit: 50 (MAX_FILE_NODES)"), "{err}");
        // Bytes: 3 × 35 > 100.
        let doc = format!("[{}]", ["abcde"; 7].join(", "));
        let err = refused(&format!("{doc}\n---\n{doc}\n---\n{doc}\n"));
        assert_eq!(err.document, 3);
        assert!(
            err.message.contains("limit: 100 (MAX_FILE_SCALAR_BYTES)"),
            "{err}"
        );
    }

    #[test]
    fn documents_at_the_limit_and_one_over() {
        run("a\n---\nb\n---\nc\n").unwrap();
        // Empty documents are not counted.
        run("a\n---\nb\n---\n---\nc\n---\n").unwrap();
        let err = refused("a\n---\nb\n---\nc\n---\nd\n");
        assert_eq!(err.document, 4);
        assert_eq!(err.line, Some(7));
        assert_eq!(
            err.message,
            "more than 3 documents in one file; limit: 3 (MAX_DOCUMENTS)"
        );
    }

    #[test]
    fn text_size_at_the_limit_and_one_over() {
        let fits = format!("a{}", " ".repeat(9_999));
        run(&fits).unwrap();
        let err = refused(&format!("{fits} "));
        assert_eq!(err.document, 0);
        assert_eq!(
            err.to_string(),
            "f.yaml: the file is 10001 bytes; limit: 10000 (MAX_TEXT_BYTES)"
        );
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let err = check(&Limits::DEFAULT, "f.yaml", &deep, &[1]).unwrap_err();
        assert!(err.message.contains("recursion limit"), "{err}");
        assert_eq!(err.document, 1);
    }

    #[test]
    fn tags_and_nesting_are_counted() {
        run("!t {a: [b, {c: d}]}").unwrap();
        let err = refused("!t [a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a]");
        assert!(err.message.contains("MAX_DOCUMENT_NODES"), "{err}");
    }
}
