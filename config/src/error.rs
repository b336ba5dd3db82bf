//! `ConfigError`, the one error a config file can produce, and the helpers that place it.
//!
//! This module owns the error type and its `file:line:column: field: message` rendering, the
//! byte-offset → line/column conversion, and the mapping of a toml/serde error's span back to the
//! dotted field it sits in (`clusters.app.backends[1].address`). What counts as *wrong* is decided
//! elsewhere: serde's derive in `file.rs` and the semantic checks in `validate.rs`.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};

/// A position in the config file, both numbers 1-based; the column counts characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

/// Why a config file was refused. Its `Display` is the one line an operator sees:
/// `{file}:{line}:{column}: {field}: {message}` (line and column omitted when unknown, the field
/// omitted for a TOML syntax error, which belongs to no field).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{}: cannot read the config file: {error}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        error: std::io::Error,
    },
    /// The file was read, but it is not a valid configuration.
    #[error("{}", render(file, *location, field.as_deref(), message))]
    Invalid {
        /// The file as the caller named it.
        file: PathBuf,
        /// Where the offending key or value is, when known.
        location: Option<Location>,
        /// Dotted path of the offending key, e.g. `clusters.app.backends[1].address`.
        field: Option<String>,
        /// What is wrong and what is allowed instead.
        message: String,
    },
}

impl ConfigError {
    /// The config file the error is about.
    pub fn file(&self) -> &Path {
        match self {
            ConfigError::Read { file, .. } | ConfigError::Invalid { file, .. } => file,
        }
    }

    /// 1-based line and column of the offending key or value, when known.
    pub fn location(&self) -> Option<Location> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Invalid { location, .. } => *location,
        }
    }

    /// Dotted path of the offending key, when the error belongs to one.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Invalid { field, .. } => field.as_deref(),
        }
    }
}

fn render(file: &Path, location: Option<Location>, field: Option<&str>, message: &str) -> String {
    let mut out = file.display().to_string();
    if let Some(Location { line, column }) = location {
        out.push_str(&format!(":{line}:{column}"));
    }
    if let Some(field) = field {
        out.push_str(": ");
        out.push_str(field);
    }
    out.push_str(": ");
    out.push_str(message);
    out
}

/// Line and column (1-based, column in characters) of byte `offset` in `text`.
pub(crate) fn locate(text: &str, offset: usize) -> Location {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = text.get(..end).unwrap_or_default();
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).unwrap_or_default().chars().count() + 1;
    Location { line, column }
}

/// Turns toml's own error (syntax, unknown key, wrong type, missing key) into a `ConfigError`
/// with a line, a column and, where the span falls inside a key or value, its dotted path.
pub(crate) fn from_toml(file: &Path, text: &str, error: &toml::de::Error) -> ConfigError {
    // serde names Rust types ("expected i64"); an operator wants the TOML word.
    let message = error
        .message()
        .trim_end()
        .replace("expected i64", "expected an integer")
        .replace("expected a sequence", "expected an array");
    let span = error.span();
    let location = span.as_ref().map(|s| locate(text, s.start));
    let mut field = span.and_then(|s| field_at(text, &s));
    // serde says "missing field `address`" at the table that lacks it: name the key itself.
    if let Some(missing) = missing_field(&message) {
        field = Some(match field {
            Some(table) => format!("{table}.{missing}"),
            None => missing.to_owned(),
        });
    }
    ConfigError::Invalid {
        file: file.to_path_buf(),
        location,
        field,
        message,
    }
}

fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.strip_suffix('`')
}

/// Where each key and value of a config text sits, by its dotted path (`listeners[0].address`):
/// how the validator, which reads the document as plain values ([`crate::state::State`]), puts
/// a line and column on its errors. A state built at runtime has no text, and its errors no
/// place ([`Places::none`]).
pub(crate) struct Places<'a> {
    text: &'a str,
    /// Path → the span of a value, or of the key of a table or an array (an array item, which
    /// has no key, by its own span).
    spans: HashMap<String, Range<usize>>,
}

impl<'a> Places<'a> {
    /// The places of `text`, a TOML document (none when it does not parse: then serde has
    /// already refused it).
    pub(crate) fn of(text: &'a str) -> Places<'a> {
        let mut spans = HashMap::new();
        if let Ok(doc) = DeTable::parse(text) {
            record_table(doc.get_ref(), "", &mut spans);
        }
        Places { text, spans }
    }

    /// No text: nothing is located.
    pub(crate) fn none() -> Places<'static> {
        Places {
            text: "",
            spans: HashMap::new(),
        }
    }

    /// Where `field` is written, else where its nearest written ancestor is (a missing key is
    /// reported at the table that lacks it).
    pub(crate) fn locate(&self, field: &str) -> Option<Location> {
        let mut path = field;
        loop {
            if let Some(span) = self.spans.get(path) {
                return Some(locate(self.text, span.start));
            }
            path = parent(path)?;
        }
    }
}

