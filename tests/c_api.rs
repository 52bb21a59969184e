//! libcrayon from C, for real: the example in examples/c is compiled with gcc (-Wall -Wextra
//! -Werror, against the committed include/crayon.h) and run against a running crayond, linked
//! dynamically (finding only `libcrayon.so.0`, as an app on a board without the -dev package does)
//! and statically, and under valgrind (no leaks, no invalid accesses). A peer whose user may not use
//! the service is refused by the daemon's credential check.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::service::{Service, libcrayon_dir, path_str, require_root, run};

fn compile(out: &Path, static_link: bool) {
    compile_source(&common::repo().join("examples/c/crayon_example.c"), out, static_link);
}

/// Builds a C program against the committed header and libcrayon; a dynamically linked one gets,
/// beside it, a `runtime/` folder holding only `libcrayon.so.0` (what the runtime package installs).
fn compile_source(source: &Path, out: &Path, static_link: bool) {
    let repo = common::repo();
    let lib = libcrayon_dir();
    let mut cc = Command::new("gcc");
    cc.args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-g", "-I"])
        .arg(repo.join("include"))
        .arg(source)
        .arg("-o")
        .arg(out);
    if static_link {
        cc.arg(lib.join("libcrayon.a")).args(["-lpthread", "-ldl", "-lm"]);
    } else {
        cc.arg("-L").arg(&lib).arg("-lcrayon");
    }
    let (rc, stdout, err) = run(&mut cc);
    assert_eq!(rc, 0, "gcc failed:\n{stdout}{err}");
    if !static_link {
        let runtime = runtime_dir(out);
        std::fs::create_dir_all(&runtime).unwrap();
        std::fs::copy(lib.join("libcrayon.so"), runtime.join("libcrayon.so.0")).unwrap();
    }
}

/// Where a dynamically linked test program finds libcrayon at run time: `libcrayon.so.0` only.
fn runtime_dir(exe: &Path) -> PathBuf {
    exe.parent().unwrap().join("runtime")
}

fn example(dir: &Path, static_link: bool) -> PathBuf {
    let exe = dir.join(if static_link { "crayon_example_static" } else { "crayon_example" });
    compile(&exe, static_link);
    exe
}

fn run_example(cmd: &mut Command, s: &Service) -> (i32, String, String) {
    run(cmd.env("LD_LIBRARY_PATH", s.dir.path().join("runtime")).arg(&s.socket).arg("Name a primary color.").arg("8"))
}

#[test]
fn the_c_example_generates_and_customizes_against_the_daemon() {
    let s = Service::start(None, "");
    for static_link in [false, true] {
        let exe = example(s.dir.path(), static_link);
        let (rc, out, err) = run_example(&mut Command::new(&exe), &s);
        assert_eq!(rc, 0, "static={static_link}\n{out}\n{err}");
        assert!(out.contains("libcrayon 0.2.0 (header 0.2.0, protocol 1)"), "{out}");
        assert!(out.contains("customized: {\"adapter\""), "{out}");
        assert!(
            ["choice> 6 (scored)", "choice> 8 (scored)", "choice> 9 (scored)"].iter().any(|c| out.contains(c)),
            "crayon_choose names one of the options and returns their scores: {out}"
        );
        assert!(out.contains("unknown adapter -> CRAYON_ERR_NOT_FOUND: adapter 'no-such-adapter'"), "{out}");
        assert!(out.contains("adapters now: []") && out.ends_with("ok\n"), "{out}");
    }
}

#[test]
fn the_c_example_is_clean_under_valgrind() {
    let s = Service::start(None, "");
    let exe = example(s.dir.path(), false);
    let (rc, out, err) = run_example(
        Command::new("valgrind")
            .args(["--leak-check=full", "--errors-for-leak-kinds=definite,indirect", "--error-exitcode=99"])
            .arg("--show-leak-kinds=definite,indirect")
            .arg(&exe),
        &s,
    );
    assert_eq!(rc, 0, "valgrind found errors or leaks (exit 99) or the example failed:\n{out}\n{err}");
    assert!(err.contains("ERROR SUMMARY: 0 errors"), "{err}");
    assert!(out.ends_with("ok\n"), "{out}");
}

#[test]
fn errors_reach_c_as_codes_and_messages() {
    let dir = tempfile::tempdir().unwrap();
    let exe = example(dir.path(), false);
    // No daemon at that path.
    let missing = dir.path().join("nobody-here.sock");
    let (rc, _, err) = run(Command::new(&exe).env("LD_LIBRARY_PATH", runtime_dir(&exe)).arg(path_str(&missing)));
    assert_eq!(rc, 2, "CRAYON_ERR_CONNECT: {err}");
    assert!(err.contains("CRAYON_ERR_CONNECT") && err.contains("nobody-here.sock"), "{err}");
}

