//! The two ends of every measured path: a server (sink and echo) and a load generator.
//! Both run as this same binary, inside the network namespaces the orchestrator made.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// First byte a client sends: what the server should do with the connection.
const MODE_SINK: u8 = b'S';
const MODE_ECHO: u8 = b'E';
const BULK_BUF: usize = 256 * 1024;
pub const RR_SIZE: usize = 1024;

/// Sink: read and discard until EOF, then answer with the byte count (u64 BE).
/// Echo: copy back until EOF.
pub async fn serve(addr: SocketAddr) -> Result<()> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    let l: TcpListener = sock.listen(4096)?;
    eprintln!("bench server on {addr}");
    loop {
        let (mut s, _) = l.accept().await?;
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let mut mode = [0u8; 1];
            if s.read_exact(&mut mode).await.is_err() {
                return;
            }
            match mode[0] {
                MODE_SINK => {
                    let mut buf = vec![0u8; BULK_BUF];
                    let mut n = 0u64;
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) => break,
                            Ok(k) => n += k as u64,
                            Err(_) => return,
                        }
                    }
                    let _ = s.write_all(&n.to_be_bytes()).await;
                    let _ = s.shutdown().await;
                }
                _ => {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                }
            }
        });
    }
}

/// Bulk: `streams` connections send for `secs`; goodput counted by the server.
pub async fn throughput(addr: SocketAddr, streams: usize, secs: f64) -> Result<serde_json::Value> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..streams)
        .map(|_| {
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                s.write_all(&[MODE_SINK]).await?;
                let buf = vec![0x5au8; BULK_BUF];
                while Instant::now() < deadline {
                    s.write_all(&buf).await?;
                }
                s.shutdown().await?;
                let mut n = [0u8; 8];
                s.read_exact(&mut n).await?;
                Ok::<_, std::io::Error>((u64::from_be_bytes(n), Instant::now()))
            })
        })
        .collect();
    let mut bytes = 0u64;
    let mut end = start;
    for t in tasks {
        let (n, at) = t.await?.context("bulk stream")?;
        bytes += n;
        end = end.max(at);
    }
    let secs = (end - start).as_secs_f64();
    Ok(json!({ "gbps": bytes as f64 * 8.0 / secs / 1e9, "bytes": bytes, "secs": secs }))
}

