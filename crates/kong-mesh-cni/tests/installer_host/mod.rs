//! A fake node for running the real installer binary: temporary host dirs (net dir,
//! bin dir, a projected service-account volume) and the installer process, killed on
//! drop. Shared by `tests/installer.rs` and `benches/installer.rs`.

#![allow(dead_code)] // each of the two users needs a different part

use std::io::Read;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BINARY: &str = env!("CARGO_BIN_EXE_kong-mesh-cni");
pub const KUBECONFIG: &str = "ZZZ-kuma-cni-kubeconfig";
/// SIGTERM uninstalls without asking the API server whether our DaemonSet is going:
/// for tests of what the removal does (tests/upgrade.rs tests when it happens).
pub const UNINSTALL: (&str, &str) = ("KMC_UNINSTALL_ON_SIGTERM", "always");

/// The host side: `net/` (MOUNTED_CNI_NET_DIR), `bin/` (MOUNTED_CNI_BIN_DIR), `sa/` laid
/// out like a projected service-account volume, and the ready file's path.
pub struct Host {
    pub root: tempfile::TempDir,
    pub net: PathBuf,
    pub bin: PathBuf,
    pub sa: PathBuf,
    pub ready: PathBuf,
}

impl Host {
    pub fn new() -> Host {
        let root = tempfile::Builder::new().prefix("kmc-installer-").tempdir().expect("creating a temp dir");
        let (net, bin, sa) = (root.path().join("net"), root.path().join("bin"), root.path().join("sa"));
        for dir in [&net, &bin, &sa] {
            std::fs::create_dir(dir).unwrap();
        }
        let host = Host { ready: root.path().join("ready"), root, net, bin, sa };
        host.rotate_token("token-one", b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n");
        symlink("..data/token", host.sa.join("token")).unwrap();
        symlink("..data/ca.crt", host.sa.join("ca.crt")).unwrap();
        host
    }

    /// What the kubelet does to a projected volume: a new timestamped dir, then a
    /// `..data` symlink renamed over the old one, then the old dir removed.
    pub fn rotate_token(&self, token: &str, ca: &[u8]) {
        static GENERATION: AtomicU64 = AtomicU64::new(0);
        let name = format!("..2026_11_26_00_00_00.{}", GENERATION.fetch_add(1, Ordering::Relaxed));
        let dir = self.sa.join(&name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("token"), token).unwrap();
        std::fs::write(dir.join("ca.crt"), ca).unwrap();
        let old = std::fs::read_link(self.sa.join("..data")).ok();
        symlink(&name, self.sa.join("..data_tmp")).unwrap();
        std::fs::rename(self.sa.join("..data_tmp"), self.sa.join("..data")).unwrap();
        if let Some(old) = old {
            std::fs::remove_dir_all(self.sa.join(old)).unwrap();
        }
    }

    /// Where the installer listens for the plugin's log lines.
    pub fn log_socket(&self) -> PathBuf {
        self.root.path().join("run/log.sock")
    }

    pub fn net_file(&self, name: &str) -> PathBuf {
        self.net.join(name)
    }

    /// The environment of the DaemonSet's container, pointed at this host.
    pub fn env(&self) -> Vec<(String, String)> {
        let path = |p: &Path| p.to_string_lossy().into_owned();
        [
            ("KUBERNETES_SERVICE_HOST", "127.0.0.1".to_string()),
            ("KUBERNETES_SERVICE_PORT", "6443".to_string()),
            ("MOUNTED_CNI_NET_DIR", path(&self.net)),
            ("MOUNTED_CNI_BIN_DIR", path(&self.bin)),
            ("KMC_SECONDARY_BIN_DIR", path(&self.root.path().join("secondary"))),
            ("KUBE_CA_FILE", path(&self.sa.join("ca.crt"))),
            ("KUBE_SERVICE_ACCOUNT_TOKEN_PATH", path(&self.sa.join("token"))),
            ("CNI_READY_FILE", path(&self.ready)),
            ("KMC_HEALTH_PORT", "0".to_string()),
            ("KMC_LOG_SOCKET", path(&self.log_socket())),
            // The plugin's run dir (in-place repair records), next to the log socket.
            ("KMC_RUN_DIR", path(&self.root.path().join("run"))),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// The installer process; killed (SIGKILL) and reaped on drop if still running.
pub struct Installer {
    pub child: Child,
    /// Its stderr goes to a file, not a pipe: a line it wrote before an effect the test
    /// saw is in the file by then, where a pipe's reader thread could still lag.
    log: tempfile::NamedTempFile,
}

impl Installer {
    /// Starts `kong-mesh-cni install` with the host's environment plus `extra` (which
    /// wins), and nothing inherited but PATH.
    pub fn start(host: &Host, extra: &[(&str, &str)]) -> Installer {
        Installer::start_program(Path::new(BINARY), &["install"], host, extra)
    }

    pub fn start_program(program: &Path, args: &[&str], host: &Host, extra: &[(&str, &str)]) -> Installer {
        Installer::spawn(program, args, host.env().into_iter().chain(extra.iter().map(|&(k, v)| (k.into(), v.into()))))
    }

    /// Spawns `program args` with `env` and nothing inherited but PATH.
    pub fn spawn(program: &Path, args: &[&str], env: impl IntoIterator<Item = (String, String)>) -> Installer {
        let log = tempfile::NamedTempFile::new().expect("a file for the installer's log");
        let stderr = Stdio::from(log.reopen().expect("the log file"));
        Installer::spawn_with_stderr(program, args, env, stderr, log)
    }

    /// [`Installer::start`] with stderr a pipe that nobody reads (a stalled log
    /// collector): once it is full, every write to it blocks. [`Installer::log`] is
    /// empty; [`Installer::unread_stderr`] says how much waits in the pipe.
    pub fn start_with_unread_stderr(host: &Host, extra: &[(&str, &str)]) -> Installer {
        let env = host.env().into_iter().chain(extra.iter().map(|&(k, v)| (k.into(), v.into())));
        let log = tempfile::NamedTempFile::new().expect("an (unused) log file");
        Installer::spawn_with_stderr(Path::new(BINARY), &["install"], env, Stdio::piped(), log)
    }

    fn spawn_with_stderr(
        program: &Path,
        args: &[&str],
        env: impl IntoIterator<Item = (String, String)>,
        stderr: Stdio,
        log: tempfile::NamedTempFile,
    ) -> Installer {
        let mut cmd = Command::new(program);
        cmd.args(args).env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default()).env("NO_COLOR", "1");
        cmd.envs(env);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr);
        let child = cmd.spawn().expect("starting the installer");
        Installer { child, log }
    }

    /// Bytes written to a piped stderr and not read (see [`Installer::start_with_unread_stderr`]).
    pub fn unread_stderr(&self) -> usize {
        use std::os::fd::AsRawFd;
        let pipe = self.child.stderr.as_ref().expect("stderr is a pipe");
        let mut queued: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int into `queued`, which outlives the call.
        unsafe { libc::ioctl(pipe.as_raw_fd(), libc::FIONREAD, &mut queued as *mut libc::c_int) };
        usize::try_from(queued).unwrap_or(0)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Everything it logged so far.
    /// Everything it logged so far. The installer writes its lines from a thread of its
    /// own (a stalled stderr must not stop it), so a line logged before an effect the
    /// test saw may still be queued: this waits until the log has not grown for 50 ms
    /// (at most 2 s, for an installer that never stops logging).
    pub fn log(&self) -> String {
        let read = || std::fs::read(self.log.path()).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut seen = read();
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let now = read();
            if now.len() == seen.len() || Instant::now() > deadline {
                return String::from_utf8_lossy(&now).into_owned();
            }
            seen = now;
        }
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        unsafe { libc::kill(self.pid(), signal) };
    }

    /// Sends SIGTERM and waits (bounded) for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait(Duration::from_secs(20)).expect("the installer did not exit within 20s of SIGTERM")
    }

    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// User plus system CPU time so far, from /proc/<pid>/stat.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the command name (which may hold spaces) start at ") ".
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        Duration::from_millis(ticks * 1000 / hz)
    }

