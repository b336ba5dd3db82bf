//! Unmapping the pages of code and read-only data that a process ran only while it started.
//!
//! A worker is exec'd, not forked: it maps lbd's binary afresh and faults in every page it
//! runs, and the kernel maps the neighbouring pages already in the page cache with each fault
//! ("fault-around", 64 KiB by default). Parsing the config, building the TLS configs and the
//! seccomp filter run code spread over most of the binary, so a worker that had just started
//! counted 7.2 MB of file pages in its RSS (4.4 of text, 1.5 of read-only data, 1.3 of libc
//! and the loader), where a forked nginx worker counts the 2.7 MB it touched itself. The
//! pages are one copy in the page cache, shared with lbd's main process; what the worker
//! holds is the mapping. Once it has started, [`FilePages::unmap`] zaps those mappings
//! (`MADV_DONTNEED`): the pages stay in the page cache, and the event loop faults back in
//! only what it runs.
//!
//! Only private mappings of a file that cannot be written and hold no anonymous (copied)
//! page: for those, `MADV_DONTNEED` loses nothing, as the next access reads the same bytes
//! from the file. A mapping that does hold copied pages (the loader's RELRO, made read-only
//! after relocation) is left alone: zapping it would take the relocations back.

use std::io;

/// The ranges to unmap, read from `/proc/self/smaps` before the sandbox closes `/proc`.
#[derive(Debug, Default)]
pub struct FilePages {
    ranges: Vec<(usize, usize)>,
    resident_kib: u64,
}

impl FilePages {
    /// Reads this process's mappings of its own executable and of libc: files that stay
    /// mapped for the life of the process, so no other mapping can take a range's place
    /// between this reading and [`FilePages::unmap`] (a library another thread might unload
    /// could leave its range to, say, an allocator's arena).
    pub fn find() -> io::Result<FilePages> {
        let exe = std::fs::read_link("/proc/self/exe")?;
        let exe = exe.to_string_lossy();
        let smaps = std::fs::read_to_string("/proc/self/smaps")?;
        let (ranges, resident_kib) =
            droppable(&smaps, |path| path == exe || path.ends_with("/libc.so.6"));
        Ok(FilePages {
            ranges,
            resident_kib,
        })
    }

    /// How much of the ranges was resident when they were read, in KiB.
    pub fn resident_kib(&self) -> u64 {
        self.resident_kib
    }

