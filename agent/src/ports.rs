//! Listening TCP ports of the workspace, watched every [`POLL_INTERVAL`].
//!
//! Each poll dumps listening sockets (IPv4 and IPv6) with one netlink `sock_diag` request per
//! family (well under a millisecond even with thousands of connections open), or reads
//! `/proc/net/tcp` and `tcp6` where netlink is refused. Socket inodes are mapped to their
//! process once: `/proc/<pid>/fd` is scanned only when an inode is new. Ports outside the
//! configured [`PortScope`] are left out. A new port is probed once, on its own thread,
//! for whether it speaks HTTP.
//!
//! The watcher runs on a dedicated thread (everything here blocks) and publishes the
//! current table on a `watch` channel; each connection to the hub turns changes of the
//! table into [`ControlMsg`](protocol::control::ControlMsg) port reports.

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use protocol::bootstrap::PortScope;
use protocol::control::{PortInfo, PortSource};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

/// How often listening sockets are dumped.
pub const POLL_INTERVAL: Duration = Duration::from_millis(75);
/// How long the HTTP probe waits to connect and for the first bytes of an answer.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);
/// Command lines are cut to this many characters.
const COMMAND_CHARS: usize = 200;

/// The ports as last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortTable {
    pub source: PortSource,
    pub ports: BTreeMap<u16, PortInfo>,
}

/// One listening socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    pub addr: IpAddr,
    pub port: u16,
    pub inode: u64,
}

/// Where listening sockets come from.
pub enum Dumper {
    Netlink(netlink_sys::Socket, Vec<u8>),
    ProcNet,
}

impl Dumper {
    /// Netlink `sock_diag`, if this process may use it.
    pub fn netlink() -> std::io::Result<Self> {
        Ok(Dumper::Netlink(netlink_socket()?, vec![0; 64 * 1024]))
    }

    /// `/proc/net/tcp` and `tcp6`.
    pub fn proc_net() -> Self {
        Dumper::ProcNet
    }

    fn open() -> Self {
        match netlink_socket() {
            Ok(socket) => Dumper::Netlink(socket, vec![0; 64 * 1024]),
            Err(e) => {
                tracing::warn!(error = %e, "netlink sock_diag unavailable: reading /proc/net/tcp instead (slower)");
                Dumper::ProcNet
            }
        }
    }

    fn source(&self) -> PortSource {
        match self {
            Dumper::Netlink(..) => PortSource::SockDiag,
            Dumper::ProcNet => PortSource::ProcNet,
        }
    }

    /// Every listening TCP socket on the machine (IPv4 and IPv6).
    pub fn dump(&mut self) -> std::io::Result<Vec<Listener>> {
        match self {
            Dumper::Netlink(socket, buf) => {
                let mut all = dump_family(socket, buf, AF_INET)?;
                all.extend(dump_family(socket, buf, AF_INET6)?);
                Ok(all)
            }
            Dumper::ProcNet => {
                let mut all = Vec::new();
                for (path, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
                    if let Ok(text) = std::fs::read_to_string(path) {
                        all.extend(parse_proc_net(&text, v6));
                    }
                }
                Ok(all)
            }
        }
    }
}

fn netlink_socket() -> std::io::Result<netlink_sys::Socket> {
    let mut socket = netlink_sys::Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    // Probe once: some sandboxes allow the socket but refuse the request.
    let mut buf = vec![0; 64 * 1024];
    dump_family(&mut socket, &mut buf, AF_INET)?;
    Ok(socket)
}

/// One `sock_diag` dump of listening TCP sockets of one address family.
fn dump_family(
    socket: &mut netlink_sys::Socket,
    buf: &mut [u8],
    family: u8,
) -> std::io::Result<Vec<Listener>> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::LISTEN,
            socket_id: if family == AF_INET {
                SocketId::new_v4()
            } else {
                SocketId::new_v6()
            },
        })
        .into(),
    );
    request.finalize();
    let mut out = vec![0; request.buffer_len()];
    request.serialize(&mut out);
    socket.send(&out, 0)?;
    let mut found = Vec::new();
    loop {
        let size = socket.recv(&mut &mut buf[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[offset..size])
                .map_err(|e| std::io::Error::other(format!("sock_diag reply: {e}")))?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    found.push(Listener {
                        addr: r.header.socket_id.source_address,
                        port: r.header.socket_id.source_port,
                        inode: u64::from(r.header.inode),
                    });
                }
                NetlinkPayload::Done(_) => return Ok(found),
                NetlinkPayload::Error(e) => {
                    return Err(std::io::Error::other(format!("sock_diag: {e:?}")));
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

/// Listening sockets from `/proc/net/tcp` (or `tcp6`) text.
pub fn parse_proc_net(text: &str, v6: bool) -> Vec<Listener> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if fields.len() < 10 || fields[3] != "0A" {
                return None;
            }
            let (addr, port) = fields[1].split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let addr = parse_proc_addr(addr, v6)?;
            let inode = fields[9].parse().ok()?;
            Some(Listener { addr, port, inode })
        })
        .collect()
}

