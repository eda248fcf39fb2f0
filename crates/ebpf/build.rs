//! Compiles the eBPF programs from source (clang, `-target bpf`): no prebuilt object is
//! ever committed. The object is embedded in the binary with `include_bytes!`.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let source = "bpf/redirect.c";
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-env-changed=CLANG");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("redirect.o");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    // The uapi headers (linux/bpf.h) come from linux-libc-dev; asm/ lives in the
    // multiarch directory, which clang does not search for the bpf target.
    let arch = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("aarch64") => "aarch64-linux-gnu",
        _ => "x86_64-linux-gnu",
    };
    let status = Command::new(&clang)
        .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
        .arg(format!("-I/usr/include/{arch}"))
        .args(["-c", source, "-o"])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| {
            panic!("cannot run {clang} to build the eBPF programs ({e}): install clang (Debian package `clang`)")
        });
    assert!(status.success(), "{clang} failed on {source}");
}
