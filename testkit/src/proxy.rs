//! A TCP proxy that can silently blackhole its connections (the network cut of a holder) and
//! delay what it forwards (a slow link, such as a lagging replication connection).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Forwards every connection accepted on `127.0.0.1:<port>` to a target, until [`cut`]: then
/// it stops reading and writing in both directions while keeping both sockets open, so neither
/// end sees a FIN or an RST; the kernel still acknowledges what arrives, exactly as a peer
/// whose replies are lost in the network. New connections accepted during a cut are not
/// forwarded either. [`heal`] resumes forwarding, including bytes held during the cut. Dropping
/// the proxy closes everything. A proxy started with [`start_delayed`] holds every chunk it
/// reads for a fixed delay before writing it on, in order, in both directions (a link with that
/// latency; throughput is not limited).
///
/// [`start_delayed`]: BlackholeProxy::start_delayed
///
/// [`cut`]: BlackholeProxy::cut
/// [`heal`]: BlackholeProxy::heal
pub struct BlackholeProxy {
    addr: SocketAddr,
    target: SocketAddr,
    cut: watch::Sender<bool>,
    shutdown: CancellationToken,
    accepted: Arc<AtomicUsize>,
}

impl BlackholeProxy {
    /// Listens on `127.0.0.1:0` and forwards to `target`. Must run inside a tokio runtime.
    pub async fn start(target: SocketAddr) -> std::io::Result<BlackholeProxy> {
        Self::start_delayed(target, Duration::ZERO).await
    }

    /// As [`start`](Self::start), holding everything it forwards for `delay`, each direction.
    pub async fn start_delayed(target: SocketAddr, delay: Duration) -> std::io::Result<BlackholeProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let cut = watch::Sender::new(false);
        let shutdown = CancellationToken::new();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (cut_rx, stop, count) = (cut.subscribe(), shutdown.clone(), accepted.clone());
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    _ = stop.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => client,
                        // Transient accept errors (e.g. EMFILE) must not end the proxy.
                        Err(_) => continue,
                    },
                };
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(forward(client, target, cut_rx.clone(), stop.clone(), delay));
            }
        });
        Ok(BlackholeProxy {
            addr,
            target,
            cut,
            shutdown,
            accepted,
        })
    }

    /// Starts a proxy to the host and port of a `postgres://` URL.
    pub async fn for_url(url: &str) -> std::io::Result<BlackholeProxy> {
        Self::start(url_target(url)?).await
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address it forwards to.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// `url` with its host and port replaced by the proxy's.
    pub fn url(&self, url: &str) -> String {
        rewrite_url_host(url, self.addr)
    }

    /// Silently stops forwarding, both directions, every connection.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Resumes forwarding.
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }

    /// Whether the proxy is cut.
    pub fn is_cut(&self) -> bool {
        *self.cut.borrow()
    }

    /// How many connections it accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for BlackholeProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Waits until the proxy is not cut; `false` when it shuts down meanwhile.
async fn wait_healed(cut: &mut watch::Receiver<bool>, shutdown: &CancellationToken) -> bool {
    loop {
        if !*cut.borrow_and_update() {
            return true;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            changed = cut.changed() => if changed.is_err() { return false },
        }
    }
}

