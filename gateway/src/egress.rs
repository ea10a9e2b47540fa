//! Egress: one local TCP listener per imported service port. Each accepted client gets a
//! stream on the peer connection, an open request, and — only after the far side accepts
//! — a splice. A refusal closes the client socket with a reset, a log line and a metric
//! carrying the reason.

use std::time::Duration;

use meshfed_identity::SpiffeId;
use quinn::{Connection, RecvStream, SendStream};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};

use crate::config::Import;
use crate::metrics::Metrics;
use crate::peers::PeerHandle;
use crate::splice::{reset_tcp, splice};
use crate::tunnel::{HeaderReadError, read_header};
use crate::wire::{self, Open, Refusal, Response};

const DIR: &str = "egress";
/// How long a client waits for the peer connection to come (back) up.
const PEER_WAIT: Duration = Duration::from_secs(3);

pub struct Egress {
    pub import: Import,
    pub peer: PeerHandle,
    pub local_id: SpiffeId,
    pub metrics: Metrics,
    /// How long the far side may take to answer an open request: its endpoint connect
    /// timeout plus a margin. Past it the peer connection is presumed dead.
    pub open_timeout: Duration,
}

impl Egress {
    pub async fn serve(self, listener: TcpListener, stop: CancellationToken, tasks: TaskTracker) {
        let this = std::sync::Arc::new(self);
        loop {
            let (tcp, client) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.cancelled() => return,
            };
            let this = this.clone();
            tasks.spawn(
                async move { this.serve_client(tcp).await }
                    .instrument(info_span!("egress", %client)),
            );
        }
    }

    async fn serve_client(&self, tcp: TcpStream) {
        let open = Open {
            service: self.import.service.clone(),
            port: self.import.port,
            source: self.local_id.clone(),
        };
        match self.open_stream(&open).await {
            Ok((send, recv)) => {
                let _active = self.metrics.stream_started(DIR);
                let end = splice(tcp, send, recv, &self.metrics.counters(DIR)).await;
                debug!(?end, "connection done");
            }
            Err((reason, message)) => {
                warn!(
                    service = %open.service, port = open.port, peer = %self.peer.site,
                    reason = reason.as_str(), %message, "connection refused"
                );
                self.metrics.refused(DIR, reason.as_str());
                reset_tcp(tcp);
            }
        }
    }

    /// Opens a stream and waits for accept. A dead connection (open failed or no answer in
    /// time) is reported to the dialer and the open is tried once more on a fresh one.
    async fn open_stream(
        &self,
        open: &Open,
    ) -> Result<(SendStream, RecvStream), (Refusal, String)> {
        let frame = open.encode();
        let mut last = (Refusal::PeerUnavailable, String::new());
        for _attempt in 0..2 {
            let Some(conn) = self.peer.connection(PEER_WAIT).await else {
                return Err((
                    Refusal::PeerUnavailable,
                    format!(
                        "no connection to peer {} within {PEER_WAIT:?}",
                        self.peer.site
                    ),
                ));
            };
            match self.try_open(&conn, &frame).await {
                Ok(r) => return r,
                Err(why) => {
                    self.peer.report_dead(&conn);
                    last = (Refusal::PeerUnavailable, why);
                }
            }
        }
        Err(last)
    }

    /// `Err` means the connection is unusable; `Ok(Err)` is a refusal from the far side.
    #[allow(clippy::type_complexity)]
    async fn try_open(
        &self,
        conn: &Connection,
        frame: &[u8],
    ) -> Result<Result<(SendStream, RecvStream), (Refusal, String)>, String> {
        let lost = |e: &dyn std::fmt::Display| match conn.close_reason() {
            Some(why) => format!("{e}: {why}"),
            None => e.to_string(),
        };
        let work = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
            send.write_all(frame).await.map_err(|e| lost(&e))?;
            let payload = match read_header(&mut recv).await {
                Ok(p) => p,
                Err(HeaderReadError::Wire(e)) => {
                    return Ok(Err((
                        Refusal::MalformedHeader,
                        format!("bad response from peer: {e}"),
                    )));
                }
                Err(HeaderReadError::Io(e)) => return Err(lost(&e)),
            };
            Ok(match wire::decode_response(&payload) {
                Ok(Response::Accept) => Ok((send, recv)),
                Ok(Response::Refuse { reason, message }) => Err((reason, message)),
                Err(e) => Err((
                    Refusal::MalformedHeader,
                    format!("bad response from peer: {e}"),
                )),
            })
        };
        tokio::time::timeout(self.open_timeout, work)
            .await
            .map_err(|_| {
                format!(
                    "peer did not answer the open request within {:?}",
                    self.open_timeout
                )
            })?
    }
}
