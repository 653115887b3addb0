//! Listen addresses and listening sockets (TCP or unix, plain or TLS),
//! bound here or inherited from the service manager.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use tokio::io::{AsyncRead, AsyncWrite};

/// A listen address: `HOST:PORT`, `[V6]:PORT` or `unix:/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("`unix:` needs a path, e.g. unix:/run/wasmpool.sock".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(p)));
        }
        s.parse::<SocketAddr>().map(ListenAddr::Tcp).map_err(|_| {
            format!("invalid listen address `{s}`: expected HOST:PORT (e.g. 127.0.0.1:8080, [::1]:8080) or unix:/path")
        })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "http://{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A `--listen` value: an address, and whether it serves TLS: `https://`
/// says yes, `http://` says no, a bare address or `unix:` path leaves it
/// to the TLS settings (TCP listeners serve TLS when a certificate is
/// configured; unix sockets, usually behind a proxy, serve plain HTTP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSpec {
    pub addr: ListenAddr,
    pub tls: Option<bool>,
}

impl std::str::FromStr for ListenSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (rest, tls) = if let Some(r) = s.strip_prefix("https://") {
            (r, Some(true))
        } else if let Some(r) = s.strip_prefix("http://") {
            (r, Some(false))
        } else {
            (s, None)
        };
        let addr: ListenAddr = rest.trim_end_matches('/').parse()?;
        if tls.is_some() && matches!(addr, ListenAddr::Unix(_)) {
            return Err(format!(
                "invalid listen address `{s}`: a scheme goes with HOST:PORT, not unix:"
            ));
        }
        Ok(ListenSpec { addr, tls })
    }
}

impl From<ListenAddr> for ListenSpec {
    fn from(addr: ListenAddr) -> ListenSpec {
        ListenSpec { addr, tls: None }
    }
}

/// A bound listening socket, plain or TLS.
pub struct Listener {
    socket: Socket,
    tls: bool,
}

enum Socket {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Listener {
    pub fn tcp(l: tokio::net::TcpListener) -> Listener {
        Listener {
            socket: Socket::Tcp(l),
            tls: false,
        }
    }

    pub fn unix(l: tokio::net::UnixListener) -> Listener {
        Listener {
            socket: Socket::Unix(l),
            tls: false,
        }
    }

    /// Serves TLS (`true`) or plain HTTP on this socket.
    pub fn with_tls(mut self, tls: bool) -> Listener {
        self.tls = tls;
        self
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }

    pub fn is_unix(&self) -> bool {
        matches!(self.socket, Socket::Unix(_))
    }

    /// `http://ADDR`, `https://ADDR` or `unix:PATH` (`https+unix:` for TLS
    /// on a unix socket), for the log.
    pub fn describe(&self) -> String {
        match self.local_addr() {
            Ok(ListenAddr::Tcp(a)) if self.tls => format!("https://{a}"),
            Ok(ListenAddr::Unix(p)) if self.tls => format!("https+unix:{}", p.display()),
            Ok(a) => a.to_string(),
            Err(e) => format!("(unknown address: {e})"),
        }
    }

    /// Binds `addr`. A stale unix socket file at the path is replaced.
    pub async fn bind(addr: &ListenAddr) -> std::io::Result<Listener> {
        match addr {
            ListenAddr::Tcp(a) => {
                let sock = if a.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()?
                } else {
                    tokio::net::TcpSocket::new_v6()?
                };
                sock.set_reuseaddr(true)?;
                sock.bind(*a)?;
                Ok(Listener::tcp(sock.listen(1024)?))
            }
            ListenAddr::Unix(p) => {
                use std::os::unix::fs::FileTypeExt;
                if let Ok(m) = std::fs::symlink_metadata(p)
                    && m.file_type().is_socket()
                {
                    std::fs::remove_file(p)?;
                }
                Ok(Listener::unix(tokio::net::UnixListener::bind(p)?))
            }
        }
    }

