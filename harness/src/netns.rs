//! A small network of namespaces for NAT traversal tests: a "public" segment (a bridge in
//! the test's own namespace, where the hub listens) and two sites, each a host behind a
//! NAT router of its own (nftables masquerade), one for an agent and one for a client.
//!
//! ```text
//!  agent host ── NAT a ──┐                       ┌── NAT c ── client host
//!  10.237.(3k+1).2       │  bridge 10.237.3k.0/24 │            10.237.(3k+2).2
//!                        └──── hub 10.237.3k.1 ───┘
//! ```
//!
//! No namespace has a default route: every packet stays on these links. The NATs drop
//! unsolicited packets from outside, as home routers do, so a direct path needs both sides
//! to punch. `Nat::Cone` keeps a host's source port for every destination (what hole
//! punching needs); `Nat::Symmetric` picks a random port per destination (what defeats it).
//! Everything is removed on drop.

use anyhow::{Context, Result, bail};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// The two sites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    Agent,
    Client,
}

/// How a site's router maps ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// Endpoint-independent mapping (the source port is kept), address-dependent filtering.
    Cone,
    /// A random port for every new destination.
    Symmetric,
}

pub struct Lab {
    k: u8,
    created: Vec<String>,
    bridge: Option<String>,
}

fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn nft(ns: &str, script: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run nft")?;
    use std::io::Write;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft in {ns}: {}\n{script}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl Lab {
    /// Builds the network, both NATs `Nat::Cone`. Needs root, `ip` and `nft`.
    pub fn new() -> Result<Self> {
        // A free number: the bridge's name is the lock.
        let start = std::process::id() as u8 % 80;
        let mut lab = None;
        for i in 0..80u8 {
            let k = (start + i) % 80;
            let bridge = format!("wsh{k}br");
            if run(&["ip", "link", "add", &bridge, "type", "bridge"]).is_ok() {
                lab = Some(Lab {
                    k,
                    created: Vec::new(),
                    bridge: Some(bridge),
                });
                break;
            }
        }
        let mut lab = lab.context("no free lab number (wsh*br bridges left over?)")?;
        lab.build()?;
        Ok(lab)
    }

    fn build(&mut self) -> Result<()> {
        let bridge = self.bridge.clone().unwrap_or_default();
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", self.hub_ip()),
            "dev",
            &bridge,
        ])?;
        run(&["ip", "link", "set", &bridge, "up"])?;
        for site in [Site::Agent, Site::Client] {
            let (host, router) = (self.ns(site), self.router(site));
            for ns in [&host, &router] {
                run(&["ip", "netns", "add", ns])?;
                self.created.push(ns.clone());
                run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            }
            let outside = format!("{router}o");
            run(&[
                "ip", "link", "add", &outside, "type", "veth", "peer", "name", "out", "netns",
                &router,
            ])?;
            run(&["ip", "link", "set", &outside, "master", &bridge, "up"])?;
            let public = format!("{}/24", self.public_ip(site));
            run(&["ip", "-n", &router, "addr", "add", &public, "dev", "out"])?;
            run(&["ip", "-n", &router, "link", "set", "out", "up"])?;
            run(&[
                "ip", "-n", &router, "link", "add", "in", "type", "veth", "peer", "name", "eth0",
                "netns", &host,
            ])?;
            let (gw, host_ip) = (self.inside(site, 1), self.inside(site, 2));
            run(&[
                "ip",
                "-n",
                &router,
                "addr",
                "add",
                &format!("{gw}/24"),
                "dev",
                "in",
            ])?;
            run(&["ip", "-n", &router, "link", "set", "in", "up"])?;
            run(&[
                "ip",
                "-n",
                &host,
                "addr",
                "add",
                &format!("{host_ip}/24"),
                "dev",
                "eth0",
            ])?;
            run(&["ip", "-n", &host, "link", "set", "eth0", "up"])?;
            let public_net = format!("{}/24", self.net(0, 0));
            run(&[
                "ip",
                "-n",
                &host,
                "route",
                "add",
                &public_net,
                "via",
                &gw.to_string(),
            ])?;
            run(&[
                "ip",
                "netns",
                "exec",
                &router,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ])?;
            self.set_nat(site, Nat::Cone)?;
        }
        Ok(())
    }

    fn net(&self, offset: u8, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 237, self.k * 3 + offset, host)
    }

    /// The hub's address on the public segment.
    pub fn hub_ip(&self) -> Ipv4Addr {
        self.net(0, 1)
    }

    /// A site's NAT address on the public segment.
    pub fn public_ip(&self, site: Site) -> Ipv4Addr {
        self.net(0, if site == Site::Agent { 2 } else { 3 })
    }

    fn inside(&self, site: Site, host: u8) -> Ipv4Addr {
        self.net(if site == Site::Agent { 1 } else { 2 }, host)
    }

    /// The site's host address behind its NAT.
    pub fn host_ip(&self, site: Site) -> Ipv4Addr {
        self.inside(site, 2)
    }

    fn ns(&self, site: Site) -> String {
        format!(
            "wsh{}-{}",
            self.k,
            if site == Site::Agent { "a" } else { "c" }
        )
    }

    fn router(&self, site: Site) -> String {
        format!(
            "wsh{}-n{}",
            self.k,
            if site == Site::Agent { "a" } else { "c" }
        )
    }

    /// (Re)configures a site's router: its NAT, and a firewall that drops what nobody
    /// inside asked for.
    pub fn set_nat(&self, site: Site, nat: Nat) -> Result<()> {
        let router = self.router(site);
        let _ = nft(&router, "delete table ip nat\n");
        let _ = nft(&router, "delete table ip filter\n");
        let random = if nat == Nat::Symmetric { " random" } else { "" };
        nft(
            &router,
            &format!(
                "table ip nat {{\n chain outgoing {{ type nat hook postrouting priority 100; oifname \"out\" masquerade{random}; }}\n}}\n\
                 table ip filter {{\n chain passing {{ type filter hook forward priority 0; iifname \"out\" ct state new drop; }}\n chain arriving {{ type filter hook input priority 0; iifname \"out\" ct state new drop; }}\n}}\n"
            ),
        )?;
        Ok(())
    }

    /// Cuts (or restores) UDP between the two sites' NATs; the hub still reaches both.
    pub fn cut(&self, cut: bool) -> Result<()> {
        let router = self.router(Site::Client);
        let _ = nft(&router, "delete table ip cut\n");
        if cut {
            let far = self.public_ip(Site::Agent);
            nft(
                &router,
                &format!(
                    "table ip cut {{\n chain between {{ type filter hook forward priority -10; ip daddr {far} meta l4proto udp drop; ip saddr {far} meta l4proto udp drop; }}\n}}\n"
                ),
            )?;
        }
        Ok(())
    }

    /// Starts a real agent process on the agent's host from a manual-provider create
    /// response; its state and its log (`agent.log`) go in `dir`. Killed on drop.
    pub fn start_agent(
        &self,
        create_response: &serde_json::Value,
        dir: &std::path::Path,
    ) -> Result<crate::Reaped> {
        let text = create_response["agent_config"]
            .as_str()
            .context("create response has no agent_config (is the provider manual?)")?;
        let mut bootstrap: protocol::bootstrap::AgentBootstrap = toml::from_str(text)?;
        bootstrap.state_dir = dir.join("state").display().to_string();
        let config = dir.join("agent.toml");
        std::fs::write(&config, toml::to_string(&bootstrap)?)?;
        let log = std::fs::File::create(dir.join("agent.log"))?;
        let child = self
            .command(Site::Agent, crate::binary("workspace-agent")?)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .env("HOME", dir)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        Ok(crate::Reaped(child))
    }

    /// `program` run in a site's host namespace.
    pub fn command(&self, site: Site, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(site)]).arg(program);
        cmd
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veths and their peers.
        for ns in self.created.drain(..) {
            let _ = run(&["ip", "netns", "del", &ns]);
        }
        if let Some(bridge) = self.bridge.take() {
            let _ = run(&["ip", "link", "del", &bridge]);
        }
    }
}