/// `a.b[2]` → `a.b`, `a."x.y"` → `a`, `a` → none.
fn parent(path: &str) -> Option<&str> {
    if let Some(stripped) = path.strip_suffix(']') {
        return stripped.rfind('[').map(|i| &path[..i]);
    }
    // The last '.' outside a quoted key.
    let mut quoted = false;
    let mut escaped = false;
    let mut last_dot = None;
    for (i, c) in path.char_indices() {
        match c {
            '\\' if quoted => escaped = !escaped,
            '"' if !escaped => quoted = !quoted,
            '.' if !quoted => last_dot = Some(i),
            _ => escaped = false,
        }
        if c != '\\' {
            escaped = false;
        }
    }
    last_dot.map(|i| &path[..i])
}

fn record_table(table: &DeTable<'_>, prefix: &str, spans: &mut HashMap<String, Range<usize>>) {
    for (key, value) in table {
        let path = join_key(prefix, key.get_ref());
        // A value is shown where it is written; a table or an array where its key is.
        let span = match value.get_ref() {
            DeValue::Table(_) | DeValue::Array(_) => key.span(),
            _ => value.span(),
        };
        record_value(value.get_ref(), &path, spans);
        spans.insert(path, span);
    }
}

fn record_value(value: &DeValue<'_>, path: &str, spans: &mut HashMap<String, Range<usize>>) {
    match value {
        DeValue::Table(table) => record_table(table, path, spans),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let path = format!("{path}[{i}]");
                record_value(item.get_ref(), &path, spans);
                spans.insert(path, item.span());
            }
        }
        _ => {}
    }
}

/// The dotted path of the smallest key or value whose span contains `span.start`.
fn field_at(text: &str, span: &Range<usize>) -> Option<String> {
    let doc = DeTable::parse(text).ok()?;
    let mut best = None;
    walk_table(doc.get_ref(), "", span.start, &mut best);
    best.map(|(_, path)| path)
}

type Best = Option<(usize, String)>;

fn consider(span: Range<usize>, offset: usize, path: &str, best: &mut Best) {
    let inside = span.contains(&offset) || (span.is_empty() && span.start == offset);
    if inside && best.as_ref().is_none_or(|(len, _)| span.len() <= *len) {
        *best = Some((span.len(), path.to_owned()));
    }
}

fn walk_table(table: &DeTable<'_>, prefix: &str, offset: usize, best: &mut Best) {
    for (key, value) in table {
        let path = join_key(prefix, key.get_ref());
        consider(key.span(), offset, &path, best);
        consider(value.span(), offset, &path, best);
        walk_value(value.get_ref(), &path, offset, best);
    }
}

fn walk_value(value: &DeValue<'_>, path: &str, offset: usize, best: &mut Best) {
    match value {
        DeValue::Table(table) => walk_table(table, path, offset, best),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let path = format!("{path}[{i}]");
                consider(item.span(), offset, &path, best);
                walk_value(item.get_ref(), &path, offset, best);
            }
        }
        _ => {}
    }
}

/// `prefix.key`, with the key quoted when it is not a bare TOML key.
pub(crate) fn join_key(prefix: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let key = if bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    };
    if prefix.is_empty() {
        key
    } else {
        format!("{prefix}.{key}")
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_counts_lines_and_characters() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(locate(text, 0), Location { line: 1, column: 1 });
        assert_eq!(locate(text, 6), Location { line: 2, column: 1 });
        // "bé = " is 6 bytes but 5 characters.
        assert_eq!(locate(text, 12), Location { line: 2, column: 6 });
        assert_eq!(locate(text, 1000).line, 3);
    }

    #[test]
    fn parents_of_paths() {
        assert_eq!(
            parent("clusters.app.backends[1].address"),
            Some("clusters.app.backends[1]")
        );
        assert_eq!(
            parent("clusters.app.backends[1]"),
            Some("clusters.app.backends")
        );
        assert_eq!(
            parent("clusters.\"a.b\".send_proxy"),
            Some("clusters.\"a.b\"")
        );
        assert_eq!(parent("clusters.\"a.b\""), Some("clusters"));
        assert_eq!(parent("workers"), None);
    }

    #[test]
    fn places_locate_a_field_or_its_nearest_ancestor() {
        let text = "workers = 2\n[[listeners]]\naddress = \"x\"\n\n[clusters.app]\nbackends = [\n  { address = \"y\" },\n]\n";
        let places = Places::of(text);
        assert_eq!(places.locate("workers").map(|l| l.line), Some(1));
        assert_eq!(
            places.locate("listeners[0].address").map(|l| l.line),
            Some(3)
        );
        assert_eq!(
            places
                .locate("clusters.app.backends[0].address")
                .map(|l| l.line),
            Some(7)
        );
        assert_eq!(
            places
                .locate("clusters.app.backends[0].weight")
                .map(|l| l.line),
            Some(7)
        );
        assert_eq!(
            places.locate("clusters.app.health_check").map(|l| l.line),
            Some(5)
        );
        assert_eq!(Places::none().locate("workers"), None);
    }

    #[test]
    fn keys_are_quoted_only_when_needed() {
        assert_eq!(join_key("", "clusters"), "clusters");
        assert_eq!(join_key("clusters", "my app"), "clusters.\"my app\"");
    }
}