#[test]
fn peers_outside_root_the_service_user_and_its_group_are_refused() {
    if !require_root("to run a client as another user") {
        return;
    }
    let s = Service::start(None, "");
    let exe = example(s.dir.path(), true);
    // Open the file system gate wide, so that the daemon's own peer-credential check is what refuses.
    std::fs::set_permissions(&s.socket, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    std::fs::set_permissions(s.dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (rc, out, err) = run(Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&exe)
        .arg(&s.socket));
    assert_eq!(rc, 10, "CRAYON_ERR_PERMISSION_DENIED expected:\n{out}\n{err}");
    assert!(err.contains("uid 65534 may not use this service"), "{err}");
}

/// The ABI can evolve (issue #13): libcrayon.so carries the SONAME libcrayon.so.0 and apps record it;
/// options are initialized and read by the app's `struct_size` (zero, or a newer header's size, is
/// refused with a message that says what to do; the newer app's extra field is left untouched);
/// `crayon_status_name` takes any int.
#[test]
fn the_abi_has_a_soname_sized_options_and_total_status_names() {
    let s = Service::start(None, "");
    let (rc, dynamic, err) = run(Command::new("readelf").arg("-d").arg(libcrayon_dir().join("libcrayon.so")));
    assert_eq!(rc, 0, "{err}");
    assert!(dynamic.contains("Library soname: [libcrayon.so.0]"), "{dynamic}");
    let source = s.dir.path().join("abi_check.c");
    std::fs::write(&source, ABI_CHECK).unwrap();
    let exe = s.dir.path().join("abi_check");
    compile_source(&source, &exe, false);
    let (rc, needed, err) = run(Command::new("readelf").arg("-d").arg(&exe));
    assert_eq!(rc, 0, "{err}");
    assert!(needed.contains("Shared library: [libcrayon.so.0]"), "apps must need libcrayon.so.0: {needed}");
    let (rc, out, err) = run(Command::new(&exe).env("LD_LIBRARY_PATH", runtime_dir(&exe)).arg(&s.socket));
    assert_eq!(rc, 0, "{out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "names: CRAYON_OK CRAYON_ERR_BUSY CRAYON_ERR_UNKNOWN CRAYON_ERR_UNKNOWN", "{out}");
    assert!(lines[1].starts_with("zero size: CRAYON_ERR_INVALID_ARGUMENT options.struct_size is 0"), "{out}");
    assert!(lines[1].contains("crayon_generate_options_init(&opts, sizeof opts)"), "{out}");
    assert!(lines[2].starts_with("newer header: CRAYON_ERR_INVALID_ARGUMENT options.struct_size is"), "{out}");
    assert!(lines[2].contains("upgrade libcrayon"), "{out}");
    assert!(lines[3].starts_with("initialized: CRAYON_OK "), "{out}");
}

const ABI_CHECK: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "crayon.h"

/* A newer app's options: this version's fields and one more at the end. */
typedef struct { crayon_generate_options base; uint64_t added_later; } newer_options;

int main(int argc, char **argv) {
    (void)argc;
    printf("names: %s %s %s %s\n", crayon_status_name(CRAYON_OK), crayon_status_name(CRAYON_ERR_BUSY),
           crayon_status_name(-1), crayon_status_name(4096));
    crayon_client *client = NULL;
    if (crayon_client_open(argv[1], &client) != CRAYON_OK) { fprintf(stderr, "%s\n", crayon_last_error()); return 1; }
    crayon_generate_options opts;
    memset(&opts, 0, sizeof opts);
    char *text = NULL;
    crayon_status st = crayon_generate(client, "Hi", &opts, NULL, NULL, &text);
    printf("zero size: %s %s\n", crayon_status_name(st), crayon_last_error());
    newer_options newer;
    newer.added_later = 12345; /* a newer app's field: init must leave it alone */
    crayon_generate_options_init(&newer.base, sizeof newer); /* writes only the fields it knows */
    st = crayon_generate(client, "Hi", &newer.base, NULL, NULL, &text);
    printf("newer header: %s %s\n", crayon_status_name(st), crayon_last_error());
    if (newer.added_later != 12345) { fprintf(stderr, "init wrote past the fields it knows\n"); return 1; }
    crayon_generate_options_init(&opts, sizeof opts);
    opts.max_tokens = 2;
    st = crayon_generate(client, "Hi", &opts, NULL, NULL, &text);
    printf("initialized: %s %s\n", crayon_status_name(st), text ? "text" : "none");
    crayon_string_free(text);
    crayon_client_free(client);
    return 0;
}
"#;
