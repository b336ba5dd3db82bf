//! Routing: which cluster serves a request, from its listener, host, path and method.
//!
//! Each listener gets one [`Router`], built from the frontends that name its address. Routes are
//! ordered most specific first (exact host, then wildcards with longer suffixes, then regexes,
//! then any host; within that, exact path, then longer prefixes, then regexes; a route with a
//! method before one without), and the first match wins, so the answer never depends on the
//! order of the config file.

use crate::rate_limit::RateLimit;
use lb_config::{Config, HostMatch, PathMatch};
use std::net::SocketAddr;
use std::sync::Arc;

#[derive(Debug, Clone)]
struct Route {
    host: HostMatch,
    path: PathMatch,
    method: Option<String>,
    cluster: usize,
    /// Answer a 301 to https instead of proxying (`redirect_https`).
    redirect_https: bool,
    /// The frontend's `rate_limit`, if it has one.
    rate: Option<RateLimit>,
    /// The frontend's `hsts` value, if it has one.
    hsts: Option<Arc<str>>,
}

impl Route {
    fn rank(&self) -> (u8, usize, u8, usize, u8) {
        let (host_class, host_len) = match &self.host {
            HostMatch::Exact(h) => (0, h.len()),
            HostMatch::Wildcard(s) => (1, s.len()),
            HostMatch::Regex(_) => (2, 0),
            HostMatch::Any => (3, 0),
        };
        let (path_class, path_len) = match &self.path {
            PathMatch::Exact(p) => (0, p.len()),
            PathMatch::Prefix(p) => (1, p.len()),
            PathMatch::Regex(_) => (2, 0),
        };
        let method = u8::from(self.method.is_none());
        // Longer is more specific: sort descending on lengths.
        (
            host_class,
            usize::MAX - host_len,
            path_class,
            usize::MAX - path_len,
            method,
        )
    }

    fn matches(&self, host: &str, path: &str, method: &[u8]) -> bool {
        let host_ok = match &self.host {
            HostMatch::Any => true,
            HostMatch::Exact(h) => h == host,
            HostMatch::Wildcard(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
            HostMatch::Regex(re) => re.is_match(host),
        };
        if !host_ok {
            return false;
        }
        let path_ok = match &self.path {
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Exact(p) => path == p,
            PathMatch::Regex(re) => re.is_match(path),
        };
        path_ok
            && self
                .method
                .as_ref()
                .is_none_or(|m| m.as_bytes().eq_ignore_ascii_case(method))
    }
}

/// The routes of one listener.
#[derive(Debug, Clone, Default)]
pub struct Router {
    routes: Vec<Route>,
    /// Some route has a `rate_limit` (otherwise [`Router::rate_limit`] is not even looked up).
    rate_limited: bool,
    /// Some route has `hsts` (likewise for [`Router::hsts`]).
    with_hsts: bool,
}

impl Router {
    /// The router of the listener at `address`; cluster indices follow `config.clusters`.
    pub fn for_listener(config: &Config, address: SocketAddr) -> Router {
        let mut routes: Vec<Route> = config
            .clusters
            .iter()
            .enumerate()
            .flat_map(|(cluster, c)| {
                c.frontends
                    .iter()
                    .enumerate()
                    .filter(move |(_, f)| f.address == address)
                    .map(move |(index, f)| Route {
                        host: f.hostname.clone(),
                        path: f.path.clone(),
                        method: f.method.clone(),
                        cluster,
                        redirect_https: f.redirect_https,
                        rate: RateLimit::per_second(frontend_id(cluster, index), f.rate_limit),
                        hsts: f.hsts.as_deref().map(Arc::from),
                    })
            })
            .collect();
        routes.sort_by_key(Route::rank);
        let rate_limited = routes.iter().any(|r| r.rate.is_some());
        let with_hsts = routes.iter().any(|r| r.hsts.is_some());
        Router {
            routes,
            rate_limited,
            with_hsts,
        }
    }

    /// The `hsts` value of the frontend a request matches, if it has one. Free when no
    /// frontend of the listener has one.
    pub fn hsts(&self, authority: &[u8], target: &[u8], method: &[u8]) -> Option<Arc<str>> {
        if !self.with_hsts {
            return None;
        }
        self.matched(authority, target, method)
            .and_then(|r| r.hsts.clone())
    }

    /// The `rate_limit` of the frontend a request matches, if it has one. Free when no
    /// frontend of the listener has a limit.
    pub fn rate_limit(&self, authority: &[u8], target: &[u8], method: &[u8]) -> Option<RateLimit> {
        if !self.rate_limited {
            return None;
        }
        self.matched(authority, target, method).and_then(|r| r.rate)
    }

    /// The cluster for a request. `authority` is the Host header or the request target's
    /// authority (port and case ignored); `target` is the request target (query ignored).
    pub fn lookup(&self, authority: &[u8], target: &[u8], method: &[u8]) -> Option<usize> {
        self.lookup_route(authority, target, method)
            .map(|(cluster, _)| cluster)
    }

