//! Links the agent's executables with packed relative relocations (`DT_RELR`, glibc 2.36 and
//! binutils 2.38 or later): the table the loader reads at every start shrinks from hundreds of
//! kilobytes to a few, and with it the agent's resident memory. The executable stays
//! position-independent.

fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu")
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
