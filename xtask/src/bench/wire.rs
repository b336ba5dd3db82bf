//! Where a connection's time goes, seen on the wire (issue 19).
//!
//! wrk's latency runs from its write of a request to the moment it has read the whole response,
//! so it holds both the proxy's time and the time the response waits in wrk's own event queue.
//! Here a short run of one scenario is captured by tcpdump on loopback (headers only), and each
//! connection's life is cut at the turns of its conversation:
//!
//! - the proxy's answer runs from the client's last segment carrying bytes to the proxy's last
//!   segment carrying bytes before the client speaks again (its whole answer, a TLS handshake
//!   flight or a response);
//! - the client's reaction runs from there to the client's next segment carrying bytes.
//!
//! A connection is followed from its SYN, so one that began before the capture is left out and a
//! client port used again starts a new one.

use anyhow::{bail, Context, Result};
use std::collections::HashMap;

/// What one capture shows for one proxy.
#[derive(Debug, Clone, PartialEq)]
pub struct WireTimes {
    /// The proxy's answers.
    pub proxy: Quantiles,
    /// The client's reactions.
    pub client: Quantiles,
    /// Of all the time the connections spent between their first and last segment carrying
    /// bytes, the share spent waiting on the proxy.
    pub proxy_share: f64,
    /// Connections followed from their SYN.
    pub connections: usize,
}

/// Medians and 99th percentiles of a set of durations, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Quantiles {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub count: usize,
}

impl Quantiles {
    fn of(mut seconds: Vec<f64>) -> Quantiles {
        if seconds.is_empty() {
            return Quantiles::default();
        }
        seconds.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let index = ((seconds.len() as f64 * q).ceil() as usize).clamp(1, seconds.len()) - 1;
            seconds[index] * 1000.0
        };
        Quantiles {
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            count: seconds.len(),
        }
    }
}

/// One TCP segment between a client and the proxy's `port`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Segment {
    /// Seconds, as the capture stamped it.
    at: f64,
    /// The client's port: with the loopback address on both sides, it names the connection.
    client_port: u16,
    from_client: bool,
    /// TCP payload length.
    bytes: usize,
    /// A SYN without ACK: the client opens a connection.
    opens: bool,
}

/// The segments to and from `port` in a pcap file (IPv4 over Ethernet, Linux cooked or
/// loopback framing). A record cut short at the end (the capture was stopped while writing) ends
/// the list.
fn segments(pcap: &[u8], port: u16) -> Result<Vec<Segment>> {
    let Some(head) = pcap.get(..24) else {
        bail!("not a pcap file: {} bytes", pcap.len());
    };
    let magic = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let (big_endian, nanos) = match magic {
        0xa1b2_c3d4 => (false, false),
        0xa1b2_3c4d => (false, true),
        0xd4c3_b2a1 => (true, false),
        0x4d3c_b2a1 => (true, true),
        _ => bail!("not a pcap file (magic {magic:#010x})"),
    };
    let word = |b: &[u8]| {
        let b = [b[0], b[1], b[2], b[3]];
        if big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    };
    let framing = match word(&head[20..24]) {
        0 => 4,    // BSD loopback
        1 => 14,   // Ethernet (Linux `lo`)
        113 => 16, // Linux cooked
        276 => 20, // Linux cooked v2
        other => bail!("pcap link type {other} is not read"),
    };
    let unit = if nanos { 1e-9 } else { 1e-6 };
    let mut out = Vec::new();
    let mut at = 24;
    while let Some(record) = pcap.get(at..at + 16) {
        let seconds = f64::from(word(&record[0..4])) + f64::from(word(&record[4..8])) * unit;
        let captured = word(&record[8..12]) as usize;
        let Some(frame) = pcap.get(at + 16..at + 16 + captured) else {
            break;
        };
        at += 16 + captured;
        if let Some(segment) = segment(frame.get(framing..).unwrap_or_default(), port, seconds) {
            out.push(segment);
        }
    }
    Ok(out)
}

