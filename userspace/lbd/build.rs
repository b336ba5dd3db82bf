//! lbd's build script: builds the eBPF steering program so that `cargo build` embeds it.
//!
//! It runs aya-build on `ebpf/steer` (package lb-ebpf) for bpfel-unknown-none with Debian's
//! rustc-web (`rustup run /usr`, whose prebuilt BPF `core` needs no -Zbuild-std) and
//! bpf-linker; the object lands in OUT_DIR as `lb-ebpf`, where `src/steering.rs` includes it.
//! Installing that toolchain is `cargo xtask setup`'s job; this script only checks for it and
//! says what to run when it is missing. `AYA_BUILD_SKIP=1` builds lbd without the program
//! (an empty object; `steering = "ebpf"` then fails at startup with a clear error).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

/// Debian's toolchain, as `rustup run` takes it.
const TOOLCHAIN: &str = "/usr";
/// Where libstd-rust-web-dev-bpf puts the prebuilt `core` for the BPF target.
const BPF_CORE: &str = "/usr/lib/rustlib/bpfel-unknown-none/lib";

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR is not set")?,
    );
    let root = manifest_dir
        .parent()
        .and_then(Path::parent)
        .context("lbd's manifest is not two levels below the workspace root")?;
    let steer = root.join("ebpf/steer");
    let common = root.join("ebpf/common");
    // aya-build reruns on changes under ebpf/steer; the program also compiles ebpf/common and
    // the locked versions of aya-ebpf.
    println!("cargo:rerun-if-changed={}", common.display());
    println!(
        "cargo:rerun-if-changed={}",
        root.join("Cargo.lock").display()
    );

    if skipped() {
        let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR is not set")?);
        std::fs::write(out_dir.join("lb-ebpf"), b"").context("writing an empty lb-ebpf")?;
        // aya-build prints its own warning and returns.
    } else {
        let linker = check_toolchain()?;
        println!("cargo:rerun-if-changed={}", linker.display());
    }

    // aya-ebpf enables `asm_experimental_arch` on the BPF target, and the program itself
    // `core_intrinsics` (an atomic add: BPF's `core` has no compare-and-swap, so AtomicU64 has
    // no fetch_add there): allow unstable features for those two crates alone. Not "1":
    // aya-build would then add -Zbuild-std, which needs rust-src.
    // (set_var is safe on edition 2021, and nothing else runs in this process yet.)
    std::env::set_var("RUSTC_BOOTSTRAP", "aya_ebpf,lb_ebpf");

    let steer_dir = steer
        .to_str()
        .context("the path of ebpf/steer is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir: steer_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(TOOLCHAIN),
    )
    .context("building the eBPF program (ebpf/steer) failed; the lines above say why")
}

fn skipped() -> bool {
    std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// Checks for Debian's rustc with its BPF core and for bpf-linker; returns bpf-linker's path.
fn check_toolchain() -> anyhow::Result<PathBuf> {
    let fix = "install the eBPF toolchain with `cargo xtask setup` (as root), or build \
               without the program with AYA_BUILD_SKIP=1";
    if !Path::new(TOOLCHAIN).join("bin/rustc").is_file() || !Path::new(BPF_CORE).is_dir() {
        bail!(
            "Debian's rustc-web with libstd-rust-web-dev-bpf ({BPF_CORE}) is not installed: {fix}"
        );
    }
    match find_in_path("bpf-linker") {
        Some(linker) => Ok(linker),
        None => bail!("bpf-linker is not on PATH: {fix}"),
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}