    /// The cluster for a request, and whether its frontend redirects to https instead.
    pub fn lookup_route(
        &self,
        authority: &[u8],
        target: &[u8],
        method: &[u8],
    ) -> Option<(usize, bool)> {
        self.matched(authority, target, method)
            .map(|r| (r.cluster, r.redirect_https))
    }

    /// The route a request matches: the first, most specific one.
    fn matched(&self, authority: &[u8], target: &[u8], method: &[u8]) -> Option<&Route> {
        let host = normalize_host(authority);
        let path = std::str::from_utf8(path_of(target)).ok()?;
        self.routes.iter().find(|r| r.matches(&host, path, method))
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

/// A frontend's key in the rate table: its cluster and its place in the cluster's list.
fn frontend_id(cluster: usize, index: usize) -> u32 {
    let cluster = u32::try_from(cluster).unwrap_or(u32::MAX);
    let index = u32::try_from(index).unwrap_or(u32::MAX);
    cluster.wrapping_shl(16) ^ index
}

/// Lower-case host without port and without a trailing dot; IPv6 literals keep their brackets.
pub fn normalize_host(authority: &[u8]) -> String {
    let text = String::from_utf8_lossy(authority);
    let host = if text.starts_with('[') {
        match text.find(']') {
            Some(end) => text.get(..=end).unwrap_or(&text),
            None => &text,
        }
    } else {
        match text.rfind(':') {
            Some(colon) => text.get(..colon).unwrap_or(&text),
            None => &text,
        }
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// The path part of a request target: before `?` or `#`.
pub fn path_of(target: &[u8]) -> &[u8] {
    let end = target
        .iter()
        .position(|&b| b == b'?' || b == b'#')
        .unwrap_or(target.len());
    target.get(..end).unwrap_or(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(toml: &str) -> Router {
        let config = lb_config::parse_str(toml, std::path::Path::new("test.toml")).unwrap();
        Router::for_listener(&config, "127.0.0.1:8080".parse().unwrap())
    }

    const ROUTES: &str = r#"
[[listeners]]
address = "127.0.0.1:8080"

[clusters.a_exact]
frontends = [{ address = "127.0.0.1:8080", hostname = "app.example.com" }]
backends = [{ address = "127.0.0.1:1" }]

[clusters.b_api]
frontends = [{ address = "127.0.0.1:8080", hostname = "app.example.com", path = "/api" }]
backends = [{ address = "127.0.0.1:2" }]

[clusters.c_wild]
frontends = [{ address = "127.0.0.1:8080", hostname = "*.example.com" }]
backends = [{ address = "127.0.0.1:3" }]

[clusters.d_regex]
frontends = [{ address = "127.0.0.1:8080", hostname = "~^api[0-9]+\\.test$" }]
backends = [{ address = "127.0.0.1:4" }]

[clusters.e_exactpath]
frontends = [{ address = "127.0.0.1:8080", hostname = "app.example.com", path = "/login", path_type = "exact" }]
backends = [{ address = "127.0.0.1:5" }]

[clusters.f_regexpath]
frontends = [{ address = "127.0.0.1:8080", path = "^/v[0-9]+/", path_type = "regex" }]
backends = [{ address = "127.0.0.1:6" }]

[clusters.g_post]
frontends = [{ address = "127.0.0.1:8080", hostname = "app.example.com", path = "/api", method = "POST" }]
backends = [{ address = "127.0.0.1:7" }]
"#;

    #[test]
    fn specificity_order() {
        let r = router(ROUTES);
        // clusters are in name order: a_exact=0, b_api=1, c_wild=2, d_regex=3, e=4, f=5, g=6
        assert_eq!(r.lookup(b"app.example.com", b"/", b"GET"), Some(0));
        assert_eq!(r.lookup(b"APP.example.com:8080", b"/x", b"GET"), Some(0));
        assert_eq!(
            r.lookup(b"app.example.com", b"/api/users?x=1", b"GET"),
            Some(1)
        );
        assert_eq!(
            r.lookup(b"app.example.com", b"/api/users", b"POST"),
            Some(6)
        );
        assert_eq!(r.lookup(b"app.example.com", b"/login", b"GET"), Some(4));
        assert_eq!(r.lookup(b"app.example.com", b"/login/x", b"GET"), Some(0));
        assert_eq!(r.lookup(b"www.example.com", b"/", b"GET"), Some(2));
        assert_eq!(r.lookup(b"a.b.example.com", b"/", b"GET"), Some(2));
        assert_eq!(r.lookup(b"example.com", b"/", b"GET"), None);
        assert_eq!(r.lookup(b"api12.test", b"/", b"GET"), Some(3));
        assert_eq!(r.lookup(b"apix.test", b"/", b"GET"), None);
        assert_eq!(r.lookup(b"other", b"/v2/x", b"GET"), Some(5));
        assert_eq!(r.lookup(b"other", b"/x", b"GET"), None);
    }

    #[test]
    fn host_normalization() {
        assert_eq!(normalize_host(b"Example.COM:80"), "example.com");
        assert_eq!(normalize_host(b"example.com."), "example.com");
        assert_eq!(normalize_host(b"[::1]:8080"), "[::1]");
        assert_eq!(path_of(b"/a/b?c#d"), b"/a/b");
    }
}
