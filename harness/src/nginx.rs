//! A load balancer in front of several hub replicas: nginx's stream module (Debian's `nginx`
//! and `libnginx-mod-stream`, which `./scripts/test` installs), passing TCP (HTTP) and UDP
//! (QUIC) through untouched, as Google's passthrough network load balancer does.
//!
//! TCP connections go round robin, so successive HTTP requests land on different replicas.
//! UDP flows are pinned by a consistent hash of the client's address *and port*: every
//! client here comes from 127.0.0.1, and hashing the address alone (what a real deployment
//! with many client hosts would do) would send every agent and CLI to one replica.

use anyhow::{Context, Result, bail};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

pub struct LoadBalancer {
    dir: tempfile::TempDir,
    child: Child,
    /// Where HTTP clients connect (TCP) and where agents and CLIs dial (UDP): one port.
    pub addr: SocketAddr,
}

/// A port free for both TCP and UDP on 127.0.0.1 (bound and let go: a small race that a
/// failed start reports).
pub fn free_shared_port() -> Result<u16> {
    for _ in 0..50 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = tcp.local_addr()?.port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port free for both TCP and UDP")
}

impl LoadBalancer {
    /// The nginx binary, or a clear error naming the packages.
    pub fn nginx() -> Result<PathBuf> {
        let bin = PathBuf::from("/usr/sbin/nginx");
        if !bin.exists() || !Path::new(MODULE).exists() {
            bail!(
                "nginx with its stream module is missing: apt-get install nginx libnginx-mod-stream"
            );
        }
        Ok(bin)
    }

    /// Starts nginx on `port` (see [`free_shared_port`]) in front of `http` (TCP) and `quic` (UDP)
    /// backends.
    pub fn start(port: u16, http: &[SocketAddr], quic: &[SocketAddr]) -> Result<Self> {
        let nginx = Self::nginx()?;
        let dir = tempfile::Builder::new().prefix("wsh-lb-").tempdir()?;
        let d = dir.path();
        // TCP: a refused connection goes to the next replica, and no replica is ever
        // marked down for it (a rolling restart refuses briefly on each in turn). UDP has
        // no refusal to see: a replica that fails is left alone for two seconds.
        let servers = |addrs: &[SocketAddr], marks: &str| {
            addrs
                .iter()
                .map(|a| format!("    server {a} {marks};\n"))
                .collect::<String>()
        };
        let config = format!(
            "load_module {MODULE};\n\
             daemon off;\nworker_processes 1;\npid {pid};\nerror_log {log} info;\n\
             events {{ worker_connections 16384; }}\n\
             stream {{\n\
               upstream http {{\n{http}  }}\n\
               upstream quic {{\n    hash \"$remote_addr:$remote_port\" consistent;\n{quic}  }}\n\
               server {{ listen 127.0.0.1:{port}; proxy_pass http; proxy_connect_timeout 1s; proxy_timeout 10m; }}\n\
               server {{ listen 127.0.0.1:{port} udp; proxy_pass quic; proxy_timeout 10m; }}\n\
             }}\n",
            pid = d.join("nginx.pid").display(),
            log = d.join("error.log").display(),
            http = servers(http, "max_fails=0"),
            quic = servers(quic, "max_fails=1 fail_timeout=2s"),
        );
        std::fs::write(d.join("nginx.conf"), config)?;
        let child = Command::new(nginx)
            .arg("-p")
            .arg(d)
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .arg("-e")
            .arg(d.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start nginx")?;
        let mut lb = Self {
            dir,
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let start = Instant::now();
        while std::net::TcpStream::connect(lb.addr).is_err() {
            if let Some(status) = lb.child.try_wait()? {
                bail!("nginx exited with {status}: {}", lb.log());
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("nginx did not listen within 10 s: {}", lb.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(lb)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// nginx's error log (connections to dead backends show here).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for LoadBalancer {
    fn drop(&mut self) {
        // SIGQUIT would wait for open sessions; SIGTERM stops nginx and its workers now.
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
