//! Large bodies stream through the sidecar without being buffered
//! (issue 2, point 4): 200 MB up and 200 MB down while the sidecar's
//! resident memory stays under 64 MB.

use std::convert::Infallible;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use meshlet_e2e::{SidecarProcess, Upstream};
use tokio::net::TcpStream;

const TOTAL: u64 = 200 * 1024 * 1024;
const RSS_LIMIT: u64 = 64 * 1024 * 1024;

async fn connect(
    sidecar: &SidecarProcess,
) -> hyper::client::conn::http1::SendRequest<StreamBody<ChunkStream>> {
    let stream = TcpStream::connect(sidecar.inbound).await.unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

type ChunkStream = futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>;

/// `TOTAL` bytes as 64 KiB frames that all share one buffer (the test
/// process doesn't hold 200 MB either).
fn upload_body(total: u64) -> StreamBody<ChunkStream> {
    let chunk = Bytes::from(vec![b'u'; 64 * 1024]);
    let frames: Vec<_> = (0..total / chunk.len() as u64)
        .map(|_| Ok(Frame::data(chunk.clone())))
        .collect();
    StreamBody::new(futures_util::stream::iter(frames))
}

#[tokio::test]
async fn two_hundred_megabytes_stream_up_and_down_in_bounded_memory() {
    let app = Upstream::start("files").await;
    let sidecar = SidecarProcess::builder("files", app.port()).start().await;
    let baseline = sidecar.rss_bytes();

    // Upload: the app counts what it receives.
    let mut sender = connect(&sidecar).await;
    let request = Request::post("/upload")
        .header("host", "files")
        .header("content-length", TOTAL.to_string())
        .body(upload_body(TOTAL))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let received = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&received), TOTAL.to_string());

    // Download: read frame by frame, never holding the whole body.
    let request = Request::get(format!("/download?bytes={TOTAL}"))
        .header("host", "files")
        .body(upload_body(0))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut downloaded = 0u64;
    while let Some(frame) = body.frame().await {
        downloaded += frame.unwrap().data_ref().map_or(0, |d| d.len() as u64);
    }
    assert_eq!(downloaded, TOTAL);

    // VmHWM is the peak resident set over the process's whole life.
    let peak = sidecar.peak_rss_bytes();
    eprintln!(
        "sidecar RSS: baseline {} KiB, peak {} KiB",
        baseline / 1024,
        peak / 1024
    );
    assert!(
        peak < RSS_LIMIT,
        "sidecar peak RSS {} MiB >= 64 MiB",
        peak >> 20
    );
}

/// A client that stops taking response bytes (`write_stall` in the
/// sidecar): large enough that the path's buffers (sockets on both sides,
/// hyper's) cannot hold it, so the sidecar's writes stall.
const STALLED_BODY: u64 = 64 * 1024 * 1024;

/// An HTTP/1.1 client connection with a small receive buffer, so that a
/// response it does not read stalls the sidecar's writes soon.
async fn small_window_client(
    addr: std::net::SocketAddr,
) -> hyper::client::conn::http1::SendRequest<http_body_util::Empty<Bytes>> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

/// Reads `body` to its end or its error; the data bytes and whether it
/// ended cleanly. Pauses `pause` (without reading) each time another
/// `pause_every` bytes have come.
async fn drain(
    mut body: hyper::body::Incoming,
    pause_every: u64,
    pause: std::time::Duration,
) -> (u64, Result<(), String>) {
    let mut read = 0u64;
    let mut next_pause = pause_every;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => read += frame.data_ref().map_or(0, |d| d.len() as u64),
            Err(error) => return (read, Err(error.to_string())),
        }
        if read >= next_pause {
            next_pause += pause_every;
            tokio::time::sleep(pause).await;
        }
    }
    (read, Ok(()))
}

fn download(bytes: u64) -> Request<http_body_util::Empty<Bytes>> {
    Request::get(format!("/download?bytes={bytes}"))
        .header("host", "files")
        .body(http_body_util::Empty::new())
        .unwrap()
}