/// `/proc/net/tcp*` addresses: 32-bit words in host (little-endian) order, as hex.
fn parse_proc_addr(hex: &str, v6: bool) -> Option<IpAddr> {
    let words: Vec<u32> = (0..hex.len() / 8)
        .map(|i| u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok())
        .collect::<Option<_>>()?;
    match (v6, words.as_slice()) {
        (false, [w]) => Some(IpAddr::V4(Ipv4Addr::from(w.to_le_bytes()))),
        (true, [a, b, c, d]) => {
            let mut bytes = [0u8; 16];
            for (i, w) in [a, b, c, d].into_iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
            }
            Some(IpAddr::V6(Ipv6Addr::from(bytes)))
        }
        _ => None,
    }
}

/// Who owns a socket, if it is the workspace's.
#[derive(Debug, Clone)]
struct Owner {
    pid: Option<u32>,
    process: String,
    command: String,
}

/// Finds the processes holding `inodes`: one pass over `/proc/*/fd`.
fn owners_of(inodes: &HashSet<u64>) -> HashMap<u64, u32> {
    let mut found = HashMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let inode = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok());
            if let Some(inode) = inode.filter(|i| inodes.contains(i)) {
                found.insert(inode, pid);
                if found.len() == inodes.len() {
                    return found;
                }
            }
        }
    }
    found
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid ...; comm may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn descends_from(mut pid: u32, ancestor: u32) -> bool {
    for _ in 0..128 {
        if pid == ancestor {
            return true;
        }
        match parent_of(pid) {
            Some(parent) if parent != pid && parent != 0 => pid = parent,
            _ => return false,
        }
    }
    false
}

fn describe(pid: u32) -> Owner {
    let process = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_default();
    let command = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(String::from_utf8_lossy)
                .collect::<Vec<_>>()
                .join(" ")
                .chars()
                .take(COMMAND_CHARS)
                .collect()
        })
        .unwrap_or_default();
    Owner {
        pid: Some(pid),
        process,
        command,
    }
}

