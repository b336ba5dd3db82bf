//! What the targets that validate fuzzed config text share (included with `#[path]`): the
//! file those texts are resolved against, and the guard that keeps the validator from reading
//! any file but the examples' certificates (it reads the files a `certificate` or `key` names,
//! and the fuzzer runs as whatever user started it).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The files a fuzzed text may name, relative to config/examples/.
const ALLOWED_FILES: [&str; 4] = [
    "certs/site.pem",
    "certs/site.key",
    "certs/other.pem",
    "certs/other.key",
];

/// `config/examples/fuzz.toml` (it need not exist): relative paths resolve in the examples.
pub fn source() -> &'static Path {
    static SOURCE: OnceLock<PathBuf> = OnceLock::new();
    SOURCE.get_or_init(|| {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples");
        examples
            .canonicalize()
            .unwrap_or(examples)
            .join("fuzz.toml")
    })
}

/// Whether `text` may be handed to the validator: it is not TOML (then nothing is read), or
/// every `certificate` / `key` string in it is one of [`ALLOWED_FILES`].
pub fn reads_only_allowed_files(text: &str) -> bool {
    match toml::from_str::<toml::Value>(text) {
        Ok(doc) => names_only_allowed_files(&doc),
        Err(_) => true,
    }
}

fn names_only_allowed_files(value: &toml::Value) -> bool {
    match value {
        toml::Value::Table(table) => table.iter().all(|(key, v)| {
            let file = matches!(key.as_str(), "certificate" | "key");
            match v {
                toml::Value::String(s) if file => ALLOWED_FILES.contains(&s.as_str()),
                other => names_only_allowed_files(other),
            }
        }),
        toml::Value::Array(items) => items.iter().all(names_only_allowed_files),
        _ => true,
    }
}

/// Whether `text` is TOML that names a `certificate` or `key` file at all.
pub fn names_any_file(text: &str) -> bool {
    fn any(value: &toml::Value) -> bool {
        match value {
            toml::Value::Table(table) => table.iter().any(|(key, v)| {
                (matches!(key.as_str(), "certificate" | "key") && v.is_str()) || any(v)
            }),
            toml::Value::Array(items) => items.iter().any(any),
            _ => false,
        }
    }
    toml::from_str::<toml::Value>(text).is_ok_and(|doc| any(&doc))
}
