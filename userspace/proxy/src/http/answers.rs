//! Default answers: the small, complete HTTP responses kakehi sends itself (400, 404, 408, 413,
//! 414, 431, 502, 503, 504). Each carries a tiny HTML body, `Connection: close` unless the
//! session keeps the connection, and the request id when one was assigned.

/// A default answer kakehi can send instead of a backend's response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    BadRequest,
    NotFound,
    RequestTimeout,
    PayloadTooLarge,
    UriTooLong,
    HeaderTooLarge,
    /// 429 with `Retry-After: 1`: a frontend's `rate_limit` (a rate of R per second with a
    /// burst of R always has room again within a second).
    TooManyRequests,
    BadGateway,
    ServiceUnavailable,
    GatewayTimeout,
}

/// A 301 to `location` (an http frontend with `redirect_https`). `keep_alive` false adds
/// `Connection: close`.
pub fn render_redirect(location: &str, request_id: &str, keep_alive: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 301 Moved Permanently\r\nLocation: {location}\r\nContent-Length: 0\r\n\
         Cache-Control: no-cache\r\n"
    );
    if !request_id.is_empty() {
        out.push_str("X-Request-Id: ");
        out.push_str(request_id);
        out.push_str("\r\n");
    }
    if !keep_alive {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// The answer to plain HTTP sent to a TLS port (written in clear, before any TLS).
pub const PLAIN_HTTP_TO_TLS: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n\
Content-Length: 53\r\nConnection: close\r\n\r\nThis port speaks HTTPS: use an https:// URL instead.\n";

impl Answer {
    pub fn status(self) -> u16 {
        match self {
            Answer::BadRequest => 400,
            Answer::NotFound => 404,
            Answer::RequestTimeout => 408,
            Answer::PayloadTooLarge => 413,
            Answer::UriTooLong => 414,
            Answer::HeaderTooLarge => 431,
            Answer::TooManyRequests => 429,
            Answer::BadGateway => 502,
            Answer::ServiceUnavailable => 503,
            Answer::GatewayTimeout => 504,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Answer::BadRequest => "Bad Request",
            Answer::NotFound => "Not Found",
            Answer::RequestTimeout => "Request Timeout",
            Answer::PayloadTooLarge => "Content Too Large",
            Answer::UriTooLong => "URI Too Long",
            Answer::HeaderTooLarge => "Request Header Fields Too Large",
            Answer::TooManyRequests => "Too Many Requests",
            Answer::BadGateway => "Bad Gateway",
            Answer::ServiceUnavailable => "Service Unavailable",
            Answer::GatewayTimeout => "Gateway Timeout",
        }
    }

    fn detail(self) -> &'static str {
        match self {
            Answer::BadRequest => "The request could not be understood.",
            Answer::NotFound => "No service is configured for this host and path.",
            Answer::RequestTimeout => "The request was not received in time.",
            Answer::PayloadTooLarge => "The request body is too large.",
            Answer::UriTooLong => "The request target is too long.",
            Answer::HeaderTooLarge => "The request header is too large.",
            Answer::TooManyRequests => "Too many requests from this address: try again later.",
            Answer::BadGateway => "The backend could not be reached or sent an invalid answer.",
            Answer::ServiceUnavailable => "No backend is available to serve this request.",
            Answer::GatewayTimeout => "The backend did not answer in time.",
        }
    }

    /// The full response bytes. `keep_alive` false adds `Connection: close`.
    pub fn render(self, request_id: &str, keep_alive: bool) -> Vec<u8> {
        let status = self.status();
        let reason = self.reason();
        let body = format!(
            "<!DOCTYPE html><html><head><title>{status} {reason}</title></head>\
             <body><h1>{status} {reason}</h1><p>{}</p><hr><p>kakehi</p></body></html>\n",
            self.detail()
        );
        let mut out = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: text/html; charset=utf-8\r\n\
             Content-Length: {}\r\nCache-Control: no-cache\r\n",
            body.len()
        );
        if !request_id.is_empty() {
            out.push_str("X-Request-Id: ");
            out.push_str(request_id);
            out.push_str("\r\n");
        }
        if self == Answer::TooManyRequests {
            out.push_str("Retry-After: 1\r\n");
        }
        if !keep_alive {
            out.push_str("Connection: close\r\n");
        }
        out.push_str("\r\n");
        out.push_str(&body);
        out.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_answer_has_the_right_length() {
        let text = std::str::from_utf8(PLAIN_HTTP_TO_TLS).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{text}"
        );
    }

    #[test]
    fn redirect_names_its_location() {
        let text = String::from_utf8(render_redirect("https://a.test/x?y", "id", true)).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 301 Moved Permanently\r\nLocation: https://a.test/x?y\r\n")
        );
        assert!(!text.contains("Connection: close"));
    }

    #[test]
    fn well_formed() {
        let bytes = Answer::GatewayTimeout.render("abc", false);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("HTTP/1.1 504 Gateway Timeout\r\n"));
        assert!(text.contains("X-Request-Id: abc\r\n"));
        assert!(text.contains("Connection: close\r\n"));
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(len, body.len());
    }
}