async fn forward(
    client: TcpStream,
    target: SocketAddr,
    mut cut: watch::Receiver<bool>,
    shutdown: CancellationToken,
    delay: Duration,
) {
    // A cut network lets no new connection through either: connect only once healed.
    if !wait_healed(&mut cut, &shutdown).await {
        return;
    }
    let server = tokio::select! {
        _ = shutdown.cancelled() => return,
        server = TcpStream::connect(target) => match server {
            Ok(server) => server,
            Err(_) => return,
        },
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // Both directions live in this task, so both sockets stay open until both ends are done.
    if delay.is_zero() {
        tokio::join!(
            pump(client_read, server_write, cut.clone(), shutdown.clone()),
            pump(server_read, client_write, cut, shutdown),
        );
    } else {
        tokio::join!(
            pump_delayed(client_read, server_write, cut.clone(), shutdown.clone(), delay),
            pump_delayed(server_read, client_write, cut, shutdown, delay),
        );
    }
}

/// Chunks in flight on a delayed link, per direction (the reader waits when it is full).
const DELAY_LINE: usize = 4096;

/// As [`pump`], each chunk written `delay` after it was read: a reader and a writer joined by a
/// queue of `(due, bytes)`, so that the delay adds latency, not a limit on throughput.
async fn pump_delayed(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    cut: watch::Receiver<bool>,
    shutdown: CancellationToken,
    delay: Duration,
) {
    let (line, mut arriving) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(DELAY_LINE);
    let (mut read_cut, read_stop) = (cut.clone(), shutdown.clone());
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            if !wait_healed(&mut read_cut, &read_stop).await {
                return;
            }
            let n = tokio::select! {
                _ = read_stop.cancelled() => return,
                changed = read_cut.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
                read = from.read(&mut buf) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                },
            };
            let due = tokio::time::Instant::now() + delay;
            if line.send((due, buf[..n].to_vec())).await.is_err() {
                return;
            }
        }
        // Dropping `line` here ends the writer once it has written what is queued.
    };
    let (mut write_cut, write_stop) = (cut, shutdown);
    let writer = async move {
        while let Some((due, bytes)) = arriving.recv().await {
            tokio::select! {
                _ = write_stop.cancelled() => return,
                _ = tokio::time::sleep_until(due) => {}
            }
            if !wait_healed(&mut write_cut, &write_stop).await {
                return;
            }
            tokio::select! {
                _ = write_stop.cancelled() => return,
                written = to.write_all(&bytes) => if written.is_err() { return },
            }
        }
        // The reader saw the end: pass it on (FIN), after the data, as the network would.
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut cut: watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if !wait_healed(&mut cut, &shutdown).await {
            return;
        }
        let n = tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = cut.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    // Pass the end on (FIN), as the network would.
                    let _ = to.shutdown().await;
                    return;
                }
                Ok(n) => n,
            },
        };
        // Bytes read just before a cut are held until the heal, like packets queued in a router.
        if !wait_healed(&mut cut, &shutdown).await {
            return;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            written = to.write_all(&buf[..n]) => if written.is_err() { return },
        }
    }
}

/// The host and port of a `postgres://user@host:port/db` URL (port 5432 by default).
pub fn url_target(url: &str) -> std::io::Result<SocketAddr> {
    let (host, port) = url_host_port(url);
    let port: u16 = port
        .unwrap_or("5432")
        .parse()
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("bad port in {url}")))?;
    use std::net::ToSocketAddrs;
    (host, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("cannot resolve {host}")))
}

/// Splits the authority of a URL into host and optional port.
fn url_host_port(url: &str) -> (&str, Option<&str>) {
    let authority = authority_range(url);
    let authority = &url[authority.0..authority.1];
    if let Some(rest) = authority.strip_prefix('[') {
        // IPv6 literal: [addr] or [addr]:port
        let (host, after) = rest.split_once(']').unwrap_or((rest, ""));
        return (host, after.strip_prefix(':'));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    }
}

/// Byte range of `host[:port]` in a URL.
fn authority_range(url: &str) -> (usize, usize) {
    let start = url.find("://").map(|i| i + 3).unwrap_or(0);
    let end = url[start..].find(['/', '?']).map(|i| start + i).unwrap_or(url.len());
    let host_start = url[start..end].rfind('@').map(|i| start + i + 1).unwrap_or(start);
    (host_start, end)
}

