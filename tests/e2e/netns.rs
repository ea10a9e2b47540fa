//! A network namespace joined to the host by a veth pair, for tests that need a real
//! firewall between two sites (nftables inside the namespace); removed on drop.

use std::process::Command;

pub struct Netns {
    pub name: String,
    host_if: String,
    /// The host's address on the veth, and the namespace's.
    pub host: String,
    pub inner: String,
}

pub fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    /// A namespace named `<prefix>-<tag>` with `10.<100+kind>.x.y/30` on its veth (the host
    /// side `.1`, inside `.2`): each kind of test has its own /16, each process (and
    /// `variant`) its own /30, so tests running at once never share a route.
    pub fn new(prefix: &str, kind: u8, variant: u32) -> Self {
        let t = (std::process::id() * 2 + variant) % 16_384;
        let (x, y) = (t / 64, (t % 64) * 4);
        let (host, inner) = (
            format!("10.{}.{x}.{}", 100 + u32::from(kind), y + 1),
            format!("10.{}.{x}.{}", 100 + u32::from(kind), y + 2),
        );
        let name = format!("{prefix}-{t}");
        let (host_if, ns_if) = (format!("{prefix}{t}h"), format!("{prefix}{t}n"));
        let ns = Self {
            name: name.clone(),
            host_if: host_if.clone(),
            host: host.clone(),
            inner: inner.clone(),
        };
        run(&["ip", "netns", "add", &name]);
        run(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        run(&["ip", "link", "set", &ns_if, "netns", &name]);
        run(&["ip", "addr", "add", &format!("{host}/30"), "dev", &host_if]);
        run(&["ip", "link", "set", &host_if, "up"]);
        ns.exec(&["ip", "addr", "add", &format!("{inner}/30"), "dev", &ns_if]);
        ns.exec(&["ip", "link", "set", &ns_if, "up"]);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs `args` inside the namespace; it must succeed.
    pub fn exec(&self, args: &[&str]) {
        let mut v = vec!["ip", "netns", "exec", self.name.as_str()];
        v.extend_from_slice(args);
        run(&v);
    }

    /// Loads an nftables ruleset inside the namespace.
    pub fn nft(&self, rules: &str) {
        let path = std::env::temp_dir().join(format!("{}.nft", self.name));
        std::fs::write(&path, rules).unwrap();
        self.exec(&["nft", "-f", path.to_str().unwrap()]);
    }

    /// The wrapper that starts a process inside the namespace.
    pub fn wrapper(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.name]
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
