//! Is there a Docker engine to talk to? Answered the way testcontainers will connect: the
//! `DOCKER_HOST` endpoint when it is set, otherwise the usual Unix sockets, each asked `GET /_ping`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long one `/_ping` may take before the endpoint counts as not answering.
const PING_TIMEOUT: Duration = Duration::from_secs(3);

/// Where a Docker engine listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `unix:///var/run/docker.sock` and friends.
    Unix(PathBuf),
    /// `tcp://host:port` (plain HTTP; TLS endpoints are not pinged, see [`Endpoint::parse`]).
    Tcp(String),
    /// An endpoint this module cannot ping (`ssh://`, `npipe://`, TLS): trusted as given.
    Unpingable(String),
}

impl Endpoint {
    /// Parses a `DOCKER_HOST` value.
    pub fn parse(docker_host: &str, tls_verify: bool) -> Result<Self, String> {
        if let Some(path) = docker_host.strip_prefix("unix://") {
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = docker_host.strip_prefix("tcp://") {
            let addr = addr.trim_end_matches('/');
            if addr.is_empty() {
                return Err(format!("DOCKER_HOST={docker_host:?} names no host"));
            }
            return Ok(if tls_verify {
                Self::Unpingable(docker_host.to_owned())
            } else {
                Self::Tcp(addr.to_owned())
            });
        }
        if docker_host.starts_with("ssh://") || docker_host.starts_with("npipe://") {
            return Ok(Self::Unpingable(docker_host.to_owned()));
        }
        Err(format!(
            "DOCKER_HOST={docker_host:?} is not a unix://, tcp://, ssh:// or npipe:// endpoint"
        ))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix://{}", path.display()),
            Self::Tcp(addr) => write!(f, "tcp://{addr}"),
            Self::Unpingable(raw) => f.write_str(raw),
        }
    }
}

/// Why no engine is available: every endpoint tried, with what each said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    /// `(endpoint, what went wrong)` in the order tried.
    pub tried: Vec<(String, String)>,
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("no Docker engine answers")?;
        for (endpoint, why) in &self.tried {
            write!(f, "; {endpoint}: {why}")?;
        }
        Ok(())
    }
}

/// Finds an engine that answers `/_ping` with `OK`.
pub fn detect() -> Result<Endpoint, Unavailable> {
    let docker_host = std::env::var("DOCKER_HOST").ok().filter(|v| !v.is_empty());
    let tls_verify = std::env::var("DOCKER_TLS_VERIFY").is_ok_and(|v| !v.is_empty() && v != "0");
    detect_among(&candidates(
        docker_host.as_deref(),
        tls_verify,
        std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from),
        std::env::var_os("HOME").map(PathBuf::from),
    ))
}

/// The endpoints to try, in order: `DOCKER_HOST` alone when set (as the Docker CLI and
/// testcontainers do), else the system socket, the rootless socket and Docker Desktop's.
pub fn candidates(
    docker_host: Option<&str>,
    tls_verify: bool,
    xdg_runtime_dir: Option<PathBuf>,
    home: Option<PathBuf>,
) -> Vec<Result<Endpoint, String>> {
    if let Some(host) = docker_host {
        return vec![Endpoint::parse(host, tls_verify)];
    }
    let mut out = vec![Ok(Endpoint::Unix(PathBuf::from("/var/run/docker.sock")))];
    if let Some(dir) = xdg_runtime_dir {
        out.push(Ok(Endpoint::Unix(dir.join("docker.sock"))));
    }
    if let Some(home) = home {
        out.push(Ok(Endpoint::Unix(home.join(".docker/run/docker.sock"))));
    }
    out
}

/// The first candidate that answers.
pub fn detect_among(candidates: &[Result<Endpoint, String>]) -> Result<Endpoint, Unavailable> {
    let mut tried = Vec::new();
    for candidate in candidates {
        match candidate {
            Err(why) => tried.push(("DOCKER_HOST".to_owned(), why.clone())),
            Ok(endpoint) => match ping(endpoint) {
                Ok(()) => return Ok(endpoint.clone()),
                Err(why) => tried.push((endpoint.to_string(), why)),
            },
        }
    }
    Err(Unavailable { tried })
}

/// `GET /_ping` on one endpoint; `Ok` when it answers 200 with body `OK`.
pub fn ping(endpoint: &Endpoint) -> Result<(), String> {
    let request = b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n";
    let response = match endpoint {
        Endpoint::Unpingable(_) => return Ok(()),
        Endpoint::Unix(path) => exchange_unix(path, request),
        Endpoint::Tcp(addr) => exchange_tcp(addr, request),
    }?;
    check_ping_response(&response)
}

