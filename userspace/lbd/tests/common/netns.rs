//! A fresh network namespace with loopback up, for tests that attach eBPF programs.

use std::io;

/// Runs `test` on a new thread inside a new network namespace with loopback up.
pub fn in_fresh_netns(test: impl FnOnce() + Send + 'static) {
    let outcome = std::thread::spawn(move || {
        enter_fresh_netns();
        test();
    })
    .join();
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

fn enter_fresh_netns() {
    // SAFETY: unshare takes flags only; CLONE_NEWNET moves just this thread into a new
    // network namespace, which no other thread observes.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        let error = io::Error::last_os_error();
        panic!(
            "unshare(CLONE_NEWNET) failed: {error}. Tests that attach eBPF programs need root \
             (CAP_SYS_ADMIN for a network namespace, CAP_BPF and CAP_NET_ADMIN for the \
             program): run them as root, as CI does; they are not skipped"
        );
    }
    loopback_up();
}

/// `ip link set lo up`, by ioctl (a new namespace's loopback starts down).
fn loopback_up() {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
        .expect("an ioctl socket");
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    use std::os::fd::AsRawFd as _;
    // SAFETY: SIOCGIFFLAGS reads the name and writes ifru_flags inside `request`, which
    // lives across the call; the fd is a valid socket.
    let got = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) };
    assert_eq!(got, 0, "SIOCGIFFLAGS lo: {}", io::Error::last_os_error());
    // SAFETY: the union's flags member is the one SIOCGIFFLAGS just wrote.
    unsafe { request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above; SIOCSIFFLAGS only reads `request`.
    let set = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) };
    assert_eq!(set, 0, "SIOCSIFFLAGS lo up: {}", io::Error::last_os_error());
}
