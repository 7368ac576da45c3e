//! Domain images are linked with `domain.ld` (passed by xtask in RUSTFLAGS); cargo cannot see
//! that file, so this makes an edit to it rebuild the runtime and relink every domain.

fn main() {
    println!("cargo:rerun-if-changed=domain.ld");
}