/// `url` with its host and port replaced by `addr`.
pub fn rewrite_url_host(url: &str, addr: SocketAddr) -> String {
    let (start, end) = authority_range(url);
    format!("{}{}{}", &url[..start], addr, &url[end..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn url_rewriting() {
        let addr: SocketAddr = "127.0.0.1:9999".parse().expect("addr");
        assert_eq!(
            rewrite_url_host("postgres://postgres@127.0.0.1:5432/test", addr),
            "postgres://postgres@127.0.0.1:9999/test"
        );
        assert_eq!(
            rewrite_url_host("postgres://u:p@localhost/db?x=1", addr),
            "postgres://u:p@127.0.0.1:9999/db?x=1"
        );
        assert_eq!(url_host_port("postgres://a@h:1/d"), ("h", Some("1")));
        assert_eq!(url_host_port("postgres://h/d"), ("h", None));
    }

    /// An echo server that counts connections and notes when a peer closed.
    async fn echo_server() -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (accepted, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (a, c) = (accepted.clone(), closed.clone());
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let c = c.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    loop {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if socket.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        (addr, accepted, closed)
    }

    async fn read_exact_within(socket: &mut TcpStream, n: usize, timeout: Duration) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; n];
        match tokio::time::timeout(timeout, socket.read_exact(&mut buf)).await {
            Ok(Ok(_)) => Some(buf),
            Ok(Err(e)) => panic!("read failed: {e}"),
            Err(_) => None,
        }
    }

    #[tokio::test]
    async fn a_delayed_proxy_forwards_in_order_no_earlier_than_its_delay_each_way() {
        let (target, _, _) = echo_server().await;
        let delay = Duration::from_millis(100);
        let proxy = BlackholeProxy::start_delayed(target, delay).await.expect("proxy");
        let mut client = TcpStream::connect(proxy.addr()).await.expect("connect");
        let sent = tokio::time::Instant::now();
        for chunk in [&b"one "[..], b"two ", b"three"] {
            client.write_all(chunk).await.expect("write");
        }
        let reply = read_exact_within(&mut client, 13, Duration::from_secs(10)).await;
        assert_eq!(reply.as_deref(), Some(&b"one two three"[..]), "in order, nothing lost");
        // A lower bound only: the echo crossed the proxy twice.
        assert!(sent.elapsed() >= 2 * delay, "held for the delay each way");
        drop(client);
    }

    #[tokio::test]
    async fn forwards_blackholes_and_heals() {
        let (target, accepted, closed) = echo_server().await;
        let proxy = BlackholeProxy::start(target).await.expect("proxy");
        let mut client = TcpStream::connect(proxy.addr()).await.expect("connect");

        client.write_all(b"ping").await.expect("write");
        let reply = read_exact_within(&mut client, 4, Duration::from_secs(5)).await;
        assert_eq!(reply.as_deref(), Some(&b"ping"[..]), "bytes flow through the proxy");

        proxy.cut();
        assert!(proxy.is_cut());
        client.write_all(b"pong").await.expect("a cut accepts writes silently");
        let reply = read_exact_within(&mut client, 4, Duration::from_millis(300)).await;
        assert!(reply.is_none(), "no reply crosses a cut");
        // Still open on both ends: no EOF (Ok(0)) nor error for the client, nothing closed
        // at the server.
        let mut probe = [0u8; 8];
        match client.try_read(&mut probe) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("client socket should be open and idle, got {other:?}"),
        }
        assert_eq!(closed.load(Ordering::SeqCst), 0, "the server side saw no close");

        // A new connection during the cut reaches nothing.
        let mut late = TcpStream::connect(proxy.addr()).await.expect("connect during cut");
        late.write_all(b"late").await.expect("write");
        assert!(read_exact_within(&mut late, 4, Duration::from_millis(200))
            .await
            .is_none());
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "no connection to the target during a cut"
        );

        proxy.heal();
        let reply = read_exact_within(&mut client, 4, Duration::from_secs(5)).await;
        assert_eq!(reply.as_deref(), Some(&b"pong"[..]), "held bytes flow after the heal");
        let reply = read_exact_within(&mut late, 4, Duration::from_secs(5)).await;
        assert_eq!(
            reply.as_deref(),
            Some(&b"late"[..]),
            "the late connection flows after the heal"
        );

        drop(proxy);
        let mut buf = [0u8; 4];
        let eof = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf)).await;
        assert!(
            matches!(eof, Ok(Ok(0)) | Ok(Err(_))),
            "dropping the proxy closes its connections, got {eof:?}"
        );
    }
}