    /// A field of /proc/<pid>/status, in kB (VmRSS, VmHWM, Threads...).
    pub fn proc_status(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with(&format!("{field}:"))).unwrap_or_else(|| panic!("no {field}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

impl Drop for Installer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `condition` every millisecond until it holds; returns how long it took, or
/// None after `timeout`.
pub fn wait_for(timeout: Duration, mut condition: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if condition() {
            return Some(start.elapsed());
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The file parsed as JSON, if it exists and parses.
pub fn json(path: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Whether the conflist at `path` ends with our plugin, once.
pub fn chained(path: &Path, plugin: &str) -> bool {
    json(path).and_then(|v| v["plugins"].as_array().cloned()).is_some_and(|plugins| {
        plugins.last().is_some_and(|p| p["type"] == plugin)
            && plugins.iter().filter(|p| p["type"] == plugin).count() == 1
    })
}

/// Writes `content` the way an agent that does not care writes: truncate and write in
/// place.
pub fn write_in_place(path: &Path, content: &str) {
    std::fs::write(path, content).unwrap();
}

/// Writes `content` the careful way: a temp file renamed over the target.
pub fn rename_over(path: &Path, content: &str) {
    let temp = path.with_file_name(format!(".primary-{}", path.file_name().unwrap().to_string_lossy()));
    std::fs::write(&temp, content).unwrap();
    std::fs::rename(&temp, path).unwrap();
}

pub const CALICO: &str = include_str!("../../../installer/tests/golden/calico/input/10-calico.conflist");
pub const FLANNEL_CONF: &str = include_str!("../../../installer/tests/golden/flannel-conf/input/10-flannel.conf");
pub const CILIUM: &str = include_str!("../../../installer/tests/golden/cilium/input/05-cilium.conflist");

/// Two agents fighting us for `fight`: one renames its own copy over the file, the
/// other writes it in place, each every 2 ms. Returns the installer's CPU time meanwhile.
pub fn fight_over(installer: &Installer, path: &Path, content: &str, fight: Duration) -> Duration {
    let before = installer.cpu_time();
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        for writer in 0..2 {
            s.spawn(move || {
                while started.elapsed() < fight {
                    match writer {
                        0 => rename_over(path, content),
                        _ => write_in_place(path, content),
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            });
        }
    });
    installer.cpu_time() - before
}

/// A port nobody listens on right now (the kernel's pick).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// GET on 127.0.0.1:`port`: the status code and the body.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, response.split_once("\r\n\r\n")?.1.to_string()))
}