/// A client that asks for a large response and stops reading it must not
/// hold the sidecar's connection (and the app's) for ever: after
/// `--stream-idle-timeout` without taking a byte it is disconnected. One
/// that reads with pauses shorter than the limit gets every byte, however
/// long the pauses add up to. Both proxy listeners.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_after_the_stream_idle_timeout() {
    let app = Upstream::start("files").await;
    let config = format!(
        "apiVersion: meshlet.dev/v1alpha1\nkind: Service\nmetadata: {{name: files}}\nspec:\n  endpoints:\n    - address: {}\n",
        app.addr
    );
    let limit = std::time::Duration::from_millis(1500);
    let sidecar = SidecarProcess::builder("files", app.port())
        .config(&config)
        .arg("--stream-idle-timeout")
        .arg("1500ms")
        .start()
        .await;
    for (listener, addr) in [("inbound", sidecar.inbound), ("outbound", sidecar.outbound)] {
        // Stops reading once the head is in, for three times the limit (the
        // sidecar cuts it between one and two limits after the client's
        // kernel acknowledged its last byte).
        let mut sender = small_window_client(addr).await;
        let response = sender.send_request(download(STALLED_BODY)).await.unwrap();
        assert_eq!(response.status(), 200, "{listener}");
        tokio::time::sleep(3 * limit).await;
        let (read, ended) = drain(response.into_body(), u64::MAX, limit).await;
        assert!(
            ended.is_err() && read < STALLED_BODY,
            "{listener}: a client that stopped reading for {:?} was not cut off \
             ({read} of {STALLED_BODY} bytes came, {ended:?})",
            3 * limit
        );

        // Pauses of 0.4 × the limit, 1.6 × the limit in all: every byte.
        let mut sender = small_window_client(addr).await;
        let response = sender.send_request(download(STALLED_BODY)).await.unwrap();
        let (read, ended) = drain(response.into_body(), STALLED_BODY / 4, limit * 2 / 5).await;
        assert_eq!(
            (read, ended),
            (STALLED_BODY, Ok(())),
            "{listener}: a client reading with short pauses was cut off"
        );
    }
    assert!(app.requests() >= 4);
}

/// A client that reads slowly but steadily — far slower than the socket
/// would tell the sidecar it can write again (Linux wakes a writer only
/// once a third of its send buffer has drained) — is reading: it is never
/// cut off, whatever the limit (found by an attack on the first version,
/// which cut a 20 KB/s reader after 1 s). It reads 8 KiB every 100 ms for
/// three times the limit, then the rest at full speed: the whole body.
#[tokio::test]
async fn a_client_reading_slowly_but_steadily_is_never_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = Upstream::start("files").await;
    let sidecar = SidecarProcess::builder("files", app.port())
        .arg("--stream-idle-timeout")
        .arg("1500ms")
        .start()
        .await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut stream = socket.connect(sidecar.inbound).await.unwrap();
    stream
        .write_all(
            format!("GET /download?bytes={STALLED_BODY} HTTP/1.1\r\nHost: files\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut piece = vec![0u8; 8 * 1024];
    let mut read = 0u64;
    let slow_until = tokio::time::Instant::now() + std::time::Duration::from_millis(4500);
    while tokio::time::Instant::now() < slow_until {
        let n = stream.read(&mut piece).await.unwrap();
        assert!(n > 0, "cut off while reading steadily, after {read} bytes");
        read += n as u64;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The rest at full speed, up to the chunked body's last chunk.
    let mut buf = vec![0u8; 256 * 1024];
    let mut tail: Vec<u8> = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .expect("the rest of the body in time")
            .unwrap();
        assert!(
            n > 0,
            "the connection was closed after {read} bytes: the slow reader was cut off"
        );
        read += n as u64;
        tail.extend_from_slice(&buf[..n]);
        if tail.ends_with(b"\r\n0\r\n\r\n") {
            break;
        }
        let keep = tail.len().saturating_sub(8);
        tail.drain(..keep);
    }
    assert!(
        read > STALLED_BODY,
        "{read} bytes: the whole body and its framing"
    );
}
