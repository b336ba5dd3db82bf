//! PROXY protocol version 2 (HAProxy's spec, `proxy-protocol.txt` §2.2): the binary header
//! that tells a backend who the client really is, sent before any byte of the client's.
//!
//! [`encode_v2`] writes the header of a proxied TCP connection into a fixed array (no
//! allocation on the data path). [`parse`] reads what a front load balancer sends to a
//! listener with `accept_proxy = true`, sans-io: a v2 header ([`parse_v2`]) or a v1 text line
//! ([`parse_v1`], `PROXY TCP4 src dst sport dport\r\n`, §2.1), told apart by their first
//! bytes. None of them panics on any input. kakehi writes only the `PROXY` command over
//! TCP, with IPv4 addresses when both ends are IPv4 and IPv6 otherwise (an IPv4 address is
//! then written IPv4-mapped), and no TLVs. The `ppp` crate also does this; the header is a
//! fixed 28- or 52-byte layout, and writing it into a stack array here costs neither a
//! dependency nor an allocation per connection.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// The 12 bytes every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest header [`encode_v2`] writes (IPv6).
pub const MAX_V2_LEN: usize = 16 + 36;

const VERSION_2: u8 = 0x20;
const CMD_LOCAL: u8 = 0x00;
const CMD_PROXY: u8 = 0x01;
const AF_INET_STREAM: u8 = 0x11;
const AF_INET6_STREAM: u8 = 0x21;

/// An encoded header: `bytes[..len]`.
#[derive(Clone, Copy)]
pub struct V2Header {
    bytes: [u8; MAX_V2_LEN],
    len: usize,
}

impl V2Header {
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or_default()
    }
}

impl std::fmt::Debug for V2Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("V2Header").field(&self.as_bytes()).finish()
    }
}

/// The header of a TCP connection from `source` (the client) to `destination` (the address
/// the client connected to).
pub fn encode_v2(source: SocketAddr, destination: SocketAddr) -> V2Header {
    let mut bytes = [0u8; MAX_V2_LEN];
    let mut w = Writer {
        out: &mut bytes,
        at: 0,
    };
    w.put(&SIGNATURE);
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            w.put(&[VERSION_2 | CMD_PROXY, AF_INET_STREAM, 0, 12]);
            w.put(&s.octets());
            w.put(&d.octets());
        }
        (s, d) => {
            w.put(&[VERSION_2 | CMD_PROXY, AF_INET6_STREAM, 0, 36]);
            w.put(&v6(s).octets());
            w.put(&v6(d).octets());
        }
    }
    w.put(&source.port().to_be_bytes());
    w.put(&destination.port().to_be_bytes());
    let len = w.at;
    V2Header { bytes, len }
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

struct Writer<'a> {
    out: &'a mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn put(&mut self, data: &[u8]) {
        if let Some(dst) = self.out.get_mut(self.at..self.at + data.len()) {
            dst.copy_from_slice(data);
            self.at += data.len();
        }
    }
}

/// What a v2 header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addresses {
    /// `PROXY` over TCP or UDP, IPv4 or IPv6: the original connection's ends.
    Proxy {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// `LOCAL` (a health check from the proxy itself), or an address family this parser does
    /// not read (unix sockets, unspecified): use the connection's own addresses.
    Local,
}