/// Does it answer like an HTTP server? One `HEAD /` with short timeouts.
pub fn probe_http(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(PROBE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(PROBE_TIMEOUT));
    if stream
        .write_all(
            b"HEAD / HTTP/1.0\r\nHost: localhost\r\nUser-Agent: workspace-agent-probe\r\n\r\n",
        )
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        match stream.read(&mut head[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    &head[..got] == b"HTTP/"
}

/// Where to reach a listener from inside the workspace.
pub fn local_addr(addr: IpAddr, port: u16) -> SocketAddr {
    let ip = match addr {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, port)
}

/// The watcher's state between polls.
pub struct Watcher {
    scope: PortScope,
    agent_pid: u32,
    dumper: Dumper,
    /// Socket inode -> its owner if the socket is the workspace's, `None` if not.
    owners: HashMap<u64, Option<Owner>>,
    /// HTTP probe results by port (dropped when the port closes).
    http: HashMap<u16, bool>,
    probing: HashSet<u16>,
    /// Finished probes: (port, answers HTTP).
    probe_done: mpsc::Sender<(u16, bool)>,
    probe_results: mpsc::Receiver<(u16, bool)>,
}

impl Watcher {
    pub fn new(scope: PortScope) -> Self {
        let (probe_done, probe_results) = mpsc::channel();
        Self {
            scope,
            agent_pid: std::process::id(),
            dumper: Dumper::open(),
            owners: HashMap::new(),
            http: HashMap::new(),
            probing: HashSet::new(),
            probe_done,
            probe_results,
        }
    }

    fn owner(&self, pid: Option<u32>) -> Option<Owner> {
        match (self.scope, pid) {
            (_, Some(pid)) if pid == self.agent_pid => None,
            (PortScope::Descendants, Some(pid)) if descends_from(pid, self.agent_pid) => {
                Some(describe(pid))
            }
            (PortScope::Descendants | PortScope::Off, _) => None,
            // Another user's socket the agent may not inspect: still a port of the VM.
            (PortScope::All, None) => Some(Owner {
                pid: None,
                process: String::new(),
                command: String::new(),
            }),
            (PortScope::All, Some(pid)) => Some(describe(pid)),
        }
    }

    /// One poll: the current table.
    pub fn poll(&mut self) -> PortTable {
        let listeners = self.dumper.dump().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "dump listening sockets");
            Vec::new()
        });
        let live: HashSet<u64> = listeners.iter().map(|l| l.inode).collect();
        self.owners.retain(|inode, _| live.contains(inode));
        let unknown: HashSet<u64> = live
            .iter()
            .copied()
            .filter(|i| !self.owners.contains_key(i))
            .collect();
        if !unknown.is_empty() {
            let pids = owners_of(&unknown);
            for inode in unknown {
                let owner = self.owner(pids.get(&inode).copied());
                self.owners.insert(inode, owner);
            }
        }
        while let Ok((port, http)) = self.probe_results.try_recv() {
            self.probing.remove(&port);
            self.http.insert(port, http);
        }
        let mut ports: BTreeMap<u16, PortInfo> = BTreeMap::new();
        for l in &listeners {
            let Some(Some(owner)) = self.owners.get(&l.inode) else {
                continue;
            };
            let entry = ports.entry(l.port).or_insert_with(|| PortInfo {
                port: l.port,
                addresses: Vec::new(),
                loopback_only: true,
                pid: owner.pid,
                process: owner.process.clone(),
                command: owner.command.clone(),
                http: None,
            });
            let addr = l.addr.to_string();
            if !entry.addresses.contains(&addr) {
                entry.addresses.push(addr);
            }
            entry.loopback_only &= l.addr.is_loopback();
        }
        self.http.retain(|port, _| ports.contains_key(port));
        for (port, info) in &mut ports {
            info.addresses.sort();
            info.http = self.http.get(port).copied();
            if info.http.is_none() && self.probing.insert(*port) {
                let addr = info
                    .addresses
                    .first()
                    .and_then(|a| a.parse().ok())
                    .map(|ip| local_addr(ip, *port));
                let done = self.probe_done.clone();
                let port = *port;
                std::thread::spawn(move || {
                    let http = addr.is_some_and(probe_http);
                    let _ = done.send((port, http));
                });
            }
        }
        PortTable {
            source: self.dumper.source(),
            ports,
        }
    }
}

/// Starts the watcher thread; it stops when every receiver is gone.
pub fn watch(scope: PortScope) -> Option<tokio::sync::watch::Receiver<PortTable>> {
    if scope == PortScope::Off {
        return None;
    }
    let mut watcher = Watcher::new(scope);
    let (tx, rx) = tokio::sync::watch::channel(watcher.poll());
    std::thread::Builder::new()
        .name("port-watch".into())
        .spawn(move || {
            while !tx.is_closed() {
                std::thread::sleep(POLL_INTERVAL);
                let table = watcher.poll();
                tx.send_if_modified(|current| {
                    let changed = *current != table;
                    if changed {
                        *current = table;
                    }
                    changed
                });
            }
        })
        .ok()?;
    Some(rx)
}