/// The TCP segment an IPv4 packet carries, when it is to or from `port`.
fn segment(ip: &[u8], port: u16, at: f64) -> Option<Segment> {
    if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 6 {
        return None;
    }
    let ip_header = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let tcp = ip.get(ip_header..ip_header + 14)?;
    let source = u16::from_be_bytes([tcp[0], tcp[1]]);
    let destination = u16::from_be_bytes([tcp[2], tcp[3]]);
    let tcp_header = usize::from(tcp[12] >> 4) * 4;
    let flags = tcp[13];
    let (client_port, from_client) = if destination == port {
        (source, true)
    } else if source == port {
        (destination, false)
    } else {
        return None;
    };
    Some(Segment {
        at,
        client_port,
        from_client,
        bytes: total.saturating_sub(ip_header + tcp_header),
        opens: from_client && flags & 0x02 != 0 && flags & 0x10 == 0,
    })
}

/// One connection's conversation so far.
#[derive(Default)]
struct Conversation {
    /// The client's last segment with bytes.
    client_last: Option<f64>,
    /// The proxy's last segment with bytes, while it has the word.
    proxy_last: Option<f64>,
}

#[derive(Default)]
struct Tally {
    proxy: Vec<f64>,
    client: Vec<f64>,
    connections: usize,
}

impl Tally {
    /// The proxy's answer that `conversation` ends with, if it has one.
    fn close(&mut self, conversation: &Conversation) {
        if let (Some(asked), Some(answered)) = (conversation.client_last, conversation.proxy_last) {
            self.proxy.push(answered - asked);
        }
    }
}

/// Cuts every connection of a capture of the proxy's `port` into the proxy's answers and the
/// client's reactions.
pub fn wire_times(pcap: &[u8], port: u16) -> Result<WireTimes> {
    let mut open: HashMap<u16, Conversation> = HashMap::new();
    let mut tally = Tally::default();
    for s in segments(pcap, port).context("reading the capture")? {
        if s.opens {
            if let Some(done) = open.insert(s.client_port, Conversation::default()) {
                tally.close(&done);
            }
            tally.connections += 1;
            continue;
        }
        if s.bytes == 0 {
            continue;
        }
        let Some(c) = open.get_mut(&s.client_port) else {
            continue;
        };
        if s.from_client {
            if let Some(answered) = c.proxy_last.take() {
                if let Some(asked) = c.client_last {
                    tally.proxy.push(answered - asked);
                }
                tally.client.push(s.at - answered);
            }
            c.client_last = Some(s.at);
        } else if c.client_last.is_some() {
            c.proxy_last = Some(s.at);
        }
    }
    for c in open.values() {
        tally.close(c);
    }
    if tally.proxy.is_empty() {
        bail!("no answer from port {port} in the capture");
    }
    let proxy_total: f64 = tally.proxy.iter().sum();
    let client_total: f64 = tally.client.iter().sum();
    Ok(WireTimes {
        proxy_share: proxy_total / (proxy_total + client_total).max(f64::MIN_POSITIVE),
        proxy: Quantiles::of(tally.proxy),
        client: Quantiles::of(tally.client),
        connections: tally.connections,
    })
}

