//! Why the data path answered an exchange itself or cut it short: one [`Cut`] per reason, for
//! HTTP exchanges (`http::exchange`, the head checks of `http`) and TCP connections (`tcp`).
//!
//! The reason travels as a value from where it is decided to the log record; it becomes text
//! only where the access log line is written ([`Cut::as_str`], the `error` field, byte for
//! byte what operators and tests grep). [`Cut::label`] is a short, stable snake_case name for
//! a metric label. Adding a reason is one line of the table below.

macro_rules! cuts {
    ($( $(#[doc = $doc:literal])* $variant:ident => $text:literal, $label:literal; )*) => {
        /// Why kakehi answered an exchange itself or cut a connection short.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Cut {
            $( $(#[doc = $doc])* $variant, )*
        }

        impl Cut {
            /// Every reason, in the table's order.
            pub const ALL: &'static [Cut] = &[$(Cut::$variant),*];

            /// The text of the access log's `error` field.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( Cut::$variant => $text, )*
                }
            }

            /// A short, stable snake_case name, for a metric label.
            pub fn label(self) -> &'static str {
                match self {
                    $( Cut::$variant => $label, )*
                }
            }
        }
    };
}

cuts! {
    // ---- time ran out ---------------------------------------------------------------------
    /// An HTTP request head did not arrive whole within the request_header timeout.
    RequestHeaderTimeout => "request header timeout", "request_header_timeout";
    /// The backend connection was not established within the connect timeout.
    ConnectTimeout => "connect timeout", "connect_timeout";
    /// The backend stopped sending in the middle of a response already being relayed.
    BackendTimeoutMidResponse => "backend timeout mid-response", "backend_timeout_mid_response";
    /// The backend sent no response within the backend timeout.
    BackendResponseTimeout => "backend response timeout", "backend_response_timeout";
    /// A TCP connection carried no byte either way for the idle timeout.
    IdleTimeout => "idle timeout", "idle_timeout";
    /// A listener that accepts the PROXY protocol got no header within the request_header
    /// timeout.
    ProxyHeaderTimeout => "no PROXY protocol header before the request_header timeout",
        "proxy_header_timeout";
    /// A TCP listener routing by server name got no ClientHello within the request_header
    /// timeout.
    ClientHelloTimeout => "no ClientHello before the request_header timeout",
        "client_hello_timeout";

    // ---- the client -----------------------------------------------------------------------
    /// Plain HTTP came to a TLS port (the TLS layer answered it in clear).
    PlainHttpToTls => "plain HTTP sent to the TLS port", "plain_http_to_tls";
    /// The request head does not fit in the buffer.
    RequestHeadTooLarge => "request head larger than the buffer", "request_head_too_large";
    /// The request body (declared or counted) is over the frontend's max_request_body.
    RequestBodyTooLarge => "request body over max_request_body", "request_body_too_large";
    /// The request body's framing (chunks, trailers) is malformed.
    MalformedRequestBody => "malformed request body", "malformed_request_body";
    /// The client closed before the end of its request.
    ClientClosedMidRequest => "client closed before the request ended",
        "client_closed_mid_request";
    /// A chunk-size or trailer line of the request is longer than the whole buffer.
    RequestBodyLineTooLong => "request body line longer than the buffer",
        "request_body_line_too_long";
    /// Reading from or writing to the client failed.
    ClientConnectionError => "client connection error", "client_connection_error";
    /// The client closed before its PROXY protocol header was complete.
    ClientClosedMidProxyHeader => "client closed before its PROXY protocol header was complete",
        "client_closed_mid_proxy_header";
    /// The PROXY protocol header does not fit in the buffer.
    ProxyHeaderTooLarge => "PROXY protocol header larger than the buffer",
        "proxy_header_too_large";
    /// The connection did not start with a valid PROXY protocol header.
    BadProxyHeader => "missing or malformed PROXY protocol header", "bad_proxy_header";
    /// The client closed before its ClientHello was complete.
    ClientClosedMidClientHello => "client closed before its ClientHello was complete",
        "client_closed_mid_client_hello";
    /// The ClientHello did not fit in the buffer (or the client stopped sending it).
    ClientHelloTooLarge => "ClientHello incomplete or larger than the buffer",
        "client_hello_too_large";
    /// The ClientHello names no server.
    ClientHelloWithoutServerName => "ClientHello without server name",
        "client_hello_without_server_name";
    /// The first bytes are not a TLS ClientHello.
    NotTls => "not a TLS ClientHello", "not_tls";
    /// The ClientHello could not be parsed.
    MalformedClientHello => "malformed ClientHello", "malformed_client_hello";

    // ---- routing --------------------------------------------------------------------------
    /// The frontend redirects plain HTTP to https (a 301, not a failure).
    RedirectToHttps => "redirect to https", "redirect_to_https";
    /// No frontend of the listener matches the request's host and path.
    NoRoute => "no route", "no_route";
    /// The client is over its frontend's `rate_limit` (429).
    RateLimited => "over the frontend's rate limit", "rate_limited";
    /// The TCP listener has no frontend for a connection without server name.
    NoFrontendOnListener => "no frontend on this listener", "no_frontend_on_listener";
    /// The TCP listener has no frontend for the ClientHello's server name.
    NoFrontendForServerName => "no frontend for this server name",
        "no_frontend_for_server_name";

    // ---- the backend ----------------------------------------------------------------------
    /// No backend of the cluster could be picked (all down, or none).
    NoBackendAvailable => "no backend available", "no_backend_available";
    /// Every connect attempt failed.
    BackendConnectFailed => "backend connect failed", "backend_connect_failed";
    /// The backend closed while the request was being sent, before any response.
    BackendClosedMidRequest => "backend closed while sending the request",
        "backend_closed_mid_request";
    /// The response could not be parsed (or was a 101 nobody asked for).
    MalformedResponse => "malformed response", "malformed_response";
    /// The response head does not fit in the buffer.
    ResponseHeadTooLarge => "response head larger than the buffer", "response_head_too_large";
    /// The backend closed before a whole response head.
    BackendClosedWithoutAnswer => "backend closed without answering",
        "backend_closed_without_answer";
    /// The backend closed in the middle of a response already being relayed.
    BackendClosedMidResponse => "backend closed mid-response", "backend_closed_mid_response";
    /// Reading from or writing to the backend failed.
    BackendConnectionError => "backend connection error", "backend_connection_error";
    /// Reading from the backend failed in the middle of a response already being relayed.
    BackendConnectionErrorMidResponse => "backend connection error mid-response",
        "backend_connection_error_mid_response";
    /// A chunk-size or trailer line of the response is longer than the whole buffer.
    ResponseBodyLineTooLong => "response body line longer than the buffer",
        "response_body_line_too_long";
    /// A TLS backend's certificate is not signed by a CA of `backend_ca` (or the system's).
    BackendTlsUntrusted => "backend TLS: certificate not signed by a trusted CA",
        "backend_tls_untrusted";
    /// A TLS backend's certificate is not valid for `backend_server_name` (or its address).
    BackendTlsWrongName => "backend TLS: certificate not valid for the backend's name",
        "backend_tls_wrong_name";
    /// A TLS backend's certificate is expired or not yet valid.
    BackendTlsExpired => "backend TLS: certificate expired or not yet valid",
        "backend_tls_expired";
    /// The TLS handshake with the backend failed otherwise (not TLS, an alert, no common
    /// version or cipher).
    BackendTlsHandshake => "backend TLS handshake failed", "backend_tls_handshake";
    /// The TCP backend connection went away.
    BackendConnectionLost => "backend connection lost", "backend_connection_lost";

    // ---- a request head refused (400, or 431 for the caps) --------------------------------
    /// kawa refused the head and said no more.
    MalformedRequest => "malformed request", "malformed_request";
    /// A trailer name of a chunked request is not a token.
    InvalidTrailerName => "invalid trailer name", "invalid_trailer_name";
    /// More header fields than `MAX_HEADER_FIELDS` (431).
    TooManyHeaderFields => "too many header fields", "too_many_header_fields";
    /// More cookie crumbs than `MAX_COOKIE_CRUMBS` (431).
    TooManyCookieCrumbs => "too many cookie crumbs", "too_many_cookie_crumbs";
    /// A header line with an empty name.
    EmptyHeaderName => "empty header name", "empty_header_name";
    /// A header name that is not a token.
    InvalidHeaderName => "invalid header name", "invalid_header_name";
    /// Content-Length together with Transfer-Encoding (smuggling).
    ContentLengthAndTransferEncoding => "both Content-Length and Transfer-Encoding",
        "content_length_and_transfer_encoding";
    /// More than one Host header.
    SeveralHostHeaders => "several Host headers", "several_host_headers";
    /// The head has no request line.
    NoRequestLine => "no request line", "no_request_line";
    /// Transfer-Encoding in an HTTP/1.0 request (RFC 9112 §6.1).
    TransferEncodingInHttp10 => "Transfer-Encoding in an HTTP/1.0 request",
        "transfer_encoding_in_http10";
    /// The method is not a token.
    MethodNotToken => "method is not a token", "method_not_token";
    /// The CONNECT method.
    ConnectMethod => "CONNECT is not supported", "connect_method";
    /// An empty request target.
    EmptyTarget => "empty request target", "empty_target";
    /// A fragment (`#`) in the request target.
    FragmentInTarget => "fragment in the request target", "fragment_in_target";
    /// An absolute-form target whose authority is not the Host header's.
    TargetHostMismatch => "absolute-form target and Host disagree", "target_host_mismatch";
    /// No Host header in an HTTP/1.1 request.
    MissingHost => "missing Host header", "missing_host";
    /// An empty Host header in an HTTP/1.1 request.
    EmptyHost => "empty Host header", "empty_host";
    /// A Host that is not a valid host.
    InvalidHost => "Host is not a host", "invalid_host";
    /// A request target that is neither a path nor `*`.
    TargetWithoutPath => "request target without a path", "target_without_path";
    /// A `%` not followed by two hex digits in the path.
    BadPercentEncoding => "invalid percent-encoding in the path", "bad_percent_encoding";
    /// More `..` segments than segments before them.
    PathAboveRoot => "path climbs above the root", "path_above_root";
    /// `Connection` names Content-Length, Transfer-Encoding or Host.
    ConnectionNamesReliedOnHeader => "Connection names a framing or Host header",
        "connection_names_relied_on_header";
}

#[cfg(test)]
mod tests {
    use super::Cut;
    use std::collections::HashSet;

    #[test]
    fn texts_and_labels_are_distinct_and_labels_snake_case() {
        let mut texts = HashSet::new();
        let mut labels = HashSet::new();
        for &cut in Cut::ALL {
            assert!(!cut.as_str().is_empty(), "{cut:?} has no text");
            assert!(texts.insert(cut.as_str()), "{cut:?}: text used twice");
            assert!(labels.insert(cut.label()), "{cut:?}: label used twice");
            let label = cut.label();
            let snake = label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                && label.starts_with(|c: char| c.is_ascii_lowercase())
                && !label.ends_with('_')
                && !label.contains("__");
            assert!(snake, "{cut:?}: label {label:?} is not snake_case");
        }
    }
}
