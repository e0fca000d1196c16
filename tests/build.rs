//! Sets the `ablate_ci` cfg when `CI` is set (to anything but empty, `0` or `false`). Tests that
//! need what only the test command or CI prepares (root for network namespaces, chromium) are
//! `#[ignore]`d without it, so a plain `cargo test` says why it did not run them instead of
//! printing "skipped" and passing; under CI they run and fail when they cannot.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(ablate_ci)");
    println!("cargo:rerun-if-env-changed=CI");
    let ci = std::env::var("CI").unwrap_or_default();
    if !matches!(ci.trim(), "" | "0" | "false") {
        println!("cargo:rustc-cfg=ablate_ci");
    }
}
