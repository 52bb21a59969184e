//! The system-service test bed: a private `dbus-daemon` configured like a system bus (with the
//! shipped bus policy), and `crayond` serving its local socket and D-Bus on it. All real processes.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

use super::daemon::{PATIENCE, tiny_config};

/// A private bus: `dbus-daemon --config-file` built from tests/dbus/system-like.conf.in.
pub struct Bus {
    pub child: Child,
    pub address: String,
    _dir: tempfile::TempDir,
}

impl Bus {
    pub fn start() -> Bus {
        let dir = tempfile::tempdir().unwrap();
        let template = std::fs::read_to_string(super::repo().join("tests/dbus/system-like.conf.in")).unwrap();
        let socket = dir.path().join("bus");
        let conf = template
            .replace("@SOCKET@", socket.to_str().unwrap())
            .replace("@POLICY@", super::repo().join("dbus/org.crayon.Crayon1.conf").to_str().unwrap());
        let conf_path = dir.path().join("bus.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut child = Command::new("dbus-daemon")
            .args(["--nofork", "--print-address", "--config-file"])
            .arg(&conf_path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("dbus-daemon (Debian package dbus-daemon) is needed for the D-Bus tests; scripts/test installs it");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert!(line.starts_with("unix:"), "dbus-daemon did not start: {line:?}");
        Bus { child, address: format!("unix:path={}", socket.display()), _dir: dir }
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `crayond` serving a socket (and D-Bus when a bus is given), with the tiny model and its pool.
pub struct Service {
    pub child: Child,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
    pub lines: mpsc::Receiver<String>,
}

impl Service {
    pub fn start(bus: Option<&Bus>, extra_config: &str) -> Service {
        Service::start_with_env(bus, extra_config, &[])
    }

    /// As [`Service::start`], with extra environment variables (e.g. systemd's NOTIFY_SOCKET).
    pub fn start_with_env(bus: Option<&Bus>, extra_config: &str, env: &[(&str, &str)]) -> Service {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let pool = super::repo().join("models/tiny-pool");
        let config = tiny_config(Some(&pool), &state, extra_config);
        let path = dir.path().join("crayon.toml");
        std::fs::write(&path, config).unwrap();
        let socket = dir.path().join("crayon.sock");
        let mut cmd = if env.iter().any(|(k, _)| *k == "WATCHDOG_USEC") {
            // systemd names the watched process in WATCHDOG_PID; exec keeps the shell's pid.
            let mut c = Command::new("sh");
            c.args(["-c", "WATCHDOG_PID=$$ exec \"$0\" \"$@\"", env!("CARGO_BIN_EXE_crayond")]);
            c
        } else {
            Command::new(env!("CARGO_BIN_EXE_crayond"))
        };
        cmd.args(["--config", path.to_str().unwrap(), "--socket", socket.to_str().unwrap()]);
        if let Some(b) = bus {
            cmd.args(["--dbus", &b.address]);
        }
        let mut child = cmd
            .env_remove("CRAYON_CONFIG")
            .env_remove("NOTIFY_SOCKET")
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let s = Service { child, socket, dir, lines: rx };
        if let Err(e) = s.wait_line("crayond: ready") {
            let mut s = s;
            let _ = s.child.kill();
            let mut err = String::new();
            s.child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            panic!("crayond did not start ({e}):\n{err}");
        }
        s
    }

    /// Waits (bounded) for a line on the daemon's stdout.
    pub fn wait_line(&self, want: &str) -> Result<(), String> {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(want) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(format!("no '{want}' line: {e}")),
            }
        }
    }

    pub fn signal(&self, sig: i32) {
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    /// Waits (bounded) for the process to exit and returns its status code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let deadline = std::time::Instant::now() + PATIENCE;
        while std::time::Instant::now() < deadline {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("crayond did not exit");
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("crayon.toml")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a command and returns (status code, stdout, stderr).
pub fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// Whether a test that needs root may run. Without root it is skipped with a note — unless
/// `CRAYON_REQUIRE_ROOT` is set (CI runs as root and sets it in .ci/run), where a missing
/// precondition must fail loudly rather than pass silently.
pub fn require_root(why: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CRAYON_REQUIRE_ROOT").is_none(),
        "CRAYON_REQUIRE_ROOT is set but this test runs as uid {}: it needs root {why}",
        unsafe { libc::geteuid() }
    );
    eprintln!("skipped: needs root {why} (set CRAYON_REQUIRE_ROOT to make this a failure)");
    false
}

/// libcrayon as built by cargo (`cargo build -p libcrayon`, done by scripts/test).
pub fn libcrayon_dir() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| super::repo().join("target"), PathBuf::from)
        .join(if cfg!(debug_assertions) { "debug" } else { "release" });
    assert!(
        dir.join("libcrayon.so").is_file(),
        "{} is missing: build it with `cargo build -p libcrayon` (scripts/test does)",
        dir.join("libcrayon.so").display()
    );
    dir
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}
