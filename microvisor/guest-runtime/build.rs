//! Guest images are linked with `guest.ld` (passed by xtask in RUSTFLAGS); cargo cannot see
//! that file, so this makes an edit to it rebuild the runtime and relink every guest.

fn main() {
    println!("cargo:rerun-if-changed=guest.ld");
}
