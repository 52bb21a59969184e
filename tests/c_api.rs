//! libcrayon from C, for real: the example in examples/c is compiled with gcc (-Wall -Wextra
//! -Werror, against the committed include/crayon.h) and run against a running crayond, linked
//! dynamically and statically, and under valgrind (no leaks, no invalid accesses). A peer whose user
//! may not use the service is refused by the daemon's credential check.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::service::{Service, is_root, libcrayon_dir, path_str, run};

fn compile(out: &Path, static_link: bool) {
    let repo = common::repo();
    let lib = libcrayon_dir();
    let mut cc = Command::new("gcc");
    cc.args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-g", "-I"])
        .arg(repo.join("include"))
        .arg(repo.join("examples/c/crayon_example.c"))
        .arg("-o")
        .arg(out);
    if static_link {
        cc.arg(lib.join("libcrayon.a")).args(["-lpthread", "-ldl", "-lm"]);
    } else {
        cc.arg("-L").arg(&lib).arg("-lcrayon");
    }
    let (rc, out, err) = run(&mut cc);
    assert_eq!(rc, 0, "gcc failed:\n{out}{err}");
}

fn example(dir: &Path, static_link: bool) -> PathBuf {
    let exe = dir.join(if static_link { "crayon_example_static" } else { "crayon_example" });
    compile(&exe, static_link);
    exe
}

fn run_example(cmd: &mut Command, s: &Service) -> (i32, String, String) {
    run(cmd.env("LD_LIBRARY_PATH", libcrayon_dir()).arg(&s.socket).arg("Name a primary color.").arg("8"))
}

#[test]
fn the_c_example_generates_and_customizes_against_the_daemon() {
    let s = Service::start(None, "");
    for static_link in [false, true] {
        let exe = example(s.dir.path(), static_link);
        let (rc, out, err) = run_example(&mut Command::new(&exe), &s);
        assert_eq!(rc, 0, "static={static_link}\n{out}\n{err}");
        assert!(out.contains("libcrayon 0.1.0 (header 0.1.0, protocol 1)"), "{out}");
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
    let (rc, _, err) = run(Command::new(&exe).env("LD_LIBRARY_PATH", libcrayon_dir()).arg(path_str(&missing)));
    assert_eq!(rc, 2, "CRAYON_ERR_CONNECT: {err}");
    assert!(err.contains("CRAYON_ERR_CONNECT") && err.contains("nobody-here.sock"), "{err}");
}

#[test]
fn peers_outside_root_the_service_user_and_its_group_are_refused() {
    if !is_root() {
        eprintln!("skipped: needs root to run a client as another user");
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