/// Result of [`parse_v2`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// Not enough bytes yet; the header is at least `at_least` bytes long.
    Incomplete { at_least: usize },
    /// A whole header of `len` bytes (TLVs included, skipped): the payload starts after it.
    Complete { addresses: Addresses, len: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyProtocolError {
    #[error("no PROXY protocol signature")]
    Signature,
    #[error("malformed PROXY protocol v1 line")]
    V1Line,
    #[error("PROXY protocol version {0} (only 2 is read)")]
    Version(u8),
    #[error("unknown PROXY protocol command {0:#x}")]
    Command(u8),
    #[error("PROXY protocol address block too short for its family")]
    Length,
}

/// The longest v1 line, CRLF included (§2.1).
pub const MAX_V1_LEN: usize = 107;
const V1_PREFIX: &[u8] = b"PROXY ";

/// Reads a v1 or v2 header at the start of `input`.
pub fn parse(input: &[u8]) -> Result<Parsed, ProxyProtocolError> {
    if input.is_empty() {
        return Ok(Parsed::Incomplete { at_least: 1 });
    }
    let n = input.len().min(V1_PREFIX.len());
    if input.get(..n) == V1_PREFIX.get(..n) {
        return parse_v1(input);
    }
    parse_v2(input)
}

/// Reads a v1 line (`PROXY TCP4|TCP6|UNKNOWN ...\r\n`) at the start of `input`.
pub fn parse_v1(input: &[u8]) -> Result<Parsed, ProxyProtocolError> {
    let seen = input.len().min(V1_PREFIX.len());
    if input.get(..seen) != V1_PREFIX.get(..seen) {
        return Err(ProxyProtocolError::Signature);
    }
    let window = input.get(..MAX_V1_LEN).unwrap_or(input);
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        if input.len() >= MAX_V1_LEN {
            return Err(ProxyProtocolError::V1Line);
        }
        return Ok(Parsed::Incomplete {
            at_least: input.len() + 1,
        });
    };
    let len = end + 2;
    let line = window.get(V1_PREFIX.len()..end).unwrap_or_default();
    let line = std::str::from_utf8(line).map_err(|_| ProxyProtocolError::V1Line)?;
    let mut fields = line.split(' ');
    let family = fields.next().unwrap_or("");
    if family == "UNKNOWN" {
        return Ok(Parsed::Complete {
            addresses: Addresses::Local,
            len,
        });
    }
    let mut next = || fields.next().ok_or(ProxyProtocolError::V1Line);
    let (src, dst, sport, dport) = (next()?, next()?, next()?, next()?);
    if fields.next().is_some() {
        return Err(ProxyProtocolError::V1Line);
    }
    let ip = |text: &str| -> Result<IpAddr, ProxyProtocolError> {
        let ip: IpAddr = text.parse().map_err(|_| ProxyProtocolError::V1Line)?;
        match (family, ip) {
            ("TCP4", IpAddr::V4(_)) | ("TCP6", IpAddr::V6(_)) => Ok(ip),
            _ => Err(ProxyProtocolError::V1Line),
        }
    };
    let port = |text: &str| -> Result<u16, ProxyProtocolError> {
        if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ProxyProtocolError::V1Line);
        }
        text.parse().map_err(|_| ProxyProtocolError::V1Line)
    };
    Ok(Parsed::Complete {
        addresses: Addresses::Proxy {
            source: SocketAddr::new(ip(src)?, port(sport)?),
            destination: SocketAddr::new(ip(dst)?, port(dport)?),
        },
        len,
    })
}