fn exchange_unix(path: &Path, request: &[u8]) -> Result<Vec<u8>, String> {
    let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(PING_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(PING_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    exchange(&mut stream, request)
}

fn exchange_tcp(addr: &str, request: &[u8]) -> Result<Vec<u8>, String> {
    use std::net::ToSocketAddrs;
    let resolved = addr
        .to_socket_addrs()
        .map_err(|e| format!("resolving {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr} resolves to no address"))?;
    let mut stream =
        std::net::TcpStream::connect_timeout(&resolved, PING_TIMEOUT).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(PING_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(PING_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    exchange(&mut stream, request)
}

fn exchange(stream: &mut (impl Read + Write), request: &[u8]) -> Result<Vec<u8>, String> {
    stream.write_all(request).map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    // HTTP/1.0: the engine closes after the response. Cap what we keep: a ping answer is tiny.
    stream
        .take(64 * 1024)
        .read_to_end(&mut response)
        .map_err(|e| format!("reading the answer: {e}"))?;
    Ok(response)
}

/// Checks an HTTP answer to `/_ping`.
pub fn check_ping_response(response: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(response);
    let status_line = text.lines().next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(format!("not an HTTP answer: {:?}", truncate(&text)));
    };
    if !version.starts_with("HTTP/") {
        return Err(format!("not an HTTP answer: {:?}", truncate(&text)));
    }
    if code != "200" {
        return Err(format!("answered {status_line:?}"));
    }
    let body = text.split_once("\r\n\r\n").map(|(_, body)| body.trim());
    match body {
        Some("OK") => Ok(()),
        other => Err(format!(
            "answered 200 with body {:?}, not \"OK\"",
            other.unwrap_or_default()
        )),
    }
}

fn truncate(text: &str) -> &str {
    let end = text
        .char_indices()
        .nth(80)
        .map_or(text.len(), |(index, _)| index);
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A one-shot server on a Unix socket that reads the request and answers `answer`.
    fn serve_once(
        answer: &'static [u8],
    ) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<Vec<u8>>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docker.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let handle = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = vec![0u8; 1024];
            let n = conn.read(&mut request).unwrap();
            request.truncate(n);
            conn.write_all(answer).unwrap();
            request
        });
        (dir, path, handle)
    }

    #[test]
    fn an_engine_that_answers_ok_is_found() {
        let (_dir, path, server) =
            serve_once(b"HTTP/1.1 200 OK\r\nApi-Version: 1.47\r\nContent-Length: 2\r\n\r\nOK");
        let found = detect_among(&[Ok(Endpoint::Unix(path.clone()))]).unwrap();
        assert_eq!(found, Endpoint::Unix(path));
        let request = String::from_utf8(server.join().unwrap()).unwrap();
        assert!(request.starts_with("GET /_ping HTTP/1.0\r\n"), "{request}");
    }

    #[test]
    fn a_missing_socket_then_a_live_one() {
        let (_dir, path, _server) = serve_once(b"HTTP/1.0 200 OK\r\n\r\nOK");
        let missing = PathBuf::from("/nonexistent/docker.sock");
        let found = detect_among(&[
            Ok(Endpoint::Unix(missing)),
            Ok(Endpoint::Unix(path.clone())),
        ])
        .unwrap();
        assert_eq!(found, Endpoint::Unix(path));
    }

    #[test]
    fn nothing_listening_says_what_was_tried() {
        let err = detect_among(&[
            Ok(Endpoint::Unix("/nonexistent/docker.sock".into())),
            Err("DOCKER_HOST=\"http://x\" is not ...".into()),
        ])
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("no Docker engine answers; unix:///nonexistent/docker.sock: "),
            "{text}"
        );
        assert!(
            text.contains("DOCKER_HOST: DOCKER_HOST=\"http://x\""),
            "{text}"
        );
    }

    #[test]
    fn a_socket_that_is_not_docker_is_not_an_engine() {
        let (_dir, path, _server) = serve_once(b"SSH-2.0-OpenSSH_9.6\r\n");
        let err = detect_among(&[Ok(Endpoint::Unix(path))]).unwrap_err();
        assert!(err.to_string().contains("not an HTTP answer"), "{err}");
    }

    #[test]
    fn an_engine_answering_an_error_is_not_available() {
        let (_dir, path, _server) =
            serve_once(b"HTTP/1.1 500 Internal Server Error\r\n\r\n{\"message\":\"boom\"}");
        let err = detect_among(&[Ok(Endpoint::Unix(path))]).unwrap_err();
        assert!(
            err.to_string()
                .contains("answered \"HTTP/1.1 500 Internal Server Error\""),
            "{err}"
        );
    }

    #[test]
    fn tcp_endpoints_are_pinged_too() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 512];
            let _ = conn.read(&mut buf).unwrap();
            conn.write_all(b"HTTP/1.1 200 OK\r\n\r\nOK").unwrap();
        });
        let endpoint = Endpoint::parse(&format!("tcp://{addr}"), false).unwrap();
        assert_eq!(detect_among(&[Ok(endpoint.clone())]).unwrap(), endpoint);
    }

    #[test]
    fn docker_host_wins_over_the_default_sockets() {
        let only = candidates(Some("unix:///run/user/1000/docker.sock"), false, None, None);
        assert_eq!(
            only,
            vec![Ok(Endpoint::Unix("/run/user/1000/docker.sock".into()))]
        );
        let defaults = candidates(
            None,
            false,
            Some("/run/user/7".into()),
            Some("/home/u".into()),
        );
        assert_eq!(
            defaults,
            vec![
                Ok(Endpoint::Unix("/var/run/docker.sock".into())),
                Ok(Endpoint::Unix("/run/user/7/docker.sock".into())),
                Ok(Endpoint::Unix("/home/u/.docker/run/docker.sock".into())),
            ]
        );
    }

    #[test]
    fn docker_host_forms() {
        assert_eq!(
            Endpoint::parse("tcp://127.0.0.1:2375/", false),
            Ok(Endpoint::Tcp("127.0.0.1:2375".into()))
        );
        assert_eq!(
            Endpoint::parse("tcp://docker:2376", true),
            Ok(Endpoint::Unpingable("tcp://docker:2376".into()))
        );
        assert_eq!(
            Endpoint::parse("ssh://me@host", false),
            Ok(Endpoint::Unpingable("ssh://me@host".into()))
        );
        assert!(Endpoint::parse("tcp://", false).is_err());
        assert!(
            Endpoint::parse("/var/run/docker.sock", false)
                .unwrap_err()
                .contains("is not a unix://")
        );
    }
}