/// New connections per second: connect, one 64-byte round trip, close.
pub async fn connrate(addr: SocketAddr, workers: usize, secs: f64) -> Result<serde_json::Value> {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (ok, failed) = (ok.clone(), failed.clone());
            tokio::spawn(async move {
                let mut msg = [0x61u8; 64];
                msg[0] = MODE_ECHO;
                while Instant::now() < deadline {
                    let r = async {
                        let mut s = TcpStream::connect(addr).await?;
                        s.set_nodelay(true)?;
                        s.write_all(&msg).await?;
                        let mut back = [0u8; 63];
                        s.read_exact(&mut back).await?;
                        Ok::<_, std::io::Error>(())
                    };
                    match tokio::time::timeout(Duration::from_secs(5), r).await {
                        Ok(Ok(())) => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for t in tasks {
        t.await?;
    }
    let secs = start.elapsed().as_secs_f64();
    let ok = ok.load(Ordering::Relaxed);
    Ok(json!({ "per_sec": ok as f64 / secs, "ok": ok, "failed": failed.load(Ordering::Relaxed) }))
}

async fn rr_conn(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(&[MODE_ECHO]).await?;
    Ok(s)
}

async fn rr_once(s: &mut TcpStream, req: &[u8], resp: &mut [u8]) -> std::io::Result<()> {
    s.write_all(req).await?;
    s.read_exact(resp).await.map(|_| ())
}

/// Closed-loop 1 KiB request/response capacity over `conns` connections.
pub async fn capacity(addr: SocketAddr, conns: usize, secs: f64) -> Result<serde_json::Value> {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let done = done.clone();
            tokio::spawn(async move {
                let mut s = rr_conn(addr).await?;
                let req = vec![0x42u8; RR_SIZE];
                let mut resp = vec![0u8; RR_SIZE];
                while Instant::now() < deadline {
                    rr_once(&mut s, &req, &mut resp).await?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<_, std::io::Error>(())
            })
        })
        .collect();
    for t in tasks {
        t.await?.context("rr connection")?;
    }
    let n = done.load(Ordering::Relaxed);
    Ok(json!({ "rps": n as f64 / start.elapsed().as_secs_f64() }))
}

/// Open-loop 1 KiB request/response at `rate` per second. Latency runs from the
/// scheduled send time, so a stalled path is charged for the requests queued behind it
/// (no coordinated omission).
///
/// Requests leave at their own scheduled times, paced by a dedicated thread that sleeps
/// on a high-resolution timer (`nanosleep`, default 50 µs timer slack). tokio's timer has
/// a 1 ms resolution: pacing with `sleep_until` would send each millisecond's requests
/// as one burst and charge every path up to a millisecond of timer lag. How late the
/// pacer itself was is reported (`pace_late_p50_us`, `pace_late_p99_us`).
pub async fn latency(
    addr: SocketAddr,
    rate: f64,
    secs: f64,
    conns: usize,
) -> Result<serde_json::Value> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<TcpStream>(conns);
    for _ in 0..conns {
        tx.send(rr_conn(addr).await?).await?;
    }
    // Warm every connection once.
    let mut warm = Vec::new();
    for _ in 0..conns {
        let mut s = rx.recv().await.context("pool")?;
        rr_once(&mut s, &[0u8; RR_SIZE], &mut [0u8; RR_SIZE]).await?;
        warm.push(s);
    }
    for s in warm {
        tx.send(s).await?;
    }
    let total = (rate * secs) as usize;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let (lat_tx, mut lat_rx) = tokio::sync::mpsc::unbounded_channel::<Result<u64, String>>();
    let runtime = tokio::runtime::Handle::current();
    let pacer = std::thread::spawn(move || -> Result<Vec<u64>> {
        let start = Instant::now();
        let mut late = Vec::with_capacity(total);
        for i in 0..total {
            let scheduled = start + interval.mul_f64(i as f64);
            let now = Instant::now();
            if scheduled > now {
                std::thread::sleep(scheduled - now);
            }
            late.push(scheduled.elapsed().as_micros() as u64);
            let mut s = rx.blocking_recv().context("pool")?;
            let (tx, lat_tx) = (tx.clone(), lat_tx.clone());
            runtime.spawn(async move {
                let mut resp = [0u8; RR_SIZE];
                let r = rr_once(&mut s, &[0x42u8; RR_SIZE], &mut resp).await;
                let us = scheduled.elapsed().as_micros() as u64;
                let _ = lat_tx.send(r.map(|_| us).map_err(|e| e.to_string()));
                if tx.send(s).await.is_err() {
                    // pool closed: the run is over
                }
            });
        }
        Ok(late)
    });
    let mut lats = Vec::with_capacity(total);
    let mut errors = 0u64;
    while lats.len() + (errors as usize) < total {
        match lat_rx.recv().await {
            Some(Ok(us)) => lats.push(us),
            Some(Err(_)) => errors += 1,
            None => break,
        }
    }
    let mut late = tokio::task::spawn_blocking(move || pacer.join())
        .await?
        .map_err(|_| anyhow::anyhow!("pacer thread panicked"))??;
    lats.sort_unstable();
    late.sort_unstable();
    let pct = |v: &[u64], p: f64| {
        v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    Ok(json!({
        "p50_us": pct(&lats, 0.50),
        "p99_us": pct(&lats, 0.99),
        "n": lats.len(),
        "errors": errors,
        "rate": rate,
        "pace_late_p50_us": pct(&late, 0.50),
        "pace_late_p99_us": pct(&late, 0.99),
    }))
}

/// Reads a gateway's `/metrics` and returns its `meshfed_gateway_quic_*` samples, summed
/// over labels, as `{name: value}`.
pub async fn scrape_quic(admin: SocketAddr) -> Result<serde_json::Value> {
    let (status, body) = meshfed_lifecycle::admin::get(admin, "/metrics")
        .await
        .map_err(anyhow::Error::msg)?;
    anyhow::ensure!(status.is_success(), "GET /metrics on {admin}: {status}");
    let mut out = serde_json::Map::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("meshfed_gateway_quic_") else {
            continue;
        };
        let name = rest.split(['{', ' ']).next().unwrap_or_default();
        let value: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("metrics line {line:?}"))?;
        let sum = out
            .get(name)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0)
            + value;
        out.insert(name.to_string(), json!(sum));
    }
    Ok(serde_json::Value::Object(out))
}
