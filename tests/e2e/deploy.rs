//! deploy/: the systemd units pass `systemd-analyze verify` and stay hardened.

use std::process::Command;

use crate::harness::*;

fn analyze(args: &[&str]) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("systemd-analyze ({e}): apt-get install -y systemd"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Every unit in deploy/systemd, with its `/usr/local/bin/meshfed` pointed at the binary
/// under test (verify checks that the executable exists): `systemd-analyze verify` is
/// clean, and `systemd-analyze security` rates its exposure 2.5 or lower ("OK").
#[test]
fn systemd_units_verify_and_are_hardened() {
    let scratch = Scratch::new("systemd");
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/systemd");
    let mut units = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "service") {
            units.push(path);
        }
    }
    units.sort();
    let names: Vec<_> = units
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "meshfed-dns.service",
            "meshfed-federation.service",
            "meshfed-gateway.service"
        ]
    );
    for unit in &units {
        let text = std::fs::read_to_string(unit).unwrap();
        assert!(
            text.contains("ExecStart=/usr/local/bin/meshfed "),
            "{}",
            unit.display()
        );
        for needed in [
            "DynamicUser=yes",
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
        ] {
            assert!(text.contains(needed), "{}: no {needed}", unit.display());
        }
        let copy = scratch.0.join(unit.file_name().unwrap());
        std::fs::write(&copy, text.replace("/usr/local/bin/meshfed", BIN)).unwrap();
        let copy = copy.to_str().unwrap();
        let (ok, out) = analyze(&["verify", copy]);
        assert!(ok && out.trim().is_empty(), "{copy}: {out}");
        let (ok, out) = analyze(&["security", "--offline=yes", "--threshold=25", copy]);
        assert!(ok, "{copy}: exposure above 2.5:\n{out}");
        let line = out.lines().last().unwrap_or_default();
        eprintln!("{}", line.trim());
    }
}
