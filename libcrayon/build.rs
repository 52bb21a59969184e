//! Gives libcrayon.so its SONAME, `libcrayon.so.<major>`: apps linked with `-lcrayon` then record
//! that name, so at run time they need only the runtime package's `libcrayon.so.0`, not the -dev
//! package's `libcrayon.so` symlink (tests/c_api.rs checks it with `readelf -d`).

fn main() {
    let major = std::env::var("CARGO_PKG_VERSION_MAJOR").unwrap_or_else(|_| "0".into());
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libcrayon.so.{major}");
    println!("cargo:rerun-if-changed=build.rs");
}