    /// The address actually bound (with the real port when 0 was asked).
    pub fn local_addr(&self) -> std::io::Result<ListenAddr> {
        match &self.socket {
            Socket::Tcp(l) => l.local_addr().map(ListenAddr::Tcp),
            Socket::Unix(l) => {
                let a = l.local_addr()?;
                Ok(ListenAddr::Unix(
                    a.as_pathname().map(PathBuf::from).unwrap_or_default(),
                ))
            }
        }
    }

    /// Accepts one connection; TCP connections get `TCP_NODELAY` (small
    /// guest writes should not wait for Nagle).
    pub async fn accept(&self) -> std::io::Result<Accepted> {
        use std::os::fd::AsRawFd;
        Ok(match &self.socket {
            Socket::Tcp(l) => {
                let (s, addr) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Accepted {
                    fd: s.as_raw_fd(),
                    io: Box::new(s),
                    peer: Peer::Tcp(addr),
                    tls: self.tls,
                }
            }
            Socket::Unix(l) => {
                let s = l.accept().await?.0;
                Accepted {
                    fd: s.as_raw_fd(),
                    io: Box::new(s),
                    peer: Peer::Unix,
                    tls: self.tls,
                }
            }
        })
    }
}

/// An accepted connection.
pub struct Accepted {
    pub io: Box<dyn Io>,
    pub peer: Peer,
    /// The socket's descriptor, owned by `io` (valid while it lives).
    pub fd: std::os::fd::RawFd,
    /// It came in on a TLS listener.
    pub tls: bool,
}

/// Bytes written to the socket `fd` that its peer has not acknowledged
/// yet (`SIOCOUTQ`); 0 when that cannot be read.
pub fn unsent(fd: std::os::fd::RawFd) -> u64 {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one int; on a descriptor that is not a
    // socket it fails and `n` stays 0.
    let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    if r == 0 && n > 0 { n as u64 } else { 0 }
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Tcp(SocketAddr),
    /// A unix-socket client (typically a proxy speaking for many clients).
    Unix,
}

impl Peer {
    /// The key per-client limits count under: the IPv4 address, or the
    /// /64 prefix of an IPv6 address (one host usually holds a whole /64).
    /// `None` for unix-socket clients, which per-client limits exempt.
    pub fn client_key(&self) -> Option<IpAddr> {
        let Peer::Tcp(addr) = self else { return None };
        Some(match addr.ip().to_canonical() {
            IpAddr::V4(v4) => IpAddr::V4(v4),
            IpAddr::V6(v6) => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        })
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp(a) => write!(f, "{}", a.ip().to_canonical()),
            Peer::Unix => f.write_str("unix"),
        }
    }
}

/// A connection's byte stream.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_keys() {
        let p = Peer::Tcp("127.0.0.2:5000".parse().unwrap());
        assert_eq!(p.client_key(), Some("127.0.0.2".parse().unwrap()));
        let p = Peer::Tcp("[::ffff:10.0.0.1]:5000".parse().unwrap());
        assert_eq!(p.client_key(), Some("10.0.0.1".parse().unwrap()));
        let a = Peer::Tcp("[2001:db8:1:2:3:4:5:6]:1".parse().unwrap());
        let b = Peer::Tcp("[2001:db8:1:2:ffff::1]:2".parse().unwrap());
        assert_eq!(a.client_key(), b.client_key());
        assert_eq!(Peer::Unix.client_key(), None);
    }

    #[test]
    fn listen_specs() {
        let s: ListenSpec = "https://0.0.0.0:8443".parse().unwrap();
        assert_eq!(
            (s.addr, s.tls),
            (ListenAddr::Tcp("0.0.0.0:8443".parse().unwrap()), Some(true))
        );
        let s: ListenSpec = "http://[::1]:80/".parse().unwrap();
        assert_eq!(s.tls, Some(false));
        let s: ListenSpec = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(s.tls, None);
        assert!("https://unix:/x".parse::<ListenSpec>().is_err());
        assert!("https://localhost".parse::<ListenSpec>().is_err());
    }
}
