//! Config text in a few lines: backend lists, one cluster, steering for this namespace.

use std::fs;
use std::net::SocketAddr;

/// `[{ address = "A" }, { address = "B" }]`.
pub fn backends(addrs: &[SocketAddr]) -> String {
    let items: Vec<String> = addrs
        .iter()
        .map(|a| format!("{{ address = \"{a}\" }}"))
        .collect();
    format!("[ {} ]", items.join(", "))
}

/// One listener and one cluster `app` serving every host and path from `backend_addrs`.
/// `top` comes first: top-level keys, then tables such as `[timeouts]`.
pub fn one_cluster(top: &str, listener: SocketAddr, backend_addrs: &[SocketAddr]) -> String {
    format!(
        "{top}\n[[listeners]]\naddress = \"{listener}\"\n\n[clusters.app]\n\
         frontends = [ {{ address = \"{listener}\" }} ]\nbackends = {}\n",
        backends(backend_addrs)
    )
}

/// `config` as lbd should run it in this thread's network namespace. eBPF steering is lbd's
/// default, and tests attach eBPF programs only inside a fresh namespace
/// ([`in_fresh_netns`]): a config that leaves `steering` unset gets `steering = "kernel"`
/// when the thread is still in the namespace the test process started in (its main thread's:
/// [`in_fresh_netns`] moves only the test's thread; pid 1's may not be readable here).
pub fn steering_for_this_netns(config: &str) -> String {
    let names_steering = config.lines().any(|l| {
        l.trim_start().starts_with("steering ") || l.trim_start().starts_with("steering=")
    });
    let ns = |path: &str| fs::read_link(path).ok();
    let in_machine_netns = ns("/proc/thread-self/ns/net") == ns("/proc/self/ns/net");
    if names_steering || !in_machine_netns {
        config.to_owned()
    } else {
        format!("steering = \"kernel\"\n{config}")
    }
}