/// Packets tcpdump says the kernel dropped, from what it wrote on stopping.
pub fn dropped(log: &str) -> Option<u64> {
    log.lines().find_map(|line| {
        let count = line.strip_suffix(" packets dropped by kernel")?;
        count.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROXY: u16 = 8443;

    /// A pcap file (microseconds, Ethernet framing) of `packets`: (seconds, from the client,
    /// client port, TCP flags, payload bytes).
    fn pcap(packets: &[(f64, bool, u16, u8, usize)]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        out.extend_from_slice(&2u16.to_le_bytes());
        out.extend_from_slice(&4u16.to_le_bytes());
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&96u32.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        for &(at, from_client, client, flags, bytes) in packets {
            let (source, destination) = if from_client {
                (client, PROXY)
            } else {
                (PROXY, client)
            };
            let mut frame = vec![0u8; 14];
            frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
            let mut ip = vec![0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&((20 + 32 + bytes) as u16).to_be_bytes());
            ip[9] = 6;
            let mut tcp = vec![0u8; 32];
            tcp[0..2].copy_from_slice(&source.to_be_bytes());
            tcp[2..4].copy_from_slice(&destination.to_be_bytes());
            tcp[12] = 8 << 4;
            tcp[13] = flags;
            frame.extend(ip);
            frame.extend(tcp);
            // Headers only, as a short snap length captures them.
            let whole = (at.floor() as u32, ((at.fract() * 1e6).round()) as u32);
            out.extend_from_slice(&whole.0.to_le_bytes());
            out.extend_from_slice(&whole.1.to_le_bytes());
            out.extend_from_slice(&(frame.len() as u32).to_le_bytes());
            out.extend_from_slice(&((frame.len() + bytes) as u32).to_le_bytes());
            out.extend(frame);
        }
        out
    }

    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    const PSH: u8 = 0x08;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn a_tls_connection_is_cut_into_the_proxys_answers_and_the_clients_reactions() {
        // A resumed TLS 1.3 handshake and one request, as kakehi and wrk speak them: the
        // ClientHello (answered in 0.1 ms), Finished (the ticket after 0.05 ms), the request
        // (the response after 0.1 ms, then close_notify), the client's close_notify 3 ms later.
        let data = PSH | ACK;
        let packets = [
            (10.0, true, 50000, SYN, 0),
            (10.0001, false, 50000, SYN | ACK, 0),
            (10.0002, true, 50000, ACK, 0),
            (10.007, true, 50000, data, 493),
            (10.0071, false, 50000, data, 219),
            (10.010, true, 50000, data, 80),
            (10.01005, false, 50000, data, 186),
            (10.01010, true, 50000, data, 82),
            (10.01020, false, 50000, data, 313),
            (10.01021, false, 50000, data, 24),
            (10.01022, false, 50000, ACK | 0x01, 0),
            (10.01321, true, 50000, data, 24),
        ];
        let times = wire_times(&pcap(&packets), PROXY).unwrap();
        assert_eq!(times.connections, 1);
        // Answers: 0.1 ms (flight), 0.05 ms (ticket), 0.11 ms (response and close_notify).
        assert_eq!(times.proxy.count, 3);
        assert!(close(times.proxy.p50_ms, 0.1), "{times:?}");
        assert!(close(times.proxy.p99_ms, 0.11), "{times:?}");
        // Reactions: 2.9 ms (Finished), 0.05 ms (request), 3 ms (close_notify).
        assert_eq!(times.client.count, 3);
        assert!(close(times.client.p50_ms, 2.9), "{times:?}");
        assert!(close(times.client.p99_ms, 3.0), "{times:?}");
        let share = 0.26 / (0.26 + 5.95);
        assert!((times.proxy_share - share).abs() < 1e-6, "{times:?}");
    }

    #[test]
    fn a_client_port_used_again_starts_a_new_connection_and_unopened_ones_are_left_out() {
        let data = PSH | ACK;
        let packets = [
            // Began before the capture: no SYN seen, not counted.
            (1.0, true, 40000, data, 100),
            (1.002, false, 40000, data, 100),
            (1.5, true, 40000, data, 100),
            // Port 40001, twice. Its first life ends on the proxy's answer (no reaction after
            // it); the 10 s before its second SYN are nobody's.
            (2.0, true, 40001, SYN, 0),
            (2.001, true, 40001, data, 100),
            (2.003, false, 40001, data, 100),
            (12.0, true, 40001, SYN, 0),
            (12.001, true, 40001, data, 100),
            (12.005, false, 40001, data, 100),
            (12.006, false, 40001, data, 100),
        ];
        let times = wire_times(&pcap(&packets), PROXY).unwrap();
        assert_eq!(times.connections, 2);
        assert_eq!(times.proxy.count, 2);
        assert!(close(times.proxy.p50_ms, 2.0), "{times:?}");
        assert!(close(times.proxy.p99_ms, 5.0), "{times:?}");
        assert_eq!(times.client.count, 0);
        assert!(close(times.proxy_share, 1.0), "{times:?}");
    }

    #[test]
    fn a_capture_cut_short_is_read_up_to_its_last_whole_record() {
        let data = PSH | ACK;
        let mut bytes = pcap(&[
            (1.0, true, 40000, SYN, 0),
            (1.001, true, 40000, data, 10),
            (1.002, false, 40000, data, 10),
        ]);
        bytes.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 200, 0, 0, 0, 1, 2]);
        let times = wire_times(&bytes, PROXY).unwrap();
        assert_eq!(times.proxy.count, 1);
        assert!(wire_times(b"not a capture at all, not at all", PROXY).is_err());
        assert!(wire_times(&pcap(&[]), PROXY).is_err());
    }

    #[test]
    fn tcpdumps_drop_count_is_read() {
        let log = "tcpdump: listening on lo\n4100 packets captured\n4200 packets received by \
                   filter\n17 packets dropped by kernel\n";
        assert_eq!(dropped(log), Some(17));
        assert_eq!(dropped("nothing"), None);
    }
}