/// Reads a v2 header at the start of `input`.
pub fn parse_v2(input: &[u8]) -> Result<Parsed, ProxyProtocolError> {
    let seen = input.len().min(SIGNATURE.len());
    if input.get(..seen) != SIGNATURE.get(..seen) {
        return Err(ProxyProtocolError::Signature);
    }
    let Some(fixed) = input.get(..16) else {
        return Ok(Parsed::Incomplete { at_least: 16 });
    };
    let at = |i: usize| fixed.get(i).copied().unwrap_or(0);
    let (ver_cmd, family) = (at(12), at(13));
    if ver_cmd >> 4 != 2 {
        return Err(ProxyProtocolError::Version(ver_cmd >> 4));
    }
    let command = ver_cmd & 0x0f;
    if command != CMD_LOCAL && command != CMD_PROXY {
        return Err(ProxyProtocolError::Command(command));
    }
    let block = usize::from(u16::from_be_bytes([at(14), at(15)]));
    let len = 16 + block;
    let Some(block) = input.get(16..len) else {
        return Ok(Parsed::Incomplete { at_least: len });
    };
    if command == CMD_LOCAL {
        return Ok(Parsed::Complete {
            addresses: Addresses::Local,
            len,
        });
    }
    let port = |i: usize| {
        u16::from_be_bytes([
            block.get(i).copied().unwrap_or(0),
            block.get(i + 1).copied().unwrap_or(0),
        ])
    };
    let octets = |i: usize, n: usize| block.get(i..i + n).unwrap_or_default();
    let addresses = match family >> 4 {
        1 if block.len() >= 12 => {
            let ip = |i: usize| -> IpAddr {
                <[u8; 4]>::try_from(octets(i, 4)).map_or(IpAddr::from([0u8; 4]), IpAddr::from)
            };
            Addresses::Proxy {
                source: SocketAddr::new(ip(0), port(8)),
                destination: SocketAddr::new(ip(4), port(10)),
            }
        }
        2 if block.len() >= 36 => {
            let ip = |i: usize| -> IpAddr {
                <[u8; 16]>::try_from(octets(i, 16)).map_or(IpAddr::from([0u8; 16]), IpAddr::from)
            };
            Addresses::Proxy {
                source: SocketAddr::new(ip(0), port(32)),
                destination: SocketAddr::new(ip(16), port(34)),
            }
        }
        1 | 2 => return Err(ProxyProtocolError::Length),
        _ => Addresses::Local,
    };
    Ok(Parsed::Complete { addresses, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_layout_matches_the_spec() {
        let h = encode_v2(
            "192.0.2.1:56324".parse().unwrap(),
            "198.51.100.7:443".parse().unwrap(),
        );
        let mut want = SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0, 12, 192, 0, 2, 1, 198, 51, 100, 7]);
        want.extend_from_slice(&56324u16.to_be_bytes());
        want.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(h.as_bytes(), &want[..]);
        assert_eq!(h.as_bytes().len(), 28);
    }

    #[test]
    fn round_trips() {
        let cases = [
            ("127.0.0.1:1", "127.0.0.2:2"),
            ("[2001:db8::1]:65535", "[::1]:80"),
        ];
        for (s, d) in cases {
            let (s, d): (SocketAddr, SocketAddr) = (s.parse().unwrap(), d.parse().unwrap());
            let h = encode_v2(s, d);
            let mut wire = h.as_bytes().to_vec();
            wire.extend_from_slice(b"payload");
            assert_eq!(
                parse_v2(&wire),
                Ok(Parsed::Complete {
                    addresses: Addresses::Proxy {
                        source: s,
                        destination: d
                    },
                    len: h.as_bytes().len()
                })
            );
            for cut in 0..h.as_bytes().len() {
                assert!(
                    matches!(parse_v2(&wire[..cut]), Ok(Parsed::Incomplete { at_least }) if at_least > cut),
                    "cut {cut}"
                );
            }
        }
    }

    #[test]
    fn mixed_families_are_written_as_ipv6() {
        let s: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        let d: SocketAddr = "[2001:db8::2]:443".parse().unwrap();
        let h = encode_v2(s, d);
        assert_eq!(h.as_bytes().len(), MAX_V2_LEN);
        let Ok(Parsed::Complete {
            addresses: Addresses::Proxy { source, .. },
            ..
        }) = parse_v2(h.as_bytes())
        else {
            panic!("not parsed");
        };
        assert_eq!(
            source,
            SocketAddr::new(IpAddr::V6("::ffff:10.0.0.1".parse().unwrap()), 1000)
        );
    }

    #[test]
    fn v1_lines() {
        let wire = b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\nGET /";
        assert_eq!(
            parse(wire),
            Ok(Parsed::Complete {
                addresses: Addresses::Proxy {
                    source: "192.0.2.1:56324".parse().unwrap(),
                    destination: "198.51.100.7:443".parse().unwrap(),
                },
                len: wire.len() - 5
            })
        );
        for cut in 0..wire.len() - 5 {
            assert!(
                matches!(parse(&wire[..cut]), Ok(Parsed::Incomplete { at_least }) if at_least > cut),
                "cut {cut}: {:?}",
                parse(&wire[..cut])
            );
        }
        let v6 = b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n";
        assert!(matches!(
            parse(v6),
            Ok(Parsed::Complete {
                addresses: Addresses::Proxy { .. },
                ..
            })
        ));
        assert_eq!(
            parse(b"PROXY UNKNOWN whatever\r\n"),
            Ok(Parsed::Complete {
                addresses: Addresses::Local,
                len: 24
            })
        );
        for bad in [
            &b"PROXY TCP4 192.0.2.1 198.51.100.7 56324\r\n"[..],
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 1.2.3.4 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 99999\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 +1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3\r\n",
            b"PROXY TCP4  1.2.3.4 1.2.3.4 1 2\r\n",
        ] {
            assert_eq!(parse(bad), Err(ProxyProtocolError::V1Line), "{bad:?}");
        }
        assert_eq!(parse(&[b'P'; 200]), Err(ProxyProtocolError::Signature));
        let mut long = b"PROXY ".to_vec();
        long.extend_from_slice(&[b'1'; 150]);
        assert_eq!(parse(&long), Err(ProxyProtocolError::V1Line));
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\n"),
            Err(ProxyProtocolError::Signature)
        );
        assert_eq!(parse(b""), Ok(Parsed::Incomplete { at_least: 1 }));
    }

    #[test]
    fn refusals_and_local() {
        assert_eq!(
            parse_v2(b"PROXY TCP4 1.2.3.4"),
            Err(ProxyProtocolError::Signature)
        );
        let mut local = SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(
            parse_v2(&local),
            Ok(Parsed::Complete {
                addresses: Addresses::Local,
                len: 16
            })
        );
        let mut v1 = local.clone();
        v1[12] = 0x11;
        assert_eq!(parse_v2(&v1), Err(ProxyProtocolError::Version(1)));
        let mut short = local.clone();
        short[12] = 0x21;
        short[13] = 0x11;
        short[15] = 4;
        short.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(parse_v2(&short), Err(ProxyProtocolError::Length));
        for i in 0..local.len() {
            for v in [0u8, 0xff] {
                let mut m = local.clone();
                m[i] = v;
                let _ = parse_v2(&m);
            }
        }
    }
}