/// The reports that bring a hub that saw `sent` up to `now`: a full [`Ports`] list the
/// first time, then `PortOpened` for new or changed ports and `PortClosed` for gone ones.
///
/// [`Ports`]: protocol::control::Ports
pub fn reports(sent: Option<&PortTable>, now: &PortTable) -> Vec<protocol::control::ControlMsg> {
    use protocol::control::{ControlMsg, PortClosed, Ports};
    let Some(sent) = sent else {
        return vec![ControlMsg::Ports(Ports {
            source: now.source,
            ports: now.ports.values().cloned().collect(),
        })];
    };
    let mut out: Vec<ControlMsg> = sent
        .ports
        .keys()
        .filter(|p| !now.ports.contains_key(p))
        .map(|&port| ControlMsg::PortClosed(PortClosed { port }))
        .collect();
    out.extend(
        now.ports
            .iter()
            .filter(|(port, info)| sent.ports.get(port) != Some(info))
            .map(|(_, info)| ControlMsg::PortOpened(info.clone())),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_lines_parse() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:0BB8 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 12345 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:0BB9 0100007F:D431 01 00000000:00000000 00:00000000 00000000  1000        0 999 1 0000000000000000 100 0 0 10 0\n";
        assert_eq!(
            parse_proc_net(v4, false),
            vec![Listener {
                addr: "127.0.0.1".parse().unwrap(),
                port: 3000,
                inode: 12345
            }]
        );
        let v6 = "  sl  local_address                         remote_address                        st\n   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 777 1\n";
        assert_eq!(
            parse_proc_net(v6, true),
            vec![Listener {
                addr: "::1".parse().unwrap(),
                port: 8080,
                inode: 777
            }]
        );
        assert!(parse_proc_net("header\ngarbage line\n", false).is_empty());
    }

    fn info(port: u16, http: Option<bool>) -> PortInfo {
        PortInfo {
            port,
            addresses: vec!["127.0.0.1".into()],
            loopback_only: true,
            pid: Some(1),
            process: "node".into(),
            command: "node server.js".into(),
            http,
        }
    }

    fn table(ports: &[PortInfo]) -> PortTable {
        PortTable {
            source: PortSource::SockDiag,
            ports: ports.iter().map(|p| (p.port, p.clone())).collect(),
        }
    }

    #[test]
    fn both_sources_see_the_same_listeners() {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("[::1]:0").unwrap();
        let mut netlink = Dumper::netlink().unwrap();
        let mut proc_net = Dumper::proc_net();
        for l in [&a, &b] {
            let addr = l.local_addr().unwrap();
            let want = |d: &mut Dumper| {
                d.dump()
                    .unwrap()
                    .into_iter()
                    .any(|x| x.port == addr.port() && x.addr == addr.ip() && x.inode > 0)
            };
            assert!(want(&mut netlink), "sock_diag misses {addr}");
            assert!(want(&mut proc_net), "/proc/net misses {addr}");
        }
    }

    #[test]
    fn reports_are_a_snapshot_then_differences() {
        use protocol::control::{ControlMsg, PortClosed};
        let a = table(&[info(3000, None)]);
        assert!(matches!(&reports(None, &a)[..], [ControlMsg::Ports(p)] if p.ports.len() == 1));
        let b = table(&[info(3000, Some(true)), info(5432, None)]);
        assert_eq!(
            reports(Some(&a), &b),
            vec![
                ControlMsg::PortOpened(info(3000, Some(true))),
                ControlMsg::PortOpened(info(5432, None))
            ]
        );
        let c = table(&[info(5432, None)]);
        assert_eq!(
            reports(Some(&b), &c),
            vec![ControlMsg::PortClosed(PortClosed { port: 3000 })]
        );
        assert!(reports(Some(&c), &c).is_empty());
    }

    #[test]
    fn a_listener_of_this_process_tree_is_found_with_its_owner_and_http_probe() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        // Answer the probe like a web server would (and keep listening).
        let accepting = server.try_clone().unwrap();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = accepting.accept() {
                let mut buf = [0u8; 256];
                let _ = s.read(&mut buf);
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\n");
            }
        });
        // The test process is the "agent" here: its own sockets are left out in either scope,
        // so watch from a child's point of view by pretending to be our parent.
        let mut watcher = Watcher::new(PortScope::Descendants);
        watcher.agent_pid = parent_of(std::process::id()).unwrap();
        let mut table = watcher.poll();
        for _ in 0..100 {
            if table.ports.get(&port).and_then(|p| p.http).is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
            table = watcher.poll();
        }
        let found = &table.ports[&port];
        assert_eq!(found.pid, Some(std::process::id()));
        assert!(found.loopback_only);
        assert_eq!(found.addresses, vec!["127.0.0.1".to_owned()]);
        assert_eq!(found.http, Some(true));
        assert_eq!(table.source, PortSource::SockDiag);
        drop(server);
        assert!(!watcher.poll().ports.contains_key(&port), "closed");
    }
}
