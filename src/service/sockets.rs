//! Sockets handed over by systemd (or `systemd-socket-activate`): the
//! `LISTEN_FDS` protocol. Read once, before any thread starts, because it
//! unsets the variables.

use crate::http::{ListenAddr, Listener};
use socket2::{Domain, Socket, Type};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// A listening socket received from the service manager.
pub struct Inherited {
    /// Its name from `LISTEN_FDNAMES` (`FileDescriptorName=`), or `unknown`.
    pub name: String,
    socket: Socket,
}

/// Why an inherited descriptor cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum InheritError {
    #[error("cannot read LISTEN_FDS: {0}")]
    Env(std::io::Error),
    #[error("inherited fd {fd} ({name}) is not a socket")]
    NotSocket { fd: RawFd, name: String },
    #[error("inherited fd {fd} ({name}) is a {kind} socket; only stream sockets can serve HTTP")]
    NotStream {
        fd: RawFd,
        name: String,
        kind: String,
    },
    #[error("inherited fd {fd} ({name}) is not listening")]
    NotListening { fd: RawFd, name: String },
    #[error(
        "inherited fd {fd} ({name}) has unsupported address family {family}; expected IPv4, IPv6 or unix"
    )]
    Family {
        fd: RawFd,
        name: String,
        family: i32,
    },
    #[error("inherited fd {fd} ({name}): {source}")]
    Io {
        fd: RawFd,
        name: String,
        source: std::io::Error,
    },
}

/// Takes the sockets passed with `LISTEN_FDS` when `LISTEN_PID` names this
/// process, and unsets `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` in
/// any case. A wrong `LISTEN_PID` means the variables were meant for
/// another process: nothing is taken.
///
/// # Safety
/// Changes the environment: call it before any other thread exists.
pub unsafe fn take() -> Result<Vec<Inherited>, InheritError> {
    let for_us =
        std::env::var("LISTEN_PID").is_ok_and(|p| p.trim() == std::process::id().to_string());
    if !for_us {
        // Meant for another process (or absent): ignore, but do not pass on.
        for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            // SAFETY: our caller guarantees there are no other threads yet.
            unsafe { std::env::remove_var(var) };
        }
        return Ok(Vec::new());
    }
    // SAFETY: our caller guarantees there are no other threads yet.
    let fds =
        unsafe { sd_notify::listen_fds_with_names_and_unset_env() }.map_err(InheritError::Env)?;
    let mut out = Vec::new();
    for (fd, name) in fds {
        let name = if name.is_empty() {
            "unknown".to_string()
        } else {
            name
        };
        out.push(check(fd, name)?);
    }
    Ok(out)
}

fn check(fd: RawFd, name: String) -> Result<Inherited, InheritError> {
    use std::os::unix::fs::FileTypeExt;
    // fstat through a borrowed descriptor: is it a socket at all?
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let owned = borrowed
        .try_clone_to_owned()
        .map_err(|source| InheritError::Io {
            fd,
            name: name.clone(),
            source,
        })?;
    let meta = std::fs::File::from(owned)
        .metadata()
        .map_err(|source| InheritError::Io {
            fd,
            name: name.clone(),
            source,
        })?;
    if !meta.file_type().is_socket() {
        return Err(InheritError::NotSocket { fd, name });
    }
    // SAFETY: the service manager passed us ownership of fds 3.. (sd_listen_fds).
    let socket = Socket::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let io = |source| InheritError::Io {
        fd,
        name: name.clone(),
        source,
    };
    let ty = socket.r#type().map_err(io)?;
    if ty != Type::STREAM {
        let kind = if ty == Type::DGRAM {
            "datagram"
        } else if ty == Type::SEQPACKET {
            "seqpacket"
        } else {
            "non-stream"
        };
        return Err(InheritError::NotStream {
            fd,
            name,
            kind: kind.into(),
        });
    }
    if !socket.is_listener().map_err(io)? {
        return Err(InheritError::NotListening { fd, name });
    }
    let domain = socket.domain().map_err(io)?;
    if domain != Domain::IPV4 && domain != Domain::IPV6 && domain != Domain::UNIX {
        return Err(InheritError::Family {
            fd,
            name,
            family: i32::from(domain),
        });
    }
    socket.set_nonblocking(true).map_err(io)?;
    socket.set_cloexec(true).map_err(io)?;
    Ok(Inherited { name, socket })
}

impl Inherited {
    /// Registers the socket with the async runtime (needs one running).
    pub fn into_listener(self) -> std::io::Result<Listener> {
        if self.socket.domain()? == Domain::UNIX {
            let std: std::os::unix::net::UnixListener = self.socket.into();
            Ok(Listener::unix(tokio::net::UnixListener::from_std(std)?))
        } else {
            let std: std::net::TcpListener = self.socket.into();
            Ok(Listener::tcp(tokio::net::TcpListener::from_std(std)?))
        }
    }

    /// Whether it is a unix-domain socket.
    pub fn is_unix(&self) -> bool {
        self.socket.domain().is_ok_and(|d| d == Domain::UNIX)
    }

    /// Where it listens, for the log.
    pub fn describe(&self) -> String {
        match self.socket.local_addr() {
            Ok(a) => match (a.as_socket(), a.as_pathname()) {
                (Some(sa), _) => ListenAddr::Tcp(sa).to_string(),
                (None, Some(p)) => ListenAddr::Unix(p.to_path_buf()).to_string(),
                (None, None) => "unix:(unnamed)".into(),
            },
            Err(e) => format!("(unknown address: {e})"),
        }
    }
}
