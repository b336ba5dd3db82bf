//! Checks a cluster's `frontends`: the routes from a listener to the cluster.
//!
//! This module owns hostname matching (absent, exact, `*.wildcard`, `~regex`), path matching
//! (prefix, exact, regex), method names, and the checks that tie a frontend to the rest of the
//! file: its address must be a listener's, that listener's protocol must fit the cluster's, and
//! no two frontends anywhere in the file may be identical. Matching requests against these rules
//! is the proxy's business, not this crate's.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::model::{ClusterProtocol, Frontend, HostMatch, Listener, ListenerProtocol, PathMatch};
use crate::state::{FrontendDef, PathTypeDef};
use crate::validate::{Checker, Result};

/// What makes two frontends the same route.
#[derive(Debug, PartialEq, Eq, Hash)]
struct RouteKey {
    address: SocketAddr,
    /// "" for any host, else the hostname as written after normalisation, with its kind.
    host: String,
    path_type: PathTypeDef,
    path: String,
    method: Option<String>,
}

/// Checks frontends one by one, remembering every route seen so far in the file.
pub(crate) struct FrontendChecker<'c, 'a> {
    c: &'c Checker<'a>,
    listeners: &'c [Listener],
    /// Each route seen, with the field path of its first definition.
    seen: HashMap<RouteKey, String>,
}

impl<'c, 'a> FrontendChecker<'c, 'a> {
    pub(crate) fn new(c: &'c Checker<'a>, listeners: &'c [Listener]) -> Self {
        FrontendChecker {
            c,
            listeners,
            seen: HashMap::new(),
        }
    }

    /// Validates one frontend of a cluster speaking `protocol`.
    pub(crate) fn check(
        &mut self,
        f: &FrontendDef,
        field: &str,
        protocol: ClusterProtocol,
    ) -> Result<Frontend> {
        let address = self.listener(&f.address, field, protocol)?;
        if protocol == ClusterProtocol::Tcp {
            let http_only = [
                ("path", f.path.is_some()),
                ("path_type", f.path_type.is_some()),
                ("method", f.method.is_some()),
                ("rate_limit", f.rate_limit.is_some()),
                ("hsts", f.hsts.is_some()),
            ];
            if let Some((key, _)) = http_only.into_iter().find(|(_, given)| *given) {
                return Err(self.c.err(
                    &format!("{field}.{key}"),
                    format!("{key} only applies to http clusters; a tcp frontend is matched by its address (and hostname) alone"),
                ));
            }
        }
        let (host, hostname) = self.hostname(f.hostname.as_ref(), field)?;
        let path_type = f.path_type.unwrap_or(PathTypeDef::Prefix);
        let (path_text, path) = self.path(f, path_type, field)?;
        let method = match &f.method {
            None => None,
            Some(m) => Some(self.method(m, field)?),
        };

        let key = RouteKey {
            address,
            host,
            path_type,
            path: path_text,
            method: method.clone(),
        };
        if let Some(other) = self.seen.get(&key) {
            let at = self.c.at_line(other);
            return Err(self.c.err(
                field,
                format!(
                    "this frontend is identical to {other}{at}: same address, hostname, path, path_type and method; a request could not tell them apart, so remove one or make them differ"
                ),
            ));
        }
        self.seen.insert(key, field.to_owned());
        let redirect_https = match f.redirect_https {
            Some(true) => {
                let on_http = self
                    .listeners
                    .iter()
                    .any(|l| l.address == address && l.protocol == ListenerProtocol::Http);
                if !on_http {
                    return Err(self.c.err(
                        &format!("{field}.redirect_https"),
                        "redirect_https only applies to frontends of http listeners (it sends plain-HTTP clients to https)",
                    ));
                }
                true
            }
            _ => false,
        };

        let rate_limit = match &f.rate_limit {
            None => 0,
            Some(text) => self.c.per_second(text, &format!("{field}.rate_limit"))?,
        };
        let hsts = match &f.hsts {
            None => None,
            Some(value) => Some(self.hsts(value, address, &format!("{field}.hsts"))?),
        };

        Ok(Frontend {
            address,
            hostname,
            path,
            method,
            redirect_https,
            rate_limit,
            hsts,
        })
    }

