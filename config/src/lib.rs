//! lb-config: kakehi's configuration file, read and checked once, then immutable.
//!
//! The configuration is modelled twice: as the document an operator writes and lbctl edits
//! ([`state::State`], the TOML file key for key, serde structs that refuse unknown keys), and as
//! the checked [`Config`] in `model.rs` that the rest of kakehi consumes. `validate.rs` is the
//! one way from the first to the second: it fills in defaults, parses addresses, durations,
//! hostnames and regexes and checks that the pieces fit together. Every refusal is one
//! [`ConfigError`] naming the file, the field and what is allowed, and, when the document was
//! read from a text, the line and column (the error module finds where each field is written). Relative paths in the file
//! (certificates, the command socket, an access log file) are relative to the file's directory.
//! This crate opens no socket. Besides the config itself it reads the certificate files an
//! https listener names, and checks them (`certs.rs`: the key matches, not expired), so that
//! `lbd --check`, lbd's start and every runtime change refuse a bad certificate with its
//! reason; the running state then carries the PEM text itself, since workers validate the
//! configurations they receive inside a sandbox that opens no file. Whether a port is free is
//! for the process that binds it to find out.

#![forbid(unsafe_code)]

pub mod certs;
mod error;
pub mod model;
pub mod protocol;
mod routes;
pub mod state;
mod validate;

use std::path::Path;

pub use error::{ConfigError, Location};
pub use model::*;
pub use validate::MAX_DURATION;

/// Where `lbd` listens for `lbctl` when the file sets no `command_socket`.
pub const DEFAULT_COMMAND_SOCKET: &str = "/run/kakehi/lbd.sock";

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        file: path.to_path_buf(),
        error,
    })?;
    parse_str(&text, path)
}

/// Validates `text` as a config file that lives at `source`.
///
/// `source` names the file in error messages, and relative paths inside `text` are resolved
/// against its directory (itself made absolute against the current directory). The file at
/// `source` is not read and need not exist.
pub fn parse_str(text: &str, source: &Path) -> Result<Config, ConfigError> {
    let document: state::State =
        toml::from_str(text).map_err(|e| error::from_toml(source, text, &e))?;
    validate::validate(&document, &error::Places::of(text), source)
}