    /// Zaps the ranges. Runs under the sandbox, which allows `madvise`.
    #[allow(unsafe_code)]
    pub fn unmap(&self) -> io::Result<()> {
        for &(start, end) in &self.ranges {
            // SAFETY: the range is a whole private, read-only mapping of a file with no
            // anonymous page (see `droppable`), so MADV_DONTNEED only removes page table
            // entries: any later access faults the same bytes back in from the file. No
            // Rust reference is invalidated, as the contents do not change.
            let rc = unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED)
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// The private, file-backed, non-writable mappings of `smaps` of a file that `keep` accepts
/// that hold resident pages and no anonymous page.
/// Returns them with the sum of their resident sizes (KiB).
fn droppable(smaps: &str, keep: impl Fn(&str) -> bool) -> (Vec<(usize, usize)>, u64) {
    struct Mapping {
        range: (usize, usize),
        eligible: bool,
        rss_kib: u64,
        anonymous_kib: Option<u64>,
    }
    let mut out = Vec::new();
    let mut resident = 0;
    let mut current: Option<Mapping> = None;
    let mut finish = |mapping: Option<Mapping>| {
        if let Some(m) = mapping {
            if m.eligible && m.rss_kib > 0 && m.anonymous_kib == Some(0) {
                out.push(m.range);
                resident += m.rss_kib;
            }
        }
    };
    for line in smaps.lines() {
        if let Some((range, eligible, path)) = mapping_header(line) {
            finish(current.take());
            current = Some(Mapping {
                range,
                eligible: eligible && keep(path),
                rss_kib: 0,
                anonymous_kib: None,
            });
        } else if let Some(m) = current.as_mut() {
            if let Some(kib) = field_kib(line, "Rss:") {
                m.rss_kib = kib;
            } else if let Some(kib) = field_kib(line, "Anonymous:") {
                m.anonymous_kib = Some(kib);
            }
        }
    }
    finish(current.take());
    (out, resident)
}

/// A mapping's header line (`start-end perms offset dev inode path`): its range, whether it
/// is private, not writable, and backed by a file on disk, and its path (which may hold
/// spaces: the rest of the line).
fn mapping_header(line: &str) -> Option<((usize, usize), bool, &str)> {
    let mut rest = line;
    let mut field = || {
        let trimmed = rest.trim_start_matches(' ');
        let end = trimmed.find(' ').unwrap_or(trimmed.len());
        let (head, tail) = trimmed.split_at(end);
        rest = tail;
        head
    };
    let (start, end) = field().split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    let perms = field().as_bytes();
    let _offset = field();
    let _device = field();
    let inode = field();
    if perms.len() != 4 || end <= start || inode.is_empty() {
        return None;
    }
    let path = rest.trim();
    let private = perms.get(3) == Some(&b'p');
    let writable = perms.get(1) == Some(&b'w');
    let eligible = private && !writable && inode != "0" && path.starts_with('/');
    Some(((start, end), eligible, path))
}

fn field_kib(line: &str, name: &str) -> Option<u64> {
    let rest = line.strip_prefix(name)?.trim();
    rest.strip_suffix("kB")?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
5637b4b0a000-5637b4d3a000 r--p 00000000 fe:00 5327155                    /usr/sbin/lbd
Size:               2240 kB
Rss:                1240 kB
Anonymous:             0 kB
VmFlags: rd mr mw me sd
5637b4d3a000-5637b543c000 r-xp 0022f000 fe:00 5327155                    /usr/sbin/lbd
Rss:                4400 kB
Anonymous:             0 kB
5637b543c000-5637b5487000 r--p 00930000 fe:00 5327155                    /usr/sbin/lbd
Rss:                 300 kB
Anonymous:           300 kB
5637b5487000-5637b5489000 rw-p 0097a000 fe:00 5327155                    /usr/sbin/lbd
Rss:                   8 kB
Anonymous:             8 kB
5637b6000000-5637b6100000 rw-p 00000000 00:00 0                          [heap]
Rss:                4236 kB
Anonymous:          4236 kB
7f95d60dd000-7f95d6103000 r--p 00000000 fe:00 326279                     /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                   0 kB
Anonymous:             0 kB
7f95d6200000-7f95d6202000 rw-s 00000000 00:0e 1052                       anon_inode:bpf-map
Rss:                   8 kB
Anonymous:             0 kB
7f95d6300000-7f95d6302000 r--s 00000000 00:01 77                         /memfd:tickets (deleted)
Rss:                   8 kB
Anonymous:             0 kB
7ffd0000a000-7ffd0000c000 r-xp 00000000 00:00 0                          [vdso]
Rss:                   4 kB
Anonymous:             0 kB
";

    #[test]
    fn only_read_only_private_file_mappings_without_copied_pages() {
        let any = |_: &str| true;
        assert_eq!(
            droppable(SMAPS, any).0,
            vec![
                (0x5637b4b0a000, 0x5637b4d3a000),
                (0x5637b4d3a000, 0x5637b543c000)
            ]
        );
    }

    #[test]
    fn only_the_files_asked_for() {
        let libc = |path: &str| path.ends_with("/libc.so.6");
        let smaps = "7f00-8f00 r-xp 00000000 fe:00 12   /usr/lib/x86_64-linux-gnu/libc.so.6\n\
                     Rss: 4 kB\nAnonymous: 0 kB\n\
                     9f00-af00 r-xp 00000000 fe:00 13   /usr/lib/libnss_files.so.2\n\
                     Rss: 4 kB\nAnonymous: 0 kB\n";
        assert_eq!(droppable(smaps, libc), (vec![(0x7f00, 0x8f00)], 4));
    }

    #[test]
    fn a_path_with_spaces_is_read_whole() {
        let smaps = "7f00-8f00 r-xp 00000000 fe:00 12   /usr/sbin/lbd (deleted)\n\
                     Rss: 4 kB\nAnonymous: 0 kB\n";
        assert_eq!(
            droppable(smaps, |path| path == "/usr/sbin/lbd (deleted)"),
            (vec![(0x7f00, 0x8f00)], 4)
        );
    }

    #[test]
    fn a_mapping_without_an_anonymous_line_is_kept() {
        let smaps = "7f00-8f00 r-xp 00000000 fe:00 12 /usr/sbin/lbd\nRss: 4 kB\n";
        assert!(droppable(smaps, |_| true).0.is_empty());
    }

    /// The test binary unmaps its own code and read-only data, then runs on: every page comes
    /// back from the file.
    #[test]
    fn this_process_runs_on_after_dropping_its_pages() {
        let before = FilePages::find().unwrap();
        assert!(before.resident_kib() > 0);
        before.unmap().unwrap();
        let after = FilePages::find().unwrap();
        assert!(
            after.resident_kib() < before.resident_kib(),
            "{} KiB resident before, {} after",
            before.resident_kib(),
            after.resident_kib()
        );
    }
}
