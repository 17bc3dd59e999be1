//! Links the multiboot guest with its linker script (one PT_LOAD at 0x100000, a.out kludge
//! symbols).
fn main() {
    let directory = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rustc-link-arg-bins=-T{directory}/multiboot.ld");
    println!("cargo:rerun-if-changed={directory}/multiboot.ld");
}
