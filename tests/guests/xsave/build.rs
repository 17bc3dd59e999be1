//! Links this flat64 guest with the shared flat64 linker script (at 0x100000, `_start` first).
fn main() {
    let directory = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rustc-link-arg-bins=-T{directory}/../lib/flat64.ld");
    println!("cargo:rerun-if-changed={directory}/../lib/flat64.ld");
}
