//! Puts memory.x and device.x where cortex-m-rt's link.x finds them.

use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap());
    for file in ["memory.x", "device.x"] {
        std::fs::copy(file, out.join(file)).unwrap();
        println!("cargo:rerun-if-changed={file}");
    }
    println!("cargo:rustc-link-search={}", out.display());
}