    /// A frontend's `hsts`: on an https listener, a header value with `max-age=`.
    fn hsts(&self, value: &str, address: SocketAddr, field: &str) -> Result<String> {
        let on_https = self
            .listeners
            .iter()
            .any(|l| l.address == address && l.protocol == ListenerProtocol::Https);
        if !on_https {
            return Err(self.c.err(
                field,
                "hsts only applies to frontends of https listeners (browsers ignore the header over plain HTTP)",
            ));
        }
        let value = value.trim();
        let printable = value
            .bytes()
            .all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic());
        if !printable || !value.to_ascii_lowercase().contains("max-age=") {
            return Err(self.c.err(
                field,
                format!("{value:?} is not a Strict-Transport-Security value: it needs max-age=SECONDS (e.g. \"max-age=31536000; includeSubDomains\"), in printable ASCII"),
            ));
        }
        Ok(value.to_owned())
    }

    /// The frontend's address: a listener's, whose protocol fits the cluster's.
    fn listener(&self, value: &str, field: &str, protocol: ClusterProtocol) -> Result<SocketAddr> {
        let field = format!("{field}.address");
        let address = self.c.socket_addr(value, &field)?;
        let Some(listener) = self.listeners.iter().find(|l| l.address == address) else {
            let known = if self.listeners.is_empty() {
                "the file has no [[listeners]]".to_owned()
            } else {
                let list: Vec<String> = self
                    .listeners
                    .iter()
                    .map(|l| l.address.to_string())
                    .collect();
                format!("the listeners are {}", list.join(", "))
            };
            return Err(self.c.err(
                &field,
                format!("no listener has address {address} ({known}): use one of them or add a [[listeners]] entry"),
            ));
        };
        let fits = match protocol {
            ClusterProtocol::Http => matches!(
                listener.protocol,
                ListenerProtocol::Http | ListenerProtocol::Https
            ),
            ClusterProtocol::Tcp => listener.protocol == ListenerProtocol::Tcp,
        };
        if !fits {
            let (cluster, wanted, got) = match protocol {
                ClusterProtocol::Http => ("an http", "an http or https", "tcp"),
                ClusterProtocol::Tcp => (
                    "a tcp",
                    "a tcp",
                    if listener.protocol == ListenerProtocol::Https {
                        "https"
                    } else {
                        "http"
                    },
                ),
            };
            return Err(self.c.err(
                &field,
                format!("the listener {address} is {got}, but this is {cluster} cluster: its frontends need {wanted} listener"),
            ));
        }
        Ok(address)
    }

    fn hostname(&self, value: Option<&String>, field: &str) -> Result<(String, HostMatch)> {
        let Some(text) = value else {
            return Ok((String::new(), HostMatch::Any));
        };
        let field = format!("{field}.hostname");
        if let Some(pattern) = text.strip_prefix('~') {
            let regex = regex::RegexBuilder::new(pattern)
                .case_insensitive(true)
                .build()
                .map_err(|e| self.c.err(&field, regex_message(pattern, &e)))?;
            return Ok((format!("~{pattern}"), HostMatch::Regex(regex)));
        }
        let lower = text.to_ascii_lowercase();
        let (name, wildcard) = match lower.strip_prefix("*.") {
            Some(rest) => (rest, true),
            None => (lower.as_str(), false),
        };
        if let Some(problem) = hostname_problem(name) {
            return Err(self.c.err(
                &field,
                format!("\"{text}\" is not a valid hostname: {problem}; expected app.example.com, *.example.com, ~REGEX, or no hostname for any host"),
            ));
        }
        if wildcard {
            let suffix = format!(".{name}");
            Ok((format!("*{suffix}"), HostMatch::Wildcard(suffix)))
        } else {
            Ok((lower.clone(), HostMatch::Exact(lower)))
        }
    }

    /// The path rule, and its text for comparing routes.
    fn path(
        &self,
        f: &FrontendDef,
        path_type: PathTypeDef,
        at: &str,
    ) -> Result<(String, PathMatch)> {
        let field = format!("{at}.path");
        let Some(text) = &f.path else {
            if path_type == PathTypeDef::Regex {
                return Err(self.c.err_near(
                    &format!("{at}.path_type"),
                    &field,
                    "path_type = \"regex\" needs a path holding the regex, such as path = \"^/api/v[0-9]+/\"",
                ));
            }
            let root = "/".to_owned();
            let rule = match path_type {
                PathTypeDef::Exact => PathMatch::Exact(root.clone()),
                PathTypeDef::Prefix | PathTypeDef::Regex => PathMatch::Prefix(root.clone()),
            };
            return Ok((root, rule));
        };
        if path_type == PathTypeDef::Regex {
            let regex =
                regex::Regex::new(text).map_err(|e| self.c.err(&field, regex_message(text, &e)))?;
            return Ok((text.clone(), PathMatch::Regex(regex)));
        }
        let problem = if !text.starts_with('/') {
            Some("it must start with '/'")
        } else if text.contains(['?', '#']) {
            Some("the query and fragment are not part of the matched path")
        } else if text.contains(|c: char| c.is_whitespace() || c.is_control()) {
            Some("it contains whitespace or control characters")
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(self.c.err(
                &field,
                format!("\"{text}\" is not a valid path: {problem}; expected a path such as \"/\" or \"/api\""),
            ));
        }
        let rule = match path_type {
            PathTypeDef::Exact => PathMatch::Exact(text.clone()),
            PathTypeDef::Prefix | PathTypeDef::Regex => PathMatch::Prefix(text.clone()),
        };
        Ok((text.clone(), rule))
    }

    fn method(&self, text: &str, field: &str) -> Result<String> {
        let is_token = !text.is_empty() && text.bytes().all(is_tchar);
        if !is_token {
            return Err(self.c.err(
                &format!("{field}.method"),
                format!("\"{text}\" is not an HTTP method: expected a token such as \"GET\" or \"POST\""),
            ));
        }
        Ok(text.to_ascii_uppercase())
    }
}

/// Why `name` (lower-case, without a `*.` prefix) is not a plausible hostname, if it is not.
fn hostname_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("it is empty");
    }
    if name.contains(':') {
        return Some("a hostname has no port here (the listener's address has it)");
    }
    if name.contains('*') {
        return Some("'*' is only allowed as the whole first label, as in *.example.com");
    }
    if name.len() > 253 {
        return Some("it is longer than 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Some("it has an empty label (two dots in a row, or a dot at an end)");
        }
        if label.len() > 63 {
            return Some("a label is longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Some("only letters, digits, '-' and '.' are allowed");
        }
    }
    None
}

/// RFC 9110 `tchar`: the characters of a method name.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// regex's own message on one line: its multi-line rendering ends with the line `error: ...`.
fn regex_message(pattern: &str, error: &regex::Error) -> String {
    let full = error.to_string();
    let reason = full
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("error: "))
        .map_or_else(
            || full.split_whitespace().collect::<Vec<_>>().join(" "),
            str::to_owned,
        );
    format!("\"{pattern}\" is not a valid regex: {reason}")
}
