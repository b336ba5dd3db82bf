//! What the benchmark reads from /proc: a process tree's CPU time and peak memory, and how
//! busy the machine is.
//!
//! A proxy is measured as its whole process tree (nginx's master and worker; lbd's supervisor
//! and workers once it has them), so every proxy is counted the same way.

use std::collections::HashMap;
use std::time::Duration;

/// `pid` and all its descendants, found by scanning /proc for parent pids.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(stat) = read_stat(child) {
                children.entry(stat.ppid).or_default().push(child);
            }
        }
    }
    let mut all = vec![pid];
    let mut next = 0;
    while next < all.len() {
        if let Some(kids) = children.get(&all[next]) {
            all.extend(kids);
        }
        next += 1;
    }
    all
}

struct Stat {
    ppid: u32,
    cpu: CpuTicks,
}

/// CPU time in clock ticks: in user space (utime) and in the kernel on the process's behalf
/// (stime).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTicks {
    pub user: u64,
    pub kernel: u64,
}

impl CpuTicks {
    pub fn total(self) -> u64 {
        self.user + self.kernel
    }

    /// What was spent since `before`.
    pub fn since(self, before: CpuTicks) -> CpuTicks {
        CpuTicks {
            user: self.user.saturating_sub(before.user),
            kernel: self.kernel.saturating_sub(before.kernel),
        }
    }
}

fn read_stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<Stat> {
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the
    // last ')'. Then field 0 is the state, 1 the ppid, 11 utime and 12 stime.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        ppid: fields.get(1)?.parse().ok()?,
        cpu: CpuTicks {
            user: fields.get(11)?.parse().ok()?,
            kernel: fields.get(12)?.parse().ok()?,
        },
    })
}

/// Clock ticks per second, for /proc CPU times.
pub fn ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|ticks| u64::try_from(ticks).ok())
        .filter(|ticks| *ticks > 0)
        .unwrap_or(100)
}

/// User and system CPU time of the process tree rooted at `pid`, in clock ticks.
pub fn cpu_ticks(pid: u32) -> CpuTicks {
    tree(pid)
        .into_iter()
        .filter_map(read_stat)
        .fold(CpuTicks::default(), |sum, stat| CpuTicks {
            user: sum.user + stat.cpu.user,
            kernel: sum.kernel + stat.cpu.kernel,
        })
}

/// Sum of VmHWM (peak resident set) over the tree, in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    tree(pid)
        .into_iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|status| parse_vm_hwm(&status))
        .sum()
}

/// Sum of VmRSS (resident set now) over the tree, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    tree(pid)
        .into_iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|status| {
            let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .sum()
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resets the peak RSS of every process in the tree to its current RSS, so the next reading
/// is the peak of one run. Returns false when the kernel refused (then VmHWM is the peak since
/// the process started).
pub fn reset_peak_rss(pid: u32) -> bool {
    tree(pid)
        .into_iter()
        .all(|pid| std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok())
}

/// The share of CPU time, over all CPUs, spent not idle during `over`.
pub fn machine_busy(over: Duration) -> Option<f64> {
    let before = cpu_totals()?;
    std::thread::sleep(over);
    let after = cpu_totals()?;
    let total = after.0.saturating_sub(before.0);
    let idle = after.1.saturating_sub(before.1);
    if total == 0 {
        return None;
    }
    Some(1.0 - idle as f64 / total as f64)
}

/// (all ticks, idle + iowait ticks) from the first line of /proc/stat.
fn cpu_totals() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // guest and guest_nice (8, 9) are already counted in user and nice.
    let total = values.iter().take(8).sum();
    let idle = values.get(3)? + values.get(4).copied().unwrap_or(0);
    Some((total, idle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_survives_odd_process_names() {
        let text = "4242 (a) b (c) S 17 4242 4242 0 -1 4194560 100 0 0 0 250 31 0 0 20 0 1 0";
        let stat = parse_stat(text).unwrap();
        assert_eq!(stat.ppid, 17);
        assert_eq!(
            stat.cpu,
            CpuTicks {
                user: 250,
                kernel: 31
            }
        );
        assert_eq!(stat.cpu.total(), 281);
    }

    #[test]
    fn vm_hwm_is_read_in_kib() {
        let status = "Name:\tnginx\nVmPeak:\t  20000 kB\nVmHWM:\t    5120 kB\nVmRSS:\t 4000 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(5120));
    }

    #[test]
    fn our_own_tree_and_cpu_time_are_readable() {
        let me = std::process::id();
        assert!(tree(me).contains(&me));
        assert!(peak_rss_kib(me) > 0);
        let _ = cpu_ticks(me);
    }
}
